"""The pub/sub link: one Redis pub/sub connection, what it should hold subscribed, and the task
that keeps it alive (connect, subscribe in batches, read, probe with PING, reconnect with
exponential backoff and jitter).

The single-node broker (``hub.redis.broker``) has one link; the cluster broker
(``hub.redis.cluster_broker``) has one per shard owning a slot of something it subscribes,
speaking ``SSUBSCRIBE`` there. The link knows nothing of envelopes or of the node: every message
goes to its owner's ``_on_message`` as ``(Redis channel name, payload)``, and it tells its owner
when to report a gap (``_link_gap``: the link went down, or came back and what was published
in between is lost), before each reconnect attempt (``_retrying``, where a cluster refreshes
its slot map), what it unsubscribed (``_swept``) and what Redis unsubscribed because the
slot left the shard (``_slot_left``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import RedisError

from ..errors import RedisUnavailable
from .cluster import Addr
from .resp import RespStream

__all__ = ["Link", "LinkOwner", "RateLimitedLog"]

log = logging.getLogger("hub.redis")


class LinkOwner(Protocol):
    """What a link needs of the broker it serves: its settings, its counters and its callbacks."""

    unsubscribe_delay: float
    ping_interval: float
    ping_timeout: float
    connect_timeout: float
    backoff_min: float
    backoff_max: float
    batch_size: int
    reconnects: int
    _closing: bool

    def _on_message(self, name: bytes, payload: bytes) -> None: ...

    def _link_gap(self, link: Link) -> None: ...

    async def _retrying(self, link: Link) -> None: ...

    def _swept(self, link: Link, names: list[bytes]) -> None: ...

    def _slot_left(self, link: Link, name: bytes) -> None: ...


class RateLimitedLog:
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


class Link:
    """One pub/sub connection (see the module docstring). ``sharded``: speak ``SSUBSCRIBE``
    to the shard at ``addr``, one slot per command."""

    def __init__(
        self,
        broker: LinkOwner,
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
        self._log_connect = RateLimitedLog()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._closing = False
        self.first_attempt = loop.create_future()
        self._task = loop.create_task(self._run(), name=f"hub-redis-link {self.label}")

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
            except (RedisError, OSError, TimeoutError, RedisUnavailable) as exc:
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
            raise RedisUnavailable(f"redis did not answer {what} within {timeout}s")

    @staticmethod
    def _reader_failed(reader: asyncio.Task[None]) -> None:
        if not reader.cancelled():
            exc = reader.exception()
            if exc is not None:
                raise exc
        raise RedisUnavailable("redis connection closed")

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
            # Redis dropped the subscription itself: the slot now belongs to another shard (a
            # migration ended, or a failover). Only that name moves; the link carries on.
            self._sent.discard(name)
            for batch in self._pending.pop(name, ()):
                batch.confirm()
            self.broker._slot_left(self, name)

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
