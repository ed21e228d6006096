"""Publish to hub processes through Redis, from any backend: the contract in docs/publish-api.md.

A hub process joined by :class:`hub.bridge.RedisBroker` listens on a few Redis channels under a
prefix (``hub`` by default): ``<prefix>:ch:<channel>`` for channel publications,
``<prefix>:user:<user id>`` for per-user messages, ``<prefix>:all`` for broadcasts and
``<prefix>:ctl`` for control messages (a server-side disconnect). Every payload is a msgpack map:
``{"data": <value>, ...optional fields}`` or, on the control channel,
``{"op": "disconnect", "user": ..., "code": ..., "reason": ...}``.

:class:`Publisher` (blocking, on ``redis.Redis``) and :class:`AsyncPublisher` (on
``redis.asyncio``) write exactly that, so a backend never builds envelopes by hand. The hub's own
bridge publishes through :class:`AsyncPublisher` too: there is one implementation of the format.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import msgpack
import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.cluster import ClusterNode
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .envelope import Envelopes, disconnect_problem, seal
from .history import (
    PUBLISH_SCRIPT,
    READ_SCRIPT,
    HistoryPage,
    PublishCommands,
    Published,
    Script,
    publish_args,
    read_args,
)
from .resp import RespStream, pack_command, pack_publish

__all__ = [
    "CLUSTER_SCHEME",
    "DEFAULT_PREFIX",
    "DISCONNECT_CODE",
    "AsyncPublisher",
    "HistoryPage",
    "Names",
    "Published",
    "Publisher",
    "SlotMap",
    "is_cluster_url",
    "pack_disconnect",
    "pack_message",
]

DEFAULT_PREFIX = "hub"
#: Close code of a server-side disconnect when none is given: "disconnected, do not reconnect".
DISCONNECT_CODE = 4503
#: Bytes of a signing key, at least (the size of the HMAC-SHA256 output).
MIN_SIGNING_KEY = 32
#: URL scheme of a Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...]``.
CLUSTER_SCHEME = "redis+cluster://"
#: Redis Cluster hash slots.
SLOTS = 16384
#: After a shard's connection failed, a cluster publisher refreshes its slot map at most this
#: often (seconds): a failover moves slots to another address, a dead shard only costs a lookup.
STALE_REFRESH = 1.0

Addr = tuple[str, int]


class Names:
    """The Redis channel names for one prefix. Publishers and the bridge share this so the two
    sides cannot disagree on a name."""

    __slots__ = ("all", "ctl", "prefix")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError("prefix must be a non-empty string without whitespace")
        self.prefix = prefix
        self.all = f"{prefix}:all"
        self.ctl = f"{prefix}:ctl"

    def channel(self, channel: str) -> str:
        return f"{self.prefix}:ch:{channel}"

    def user(self, user: str) -> str:
        return f"{self.prefix}:user:{user}"


def _non_empty(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def pack_message(data: Any, fields: Mapping[str, Any] | None = None) -> bytes:
    """The envelope ``{"data": data, **fields}`` in msgpack.

    ``bytes`` values become msgpack ``bin`` and ``str`` values msgpack ``str``: the hub keeps that
    distinction, and a push whose data holds bytes reaches JSON clients as a binary frame.
    """
    pack = _packer().pack
    if not fields:
        return _DATA_MAP + pack(data)
    if "data" in fields:
        raise ValueError("the data field is given separately")
    return pack({"data": data, **fields})


#: msgpack for a map of one entry whose key is "data": what ``{"data": data}`` starts with.
_DATA_MAP = b"\x81\xa4data"

_local = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's packer: ``msgpack.packb`` makes a new one per call, which costs more than
    packing a small message. One per thread, since a packer's buffer is not thread-safe."""
    try:
        packer: msgpack.Packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _history_options(size: Any, ttl: Any, fields: Mapping[str, Any]) -> None:
    """Check the history keywords: bad values fail at the caller, not inside Redis."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("history_size must be a non-negative integer")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 0:
        raise ValueError("history_ttl must be a non-negative number of seconds")
    if "offset" in fields or "epoch" in fields:
        raise ValueError("offset and epoch are assigned by the history script")


def _limit(since: int | None, limit: int | None) -> None:
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise ValueError("since must be a non-negative integer offset")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError("limit must be a non-negative integer")


def pack_disconnect(user: str, code: int = DISCONNECT_CODE, reason: str = "") -> bytes:
    """The control message that closes every connection of ``user`` on every hub process.

    Checked here like the HTTP API checks it, so a bad value fails at the caller instead of being
    dropped (and counted as malformed) by every hub.
    """
    problem = disconnect_problem(user, code, reason)
    if problem is not None:
        raise ValueError(problem)
    control = {"op": "disconnect", "user": user, "code": code, "reason": reason}
    return msgpack.packb(control, use_bin_type=True)


def _signing_key(key: bytes | str | None) -> bytes | None:
    """``signing_key`` as bytes; short keys are refused (HMAC-SHA256 wants 32 bytes or more)."""
    if key is None:
        return None
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_SIGNING_KEY:
        raise ValueError(f"signing_key must have at least {MIN_SIGNING_KEY} bytes")
    return raw


def is_cluster_url(url: str | None) -> bool:
    return url is not None and url.startswith(CLUSTER_SCHEME)


def parse_cluster_url(url: str) -> tuple[list[Addr], str, str]:
    """Seed nodes, ``user:password@`` (or empty) and ``?query`` (or empty) of a cluster URL.

    ``redis://host:port`` is taken as a single seed too, for ``cluster=True``.
    """
    for scheme in (CLUSTER_SCHEME, "redis://"):
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            break
    else:
        raise ValueError(f"expected a {CLUSTER_SCHEME} url")
    rest, _, query = rest.partition("?")
    rest = rest.partition("/")[0]  # a cluster has database 0 only
    userinfo, _, hosts = rest.rpartition("@")
    seeds: list[Addr] = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster seed must be host:port, got {item!r}")
        seeds.append((host.strip("[]"), int(port)))
    return seeds, f"{userinfo}@" if userinfo else "", f"?{query}" if query else ""


class SlotMap:
    """Which master owns which hash slot, learnt from ``CLUSTER SLOTS`` of any reachable node.

    Sharded pub/sub (``SPUBLISH`` / ``SSUBSCRIBE``) reaches only the subscribers connected to the
    shard that owns the channel's slot, so both the publisher and the bridge route every channel
    with this map. Refreshes are shared: concurrent callers wait for the same ``CLUSTER SLOTS``.
    """

    def __init__(self, url: str, **redis_kwargs: Any) -> None:
        self.seeds, self._userinfo, self._query = parse_cluster_url(url)
        self._kwargs = redis_kwargs
        self.slots: list[Addr | None] | None = None
        self.refreshed_at = -math.inf  # time.monotonic() of the last successful refresh
        self._refreshing: asyncio.Task[None] | None = None

    def node_url(self, addr: Addr) -> str:
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"redis://{self._userinfo}{host}:{addr[1]}/0{self._query}"

    def pool(self, addr: Addr, **overrides: Any) -> ConnectionPool:
        return ConnectionPool.from_url(self.node_url(addr), **{**self._kwargs, **overrides})

    def owner(self, name: str | bytes) -> Addr | None:
        """The master that owns ``name``'s slot; None when the map is unknown or has a hole."""
        if self.slots is None:
            return None
        return self.slots[key_slot(name.encode() if isinstance(name, str) else name)]

    @property
    def masters(self) -> set[Addr]:
        return {addr for addr in self.slots or () if addr is not None}

    async def refresh(self) -> None:
        task = self._refreshing
        if task is None:
            task = self._refreshing = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(lambda _: setattr(self, "_refreshing", None))
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        # Known masters first (the seeds may be gone since), then the seeds.
        candidates = list(dict.fromkeys([*sorted(self.masters), *self.seeds]))
        last: BaseException | None = None
        for addr in candidates:
            connection = self.pool(addr).make_connection()
            try:
                await connection.connect()
                await connection.send_command("CLUSTER", "SLOTS")
                reply = await connection.read_response()
            except (RedisError, OSError, TimeoutError) as exc:
                last = exc
                continue
            finally:
                await connection.disconnect(nowait=True)
            if not reply:
                last = RedisConnectionError(f"{addr[0]}:{addr[1]} serves no slots")
                continue
            slots: list[Addr | None] = [None] * SLOTS
            for entry in reply:
                start, end, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode() if isinstance(master[0], bytes) else master[0]
                owner = (host or addr[0], int(master[1]))
                slots[start : end + 1] = [owner] * (end + 1 - start)
            self.slots = slots
            self.refreshed_at = time.monotonic()
            return
        raise RedisConnectionError(f"no cluster node answered: {last}")


