"""Open-file limits: how many connections one process can hold, and what it keeps in reserve.

Every connection is a file descriptor, and the soft ``RLIMIT_NOFILE`` many systems start a
process with (1,024) is far below what a hub holds; the hard limit is what the administrator
allows, so the hub raises the soft limit to it at start.

A process that runs out of descriptors cannot even refuse a client: ``accept()`` fails with
EMFILE, the connection waits in the kernel's queue, and asyncio logs the failure on every
retry. So the hub never lets its sockets take every descriptor. It keeps a reserve for what else
needs one (the Redis links, files, a burst of accepts that arrive before any of them is counted)
and refuses connections beyond ``limit - in use - reserve`` with a 503 (``hub.ws.Server.
socket_limit``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["Capacity", "plan", "quiet_accept_errors", "raise_limit"]

log = logging.getLogger("hub")

#: Most connections accepted in one go (the listen backlog, which is also asyncio's accept
#: burst: that many sockets may be accepted before the first is counted).
MAX_BACKLOG = 512
#: Accept bursts whose descriptors may be open at once: a socket refused by a reset gives its
#: descriptor back a loop turn or two later, while the next bursts are accepted.
BURSTS = 3
#: Descriptors kept for everything that is not a client socket: Redis links, files, and the
#: connections past the limit that are waiting for their 503.
SPARE = 64
#: Seconds between two log lines about accept() failing for want of descriptors.
ACCEPT_ERROR_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class Capacity:
    """What a process can hold: ``connections`` sockets, out of ``limit`` descriptors."""

    limit: int  # the soft RLIMIT_NOFILE, once raised
    raised_from: int  # the soft limit the process started with
    in_use: int  # descriptors open when the plan was made (interpreter, listening socket...)
    backlog: int  # listen backlog and accept burst
    connections: int  # client sockets (WebSocket or HTTP) the process accepts at most

    @property
    def reserve(self) -> int:
        return self.limit - self.in_use - self.connections

    def describe(self) -> str:
        raised = "" if self.raised_from == self.limit else f", raised from {self.raised_from}"
        return (
            f"open files: limit {self.limit}{raised}, {self.in_use} in use, {self.reserve} "
            f"kept in reserve: room for {self.connections} connections"
        )


def raise_limit() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard one; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # An unlimited hard limit is capped by the kernel's per-process maximum.
        target = _nr_open()
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("cannot raise the open-file limit from %d to %d", soft, target)
            return soft, soft
        return soft, target
    return soft, soft


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def open_descriptors() -> int:
    """Descriptors this process has open now (0 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # listdir's own descriptor is gone again
    except OSError:
        return 0


def plan(before: int | None = None) -> Capacity:
    """The capacity of this process under its current limit (call after :func:`raise_limit`).

    The backlog is a tenth of the free descriptors, at least 16 and at most ``MAX_BACKLOG``;
    the reserve is ``BURSTS`` backlogs plus ``SPARE``; the rest is for connections.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = _nr_open() if soft == resource.RLIM_INFINITY else int(soft)
    in_use = open_descriptors()
    free = max(0, limit - in_use)
    backlog = max(16, min(MAX_BACKLOG, free // 10))
    connections = max(0, free - BURSTS * backlog - SPARE)
    return Capacity(limit, limit if before is None else before, in_use, backlog, connections)


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's "accept() out of system resource" once a minute, not on every retry.

    With the reserve it should not happen; when something else takes the descriptors (a leak,
    a lower limit than planned), asyncio retries the accept every second and would log a
    traceback each time.
    """
    previous = loop.get_exception_handler()
    last = [float("-inf"), 0]  # time of the last line, failures since

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            if previous is None:
                loop.default_exception_handler(context)
            else:
                previous(loop, context)
            return
        last[1] += 1
        now = time.monotonic()
        if now - last[0] >= ACCEPT_ERROR_EVERY:
            log.warning(
                "cannot accept connections: %s (%d times since the last report)",
                context.get("exception"),
                last[1],
            )
            last[0], last[1] = now, 0

    loop.set_exception_handler(handler)
