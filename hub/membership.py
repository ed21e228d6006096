"""Who is in which channel: presence entries and batched join/leave notices.

For namespaces with ``presence = true`` a subscriber's entry (user, client id, token ``info``)
is added to the presence store (``hub.presence``) on subscribe and removed on unsubscribe or
disconnect. For namespaces with ``join_leave = true`` the same entries are announced to the
channel's subscribers, but not one by one: a mass reconnect (a deploy, a network blip) would
make N subscribers x N joins pushes. Each process collects them per channel and flushes at most
once per ``join_leave_interval``, one message per channel (lists of entries) through the broker
to every process. A join and a leave of the same client within one interval cancel out: nobody
saw it come, nobody needs to see it go.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import HubUnavailable

if TYPE_CHECKING:
    from .broker import Broker
    from .config import Settings
    from .presence import Presence

__all__ = ["JOIN_LEAVE_CHUNK", "Member", "Membership"]

log = logging.getLogger("hub.membership")

#: Most entries in one join/leave message; a bigger batch is split (a mass reconnect into one
#: channel must not make one enormous push).
JOIN_LEAVE_CHUNK = 500


class Member(Protocol):
    """A subscriber as presence and join/leave see it."""

    @property
    def client_id(self) -> str: ...

    def presence_entry(self, channel: str | None = None) -> dict[str, Any]: ...


class Membership:
    """Presence bookkeeping and join/leave batching for one node."""

    def __init__(self, settings: Settings, broker: Broker, presence: Presence) -> None:
        self.settings = settings
        self.broker = broker
        self.presence = presence
        # Join/leave notices waiting for the next flush: per channel, (joins, leaves) by client.
        self._pending: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._sends: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Flush the last notices (the last leaves still go out) and wait for them."""
        if self._timer is not None:
            self._timer.cancel()
            self._flush()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)

    async def joined(self, member: Member, channel: str) -> None:
        """``member`` subscribed to ``channel``."""
        ns = self.settings.namespace(channel)
        if ns.presence or ns.join_leave:
            entry = member.presence_entry(channel)
            if ns.presence:
                await self.presence.add(channel, member.client_id, entry)
            if ns.join_leave:
                self._note(channel, entry, joined=True)

    def left(self, member: Member, channel: str) -> Awaitable[None] | None:
        """Note the leave; the presence removal to await, if the namespace keeps presence."""
        ns = self.settings.namespace(channel)
        if ns.join_leave:
            self._note(channel, member.presence_entry(channel), joined=False)
        if ns.presence:
            return self.presence.remove(channel, member.client_id)
        return None

    def _note(self, channel: str, entry: dict[str, Any], *, joined: bool) -> None:
        pending = self._pending.get(channel)
        if pending is None:
            pending = self._pending[channel] = ({}, {})
        same, other = pending if joined else pending[::-1]
        client = entry["client"]
        if other.pop(client, None) is None:
            same[client] = entry
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.settings.join_leave_interval, self._flush)

    def _flush(self) -> None:
        self._timer = None
        pending, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for channel, (joins, leaves) in pending.items():
            join, leave = list(joins.values()), list(leaves.values())
            for start in range(0, len(join) + len(leave), JOIN_LEAVE_CHUNK):
                end = start + JOIN_LEAVE_CHUNK
                part_join = join[start:end]
                part_leave = leave[max(0, start - len(join)) : max(0, end - len(join))]
                task = loop.create_task(self._send(channel, part_join, part_leave))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    async def _send(
        self, channel: str, join: list[dict[str, Any]], leave: list[dict[str, Any]]
    ) -> None:
        try:
            await self.broker.join_leave(channel, join, leave)
        except HubUnavailable as exc:  # best effort: presence itself stays right
            log.info("join/leave on %r not sent: %s", channel, exc)
