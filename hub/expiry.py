"""When a session's credentials run out: a ``refresh`` notice first, the end only if nothing
came in time.

A connection token (or the connect proxy's ``expire_at``) and each subscription token have a
deadline. ``REFRESH_LEAD`` seconds before it (at most half the time left) the client gets
``{"refresh": {"expire_at"}}`` (with ``channel`` for a subscription token) and may send a fresh
token (``{"op": "refresh", ...}``, hub.refresh); a connection the connect proxy let in is
renewed by asking the proxy again instead. At the deadline a connection still on the old
credentials is closed with 4002, a subscription is ended with an ``unsubscribed`` push.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .backend import NO_INFO
from .errors import CloseCode, HubUnavailable, ProxyDisconnect, ProxyFailed, ProxyRefused

if TYPE_CHECKING:
    from .session import Session

__all__ = ["REFRESH_LEAD", "Expiry"]

log = logging.getLogger("hub.expiry")

#: Seconds before a deadline the refresh notice goes out (or the connect proxy is asked again).
REFRESH_LEAD = 30.0

#: Asks the connect proxy again; the new deadline (None: no longer any).
Renew = Callable[[], Awaitable[float | None]]


class Expiry:
    """The deadlines of one session: ``None`` for the connection, a channel's name for that
    channel's subscription token."""

    __slots__ = ("_tasks", "_timers", "renew", "session")

    def __init__(self, session: Session, renew: Renew | None = None) -> None:
        self.session = session
        self.renew = renew
        # Made on first use: most sessions never have a deadline, and all of them are idle.
        self._timers: dict[str | None, tuple[asyncio.TimerHandle, asyncio.TimerHandle]] | None = (
            None
        )
        self._tasks: set[asyncio.Task[None]] | None = None

    def set(self, key: str | None, expires_at: float | None) -> None:
        """(Re)arm the deadline of ``key``; ``None`` clears it."""
        self.clear(key)
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        left = max(expires_at - time.time(), 0.0)
        lead = min(REFRESH_LEAD, left / 2)
        at = loop.time() + left
        notice = loop.call_at(at - lead, self._notice, key, expires_at)
        end = loop.call_at(at, self._expire, key)
        if self._timers is None:
            self._timers = {}
        self._timers[key] = (notice, end)

    def clear(self, key: str | None) -> None:
        timers = self._timers.pop(key, None) if self._timers else None
        if timers is not None:
            for timer in timers:
                timer.cancel()

    def close(self) -> None:
        """Cancel every deadline and task, and let go of the session: the two refer to each
        other, and a cycle would keep a closed connection until the collector runs."""
        for key in list(self._timers or ()):
            self.clear(key)
        for task in self._tasks or ():
            task.cancel()
        with contextlib.suppress(AttributeError):  # closed before
            del self.session

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notice(self, key: str | None, expires_at: float) -> None:
        if key is None and self.renew is not None:
            self._spawn(self._renew())
            return
        notice: dict[str, object] = {"refresh": {"expire_at": int(expires_at)}}
        if key is not None:
            notice = {"channel": key, **notice}
        self._spawn(self.session._reply(notice))

    def _expire(self, key: str | None) -> None:
        if self._timers:
            self._timers.pop(key, None)
        session = self.session
        if key is None:
            session.close_soon(CloseCode.TOKEN_EXPIRED, "token expired")
            return
        self._spawn(self._end_subscription(key))

    async def _end_subscription(self, channel: str) -> None:
        session = self.session
        try:
            ended = await session.node.unsubscribe(session, channel)
        except HubUnavailable:
            ended = True  # unsubscribed here; the broker catches up when it is back
        session.set_channel_info(channel, NO_INFO)
        if ended:
            await session._reply({"channel": channel, "unsubscribed": {"reason": "token expired"}})

    async def _renew(self) -> None:
        """Ask the connect proxy again; on a refusal close as a refused connect is, on a failure
        leave the deadline to close it (the backend may be back before then)."""
        assert self.renew is not None
        try:
            expires_at = await self.renew()
        except ProxyDisconnect as exc:
            self.session.close_soon(exc.code, exc.reason)
            return
        except ProxyRefused as exc:
            self.session.close_soon(CloseCode.UNAUTHORIZED, exc.message[:100])
            return
        except ProxyFailed as exc:
            log.info("connect proxy refresh of %r failed: %s", self.session, exc.message)
            return
        self.set(None, expires_at)
