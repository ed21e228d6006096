"""The node wires sessions, the local registry and the broker, and does the fan-out.

Server-side API: :meth:`Node.publish`, :meth:`Node.send_to_user`, :meth:`Node.broadcast`,
:meth:`Node.disconnect`. Every message arriving from the broker is encoded once per client
encoding and once per wire format, and the same bytes are written to every local recipient.

The node also keeps presence (``hub.presence``) for namespaces with ``presence = true`` and
sends coalesced join/leave pushes for namespaces with ``join_leave = true``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from .broker import Broker, MemoryBroker, Publication
from .codec import CODECS, MSGPACK, check_data, json_bytes
from .config import Namespace, Settings
from .errors import CloseCode, HubUnavailable
from .history import HistoryPage
from .inbox import Inbox
from .metrics import Metrics, PublishSource
from .notify import Notifications
from .presence import MemoryPresence, Presence
from .recovery import Tracker
from .registry import Registry
from .ws.broadcast import encode_once
from .ws.connection import WriteCoalescer
from .ws.frames import Opcode

if TYPE_CHECKING:
    from .admin import Admin
    from .session import Session

__all__ = ["Node", "Push"]

log = logging.getLogger("hub.node")

#: Most entries in one join/leave message; a bigger batch is split (a mass reconnect into one
#: channel must not make one enormous push).
JOIN_LEAVE_CHUNK = 500


#: The opcodes as plain module constants: reading an enum member off its class costs more than
#: the rest of building a small frame.
TEXT, BINARY = int(Opcode.TEXT), int(Opcode.BINARY)


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
            text = json_bytes(self.obj)
            if text is not None:
                return encode_once(TEXT, text)
            # JSON cannot carry it (bytes, NaN, non-string keys...): msgpack in a binary frame.
        return encode_once(BINARY, MSGPACK.encode(self.obj))


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
        presence: Presence | None = None,
        inbox: Inbox | None = None,
    ) -> None:
        self.settings = settings or Settings(insecure=True)
        self.broker = broker or MemoryBroker()
        self.presence = presence or MemoryPresence()
        self.metrics = metrics or Metrics()
        self.registry: Registry[Session] = Registry()
        self.metrics.track_counters(self.broker)
        self.metrics.track_counters(self.presence)
        self.metrics.track(
            lambda: len(self.registry),
            lambda: self.registry.subscription_count,
            lambda: self.registry.channel_count,
        )
        self._started = False
        self._queue: list[tuple[int, str, dict[str, Any]]] = []
        self._flush_scheduled = False
        # Hot-path counters as plain numbers (by kind: channel, user, broadcast), which the
        # metrics read at scrape time.
        self.delivered = [0, 0, 0]
        self.bytes_sent = 0
        metrics = self.metrics
        children = (metrics.delivered_channel, metrics.delivered_user, metrics.delivered_broadcast)
        for kind, child in enumerate(children):
            metrics.pull(child, lambda kind=kind: self.delivered[kind])
        metrics.pull(metrics.bytes_sent, lambda: self.bytes_sent)
        # Join/leave notices waiting for the next flush: per channel, (joins, leaves) by client.
        self._join_leave: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._join_leave_timer: asyncio.TimerHandle | None = None
        self._join_leave_sends: set[asyncio.Task[None]] = set()
        # Sessions joining a history channel, by channel (see hub.recovery).
        self._tracked: dict[str, dict[Session, Tracker]] = {}
        #: The admin page's view (``admin = true``), which takes the admin control messages.
        self.admin: Admin | None = None
        #: Per-user inboxes (hub.notify): notify, the inbox/ack/read commands, the fallback.
        self.inbox = Notifications(self, inbox)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self)
        await self.presence.start()
        self.inbox.start()
        self._started = True

    async def close(self) -> None:
        self._started = False
        if self._join_leave_timer is not None:  # the last leaves still go out
            self._join_leave_timer.cancel()
            self._flush_join_leave()
        if self._join_leave_sends:
            await asyncio.gather(*self._join_leave_sends, return_exceptions=True)
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
        channels = list(self.registry.channels_of(session))
        self.inbox.forget(session)
        if self._tracked:
            for channel in channels:
                self._untrack(channel, session)
        last_user, emptied = self.registry.remove(session, session.user)
        self.metrics.connections_closed.labels(str(_closing_code(session))).inc()
        if emptied:
            await self.broker.unsubscribe(emptied)
        if last_user:
            await self.broker.unsubscribe_user(session.user)
        removals = [self._left(session, channel) for channel in channels]
        removals = [r for r in removals if r is not None]
        if removals:  # concurrently, so they share round trips to Redis
            await asyncio.gather(*removals)

    async def subscribe(self, session: Session, channel: str) -> None:
        if self.registry.subscribe(session, channel):
            await self.broker.subscribe([channel])
        ns = self.settings.namespace(channel)
        if ns.presence or ns.join_leave:
            entry = session.presence_entry()
            if ns.presence:
                await self.presence.add(channel, session.client_id, entry)
            if ns.join_leave:
                self._note_join_leave(channel, entry, joined=True)

    async def unsubscribe(self, session: Session, channel: str) -> bool:
        if not self.registry.is_subscribed(session, channel):
            return False
        if self._tracked:
            self._untrack(channel, session)
        if self.registry.unsubscribe(session, channel):
            await self.broker.unsubscribe([channel])
        removal = self._left(session, channel)
        if removal is not None:
            await removal
        return True

    def _left(self, session: Session, channel: str) -> Awaitable[None] | None:
        """Note the leave; the presence removal to await, if the namespace keeps presence."""
        ns = self.settings.namespace(channel)
        if ns.join_leave:
            self._note_join_leave(channel, session.presence_entry(), joined=False)
        if ns.presence:
            return self.presence.remove(channel, session.client_id)
        return None

    # -- join/leave ----------------------------------------------------------------------------
    #
    # Joins and leaves are not pushed one by one: a mass reconnect (a deploy, a network blip)
    # would make N subscribers x N joins pushes. Each process collects them per channel and
    # flushes at most once per ``join_leave_interval``, one message per channel (lists of
    # entries) through the broker to every process. A join and a leave of the same client within
    # one interval cancel out: nobody saw it come, nobody needs to see it go.

    def _note_join_leave(self, channel: str, entry: dict[str, Any], *, joined: bool) -> None:
        pending = self._join_leave.get(channel)
        if pending is None:
            pending = self._join_leave[channel] = ({}, {})
        same, other = pending if joined else pending[::-1]
        client = entry["client"]
        if other.pop(client, None) is None:
            same[client] = entry
        if self._join_leave_timer is None:
            loop = asyncio.get_running_loop()
            interval = self.settings.join_leave_interval
            self._join_leave_timer = loop.call_later(interval, self._flush_join_leave)

    def _flush_join_leave(self) -> None:
        self._join_leave_timer = None
        pending, self._join_leave = self._join_leave, {}
        loop = asyncio.get_running_loop()
        for channel, (joins, leaves) in pending.items():
            join, leave = list(joins.values()), list(leaves.values())
            for start in range(0, len(join) + len(leave), JOIN_LEAVE_CHUNK):
                end = start + JOIN_LEAVE_CHUNK
                part_join = join[start:end]
                part_leave = leave[max(0, start - len(join)) : max(0, end - len(join))]
                task = loop.create_task(self._send_join_leave(channel, part_join, part_leave))
                self._join_leave_sends.add(task)
                task.add_done_callback(self._join_leave_sends.discard)

    async def _send_join_leave(
        self, channel: str, join: list[dict[str, Any]], leave: list[dict[str, Any]]
    ) -> None:
        try:
            await self.broker.join_leave(channel, join, leave)
        except HubUnavailable as exc:  # best effort: presence itself stays right
            log.info("join/leave on %r not sent: %s", channel, exc)

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
                channel,
                ns,
                since=None if since is None else since[0],
                limit=None if since else 0,
                subscribing=True,
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
            self.bytes_sent += sent
            self.delivered[CHANNEL] += len(pushes)
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
        start = time.perf_counter()
        # Several pushes: buffer every write until all are fanned out, so a connection that
        # gets more than one of them (a user in a burst of per-user sends) costs one send.
        writes = WriteCoalescer.of(asyncio.get_running_loop()) if len(queue) > 1 else None
        if writes is not None:
            writes.hold()
        try:
            self._fanout_queue(queue)
        finally:
            if writes is not None:
                writes.release()
        self.metrics.fanout_seconds.observe(time.perf_counter() - start)

    def _fanout_queue(self, queue: list[tuple[int, str, dict[str, Any]]]) -> None:
        delivered, sent = [0, 0, 0], 0  # added to the counters once, not once per push
        i, end = 0, len(queue)
        while i < end:
            kind, key, obj = queue[i]
            j = i + 1
            while j < end and queue[j][0] == kind and queue[j][1] == key:
                j += 1
            if j == i + 1:  # the usual case for per-user sends: one push, nothing to join
                n, size = self._fanout(kind, key, Push(obj), 1)
            else:
                n, size = self._fanout(kind, key, PushRun([Push(q[2]) for q in queue[i:j]]), j - i)
            delivered[kind] += n
            sent += size
            i = j
        for kind, n in enumerate(delivered):
            self.delivered[kind] += n
        self.bytes_sent += sent

    def _fanout(self, kind: int, key: str, push: Push | PushRun, count: int) -> tuple[int, int]:
        """Write ``push`` to its recipients; returns (messages delivered, bytes written)."""
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
        delivered = 0
        sent = 0
        if tracked is None:
            for session in sessions:
                n = session.push(push)
                if n:
                    delivered += 1
                    sent += n
            delivered *= count
        else:
            # Some subscribers are joining this history channel: they get what their tracker
            # admits (in order, no duplicate); the others the shared push.
            pushes = push.pushes if isinstance(push, PushRun) else [push]
            for session in sessions:
                tracker = tracked.get(session)
                if tracker is None:
                    n = session.push(push)
                    delivered += count if n else 0
                else:
                    admitted = tracker.admit(pushes)
                    n = sum(session.push(one) for one in admitted)
                    delivered += len(admitted) if n else 0
                    if tracker.done:
                        self._untrack(key, session)
                sent += n
        return delivered, sent

    def on_publication(self, publication: Publication) -> None:
        obj = {"channel": publication.channel, "data": publication.data}
        if publication.meta:
            obj.update(publication.meta)
        self._enqueue(CHANNEL, publication.channel, obj)

    def on_user_message(self, user: str, data: Any) -> None:
        self._enqueue(USER, user, {"data": data})

    def on_inbox(self, user: str, mark: dict[str, Any], data: Any) -> None:
        self.inbox.on_push(user, mark, data)

    def on_user_gap(self, users: list[str]) -> None:
        self.inbox.on_gap(users)

    def on_broadcast(self, data: Any) -> None:
        self._enqueue(EVERYONE, "", {"data": data})

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
            self._enqueue(CHANNEL, channel, {"channel": channel, "join": join})
        if leave:
            self._enqueue(CHANNEL, channel, {"channel": channel, "leave": leave})

    def on_admin(self, message: dict[str, Any]) -> bool:
        """An admin control message; False if malformed. Ignored with the admin page off."""
        return True if self.admin is None else self.admin.on_message(message)

    def on_gap(self, channels: Iterable[str]) -> None:
        """Messages may have been lost on these channels: tell their subscribers at once."""
        for channel in channels:
            if self.registry.has_channel(channel):
                self._enqueue(CHANNEL, channel, {"channel": channel, "gap": True})
