"""Keepalive for every connection of a process: one timer, one ping frame, deadlines in bulk.

A timer per connection (a heap entry rescheduled after every pong), a fresh ping payload and a
future per ping, and a second timer for the pong's deadline cost an idle hub more than
anything else does: at 100,000 connections and a ping every 25 s, 4,000 connections a second
each went through all of that. Here the connections sharing (ping_interval, ping_timeout) on an
server share one :class:`Keepalive` (a hub process has one server: one timer for all):

- they sit in ``slices`` buckets, one per tick of ``ping_interval / slices`` (about a second);
  each tick pings one bucket, so every connection is pinged once per ``ping_interval`` (its
  first ping comes one interval after it opened, less at most one tick while the loop keeps up
  with its timers, two when it runs them late);
- every ping is the same pre-encoded frame (servers do not mask, so the bytes never change) with
  the payload :data:`PAYLOAD`, which the connection's own ``ping()`` never uses while a
  keepalive ping waits;
- a connection notes when its ping left (one float) and clears it when the pong comes; one
  timer per tick, ``ping_timeout`` later, fails (1011) the connections of that bucket still
  waiting. A connection whose pong is late is not pinged again until it answers or times out.

The timer runs only while connections are registered.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .frames import Opcode, encode_frame

if TYPE_CHECKING:
    from .connection import ServerConnection

__all__ = ["FRAME", "PAYLOAD", "Keepalive", "KeepaliveKey"]

#: The payload of every keepalive ping.
PAYLOAD = b"\x00hka"
#: The keepalive ping as it goes on the wire.
FRAME = encode_frame(Opcode.PING, PAYLOAD)
#: Seconds between two ticks at most, for long intervals; short ones get MIN_SLICES ticks.
TICK = 1.0
MIN_SLICES = 8
MAX_SLICES = 600

KeepaliveKey = tuple[float, float | None]
_Key = KeepaliveKey


class Keepalive:
    """The keepalive of the connections of one event loop with one (interval, timeout)."""

    __slots__ = ("buckets", "handle", "index", "interval", "loop", "next_at", "tick", "timeout")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval: float, timeout: float | None
    ) -> None:
        self.loop = loop
        self.interval = interval
        self.timeout = timeout
        slices = min(MAX_SLICES, max(MIN_SLICES, round(interval / TICK)))
        self.tick = interval / slices
        self.buckets: list[set[ServerConnection]] = [set() for _ in range(slices)]
        self.index = 0  # the bucket the next tick pings
        self.next_at = 0.0
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(
        cls,
        table: dict[_Key, Keepalive],
        loop: asyncio.AbstractEventLoop,
        interval: float,
        timeout: float | None,
    ) -> Keepalive:
        """The keepalive in ``table`` (a server's) for these settings, made on first use."""
        keepalive = table.get((interval, timeout))
        if keepalive is None:
            keepalive = table[(interval, timeout)] = cls(loop, interval, timeout)
        return keepalive

    def add(self, connection: ServerConnection) -> set[ServerConnection]:
        """Register ``connection``; returns its bucket (to leave with ``bucket.discard``).

        It joins the bucket pinged last: the next turn of that bucket is one interval after
        it was pinged, so at most one tick less than an interval from now."""
        if self.handle is None:
            self.next_at = self.loop.time() + self.tick
            self.index = 1 % len(self.buckets)
            self.handle = self.loop.call_at(self.next_at, self._tick)
        bucket = self.buckets[self.index - 1]
        bucket.add(connection)
        return bucket

    def _tick(self) -> None:
        buckets = self.buckets
        if not any(buckets):
            self.handle = None  # nobody left: the next add() starts over
            return
        now = self.loop.time()
        index = self.index
        bucket = buckets[index]
        if bucket:
            for connection in bucket:
                connection._keepalive_ping(now)
            if self.timeout is not None:
                self.loop.call_at(now + self.timeout, self._expire, bucket, now)
        self.index = (index + 1) % len(buckets)
        # On the grid of ticks (no drift); a loop that fell behind skips the missed ticks.
        self.next_at += self.tick
        if self.next_at <= now:
            self.next_at = now + self.tick
        self.handle = self.loop.call_at(self.next_at, self._tick)

    def _expire(self, bucket: set[ServerConnection], pinged_at: float) -> None:
        """Fail the connections of ``bucket`` whose ping of ``pinged_at`` (or before) is still
        unanswered."""
        late = [c for c in bucket if 0.0 < c._ka_sent <= pinged_at]
        for connection in late:
            connection._keepalive_timed_out()
