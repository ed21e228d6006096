"""One worker process of ``hub serve --workers N``: a :class:`hub.app.Hub` on an inherited socket.

Started by the supervisor as ``python -m workers.worker --slot I --listen-fd F --status-fd S``:

- the listening socket (``F``) is created by the supervisor, bound with ``SO_REUSEPORT`` to the
  shared port; the kernel spreads new connections over the workers' sockets;
- the settings arrive as one JSON line on stdin, never in argv (``ps`` would show the secrets);
  stdin then stays open as a lifeline: EOF means the supervisor is gone, and the worker drains
  and exits instead of serving on as an orphan nobody supervises;
- the worker reports on ``S``, one JSON object per line: ``{"event": "listening", "port": P,
  "connections": C}`` once it accepts connections (C: how many its open-file limit leaves room
  for), ``{"event": "ready"}`` once its node is ready (broker connected);
- SIGTERM (or SIGINT) drains: see :meth:`hub.app.Hub.drain`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from hub.config import Namespace, Settings

__all__ = ["WORKER_HEADER", "decode_settings", "encode_settings", "main"]

log = logging.getLogger("hub.worker")

#: Response header naming the worker process (its pid) that answered: on every HTTP answer and
#: on the WebSocket handshake, so an operator (or a test) can tell the workers apart.
WORKER_HEADER = "X-Hub-Worker"


def encode_settings(settings: Settings) -> bytes:
    """Settings as one JSON line (the supervisor has validated them; workers do not reload)."""
    return json.dumps(dataclasses.asdict(settings), separators=(",", ":")).encode() + b"\n"


def decode_settings(line: bytes) -> Settings:
    values: dict[str, Any] = json.loads(line)
    namespaces = values.pop("namespaces", {})
    return Settings(**values, namespaces={k: Namespace(**v) for k, v in namespaces.items()})


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop's loop when it is installed (``pip install hub[uvloop]``), else asyncio's."""
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


class Status:
    """The write end of the status pipe to the supervisor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}).encode() + b"\n"
        with contextlib.suppress(OSError):  # the supervisor is gone: stdin EOF handles that
            os.write(self.fd, line)


async def serve(settings: Settings, sock: socket.socket, status: Status) -> int:
    from hub.app import Hub
    from hub.fdlimit import plan, quiet_accept_errors, raise_limit
    from hub.runtime import tune_gc

    loop = asyncio.get_running_loop()
    stop: asyncio.Future[str] = loop.create_future()

    def request_stop(reason: str) -> None:
        if not stop.done():
            stop.set_result(reason)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, signal.Signals(sig).name)

    def on_stdin() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            request_stop("supervisor gone")

    loop.add_reader(0, on_stdin)
    quiet_accept_errors(loop)
    hub = Hub(settings)
    before, _ = raise_limit()  # inherited raised from the supervisor; unless started alone
    capacity = plan(before)
    await hub.start(capacity, sock=sock, extra_headers={WORKER_HEADER: str(os.getpid())})
    tune_gc()
    log.info("%s", capacity.describe())
    status.send("listening", port=hub.port, connections=capacity.connections)

    async def report_ready() -> None:
        while not hub.node.ready:
            await asyncio.sleep(0.05)
        status.send("ready")

    reporter = loop.create_task(report_ready())
    reason = await stop
    reporter.cancel()
    log.info("draining (%s) over up to %gs", reason, settings.drain_seconds)
    await hub.drain()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workers.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--status-fd", type=int, required=True)
    args = parser.parse_args(argv)
    # The supervisor owns SIGHUP (rolling restart); a stray one must not kill a worker.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = decode_settings(sys.stdin.buffer.readline())
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s [worker {args.slot} pid {os.getpid()}]: "
        "%(message)s",
    )
    factory, loop_name = loop_factory()
    log.debug("event loop: %s", loop_name)
    sock = socket.socket(fileno=args.listen_fd)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve(settings, sock, Status(args.status_fd)))


if __name__ == "__main__":
    sys.exit(main())
