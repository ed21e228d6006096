"""The node wires sessions, the local registry, the broker, presence and the fan-out, and is the
hub's server-side API: :meth:`Node.publish`, :meth:`Node.send_to_user`, :meth:`Node.broadcast`,
:meth:`Node.disconnect`, :meth:`Node.history`.

What arrives from the broker is handed to ``hub.fanout`` (encoding, the end-of-turn queue, the
outbound budget, history joins); who is in which channel (presence, join/leave notices) is
``hub.membership``'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .broker import Broker, MemoryBroker, Publication
from .codec import check_data
from .config import Namespace, Settings
from .errors import HubUnavailable
from .fanout import CHANNEL, EVERYONE, USER, Fanout
from .history import HistoryPage
from .inbox import Inbox
from .membership import Membership
from .metrics import Metrics, PublishSource
from .notify import Notifications
from .presence import MemoryPresence, Presence
from .registry import Registry
from .rules import DISCONNECT_CODE
from .runtime import MemoryReturn

if TYPE_CHECKING:
    from .admin import Admin
    from .proxy import ProxyClient
    from .session import Session
    from .tokens import TokenVerifier

__all__ = ["Node"]


class Node:
    def __init__(
        self,
        settings: Settings | None = None,
        broker: Broker | None = None,
        metrics: Metrics | None = None,
        presence: Presence | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        self.settings = settings or Settings(insecure=True)
        self.broker = broker or MemoryBroker()
        self.presence = presence or MemoryPresence()
        self.metrics = metrics or Metrics()
        self.registry: Registry[Session] = Registry()
        self.metrics.track(
            lambda: len(self.registry),
            lambda: self.registry.subscription_count,
            lambda: self.registry.channel_count,
        )
        self._started = False
        self.memory = MemoryReturn()  # gives memory back after a mass disconnect
        self.fanout = Fanout(self.registry, self.settings, self.metrics)
        self.membership = Membership(self.settings, self.broker, self.presence)
        #: The admin page's view (``admin = true``), which takes the admin control messages.
        self.admin: Admin | None = None
        #: Per-user inboxes (hub.notify): notify, the inbox/ack/read commands, the fallback.
        self.inbox = Notifications(self, inbox)
        # The inbox store checks the signatures of what it reads back (hub_bridge_bad_signatures).
        self.metrics.track_counters(self.broker, self.presence, self.inbox.store)
        #: The backend's proxies (hub.proxy) and the token verifier, set by the Hub.
        self.proxy: ProxyClient | None = None
        self.verifier: TokenVerifier | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self)
        await self.presence.start()
        self.inbox.start()
        self._started = True

    async def close(self) -> None:
        self._started = False
        self.memory.cancel()
        await self.membership.close()
        await self.presence.close()
        await self.inbox.close()
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self._started and self.broker.ready

    # -- server-side API -----------------------------------------------------------------------

    async def publish(
        self, channel: str, data: Any, *, source: PublishSource = "api", **meta: Any
    ) -> tuple[int, str] | None:
        """Publish to a channel; on a channel with history, its ``(offset, epoch)``."""
        check_data(data)
        self.metrics.published.labels(source).inc()
        ns = self.settings.namespace(channel)
        if ns.history_size:
            return await self.broker.publish(
                channel, data, history_size=ns.history_size, history_ttl=ns.history_ttl, **meta
            )
        await self.broker.publish(channel, data, **meta)
        return None

    async def history(
        self,
        channel: str,
        ns: Namespace,
        *,
        since: int | None,
        limit: int | None,
        subscribing: bool = False,
    ) -> HistoryPage:
        """The stored publications of a channel whose namespace keeps history (see
        ``Broker.history`` for ``subscribing``)."""
        if not subscribing:
            self.metrics.history_reads.inc()
        return await self.broker.history(
            channel,
            since=since,
            limit=limit,
            history_size=ns.history_size,
            history_ttl=ns.history_ttl,
            subscribing=subscribing,
        )

    async def send_to_user(self, user: str, data: Any) -> None:
        check_data(data)
        await self.broker.send_to_user(user, data)

    async def broadcast(self, data: Any) -> None:
        check_data(data)
        await self.broker.broadcast(data)

    async def disconnect(self, user: str, code: int = DISCONNECT_CODE, reason: str = "") -> None:
        await self.broker.disconnect(user, code, reason)

    # -- sessions ------------------------------------------------------------------------------

    async def add_session(self, session: Session) -> None:
        self.metrics.connections_accepted.inc()
        first = self.registry.add(session, session.user)
        self.memory.seen(len(self.registry))
        if first:
            await self.broker.subscribe_user(session.user)

    async def remove_session(self, session: Session) -> None:
        channels = list(self.registry.channels_of(session))
        self.inbox.forget(session)
        self.fanout.untrack_all(session, channels)
        self.fanout.forget(session)
        last_user, emptied = self.registry.remove(session, session.user)
        self.memory.seen(len(self.registry))
        self.metrics.connections_closed.labels(str(session.connection.closing_code)).inc()
        if emptied:
            await self.broker.unsubscribe(emptied)
        if last_user:
            await self.broker.unsubscribe_user(session.user)
        removals = [self.membership.left(session, channel) for channel in channels]
        removals = [r for r in removals if r is not None]
        if removals:  # concurrently, so they share round trips to Redis
            await asyncio.gather(*removals)

    async def subscribe(self, session: Session, channel: str) -> None:
        if self.registry.subscribe(session, channel):
            await self.broker.subscribe([channel])
        await self.membership.joined(session, channel)

    async def unsubscribe(self, session: Session, channel: str) -> bool:
        if not self.registry.is_subscribed(session, channel):
            return False
        self.fanout.untrack(channel, session)
        if self.registry.unsubscribe(session, channel):
            await self.broker.unsubscribe([channel])
        removal = self.membership.left(session, channel)
        if removal is not None:
            await removal
        return True

    async def subscribe_history(
        self, session: Session, channel: str, ns: Namespace, since: tuple[int, str] | None
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Subscribe to a channel with history, recovering what came after ``since``.

        Returns the reply's result and a function to call right after the reply is written: it
        writes the recovered publications and the live ones held back meanwhile, and switches
        the session to live delivery, with no await in between (``hub.fanout.Tracker``).
        """
        tracker = self.fanout.track(channel, session)
        try:
            await self.subscribe(session, channel)  # live at the broker from here on
            if not self.broker.ready_for(channel):
                # A broker that is down subscribes later (and reports a gap then): not live yet,
                # so recovering now could leave a hole. The client retries.
                raise HubUnavailable("broker unavailable")
            page = await self.history(
                channel,
                ns,
                since=None if since is None else since[0],
                limit=None if since else 0,
                subscribing=True,
            )
        except BaseException:
            self.fanout.untrack(channel, session)
            await self.unsubscribe(session, channel)
            raise
        result: dict[str, Any]
        recovered: list[dict[str, Any]] = []
        if since is None:
            result = {"offset": page.offset, "epoch": page.epoch}
        else:
            ok = page.covers(*since)
            result = {"recovered": ok, "offset": page.offset, "epoch": page.epoch}
            self.metrics.history_recoveries.labels("recovered" if ok else "lost").inc()
            if ok:
                recovered = page.entries
                self.metrics.history_recovered.inc(len(recovered))

        def go_live() -> None:
            self.fanout.go_live(channel, session, tracker, recovered, page.epoch, page.offset)

        return result, go_live

    # -- broker callbacks: what arrives goes to the fan-out --------------------------------------

    def on_publication(self, publication: Publication) -> None:
        obj = {"channel": publication.channel, "data": publication.data}
        if publication.meta:
            obj.update(publication.meta)
        self.fanout.enqueue(CHANNEL, publication.channel, obj)

    def on_user_message(self, user: str, data: Any) -> None:
        self.fanout.enqueue(USER, user, {"data": data})

    def on_inbox(self, user: str, mark: dict[str, Any], data: Any) -> None:
        self.inbox.on_push(user, mark, data)

    def on_user_gap(self, users: list[str]) -> None:
        self.inbox.on_gap(users)

    def on_broadcast(self, data: Any) -> None:
        self.fanout.enqueue(EVERYONE, "", {"data": data})

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        for session in list(self.registry.user_sessions(user)):
            session.close_soon(code, reason)

    def on_join_leave(
        self, channel: str, join: list[dict[str, Any]], leave: list[dict[str, Any]]
    ) -> None:
        if not self.registry.has_channel(channel):
            return
        # Joins first: a user reconnecting (new connection in, old one out in the same batch)
        # never looks gone for a moment.
        if join:
            self.fanout.enqueue(CHANNEL, channel, {"channel": channel, "join": join})
        if leave:
            self.fanout.enqueue(CHANNEL, channel, {"channel": channel, "leave": leave})

    def on_admin(self, message: dict[str, Any]) -> bool:
        """An admin control message; False if malformed. Ignored with the admin page off."""
        return True if self.admin is None else self.admin.on_message(message)

    def on_gap(self, channels: Iterable[str]) -> None:
        """Messages may have been lost on these channels: tell their subscribers at once."""
        for channel in channels:
            if self.registry.has_channel(channel):
                self.fanout.enqueue(CHANNEL, channel, {"channel": channel, "gap": True})