class Publisher:
    """Blocking publisher for backends (web apps, workers, scripts).

    Each method returns how many hub processes received the message (Redis counts subscribed
    connections; a hub process has one), which is 0 when no process has a local subscriber.

    A ``redis+cluster://host:port[,host:port...]`` URL (or ``cluster=True``, or a
    ``redis.RedisCluster`` client) publishes with ``SPUBLISH`` to the shard owning each channel,
    for hubs joined through a Redis Cluster.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        client: redis.Redis | redis.RedisCluster | None = None,
        cluster: bool = False,
        signing_key: bytes | str | None = None,
        **redis_kwargs: Any,
    ) -> None:
        self.names = Names(prefix)
        self._key = _signing_key(signing_key)
        self._envelopes = Envelopes(self._key)
        if client is None:
            if url is None:
                raise ValueError("give a redis url or a client")
            if cluster or is_cluster_url(url):
                seeds, userinfo, _ = parse_cluster_url(url)
                if userinfo:
                    user, _, password = userinfo[:-1].partition(":")
                    redis_kwargs.setdefault("username", urllib.parse.unquote(user) or None)
                    redis_kwargs.setdefault("password", urllib.parse.unquote(password) or None)
                nodes = [ClusterNode(host, port) for host, port in seeds]
                client = redis.RedisCluster(startup_nodes=nodes, **redis_kwargs)
            else:
                client = redis.Redis.from_url(url, **redis_kwargs)
            self._owned = True
        else:
            self._owned = False
        self.client = client
        # Sharded pub/sub on a cluster: a plain PUBLISH there is broadcast over the cluster bus
        # and never reaches SSUBSCRIBE subscribers.
        sharded = isinstance(client, redis.RedisCluster)
        self._sharded = sharded
        self._publish_raw: Callable[[str, bytes], Any] = (
            client.spublish if sharded else client.publish
        )
        self._publish_script = client.register_script(PUBLISH_SCRIPT.text)
        self._read_script = client.register_script(READ_SCRIPT.text)

    def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **fields: Any,
    ) -> Published:
        """Publish ``data`` to ``channel``; ``fields`` are optional envelope fields.

        With ``history_size > 0`` (the channel's namespace keeps history: pass its
        ``history_size`` and ``history_ttl``) the publication is stored and gets the channel's
        next offset, in one script run (``hub/history.lua``); the result then carries
        ``offset`` and ``epoch``.
        """
        name = self.names.channel(_non_empty("channel", channel))
        _history_options(history_size, history_ttl, fields)
        payload = seal(self._key, name.encode(), pack_message(data, fields))
        if not history_size:
            return Published(int(self._publish_raw(name, payload)))
        args = publish_args(name, payload, history_size, history_ttl, self._sharded)
        return Published.from_reply(self._publish_script(keys=args[1:3], args=args[3:]))

    def history(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        history_size: int = 0,
        history_ttl: float = 0.0,
    ) -> HistoryPage:
        """The channel's stored publications: after offset ``since`` (at most ``limit``), or
        the newest ``limit`` (all when None), oldest first, with the current offset and epoch.
        Give the namespace's ``history_size``: the stream is trimmed approximately, and
        offsets older than the newest ``history_size`` are left out (0: no bound).
        ``history_ttl`` is checked but not needed (a read writes nothing). A channel with no
        history answers offset 0 and an epoch that is not kept."""
        name = self.names.channel(_non_empty("channel", channel))
        _limit(since, limit)
        _history_options(history_size, history_ttl, {})
        args = read_args(name, since, limit, history_size)
        entry = functools.partial(self._envelopes.entry, name.encode())
        return HistoryPage.from_reply(self._read_script(keys=args[1:3], args=args[3:]), entry)

    def send_to_user(self, user: str, data: Any) -> int:
        name = self.names.user(_non_empty("user", user))
        return int(self._send(name, pack_message(data)))

    def send_to_users(self, messages: Iterable[tuple[str, Any]]) -> list[int]:
        """Send each ``(user, data)`` pair, in order, in one round trip; returns, per message,
        how many hub processes received it (0: the user is connected nowhere).

        For notifying many users at once: per message it costs a fraction of
        :meth:`send_to_user`, which waits for Redis each time.
        """
        payloads = []
        for user, data in messages:
            name = self.names.user(_non_empty("user", user))
            payloads.append((name, seal(self._key, name.encode(), pack_message(data))))
        if isinstance(self.client, redis.RedisCluster):  # each user channel has its own shard
            return [int(self._publish_raw(name, payload)) for name, payload in payloads]
        pipe = self.client.pipeline(transaction=False)
        for name, payload in payloads:
            pipe.publish(name, payload)
        return [int(n) for n in pipe.execute()]

    def broadcast(self, data: Any) -> int:
        return int(self._send(self.names.all, pack_message(data)))

    def disconnect(self, user: str, code: int = DISCONNECT_CODE, reason: str = "") -> int:
        return int(self._send(self.names.ctl, pack_disconnect(user, code, reason)))

    def _send(self, name: str, payload: bytes) -> Any:
        return self._publish_raw(name, seal(self._key, name.encode(), payload))

    def close(self) -> None:
        if self._owned:
            self.client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: A caller waiting on a pipeline: its commands, its future, whether it wants all the replies.
_Waiting = tuple[list[tuple[Any, ...] | bytes], asyncio.Future[Any], bool]


class _Pipeline:
    """One Redis connection whose commands are pipelined: everything queued during one event-loop
    turn is written in one go, and replies are matched in order.

    Concurrent publishers then share round trips instead of each waiting for its own (or queueing
    behind a lock), and one process's publishes reach Redis in the order they were made. A
    command that fails on a broken connection is not retried: it may have been executed.
    """

    def __init__(self, make_connection: Callable[[], AbstractConnection]) -> None:
        self._make_connection = make_connection
        self._connection: AbstractConnection | None = None
        self._resp: RespStream | None = None  # replies read past redis-py (see hub.resp)
        # Callers waiting, in order: their commands (each its arguments, or bytes already in
        # RESP, see hub.resp.pack_command), one future for all of them, and whether that future
        # takes the list of replies (execute_many) or the one reply.
        self._queue: list[_Waiting] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        return await self.execute_packed(args)

    async def execute_packed(self, command: tuple[Any, ...] | bytes) -> Any:
        """Run one command: its arguments, or the command already packed (``pack_command``)."""
        return await self._enqueue([command], False)

    async def execute_many(self, commands: list[tuple[Any, ...] | bytes]) -> list[Any]:
        """Run several commands in order, written together, and return their replies: one
        future for the lot, so a batch costs little more than its bytes. One that fails raises
        (the first error) once all of them ran."""
        if not commands:
            return []
        result: list[Any] = await self._enqueue(commands, True)
        return result

    def _enqueue(self, commands: list[tuple[Any, ...] | bytes], many: bool) -> asyncio.Future[Any]:
        if self._closed:
            raise RedisConnectionError("publisher closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((commands, future, many))
        if self._task is None:
            self._task = loop.create_task(self._run())
        return future

    async def _connect(self) -> AbstractConnection:
        connection = self._connection
        if connection is not None and connection.is_connected:
            # The peer may have closed an idle connection (a Redis restart): EOF already read by
            # the transport shows here, and a fresh connection avoids failing the next batch.
            if not await connection.can_read():
                return connection
            await connection.disconnect(nowait=True)
        if connection is None:
            connection = self._connection = self._make_connection()
        await connection.connect()
        self._resp = RespStream.of(connection)
        return connection

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._task = None

    async def _reply(self, connection: AbstractConnection) -> Any:
        """The next reply; an error reply is returned as its exception, not raised."""
        if self._resp is not None:
            return await self._resp.next()
        try:
            return await connection.read_response()
        except ResponseError as exc:
            return exc

    async def _send(self, batch: list[_Waiting]) -> None:
        index = 0
        try:
            connection = await self._connect()
            commands = [c for waiting in batch for c in waiting[0]]
            packed: Any
            if self._resp is None:
                packed = [
                    c if type(c) is bytes else b"".join(connection.pack_command(*c))
                    for c in commands
                ]
            else:
                packed = b"".join(c if type(c) is bytes else pack_command(*c) for c in commands)
            await connection.send_packed_command(packed, check_health=False)
            resp = self._resp
            for index, (waiting, future, many) in enumerate(batch):  # noqa: B007 - on failure
                if resp is not None:
                    replies = await resp.take(len(waiting))
                else:
                    replies = [await self._reply(connection) for _ in waiting]
                if future.done():
                    continue
                error = next((r for r in replies if isinstance(r, ResponseError)), None)
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(replies if many else replies[0])
            index = len(batch)
        except Exception as exc:
            if self._connection is not None:
                await self._connection.disconnect(nowait=True)
            for _, future, _ in batch[index:]:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # cancelled (close): the replies can no longer be matched
            if self._connection is not None:
                await self._connection.disconnect(nowait=True)
            for _, future, _ in batch[index:]:
                future.cancel()
            raise

    async def close(self) -> None:
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _, future, _ in self._queue:
            future.cancel()
        self._queue.clear()
        if self._connection is not None:
            await self._connection.disconnect()


class Router:
    """Pipelined commands for Redis: on one connection, or on a Redis Cluster on one connection
    per shard, each command sent to the shard owning the slot of the name it is for.

    On a cluster a ``MOVED``/``ASK``/``TRYAGAIN`` answer (Redis did not run the command)
    refreshes the slot map and is retried; a failed connection is not retried (the command may
    have run), but the next command looks the owner up again, in case the shard failed over.
    """

    def __init__(
        self,
        make_connection: Callable[[], AbstractConnection] | None = None,
        slot_map: SlotMap | None = None,
    ) -> None:
        if (make_connection is None) == (slot_map is None):
            raise ValueError("give a connection factory or a cluster slot map")
        self.slot_map = slot_map
        self._single = None if make_connection is None else _Pipeline(make_connection)
        self._shards: dict[Addr, _Pipeline] = {}
        self._stale = False

    @classmethod
    def from_url(cls, url: str, **redis_kwargs: Any) -> Router:
        if is_cluster_url(url):
            return cls(slot_map=SlotMap(url, **redis_kwargs))
        return cls(ConnectionPool.from_url(url, **redis_kwargs).make_connection)

    @property
    def sharded(self) -> bool:
        return self.slot_map is not None

    async def execute(self, name: str, *command: Any) -> Any:
        return await self.execute_packed(name, command)

    async def execute_packed(self, name: str, command: tuple[Any, ...] | bytes) -> Any:
        """Run ``command`` (arguments, or packed RESP) on the connection for ``name``."""
        if self._single is not None:
            return await self._single.execute_packed(command)
        slots = self.slot_map
        assert slots is not None
        for attempt in range(3):
            if slots.slots is None or (
                self._stale and time.monotonic() - slots.refreshed_at > STALE_REFRESH
            ):
                self._stale = False
                await slots.refresh()
            addr = slots.owner(name)
            if addr is None:
                raise RedisConnectionError(f"no cluster node serves {name!r}")
            shard = self._shards.get(addr)
            if shard is None:
                shard = self._shards[addr] = _Pipeline(slots.pool(addr).make_connection)
            try:
                return await shard.execute_packed(command)
            except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
                self._stale = True
                raise
            except (MovedError, AskError, TryAgainError):
                if attempt == 2:
                    raise
                await slots.refresh()  # not executed by Redis: safe to send again
        raise AssertionError("unreachable")

    async def execute_many(self, commands: list[tuple[Any, ...] | bytes]) -> list[Any]:
        """Several commands written together (one connection only: on a cluster, route them
        one by one with :meth:`execute_packed`)."""
        if self._single is None:
            raise RuntimeError("execute_many needs a single redis")
        return await self._single.execute_many(commands)

    async def script(self, name: str, script: Script, args: list[Any]) -> Any:
        """``EVALSHA``, and ``EVAL`` once when Redis does not know the script (a fresh or
        flushed server): NOSCRIPT means it did not run, so sending it again is safe.
        ``args`` starts with the key count and the keys, as ``EVALSHA`` takes them."""
        try:
            return await self.execute_packed(
                name, pack_command(b"EVALSHA", script.sha_bytes, *args)
            )
        except NoScriptError:
            return await self.execute_packed(name, pack_command(b"EVAL", script.text_bytes, *args))

    async def close(self) -> None:
        pipelines = [*self._shards.values()]
        self._shards = {}
        if self._single is not None:
            pipelines.append(self._single)
        for pipeline in pipelines:
            await pipeline.close()


class AsyncPublisher:
    """Publisher for asyncio backends, on one pipelined connection of its own.

    Publishes made concurrently share round trips; publishes from one task arrive in order. A
    publish that meets a broken connection raises ``redis.exceptions.ConnectionError`` (or
    ``TimeoutError``) and is not retried; the next one reconnects.

    With a ``redis+cluster://`` URL (or ``cluster=True``) it publishes with ``SPUBLISH`` on one
    pipelined connection per shard, routed by hash slot: a channel always maps to one shard, so
    publishes from one task still arrive in order per channel. A ``MOVED`` answer (the slot has
    moved; Redis did not deliver) refreshes the slot map and is retried.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        client: redis.asyncio.Redis | None = None,
        timeout: float = 5.0,
        cluster: bool = False,
        signing_key: bytes | str | None = None,
        **redis_kwargs: Any,
    ) -> None:
        self.names = Names(prefix)
        self._key = _signing_key(signing_key)
        self._envelopes = Envelopes(self._key)
        if isinstance(client, redis.asyncio.RedisCluster):
            raise ValueError("for a cluster, give a redis+cluster:// url (one pipeline per shard)")
        if client is not None:
            # A dedicated connection made with the client's settings (address, auth, TLS).
            self._router = Router(client.connection_pool.make_connection)
        elif url is not None:
            redis_kwargs.setdefault("socket_timeout", timeout)
            redis_kwargs.setdefault("socket_connect_timeout", timeout)
            if cluster or is_cluster_url(url):
                self._router = Router(slot_map=SlotMap(url, **redis_kwargs))
            else:
                self._router = Router.from_url(url, **redis_kwargs)
        else:
            raise ValueError("give a redis url or a client")
        self._commands = PublishCommands()

    async def _publish(self, name: str, payload: bytes) -> int:
        """PUBLISH (SPUBLISH) ``payload``, signed first when there is a key."""
        if self._key is not None:
            payload = seal(self._key, name.encode(), payload)
        command = b"SPUBLISH" if self._router.sharded else b"PUBLISH"
        return int(await self._router.execute_packed(name, pack_publish(command, name, payload)))

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **fields: Any,
    ) -> Published:
        """Publish ``data`` to ``channel``; ``fields`` are optional envelope fields. With
        ``history_size > 0`` it is stored in the channel's history and the result carries
        ``offset`` and ``epoch`` (see :meth:`Publisher.publish`)."""
        name = self.names.channel(_non_empty("channel", channel))
        _history_options(history_size, history_ttl, fields)
        payload = pack_message(data, fields)
        if not history_size:
            return Published(await self._publish(name, payload))
        payload = seal(self._key, name.encode(), payload)
        sharded = self._router.sharded
        command, epoch = self._commands.packed(name, payload, history_size, history_ttl, sharded)
        try:
            reply = await self._router.execute_packed(name, command)
        except NoScriptError:
            args = publish_args(name, payload, history_size, history_ttl, sharded, epoch)
            command = pack_command(b"EVAL", PUBLISH_SCRIPT.text_bytes, *args)
            reply = await self._router.execute_packed(name, command)
        return Published.from_reply(reply)

    async def history(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        history_size: int = 0,
        history_ttl: float = 0.0,
        keep_epoch: bool = False,
    ) -> HistoryPage:
        """See :meth:`Publisher.history`. ``keep_epoch``: what a hub's subscribe does, keep
        the epoch answered for a channel with no history yet (``hub.history.EMPTY_TTL``), so
        the first publication gets it."""
        name = self.names.channel(_non_empty("channel", channel))
        _limit(since, limit)
        _history_options(history_size, history_ttl, {})
        args = read_args(name, since, limit, history_size, keep_epoch)
        entry = functools.partial(self._envelopes.entry, name.encode())
        return HistoryPage.from_reply(await self._router.script(name, READ_SCRIPT, args), entry)

    async def send_to_user(self, user: str, data: Any) -> int:
        return await self._publish(self.names.user(_non_empty("user", user)), pack_message(data))

    async def send_to_users(self, messages: Iterable[tuple[str, Any]]) -> list[int]:
        """Send each ``(user, data)`` pair, in order, pipelined in one write; returns, per
        message, how many hub processes received it. See :meth:`Publisher.send_to_users`."""
        user = self.names.user
        if self._router.sharded:  # routed one by one, each to its shard's pipeline
            payloads = [(user(_non_empty("user", u)), pack_message(d)) for u, d in messages]
            return list(await asyncio.gather(*(self._publish(n, p) for n, p in payloads)))
        key = self._key
        if key is None:
            commands = [
                pack_publish(b"PUBLISH", user(_non_empty("user", u)), pack_message(d))
                for u, d in messages
            ]
        else:
            commands = []
            for u, d in messages:
                name = user(_non_empty("user", u))
                payload = seal(key, name.encode(), pack_message(d))
                commands.append(pack_publish(b"PUBLISH", name, payload))
        replies = await self._router.execute_many(commands)
        return [int(n) for n in replies]

    async def broadcast(self, data: Any) -> int:
        return await self._publish(self.names.all, pack_message(data))

    async def disconnect(self, user: str, code: int = DISCONNECT_CODE, reason: str = "") -> int:
        return await self._publish(self.names.ctl, pack_disconnect(user, code, reason))

    async def aclose(self) -> None:
        await self._router.close()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
