"""The node wires sessions, the local registry and the broker, and does the fan-out.

Server-side API: :meth:`Node.publish`, :meth:`Node.send_to_user`, :meth:`Node.broadcast`,
:meth:`Node.disconnect`. Every message arriving from the broker is encoded once per client
encoding and once per wire format, and the same bytes are written to every local recipient.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .broker import Broker, MemoryBroker, Publication
from .codec import CODECS, JSON, MSGPACK
from .config import Namespace, Settings
from .errors import CloseCode, HubUnavailable
from .history import HistoryPage
from .metrics import Metrics
from .recovery import Tracker
from .registry import Registry
from .ws.broadcast import encode_once
from .ws.frames import Opcode

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Node", "Push"]

log = logging.getLogger("hub.node")


class Push:
    """One push to many sessions: encoded lazily, at most once per codec and wire format."""

    __slots__ = ("_frames", "obj")

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self._frames: list[encode_once | None] = [None] * len(CODECS)

    def frame_for(self, session: Session) -> bytes:
        codec = session.codec
        frames = self._frames[codec.index]
        if frames is None:
            frames = self._frames[codec.index] = self._encode(codec.index)
        return frames.for_connection(session.connection)

    def _encode(self, index: int) -> encode_once:
        """Never raises: a fan-out is all or nothing, so encoding cannot fail halfway through."""
        if not CODECS[index].binary:
            text = JSON.encode_or_none(self.obj)
            if text is not None:
                return encode_once(Opcode.TEXT, text.encode())
            # JSON cannot carry it (bytes, NaN, non-string keys...): msgpack in a binary frame.
        return encode_once(Opcode.BINARY, MSGPACK.encode(self.obj))


class PushRun:
    """Consecutive pushes for the same recipients, joined once per encoding and wire format, so
    each recipient gets them in one write."""

    __slots__ = ("_joined", "pushes")

    def __init__(self, pushes: list[Push]) -> None:
        self.pushes = pushes
        self._joined: dict[tuple[int, tuple[int, int, int] | None], bytes] = {}

    def frame_for(self, session: Session) -> bytes:
        pushes = self.pushes
        if len(pushes) == 1:
            return pushes[0].frame_for(session)
        deflate = session.connection.protocol.deflate
        wire = None if deflate is None else deflate.wire_key
        if deflate is not None and wire is None:  # compression context of its own: not shareable
            return b"".join(p.frame_for(session) for p in pushes)
        key = (session.codec.index, wire)
        joined = self._joined.get(key)
        if joined is None:
            joined = self._joined[key] = b"".join(p.frame_for(session) for p in pushes)
        return joined


# What a queued push goes to: a channel's subscribers, a user's connections, or everyone.
CHANNEL, USER, EVERYONE = 0, 1, 2


def _closing_code(session: Session) -> int:
    """The close code of whichever side closed first (1006 when neither sent one)."""
    protocol = session.connection.protocol
    rcvd, sent = protocol.close_rcvd, protocol.close_sent
    if rcvd is not None and (sent is None or protocol.close_rcvd_then_sent):
        return rcvd.code
    if sent is not None:
        return sent.code
    return 1006


class Node:
    def __init__(
        self,
        settings: Settings | None = None,
        broker: Broker | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or Settings(insecure=True)
        self.broker = broker or MemoryBroker()
        self.metrics = metrics or Metrics()
        self.registry: Registry[Session] = Registry()
        self.metrics.track_broker(self.broker)
        self.metrics.track(
            lambda: len(self.registry),
            lambda: self.registry.subscription_count,
            lambda: self.registry.channel_count,
        )
        self._started = False
        self._queue: list[tuple[int, str, dict[str, Any]]] = []
        self._flush_scheduled = False
        # Sessions joining a history channel, by channel (see hub.recovery).
        self._tracked: dict[str, dict[Session, Tracker]] = {}
        self._delivered = (
            self.metrics.delivered_channel,
            self.metrics.delivered_user,
            self.metrics.delivered_broadcast,
        )

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self)
        self._started = True

    async def close(self) -> None:
        self._started = False
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self._started and self.broker.ready

    # -- server-side API -----------------------------------------------------------------------

    async def publish(
        self, channel: str, data: Any, *, source: str = "api", **meta: Any
    ) -> tuple[int, str] | None:
        """Publish to a channel; on a channel with history, its ``(offset, epoch)``."""
        self.metrics.published.labels(source).inc()
        ns = self.settings.namespace(channel)
        if ns.history_size:
            return await self.broker.publish(
                channel, data, history_size=ns.history_size, history_ttl=ns.history_ttl, **meta
            )
        await self.broker.publish(channel, data, **meta)
        return None

    async def history(
        self, channel: str, ns: Namespace, *, since: int | None, limit: int | None
    ) -> HistoryPage:
        """The stored publications of a channel whose namespace keeps history."""
        return await self.broker.history(
            channel,
            since=since,
            limit=limit,
            history_size=ns.history_size,
            history_ttl=ns.history_ttl,
        )

    async def send_to_user(self, user: str, data: Any) -> None:
        await self.broker.send_to_user(user, data)

    async def broadcast(self, data: Any) -> None:
        await self.broker.broadcast(data)

    async def disconnect(
        self, user: str, code: int = CloseCode.DISCONNECTED, reason: str = ""
    ) -> None:
        await self.broker.disconnect(user, code, reason)

    # -- sessions ------------------------------------------------------------------------------

    async def add_session(self, session: Session) -> None:
        self.metrics.connections_accepted.inc()
        if self.registry.add(session, session.user):
            await self.broker.subscribe_user(session.user)

    async def remove_session(self, session: Session) -> None:
        if self._tracked:
            for channel in self.registry.channels_of(session):
                self._untrack(channel, session)
        last_user, emptied = self.registry.remove(session, session.user)
        self.metrics.connections_closed.labels(str(_closing_code(session))).inc()
        if emptied:
            await self.broker.unsubscribe(emptied)
        if last_user:
            await self.broker.unsubscribe_user(session.user)

    async def subscribe(self, session: Session, channel: str) -> None:
        if self.registry.subscribe(session, channel):
            await self.broker.subscribe([channel])

    async def unsubscribe(self, session: Session, channel: str) -> bool:
        if not self.registry.is_subscribed(session, channel):
            return False
        if self._tracked:
            self._untrack(channel, session)
        if self.registry.unsubscribe(session, channel):
            await self.broker.unsubscribe([channel])
        return True

    async def subscribe_history(
        self, session: Session, channel: str, ns: Namespace, since: tuple[int, str] | None
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """Subscribe to a channel with history, recovering what came after ``since``.

        Returns the reply's result and a function to call right after the reply is written: it
        writes the recovered publications and the live ones held back meanwhile, and switches
        the session to live delivery, with no await in between (hub.recovery).
        """
        tracker = Tracker()
        self._tracked.setdefault(channel, {})[session] = tracker
        try:
            await self.subscribe(session, channel)  # live at the broker from here on
            if not self.broker.ready:
                # A broker that is down subscribes later (and reports a gap then): not live yet,
                # so recovering now could leave a hole. The client retries.
                raise HubUnavailable("broker unavailable")
            page = await self.history(
                channel, ns, since=None if since is None else since[0], limit=None if since else 0
            )
        except BaseException:
            self._untrack(channel, session)
            await self.unsubscribe(session, channel)
            raise
        result: dict[str, Any]
        recovered: list[dict[str, Any]] = []
        if since is None:
            result = {"offset": page.offset, "epoch": page.epoch}
        else:
            ok = page.covers(*since)
            result = {"recovered": ok, "offset": page.offset, "epoch": page.epoch}
            if ok:
                recovered = page.entries

        def go_live() -> None:
            if self._tracked.get(channel, {}).get(session) is not tracker:
                return  # unsubscribed or gone meanwhile
            pushes = [Push({"channel": channel, **entry}) for entry in recovered]
            pushes.extend(tracker.go_live(page.epoch, page.offset))
            sent = sum(session.push(push) for push in pushes)
            if sent:
                self.metrics.bytes_sent.inc(sent)
                self.metrics.delivered_channel.inc(len(pushes))
            if tracker.done:
                self._untrack(channel, session)

        return result, go_live

    def _untrack(self, channel: str, session: Session) -> None:
        tracked = self._tracked.get(channel)
        if tracked is not None:
            tracked.pop(session, None)
            if not tracked:
                del self._tracked[channel]

    # -- broker callbacks (fan-out) ------------------------------------------------------------
    #
    # Pushes are queued and fanned out at the end of the event-loop turn: when several arrive
    # together (a burst read from Redis), consecutive ones for the same recipients are joined and
    # each recipient gets them in one write. Arrival order is kept across all kinds.

    def _enqueue(self, kind: int, key: str, obj: dict[str, Any]) -> None:
        self._queue.append((kind, key, obj))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        i, end = 0, len(queue)
        while i < end:
            kind, key, _ = queue[i]
            j = i + 1
            while j < end and queue[j][0] == kind and queue[j][1] == key:
                j += 1
            self._fanout(kind, key, [Push(obj) for _, _, obj in queue[i:j]])
            i = j

    def _fanout(self, kind: int, key: str, pushes: list[Push]) -> None:
        registry = self.registry
        tracked = None
        if kind == CHANNEL:
            sessions: Iterable[Session] = registry.subscribers(key)
            if self._tracked:
                tracked = self._tracked.get(key)
        elif kind == USER:
            sessions = registry.user_sessions(key)
        else:
            sessions = registry.sessions
        if not sessions:
            return
        start = time.perf_counter()
        run = PushRun(pushes)
        delivered = 0
        sent = 0
        if tracked is None:
            for session in sessions:
                n = session.push(run)
                if n:
                    delivered += 1
                    sent += n
        else:
            # Some subscribers are joining this history channel: they get what their tracker
            # admits; the others the shared run.
            for session in sessions:
                tracker = tracked.get(session)
                if tracker is None:
                    n = session.push(run)
                else:
                    n = sum(session.push(push) for push in tracker.admit(pushes))
                    if tracker.done:
                        self._untrack(key, session)
                if n:
                    delivered += 1
                    sent += n
        if sent:
            self.metrics.bytes_sent.inc(sent)
        self._delivered[kind].inc(delivered * len(pushes))
        self.metrics.fanout_seconds.observe(time.perf_counter() - start)

    def on_publication(self, publication: Publication) -> None:
        obj = {"channel": publication.channel, "data": publication.data}
        if publication.meta:
            obj.update(publication.meta)
        self._enqueue(CHANNEL, publication.channel, obj)

    def on_user_message(self, user: str, data: Any) -> None:
        self._enqueue(USER, user, {"data": data})

    def on_broadcast(self, data: Any) -> None:
        self._enqueue(EVERYONE, "", {"data": data})

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        for session in list(self.registry.user_sessions(user)):
            session.close_soon(code, reason)

    def on_gap(self, channels: Iterable[str]) -> None:
        """Messages may have been lost on these channels: tell their subscribers at once."""
        for channel in channels:
            if self.registry.has_channel(channel):
                self._enqueue(CHANNEL, channel, {"channel": channel, "gap": True})
