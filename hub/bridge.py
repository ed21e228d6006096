"""The Redis bridge: a :class:`~hub.broker.Broker` that joins hub processes through Redis pub/sub.

Each process holds one pub/sub connection and subscribes only what it needs: ``<prefix>:ch:<c>``
while it has a local subscriber of channel ``c``, ``<prefix>:user:<u>`` while it holds a
connection of user ``u``, and always ``<prefix>:all`` and ``<prefix>:ctl``. There is no pattern
subscription and no Redis subscription per WebSocket: one Redis message reaches a process once,
is decoded once and handed to the node once, and the node encodes one frame for all its
recipients. The wire format is in ``hub.publisher`` and docs/publish-api.md.

Publishing goes over a separate, pipelined connection (``hub.publisher.AsyncPublisher``), so a
slow subscribe never delays a publish and concurrent publishes share round trips.

When Redis goes away the bridge reports it at once (``ready`` turns False, ``on_gap`` for every
channel with local subscribers), reconnects with exponential backoff and jitter, resubscribes in
batches, and reports a gap again once the subscriptions are back: messages published in between
are lost, and subscribers that refetched state early must refetch after the link is back too.

On a Redis Cluster (``redis+cluster://`` URL, :class:`RedisClusterBroker`) the same names travel
over sharded pub/sub (``SSUBSCRIBE`` / ``SPUBLISH``, Redis 7), with one such link per shard; the
link (connect, batch, read, probe, reconnect) is the same code for both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgpack
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.crc import key_slot
from redis.exceptions import RedisError

from .broker import Broker, BrokerHandler, Publication
from .config import mask_url
from .envelope import Envelopes
from .errors import BadEnvelope, BadSignature, HubUnavailable
from .history import HistoryPage
from .publisher import (
    DEFAULT_PREFIX,
    Addr,
    AsyncPublisher,
    Names,
    SlotMap,
    is_cluster_url,
)
from .resp import RespStream

__all__ = ["BridgeError", "RedisBroker", "RedisClusterBroker"]

log = logging.getLogger("hub.bridge")

_RESERVED = frozenset({"channel", "data", "gap", "join", "leave", "offset", "epoch", "from"})


class BridgeError(HubUnavailable):
    """Redis is unreachable or did not answer in time (the HTTP API can answer 503)."""


class _RateLimited:
    """At most one log line per ``interval`` seconds, with a count of the ones held back, so a
    flood of garbage cannot flood the log too."""

    __slots__ = ("interval", "last", "suppressed")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last = -math.inf
        self.suppressed = 0

    def __call__(self, emit: Callable[..., None], message: str, *args: Any, **kw: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        if self.suppressed:
            message += " (%d similar messages suppressed)"
            args = (*args, self.suppressed)
        self.last = now
        self.suppressed = 0
        emit(message, *args, **kw)


class _Batch:
    """One SUBSCRIBE command: done when Redis has confirmed every channel in it. Subscribers of a
    channel that is already on its way wait for the same batch instead of sending it again."""

    __slots__ = ("future", "remaining")

    def __init__(self, size: int) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.remaining = size

    def confirm(self) -> None:
        self.remaining -= 1
        if self.remaining <= 0 and not self.future.done():
            self.future.set_result(None)

    def release(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _one_group(name: bytes) -> int:
    return 0


class _Link:
    """One pub/sub connection, the subscriptions it should hold and the task that keeps it alive.

    The single-node broker has one; the cluster broker has one per shard (master) owning a slot
    of something it subscribes, speaking ``SSUBSCRIBE`` there. Either way the link connects,
    subscribes in batches, reads, probes with PING and reconnects with backoff, and tells its
    broker (``_link_gap``, ``_retrying``, ``_swept``) so the broker can report gaps and, on a
    cluster, re-route channels whose slot moved.
    """

    def __init__(
        self,
        broker: RedisBroker,
        make_connection: Callable[[], AbstractConnection],
        label: str,
        *,
        sharded: bool = False,
        addr: Addr | None = None,
    ) -> None:
        self.broker = broker
        self.label = label
        self.addr = addr
        self._make_connection = make_connection
        self._sharded = sharded
        if sharded:
            self._sub, self._unsub, self._confirm = b"SSUBSCRIBE", b"SUNSUBSCRIBE", b"ssubscribe"
            self._message = b"smessage"
            # One command may only name channels of one slot (else CROSSSLOT).
            self._group: Callable[[bytes], int] = key_slot
        else:
            self._sub, self._unsub, self._confirm = b"SUBSCRIBE", b"UNSUBSCRIBE", b"subscribe"
            self._message = b"message"
            self._group = _one_group

        # What should be subscribed on this link, by Redis channel name.
        self.wanted: set[bytes] = set()
        # What has been sent as SUBSCRIBE (and not UNSUBSCRIBE) on the current connection.
        self._sent: set[bytes] = set()
        # Batches awaiting Redis's confirmation, per channel, oldest first.
        self._pending: dict[bytes, deque[_Batch]] = {}
        # Channels no longer wanted and their unsubscribe deadline, in deadline order.
        self._lingering: dict[bytes, float] = {}
        self._linger_timer: asyncio.TimerHandle | None = None
        # SUNSUBSCRIBEs sent and not yet answered, per channel: any other sunsubscribe is Redis
        # telling us the slot has moved away.
        self._unsubscribing: dict[bytes, int] = {}

        self._connection: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._outbox: list[list[bytes]] = []
        # The last queued SUBSCRIBE per slot while it can still take more channels, and its batch.
        self._open: dict[int, tuple[list[bytes], _Batch]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._pong: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.first_attempt: asyncio.Future[None] | None = None
        self.up = False
        self._ever_up = False
        self._closing = False
        self._log_connect = _RateLimited()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing = False
        self.first_attempt = loop.create_future()
        self._task = loop.create_task(self._run(), name=f"hub-bridge-link {self.label}")

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def idle(self) -> bool:
        """Nothing wanted and nothing left subscribed: the link can go."""
        return not self.wanted and not self._sent

    # -- subscriptions -------------------------------------------------------------------------

    async def want(self, names: list[bytes]) -> None:
        """Subscribe and return once Redis has confirmed, so that a publish made after the
        client's subscribe reply is delivered. While the link is down this returns at once: the
        channel is subscribed on reconnect and its subscribers get a gap notice then."""
        fresh: list[bytes] = []
        waits: set[asyncio.Future[None]] = set()
        for name in names:
            self.wanted.add(name)
            self._lingering.pop(name, None)
            if self._connection is None:
                continue
            if name in self._sent:
                queue = self._pending.get(name)
                if queue:
                    waits.add(queue[-1].future)
            else:
                fresh.append(name)
        if fresh:
            waits.update(batch.future for batch in self._send_subscribe(fresh))
        for future in waits:
            # Shielded: one caller giving up must not cancel the batch others wait for.
            await asyncio.shield(future)

    def unwant(self, names: Iterable[bytes]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.broker.unsubscribe_delay
        for name in names:
            self.wanted.discard(name)
            if name in self._sent:
                self._lingering.pop(name, None)  # re-insert: the dict stays in deadline order
                self._lingering[name] = deadline
        if self._lingering and self._linger_timer is None:
            first = next(iter(self._lingering.values()))
            self._linger_timer = loop.call_at(first, self._sweep)

    def forget(self, names: Iterable[bytes]) -> None:
        """Drop ``names`` from this link without an UNSUBSCRIBE: their slot has moved to another
        shard (which would answer MOVED), and Redis unsubscribes them itself when it hands a
        slot over."""
        for name in names:
            self.wanted.discard(name)
            self._sent.discard(name)
            self._lingering.pop(name, None)
            for batch in self._pending.pop(name, ()):
                batch.confirm()

    def _sweep(self) -> None:
        """Unsubscribe what stayed unwanted for ``unsubscribe_delay``: re-checking here is what
        makes the lazy unsubscribe safe against a resubscribe in the meantime."""
        self._linger_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        drop: list[bytes] = []
        while self._lingering:
            name, deadline = next(iter(self._lingering.items()))
            if deadline > now:
                break
            del self._lingering[name]
            if name not in self.wanted and name in self._sent:
                self._sent.discard(name)
                drop.append(name)
        groups: dict[int, list[bytes]] = {}
        for name in drop:
            groups.setdefault(self._group(name), []).append(name)
            if self._sharded:
                self._unsubscribing[name] = self._unsubscribing.get(name, 0) + 1
        size = self.broker.batch_size
        for group in groups.values():
            for start in range(0, len(group), size):
                self._send([self._unsub, *group[start : start + size]])
        if self._lingering:
            first = next(iter(self._lingering.values()))
            self._linger_timer = loop.call_at(first, self._sweep)
        if drop:
            self.broker._swept(self, drop)

    def _send_subscribe(self, names: list[bytes]) -> list[_Batch]:
        """Queue SUBSCRIBEs for ``names``. Names queued during one event-loop turn (by many
        clients subscribing at once) join the same SUBSCRIBE, up to ``batch_size`` per command
        (and one slot per command on a cluster)."""
        batches: list[_Batch] = []
        if self._connection is None:
            return batches
        size = self.broker.batch_size
        for name in names:
            group = self._group(name)
            entry = self._open.get(group)
            if entry is None or entry[1].remaining >= size:
                entry = self._open[group] = ([self._sub], _Batch(0))
                self._queue(entry[0])
            command, batch = entry
            command.append(name)
            batch.remaining += 1
            if not batches or batches[-1] is not batch:
                batches.append(batch)
            self._sent.add(name)
            queue = self._pending.get(name)
            if queue is None:
                queue = self._pending[name] = deque()
            queue.append(batch)
        return batches

    def _send(self, command: list[bytes]) -> None:
        """Queue a command for the pub/sub connection; all commands queued in one event-loop
        turn leave in one write, in order."""
        if self._connection is None:
            return
        self._open = {}  # keep the order: later SUBSCRIBEs go after this command
        self._queue(command)

    def _queue(self, command: list[bytes]) -> None:
        self._outbox.append(command)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        connection = self._connection
        try:
            while self._outbox and connection is not None and connection is self._connection:
                commands, self._outbox, self._open = self._outbox, [], {}
                if not connection.is_connected:
                    return  # torn down; never let redis-py reconnect this one behind our back
                await connection.send_packed_command(
                    connection.pack_commands(commands), check_health=False
                )
        except (RedisError, OSError) as exc:
            log.debug("redis pub/sub write failed: %s", exc)
            if self._reader is not None:
                self._reader.cancel()  # the link task sees the reader end and reconnects
        finally:
            self._flusher = None

    # -- connect, resubscribe, read, probe, reconnect ------------------------------------------

    async def _run(self) -> None:
        broker = self.broker
        attempt = 0
        down_since = time.monotonic()
        while True:
            connection = self._make_connection()
            reader: asyncio.Task[None] | None = None
            reason: BaseException | None = None
            try:
                await asyncio.wait_for(connection.connect(), broker.connect_timeout)
                reader = asyncio.get_running_loop().create_task(self._read(connection))
                self._connection, self._reader = connection, reader
                count = await self._resubscribe(reader)
                self.up = True
                if self._ever_up:
                    broker.reconnects += 1
                    log.info(
                        "redis link %s restored after %.1fs (%d redis channels resubscribed)",
                        self.label,
                        time.monotonic() - down_since,
                        count,
                    )
                first = not self._attempted()
                self._ever_up = True
                attempt = 0
                # What was published while down (or while subscribing) is lost. Not so on a new
                # shard's first connection: its subscribers waited for it (_subscribe_on).
                if not (self._sharded and first):
                    broker._link_gap(self)
                await self._watch(reader)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, BridgeError) as exc:
                reason = exc
            except Exception as exc:  # a bug here must not end the link for good
                log.exception("redis link failed")
                reason = exc
            finally:
                was_up = self._drop()
                if was_up:
                    down_since = time.monotonic()
                    if not self._closing and not broker._closing:
                        log.warning(
                            "redis link %s lost: %s; reconnecting", self.label, reason or "closed"
                        )
                        broker._link_gap(self)  # clients learn now, not after the reconnect
                await self._dispose(connection, reader)
            self._attempted()
            if not was_up:
                self._log_connect(log.warning, "redis at %s unreachable: %s", self.label, reason)
            delay = min(broker.backoff_max, broker.backoff_min * 2**attempt)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            await broker._retrying(self)

    def _attempted(self) -> bool:
        """End the first attempt; whether it had ended already."""
        if self.first_attempt is not None and not self.first_attempt.done():
            self.first_attempt.set_result(None)
            return False
        return True

    async def _resubscribe(self, reader: asyncio.Task[None]) -> int:
        """Subscribe everything wanted, ``batch_size`` channels per SUBSCRIBE, pipelined."""
        names = list(self.wanted)
        batches = self._send_subscribe(names)
        if batches:
            # Redis confirms in order: once the last batch is confirmed, all of them are.
            timeout = self.broker.connect_timeout
            await self._until(batches[-1].future, reader, timeout, "subscribe")
        return len(names)

    async def _until(
        self, future: asyncio.Future[Any], reader: asyncio.Task[None], timeout: float, what: str
    ) -> None:
        """Wait for ``future`` unless the connection dies or Redis stays silent for ``timeout``.
        The future is not cancelled on failure: subscribers may share it, and dropping the link
        releases them."""
        done, _ = await asyncio.wait(
            (future, reader), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if reader in done:
            self._reader_failed(reader)
        if future not in done:
            raise BridgeError(f"redis did not answer {what} within {timeout}s")

    @staticmethod
    def _reader_failed(reader: asyncio.Task[None]) -> None:
        if not reader.cancelled():
            exc = reader.exception()
            if exc is not None:
                raise exc
        raise BridgeError("redis connection closed")

    async def _watch(self, reader: asyncio.Task[None]) -> None:
        """Probe the pub/sub connection: a PING must come back within ``ping_timeout``. A
        connection can stay open yet deliver nothing (a stopped server, a dead NAT entry)."""
        loop = asyncio.get_running_loop()
        broker = self.broker
        while True:
            done, _ = await asyncio.wait((reader,), timeout=broker.ping_interval)
            if done:
                self._reader_failed(reader)
            self._pong = loop.create_future()
            self._send([b"PING"])
            await self._until(self._pong, reader, broker.ping_timeout, "ping")

    async def _read(self, connection: AbstractConnection) -> None:
        """Read pushes until the connection fails: a burst read in one chunk is handled in one
        synchronous loop (``RespStream``), or through redis-py where that is not available."""
        resp = RespStream.of(connection)
        if resp is None:
            await self._read_responses(connection)
            return
        resp.timeout = None  # a quiet link is fine: the PING probe finds a dead one
        handle, on_message, message = self._handle, self.broker._on_message, self._message
        while True:
            for reply in await resp.chunk():
                # Messages (nearly all of the traffic) go straight to the broker.
                if type(reply) is list and len(reply) == 3 and reply[0] == message:
                    on_message(reply[1], reply[2])
                else:
                    handle(reply)

    async def _read_responses(self, connection: AbstractConnection) -> None:
        read = connection.read_response
        handle = self._handle
        forever = math.inf
        while True:
            handle(await read(timeout=forever))

    def _handle(self, reply: Any) -> None:
        if type(reply) is not list or len(reply) < 2:
            if reply == b"PONG":  # a cluster link with no subscription yet
                self._ponged()
            return
        kind = reply[0]
        if kind == self._message and len(reply) == 3:
            self.broker._on_message(reply[1], reply[2])
        elif kind == self._confirm:
            queue = self._pending.get(reply[1])
            if queue:
                queue.popleft().confirm()
                if not queue:
                    del self._pending[reply[1]]
        elif kind == b"pong":
            self._ponged()
        elif kind == b"sunsubscribe":
            self._unsubscribed(reply[1])

    def _ponged(self) -> None:
        pong = self._pong
        if pong is not None and not pong.done():
            pong.set_result(None)

    def _unsubscribed(self, name: bytes) -> None:
        count = self._unsubscribing.get(name, 0)
        if count > 1:
            self._unsubscribing[name] = count - 1
        elif count == 1:
            del self._unsubscribing[name]
        elif name in self._sent:
            # Redis dropped the subscription itself: the slot now belongs to another shard.
            raise BridgeError(f"slot of {name!r} moved")

    def _drop(self) -> bool:
        """Forget the connection's state at once (no await, so nothing runs in between). Returns
        whether the link was up."""
        was_up = self.up
        self.up = False
        self._connection = None
        self._reader = None
        self._outbox.clear()
        self._open = {}
        self._sent.clear()
        self._unsubscribing.clear()
        for queue in self._pending.values():
            for batch in queue:
                batch.release()  # waiting subscribers return; the channel is resubscribed later
        self._pending.clear()
        self._lingering.clear()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._pong is not None and not self._pong.done():
            self._pong.cancel()
        self._pong = None
        return was_up

    async def _dispose(
        self, connection: AbstractConnection, reader: asyncio.Task[None] | None
    ) -> None:
        flusher = self._flusher
        for task in (reader, flusher):
            if task is not None and not task.done():
                task.cancel()
        for task in (reader, flusher):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        try:
            await connection.disconnect(nowait=True)
        except (RedisError, OSError, TimeoutError):
            pass


class RedisBroker(Broker):
    """Join hub processes through Redis (see the module docstring and docs/publish-api.md).

    ``unsubscribe_delay``: a channel (or user) left by its last local subscriber stays subscribed
    in Redis this long, so churn (a page reload) does not thrash Redis. ``ping_interval`` /
    ``ping_timeout``: liveness probe of the pub/sub connection; a silent one is replaced.
    ``backoff_min`` / ``backoff_max``: reconnect delays (doubling, with jitter). ``batch_size``:
    channels per SUBSCRIBE when resubscribing. ``forward``: optional envelope fields passed on
    to clients with a channel publication. ``start_timeout``: how long :meth:`start` waits for
    the first connection before carrying on (not ready) and retrying in the background.

    A ``redis+cluster://host:port[,host:port...]`` URL makes a :class:`RedisClusterBroker`
    (sharded pub/sub), so configuration by URL is all it takes.

    Counters for metrics: ``malformed`` (payloads dropped), ``reconnects`` (links restored),
    ``handler_errors`` (node callbacks that raised).
    """

    def __new__(cls, url: str, *args: Any, **kwargs: Any) -> RedisBroker:
        if cls is RedisBroker and is_cluster_url(url):
            cls = RedisClusterBroker
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        unsubscribe_delay: float = 1.0,
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        connect_timeout: float = 5.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        batch_size: int = 500,
        forward: Iterable[str] = ("ts", "event"),
        start_timeout: float = 5.0,
        signing_key: bytes | str | None = None,
        **redis_kwargs: Any,
    ) -> None:
        self.url = url
        self.names = Names(prefix)
        self.unsubscribe_delay = unsubscribe_delay
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.forward = tuple(forward)
        if _RESERVED.intersection(self.forward):
            raise ValueError(f"forward must not name any of {sorted(_RESERVED)}")
        if isinstance(signing_key, str):
            signing_key = signing_key.encode()
        self.signing_key = signing_key
        self.envelopes = Envelopes(signing_key, self.forward)
        self.start_timeout = start_timeout

        self.malformed = 0
        self.bad_signatures = 0
        self.reconnects = 0
        self.handler_errors = 0

        redis_kwargs.setdefault("socket_timeout", connect_timeout)
        redis_kwargs.setdefault("socket_connect_timeout", connect_timeout)
        self._redis_kwargs = redis_kwargs
        # RESP2 on the pub/sub connection: messages, confirmations and pongs arrive as plain
        # replies to read in order (redis-py >= 8 defaults to RESP3, whose pushes it diverts).
        self._sub_kwargs = {**redis_kwargs, "client_name": f"{prefix}-bridge-sub", "protocol": 2}
        self._publisher: AsyncPublisher | None = None

        self._ch = f"{prefix}:ch:".encode()
        self._user = f"{prefix}:user:".encode()
        self._all = self.names.all.encode()
        self._ctl = self.names.ctl.encode()
        self._closing = False
        self._log_malformed = _RateLimited()
        self._log_handler = _RateLimited()
        self._setup()

    def _setup(self) -> None:
        """The one link of a single Redis, always subscribed to ``all`` and ``ctl``."""
        self._pool = ConnectionPool.from_url(self.url, **self._sub_kwargs)
        self._main = _Link(self, self._pool.make_connection, mask_url(self.url))
        self._main.wanted.update((self._all, self._ctl))

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, handler: BrokerHandler) -> None:
        await super().start(handler)
        self._closing = False
        kwargs = {**self._redis_kwargs, "client_name": f"{self.names.prefix}-bridge-pub"}
        self._publisher = AsyncPublisher(
            self.url, prefix=self.names.prefix, signing_key=self.signing_key, **kwargs
        )
        try:
            await asyncio.wait_for(asyncio.shield(self._boot()), self.start_timeout)
        except TimeoutError:
            pass
        if not self.ready:
            log.warning("redis at %s is not reachable yet; retrying", mask_url(self.url))

    def _boot(self) -> asyncio.Future[None]:
        """Start the link(s); done after the first connection attempt."""
        self._main.start()
        assert self._main.first_attempt is not None
        return self._main.first_attempt

    async def close(self) -> None:
        self._closing = True
        await self._stop_links()
        if self._publisher is not None:
            await self._publisher.aclose()
            self._publisher = None
        await super().close()

    async def _stop_links(self) -> None:
        await self._main.close()

    @property
    def ready(self) -> bool:
        return self.handler is not None and self._main.up

    # -- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, channels: Iterable[str]) -> None:
        await self._want([self._ch + c.encode() for c in channels])

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._unwant([self._ch + c.encode() for c in channels])

    async def subscribe_user(self, user: str) -> None:
        await self._want([self._user + user.encode()])

    async def unsubscribe_user(self, user: str) -> None:
        self._unwant([self._user + user.encode()])

    async def _want(self, names: list[bytes]) -> None:
        await self._main.want(names)

    def _unwant(self, names: list[bytes]) -> None:
        self._main.unwant(n for n in names if n != self._all and n != self._ctl)

    # -- what the links tell the broker --------------------------------------------------------

    def _link_gap(self, link: _Link) -> None:
        """A gap on every channel with local subscribers that the link carries."""
        prefix = self._ch
        channels = [n[len(prefix) :].decode() for n in link.wanted if n.startswith(prefix)]
        if channels and self.handler is not None:
            self._call(self.handler.on_gap, channels)

    async def _retrying(self, link: _Link) -> None:
        """Called before each reconnect attempt (a cluster refreshes its slot map here)."""

    def _swept(self, link: _Link, names: list[bytes]) -> None:
        """Called when the link unsubscribed ``names`` (a cluster may close an idle link)."""

    # -- publishing ----------------------------------------------------------------------------

    def _pub(self) -> AsyncPublisher:
        if self._publisher is None:
            raise BridgeError("broker not started")
        return self._publisher

    async def _publishing(self, publish: Awaitable[Any]) -> Any:
        try:
            return await publish
        except (RedisError, OSError) as exc:
            raise BridgeError(f"redis unavailable: {exc}") from exc

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **meta: Any,
    ) -> tuple[int, str] | None:
        unknown = set(meta).difference(self.forward, ("from",))
        if unknown:
            # They would reach no client (receivers pass on only ``forward``): fail loudly.
            raise ValueError(f"envelope fields not forwarded: {', '.join(sorted(unknown))}")
        publish = self._pub().publish(
            channel, data, history_size=history_size, history_ttl=history_ttl, **meta
        )
        sent = await self._publishing(publish)
        return None if sent.offset is None else (sent.offset, sent.epoch)

    async def history(
        self,
        channel: str,
        *,
        since: int | None,
        limit: int | None,
        history_size: int,
        history_ttl: float,
        subscribing: bool = False,
    ) -> HistoryPage:
        read = self._pub().history(
            channel, since=since, limit=limit, history_size=history_size, keep_epoch=subscribing
        )
        try:
            page = await read
        except (RedisError, OSError) as exc:
            raise BridgeError(f"redis unavailable: {exc}") from exc
        if page.skipped:  # stored by a writer that could not pass hub.envelope
            self.bad_signatures += page.unsigned
            self.malformed += page.skipped - page.unsigned
        # Clients get what live pushes carry: data, the forwarded fields, offset and epoch.
        meta = self.envelopes.meta
        page.entries = [{"data": e["data"], **meta(e)} for e in page.entries]
        return page

    async def send_to_user(self, user: str, data: Any) -> None:
        await self._publishing(self._pub().send_to_user(user, data))

    async def broadcast(self, data: Any) -> None:
        await self._publishing(self._pub().broadcast(data))

    async def disconnect(self, user: str, code: int, reason: str) -> None:
        await self._publishing(self._pub().disconnect(user, code, reason))

    async def join_leave(
        self, channel: str, join: list[dict[str, Any]], leave: list[dict[str, Any]]
    ) -> None:
        """On the channel's own Redis name (every process with a subscriber listens there),
        as a map with ``join`` / ``leave`` lists instead of ``data``."""
        envelope: dict[str, Any] = {}
        if join:
            envelope["join"] = join
        if leave:
            envelope["leave"] = leave
        payload = msgpack.packb(envelope, use_bin_type=True)  # signed by _publish with a key
        await self._publishing(self._pub()._publish(self.names.channel(channel), payload))

    async def control(self, message: dict[str, Any]) -> None:
        """On the control channel every process listens on (hub.admin's heartbeats, searches)."""
        payload = msgpack.packb(message, use_bin_type=True)
        await self._publishing(self._pub()._publish(self.names.ctl, payload))

    # -- incoming messages ---------------------------------------------------------------------

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self._handler_failed()

    def _handler_failed(self) -> None:
        """A node callback raised: count and log it; the link goes on with the next message."""
        self.handler_errors += 1
        self._log_handler(log.error, "broker callback failed", exc_info=True)

    def _malformed(self, name: bytes, why: str) -> None:
        self.malformed += 1
        self._log_malformed(log.warning, "dropped a malformed message on %r: %s", name, why)

    def _on_admin(self, name: bytes, message: dict[str, Any]) -> None:
        """hub.admin's heartbeats and searches: it checks their fields (False: malformed)."""
        assert self.handler is not None
        try:
            if not self.handler.on_admin(message):
                self._malformed(name, f"bad {message['op'][:40]} message")
        except Exception:
            self._handler_failed()

    def _bad_signature(self, name: bytes, why: str) -> None:
        self.bad_signatures += 1
        self._log_malformed(log.warning, "dropped a message on %r: %s", name, why)

    def _on_message(self, name: bytes, payload: bytes) -> None:
        """One pub/sub message: opened and checked by ``hub.envelope`` (the one place that
        decides what a payload from Redis may hold), then handed to the node."""
        handler = self.handler
        if handler is None:
            return
        envelopes = self.envelopes
        try:
            envelope = envelopes.open(name, payload)
            if name == self._ctl:
                kind, args = envelopes.control(envelope)
                if kind == "disconnect":
                    self._call(handler.on_disconnect, *args)
                elif kind == "admin":
                    self._on_admin(name, envelope)
                else:
                    log.debug("ignoring control message %r", envelope["op"][:40])
                return
            if "data" not in envelope:
                if name.startswith(self._ch) and ("join" in envelope or "leave" in envelope):
                    join, leave = envelopes.join_leave(envelope)
                    channel = name[len(self._ch) :].decode()
                    self._call(handler.on_join_leave, channel, join, leave)
                    return
                raise BadEnvelope("no data field")
            data = envelope["data"]
            if name.startswith(self._ch):
                meta = envelopes.meta(envelope) if len(envelope) > 1 else {}
                channel = name[len(self._ch) :].decode()
                publication = Publication(channel, data, meta)
                try:  # as _call does, without a call per message
                    handler.on_publication(publication)
                except Exception:
                    self._handler_failed()
            elif name.startswith(self._user):
                user = name[len(self._user) :].decode()
                try:
                    handler.on_user_message(user, data)
                except Exception:
                    self._handler_failed()
            elif name == self._all:
                self._call(handler.on_broadcast, data)
        except BadSignature as exc:
            self._bad_signature(name, str(exc))
        except BadEnvelope as exc:
            self._malformed(name, str(exc))


class RedisClusterBroker(RedisBroker):
    """The bridge on a Redis Cluster, with sharded pub/sub (Redis 7): the same channel names,
    envelope, lazy unsubscribe, gaps and readiness as on one Redis.

    Sharded pub/sub delivers a message only to subscribers connected to the shard (master) that
    owns the channel's hash slot, so there is a link per shard owning a slot of something this
    process subscribes (``all`` and ``ctl`` included), each speaking ``SSUBSCRIBE``; a link
    whose last channel is unsubscribed is closed. Publishing uses ``SPUBLISH`` on the owning
    shard (``AsyncPublisher`` in cluster mode).

    The slot map comes from ``CLUSTER SLOTS`` of any reachable node (the seeds of the URL
    first). A link that fails (the shard went away, answered ``MOVED``, or dropped a
    subscription because its slot moved) reports a gap for its channels like the single-node
    link does, and before each reconnect attempt the map is refreshed and channels whose slot
    now belongs to another shard move to that shard's link (and get a gap notice once
    subscribed there). ``ready`` means every link is up.
    """

    def _setup(self) -> None:
        self._map = SlotMap(self.url, **self._redis_kwargs)
        self._links: dict[Addr, _Link] = {}
        # What this process needs subscribed, by Redis channel name, and the link carrying it.
        self._wanted: set[bytes] = {self._all, self._ctl}
        self._route_of: dict[bytes, _Link] = {}
        self._booting: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._log_map = _RateLimited()

    # -- lifecycle -----------------------------------------------------------------------------

    def _boot(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self._booting = loop.create_task(self._first_map(), name="hub-bridge-cluster-boot")
        return self._booting

    async def _first_map(self) -> None:
        """Learn the slot map (retrying with backoff), then open the links."""
        attempt = 0
        while True:
            try:
                await self._map.refresh()
                break
            except (RedisError, OSError, TimeoutError) as exc:
                url = mask_url(self.url)
                self._log_map(log.warning, "redis cluster at %s unreachable: %s", url, exc)
            delay = min(self.backoff_max, self.backoff_min * 2**attempt)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        groups = self._route(list(self._wanted))
        await asyncio.gather(*(self._subscribe_on(link, group) for link, group in groups.items()))
        # Subscribes made before the map was known returned unconfirmed.
        routes = self._route_of
        self._gap_names([n for n in self._wanted if n in routes and routes[n].up])

    async def _stop_links(self) -> None:
        booting, self._booting = self._booting, None
        if booting is not None:
            booting.cancel()
            await asyncio.gather(booting, return_exceptions=True)
        links, self._links = list(self._links.values()), {}
        self._route_of.clear()
        await asyncio.gather(*(link.close() for link in links))
        await asyncio.gather(*self._retired, return_exceptions=True)

    @property
    def ready(self) -> bool:
        links = self._links.values()
        return self.handler is not None and bool(links) and all(link.up for link in links)

    # -- routing -------------------------------------------------------------------------------

    def _link_for(self, addr: Addr) -> _Link:
        link = self._links.get(addr)
        if link is None:
            pool = self._map.pool(addr, **self._sub_kwargs)
            label = f"{addr[0]}:{addr[1]}"
            link = self._links[addr] = _Link(
                self, pool.make_connection, label, sharded=True, addr=addr
            )
            link.start()
        return link

    def _route(self, names: Iterable[bytes]) -> dict[_Link, list[bytes]]:
        """Assign ``names`` to the links of the shards owning them (moving them off a link
        whose shard no longer does); the names to subscribe, per link."""
        groups: dict[_Link, list[bytes]] = {}
        for name in names:
            addr = self._map.owner(name)
            old = self._route_of.get(name)
            if addr is None:  # map unknown, or a slot nobody serves: wait for a refresh
                if old is not None:
                    old.forget([name])
                    del self._route_of[name]
                continue
            link = self._link_for(addr)
            if old is not link:
                if old is not None:
                    old.forget([name])
                self._route_of[name] = link
            groups.setdefault(link, []).append(name)
        return groups

    def _retire(self, link: _Link) -> None:
        """Close a link with nothing left to carry. Not awaited: the link may be the caller."""
        if link.addr is not None and self._links.get(link.addr) is link:
            del self._links[link.addr]
        task = asyncio.get_running_loop().create_task(link.close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _want(self, names: list[bytes]) -> None:
        self._wanted.update(names)
        groups = self._route(names)
        await asyncio.gather(*(self._subscribe_on(link, group) for link, group in groups.items()))

    @staticmethod
    async def _subscribe_on(link: _Link, names: list[bytes]) -> None:
        """``link.want``, but on a link still making its first connection, wait for that first:
        a new shard's link must not let a subscribe return before Redis confirmed it."""
        first = link.first_attempt
        if first is not None and not first.done():
            link.wanted.update(names)  # so that the link subscribes them if it connects first
            await asyncio.shield(first)
        await link.want(names)

    def _unwant(self, names: list[bytes]) -> None:
        for name in names:
            if name == self._all or name == self._ctl:
                continue
            self._wanted.discard(name)
            link = self._route_of.get(name)
            if link is None:
                continue
            link.unwant([name])
            if name not in link._lingering:  # not subscribed (link down): nothing to sweep
                del self._route_of[name]
                if link.idle:
                    self._retire(link)

    # -- what the links tell the broker --------------------------------------------------------

    def _swept(self, link: _Link, names: list[bytes]) -> None:
        for name in names:
            if self._route_of.get(name) is link and name not in self._wanted:
                del self._route_of[name]
        if link.idle:
            self._retire(link)

    async def _retrying(self, link: _Link) -> None:
        """Before a link reconnects: refresh the slot map and move channels whose slot moved
        (a shard that is merely down still owns its slots, and its link keeps retrying)."""
        try:
            await self._map.refresh()
        except (RedisError, OSError, TimeoutError) as exc:
            self._log_map(log.warning, "redis cluster slot map refresh failed: %s", exc)
            return
        await self._reroute()

    async def _reroute(self) -> None:
        moved = []
        for name in self._wanted:
            old = self._route_of.get(name)
            if old is None or old.addr != self._map.owner(name):
                moved.append(name)
        if not moved:
            return
        groups = self._route(moved)
        for other in list(self._links.values()):
            if other.idle:
                self._retire(other)
        await asyncio.gather(*(self._subscribe_on(link, group) for link, group in groups.items()))
        for link, group in groups.items():
            if link.up:  # a link still connecting reports a gap once it is up
                channels = [n for n in group if n.startswith(self._ch)]
                self._gap_names(channels)

    def _gap_names(self, names: list[bytes]) -> None:
        prefix = self._ch
        channels = [n[len(prefix) :].decode() for n in names if n.startswith(prefix)]
        if channels and self.handler is not None:
            self._call(self.handler.on_gap, channels)
