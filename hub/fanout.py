"""Everything the hub writes to its clients' sockets as pushes goes out here.

The node hands every message from the broker to :meth:`Fanout.enqueue`. At the end of the event
loop turn the queue is fanned out: consecutive pushes for the same recipients become one
:class:`PushRun`, each push is encoded once per client encoding (:class:`Push`) and once per wire
format (``hub.ws.broadcast.encode_once``), and while a burst goes out every connection's writes
are held (``hub.ws.hold_writes``), so each recipient costs one ``send``. :meth:`Fanout.deliver` is
the outbound budget: a push that would take a connection's pending bytes past
``outbound_buffer`` is a slow consumer's, and the channel namespace's ``slow_consumer`` policy
says what happens: ``close`` (4000, the default), ``drop`` (pushes are skipped while it is over
budget; once drained it gets a gap notice for every channel it missed something on) or ``latest``
(only the newest push per channel is kept, written once drained, after a gap notice). One frame
always goes through to an empty buffer, so a publication bigger than the budget reaches every
idle subscriber. ``write_delay`` holds a connection's pushes that long and writes them together.

Recipients joining a history channel are tracked here too (:class:`Tracker`): their live pushes
are held back until their recovered publications are written, then duplicates are dropped by
offset, so a subscribe with ``since`` has no hole and no duplicate.

A replay longer than the budget (an inbox catch-up, ``hub.notify``) is written in slices: at
most :meth:`Fanout.replay_budget` bytes at a time, in one ``send`` (:meth:`Fanout.replaying`),
and the next slice once :meth:`Fanout.replay_ready` says the connection has drained, so a long
backlog never makes a client a slow consumer.

The module knows recipients only by :class:`Recipient` (a codec and a ``hub.ws`` connection),
never a session, and writes through the connection's public sink (``frame_key``,
``pending_bytes``, ``writable``, ``write_frame``, ``fail``, and ``encode_once.queue_within``,
which is the first four in one call).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from .codec import CODECS, MSGPACK, Codec, json_bytes
from .config import SLOW_CONSUMER_POLICIES
from .errors import CloseCode
from .ws import ServerConnection
from .ws.broadcast import encode_once
from .ws.connection import hold_writes
from .ws.frames import Opcode

if TYPE_CHECKING:
    from .config import Settings
    from .metrics import Metrics
    from .registry import Registry

__all__ = [
    "CHANNEL",
    "EVERYONE",
    "USER",
    "Fanout",
    "Push",
    "PushRun",
    "Recipient",
    "Route",
    "Tracker",
]

log = logging.getLogger("hub.fanout")

#: Seconds a closed slow consumer gets to read its close frame before it is reset.
SLOW_CONSUMER_GRACE = 1.0
#: Seconds between checks whether a lagging connection (``drop``, ``latest``) has drained.
DRAIN_CHECK = 0.05
#: A replay writes at most ``outbound_buffer // REPLAY_SLICE`` bytes at a time, and the next
#: slice once no more than ``outbound_buffer // REPLAY_RESUME`` is pending: half the budget
#: stays free for live pushes, and a slice is written well before the last one has drained.
REPLAY_SLICE = 2
REPLAY_RESUME = 4
#: Seconds a replay waits before it looks again whether the connection has drained.
REPLAY_POLL = 0.01

#: The ``slow_consumer`` policies (hub.config holds the names).
CLOSE, DROP, LATEST = SLOW_CONSUMER_POLICIES

#: The opcodes as plain module constants: reading an enum member off its class costs more than
#: the rest of building a small frame.
TEXT, BINARY = int(Opcode.TEXT), int(Opcode.BINARY)

#: What a queued push goes to: a channel's subscribers, a user's connections, or everyone.
CHANNEL, USER, EVERYONE = 0, 1, 2


class Recipient(Protocol):
    """What the fan-out needs of whoever it writes to: the encoding it reads and its socket."""

    @property
    def codec(self) -> Codec: ...

    @property
    def connection(self) -> ServerConnection: ...


class Push:
    """One push to many recipients: encoded lazily, at most once per codec and wire format."""

    __slots__ = ("_frames", "obj")

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self._frames: list[encode_once | None] = [None] * len(CODECS)

    def frame_for(self, recipient: Recipient) -> bytes:
        index = recipient.codec.index
        return (self._frames[index] or self.message(index)).for_connection(recipient.connection)

    def message(self, index: int) -> encode_once:
        """The message as codec ``index`` encodes it (made on first use)."""
        frames = self._frames[index]
        if frames is None:
            frames = self._frames[index] = self._encode(index)
        return frames

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
        self._joined: dict[tuple[int, tuple[int, ...]], bytes] = {}

    def frame_for(self, recipient: Recipient) -> bytes:
        pushes = self.pushes
        if len(pushes) == 1:
            return pushes[0].frame_for(recipient)
        wire = recipient.connection.frame_key
        if wire is None:  # compression context of its own: not shareable
            return b"".join(p.frame_for(recipient) for p in pushes)
        key = (recipient.codec.index, wire)
        joined = self._joined.get(key)
        if joined is None:
            joined = self._joined[key] = b"".join(p.frame_for(recipient) for p in pushes)
        return joined


class Tracker:
    """One recipient's pushes of one history channel while it joins the live stream.

    The recipient is live at the broker before the history is read, so nothing published after
    the read can be missed; but until its reply and the missed publications are written, its
    live pushes are held back (``buffer``). Once they are written it goes live, and pushes it
    already got from history are dropped by offset: a publication read from history may still
    be on its way through pub/sub, or in the end-of-turn queue. The first push newer than what
    was sent ends the check, so only the first pushes after a subscribe pay for it, and channels
    without history never do.
    """

    __slots__ = ("buffer", "epoch", "last")

    def __init__(self) -> None:
        self.buffer: list[Push] | None = []
        self.epoch = ""
        self.last: int | None = 0

    @property
    def done(self) -> bool:
        """Live, and past every offset sent from history: the tracker can go."""
        return self.buffer is None and self.last is None

    def admit(self, pushes: Sequence[Push]) -> Sequence[Push]:
        """Of ``pushes`` (arrival order), those to write to the recipient now."""
        if self.buffer is not None:
            self.buffer.extend(pushes)
            return ()
        if self.last is None:
            return pushes
        out = []
        for push in pushes:
            if self.last is not None:
                obj = push.obj
                offset = obj.get("offset")
                if type(offset) is int:
                    if offset <= self.last and obj.get("epoch") == self.epoch:
                        continue  # already sent (from history, or covered by the reply)
                    self.last = None  # newer (or a new epoch): every later push is too
            out.append(push)
        return out

    def go_live(self, epoch: str, last: int) -> Sequence[Push]:
        """Stop holding back; ``last`` of ``epoch`` is the newest offset the recipient has. The
        held-back pushes it does not have yet, to write now."""
        held, self.buffer = self.buffer or [], None
        self.epoch, self.last = epoch, last
        return self.admit(held)


class Route:
    """How pushes of one kind reach their recipients: the slow-consumer policy, the channel a
    gap notice would name (None for per-user messages and broadcasts, which always close a slow
    consumer: there is no channel to report a gap on) and the write delay in seconds."""

    __slots__ = ("channel", "delay", "policy")

    def __init__(self, policy: str, channel: str | None, delay: float) -> None:
        self.policy = policy
        self.channel = channel
        self.delay = delay


#: The route of a push that is written at once and closes a slow consumer.
DIRECT = Route(CLOSE, None, 0.0)


class Lag:
    """A connection over budget under ``drop`` or ``latest``: what it missed, until drained."""

    __slots__ = ("latest", "missed")

    def __init__(self) -> None:
        self.missed: dict[str, None] = {}  # channels something was dropped on, in order
        self.latest: dict[str, tuple[Push, bool]] = {}  # newest push, and whether one was replaced


class Fanout:
    """The outbound path of one node: end-of-turn queue, encoding, budget, history joins."""

    def __init__(self, registry: Registry[Any], settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._queue: list[tuple[int, str, dict[str, Any]]] = []
        self._flush_scheduled = False
        # Hot-path counters as plain numbers (by kind: channel, user, broadcast), which the
        # metrics read at scrape time.
        self.delivered = [0, 0, 0]
        self.bytes_sent = 0
        children = (metrics.delivered_channel, metrics.delivered_user, metrics.delivered_broadcast)
        for kind, child in enumerate(children):
            metrics.pull(child, lambda kind=kind: self.delivered[kind])
        metrics.pull(metrics.bytes_sent, lambda: self.bytes_sent)
        # Recipients joining a history channel, by channel (see Tracker).
        self._tracked: dict[str, dict[Recipient, Tracker]] = {}
        # Recipients over budget under drop / latest, and the timer that checks them.
        self._lagging: dict[Recipient, Lag] = {}
        self._drain_timer: asyncio.TimerHandle | None = None
        # write_delay: frames held per delay (seconds), per recipient, with their flush timers.
        self._delayed: dict[float, dict[Recipient, list[bytes]]] = {}
        self._delayed_bytes: dict[Recipient, int] = {}
        self._default_delay = settings.write_delay / 1000.0

    # -- one recipient -------------------------------------------------------------------------

    def route(self, kind: int, key: str) -> Route:
        """The route of pushes to a channel (``CHANNEL``, its namespace's policy and delay) or to
        users and everyone (close, the global ``write_delay``)."""
        if kind != CHANNEL:
            delay = self._default_delay
            return DIRECT if not delay else Route(CLOSE, None, delay)
        ns = self.settings.namespace(key)
        delay = self._default_delay if ns.write_delay is None else ns.write_delay / 1000.0
        if ns.slow_consumer == CLOSE and not delay:
            return DIRECT
        return Route(ns.slow_consumer, key, delay)

    def deliver(self, recipient: Recipient, push: Push | PushRun, route: Route = DIRECT) -> int:
        """Queue a push to one recipient; returns the bytes queued (0 when skipped). Never waits.

        A push that would take the connection's pending bytes past ``outbound_buffer`` (unless
        nothing is pending: one frame always goes through to an empty buffer) is the route's
        policy's: closed, dropped or conflated (see the module docstring)."""
        connection = recipient.connection
        if not connection.writable:
            return 0
        if route is not DIRECT:
            return self._deliver_routed(recipient, push, route)
        frame = push.frame_for(recipient)
        pending = connection.pending_bytes
        if pending and pending + len(frame) > self.settings.outbound_buffer:
            self._close_slow(connection, pending + len(frame))
            return 0
        connection.write_frame(frame)
        return len(frame)

    # -- replays (a backlog written in slices) -------------------------------------------------

    @property
    def replay_budget(self) -> int:
        """Bytes a replay may write before it waits for the connection to drain."""
        return self.settings.outbound_buffer // REPLAY_SLICE

    def replay_ready(self, recipient: Recipient) -> bool:
        """Whether the recipient has drained enough for the next slice of a replay."""
        return recipient.connection.pending_bytes <= self.settings.outbound_buffer // REPLAY_RESUME

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Hold every write of a replay's slice, so each recipient gets it in one ``send``."""
        with hold_writes():
            yield

    def _deliver_routed(self, recipient: Recipient, push: Push | PushRun, route: Route) -> int:
        channel = route.channel
        lag = self._lagging.get(recipient) if self._lagging else None
        if lag is not None and channel is not None and route.policy != CLOSE:
            self._hold(lag, route.policy, channel, push)
            return 0
        connection = recipient.connection
        frame = push.frame_for(recipient)
        pending = connection.pending_bytes
        delayed = self._delayed_bytes.get(recipient, 0) if self._delayed_bytes else 0
        pending += delayed
        if pending and pending + len(frame) > self.settings.outbound_buffer:
            if channel is None or route.policy == CLOSE:
                self._close_slow(connection, pending + len(frame))
                return 0
            if lag is None:
                lag = self._lagging[recipient] = Lag()
                if self._drain_timer is None:
                    loop = asyncio.get_running_loop()
                    self._drain_timer = loop.call_later(DRAIN_CHECK, self._check_drained)
            self._hold(lag, route.policy, channel, push)
            return 0
        if route.delay:
            self._delay(recipient, frame, route.delay)
        else:
            connection.write_frame(frame)
        return len(frame)

    def _hold(self, lag: Lag, policy: str, channel: str, push: Push | PushRun) -> None:
        """Drop or conflate a push for a lagging recipient (counted per policy)."""
        pushes = push.pushes if isinstance(push, PushRun) else [push]
        if policy == DROP:
            lag.missed[channel] = None
            self.metrics.slow_consumer_skipped.labels(DROP).inc(len(pushes))
            return
        replaced = len(pushes) - 1
        previous = lag.latest.get(channel)
        if previous is not None:
            replaced += 1
        lag.latest[channel] = (pushes[-1], replaced > 0 or (previous is not None and previous[1]))
        if replaced:
            self.metrics.slow_consumer_skipped.labels(LATEST).inc(replaced)

    def _check_drained(self) -> None:
        """Every ``DRAIN_CHECK`` while some recipient lags: those drained to half the budget get
        their gap notices (and, under ``latest``, the newest push of each channel)."""
        self._drain_timer = None
        half = self.settings.outbound_buffer // 2
        drained = []
        for recipient, lag in list(self._lagging.items()):
            connection = recipient.connection
            if not connection.writable:
                del self._lagging[recipient]
            elif connection.pending_bytes + self._delayed_bytes.get(recipient, 0) <= half:
                del self._lagging[recipient]
                drained.append((recipient, lag))
        if drained:
            sent = 0
            with hold_writes():
                for recipient, lag in drained:
                    sent += self._catch_up(recipient, lag)
            self.bytes_sent += sent
        if self._lagging:
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_later(DRAIN_CHECK, self._check_drained)

    def _catch_up(self, recipient: Recipient, lag: Lag) -> int:
        gaps = self.metrics.slow_consumer_gaps
        sent = 0
        for channel in lag.missed:
            sent += self.deliver(recipient, Push({"channel": channel, "gap": True}))
            gaps.labels(DROP).inc()
        for channel, (push, replaced) in lag.latest.items():
            if replaced:
                sent += self.deliver(recipient, Push({"channel": channel, "gap": True}))
                gaps.labels(LATEST).inc()
            n = self.deliver(recipient, push)
            sent += n
            self.delivered[CHANNEL] += 1 if n else 0
        return sent

    def _delay(self, recipient: Recipient, frame: bytes, delay: float) -> None:
        """Hold ``frame`` for ``delay`` seconds, with the recipient's other held frames."""
        batch = self._delayed.get(delay)
        if batch is None:
            batch = self._delayed[delay] = {}
            asyncio.get_running_loop().call_later(delay, self._write_delayed, delay)
        frames = batch.get(recipient)
        if frames is None:
            batch[recipient] = [frame]
        else:
            frames.append(frame)
        self._delayed_bytes[recipient] = self._delayed_bytes.get(recipient, 0) + len(frame)

    def _write_delayed(self, delay: float) -> None:
        batch = self._delayed.pop(delay, {})
        sizes = self._delayed_bytes
        with hold_writes():  # every connection's frames leave in one send
            for recipient, frames in batch.items():
                sizes.pop(recipient, None)
                connection = recipient.connection
                if connection.writable:
                    connection.write_frame(frames[0] if len(frames) == 1 else b"".join(frames))

    def overflowed(self, connection: ServerConnection) -> None:
        """hub.ws says a connection's own writes (pongs, close frames, replies) took it past the
        budget: closed as a slow consumer, whatever the policy."""
        self._close_slow(connection, connection.pending_bytes)

    def forget(self, recipient: Recipient) -> None:
        """The recipient is gone: drop what is held for it."""
        self._lagging.pop(recipient, None)
        self._delayed_bytes.pop(recipient, None)
        for batch in self._delayed.values():
            batch.pop(recipient, None)

    def _close_slow(self, connection: ServerConnection, pending: int) -> None:
        self.metrics.slow_consumers.inc()
        log.info("closing slow consumer %r (%d bytes pending)", connection, pending)
        connection.fail(CloseCode.SLOW_CONSUMER, "slow consumer")
        # The close frame waits behind the full buffer; a client that does not read it within
        # the grace is reset, which frees the kernel's send queue too.
        asyncio.get_running_loop().call_later(SLOW_CONSUMER_GRACE, connection.abort)

    # -- joining a history channel -------------------------------------------------------------

    def track(self, channel: str, recipient: Recipient) -> Tracker:
        """Hold back ``recipient``'s live pushes of ``channel`` until :meth:`go_live`."""
        tracker = Tracker()
        self._tracked.setdefault(channel, {})[recipient] = tracker
        return tracker

    def untrack(self, channel: str, recipient: Recipient) -> None:
        tracked = self._tracked.get(channel)
        if tracked is not None:
            tracked.pop(recipient, None)
            if not tracked:
                del self._tracked[channel]

    def untrack_all(self, recipient: Recipient, channels: Iterable[str]) -> None:
        if self._tracked:
            for channel in channels:
                self.untrack(channel, recipient)

    @property
    def joining(self) -> int:
        """Recipients still being tracked while they join a history channel."""
        return sum(map(len, self._tracked.values()))

    def go_live(
        self,
        channel: str,
        recipient: Recipient,
        tracker: Tracker,
        recovered: list[dict[str, Any]],
        epoch: str,
        offset: int,
    ) -> None:
        """Write the recovered publications and the live ones held back meanwhile, and switch
        ``recipient`` to live delivery (call right after the subscribe reply is written)."""
        if self._tracked.get(channel, {}).get(recipient) is not tracker:
            return  # unsubscribed or gone meanwhile
        pushes = [Push({"channel": channel, **entry}) for entry in recovered]
        pushes.extend(tracker.go_live(epoch, offset))
        route = self.route(CHANNEL, channel)
        sent = sum(self.deliver(recipient, push, route) for push in pushes)
        self.bytes_sent += sent
        self.delivered[CHANNEL] += len(pushes)
        if tracker.done:
            self.untrack(channel, recipient)

    # -- the end-of-turn queue -----------------------------------------------------------------
    #
    # Pushes are queued and fanned out at the end of the event-loop turn: when several arrive
    # together (a burst read from Redis), consecutive ones for the same recipients are joined and
    # each recipient gets them in one write. Arrival order is kept across all kinds.

    def enqueue(self, kind: int, key: str, obj: dict[str, Any]) -> None:
        """Push ``obj`` to a channel's subscribers (``CHANNEL``, key: the channel), a user's
        connections (``USER``) or everyone (``EVERYONE``) at the end of this turn."""
        self._queue.append((kind, key, obj))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        queue, self._queue = self._queue, []
        start = time.perf_counter()
        if len(queue) > 1:
            # Several pushes: hold every write until all are fanned out, so a connection that
            # gets more than one of them (a user in a burst of per-user sends) costs one send.
            with hold_writes():
                self._fanout_queue(queue)
        else:
            self._fanout_queue(queue)
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
        route = self.route(kind, key)
        tracked = None
        if kind == CHANNEL:
            recipients: Iterable[Recipient] = registry.subscribers(key)
            if self._tracked:
                tracked = self._tracked.get(key)
        elif kind == USER:
            recipients = registry.user_sessions(key)
        else:
            recipients = registry.sessions
        deliver = self.deliver
        delivered = 0
        sent = 0
        if tracked is None and route is DIRECT and type(push) is Push:
            # The common case (a broadcast, a channel of the close policy): deliver() inlined,
            # one call per recipient into hub.ws; the same checks, the same outcome.
            budget = self.settings.outbound_buffer
            messages = push._frames
            for recipient in recipients:
                index = recipient.codec.index
                message = messages[index] or push.message(index)
                n = message.queue_within(recipient.connection, budget)
                if n > 0:
                    delivered += 1
                    sent += n
                elif n:
                    self._close_slow(recipient.connection, -n)
        elif tracked is None:
            for recipient in recipients:
                n = deliver(recipient, push, route)
                if n:
                    delivered += 1
                    sent += n
            delivered *= count
        else:
            # Some subscribers are joining this history channel: they get what their tracker
            # admits (in order, no duplicate); the others the shared push.
            pushes = push.pushes if isinstance(push, PushRun) else [push]
            for recipient in recipients:
                tracker = tracked.get(recipient)
                if tracker is None:
                    n = deliver(recipient, push, route)
                    delivered += count if n else 0
                else:
                    admitted = tracker.admit(pushes)
                    n = sum(deliver(recipient, one, route) for one in admitted)
                    delivered += len(admitted) if n else 0
                    if tracker.done:
                        self.untrack(key, recipient)
                sent += n
        return delivered, sent
