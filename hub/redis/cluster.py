"""Redis Cluster topology and routing: which shard owns a name, and commands sent there.

Sharded pub/sub (``SPUBLISH`` / ``SSUBSCRIBE``, Redis 7) reaches only the subscribers connected
to the master that owns the channel's hash slot, and keys live on the master of their slot, so
everything the hub sends to a cluster is routed by slot: the broker's pub/sub links
(``hub.redis.cluster_broker``) and the pipelines of publishers, presence and inboxes
(:class:`Router`). :class:`SlotMap` is the one map both use.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .pipeline import Pipeline
from .resp import pack_command
from .script import Script

__all__ = [
    "CLUSTER_SCHEME",
    "Addr",
    "Router",
    "SlotMap",
    "is_cluster_url",
    "parse_cluster_url",
]

#: URL scheme of a Redis Cluster: ``redis+cluster://[user:password@]host:port[,host:port...]``.
CLUSTER_SCHEME = "redis+cluster://"
#: Redis Cluster hash slots.
SLOTS = 16384
#: After a shard's connection failed, a cluster publisher refreshes its slot map at most this
#: often (seconds): a failover moves slots to another address, a dead shard only costs a lookup.
STALE_REFRESH = 1.0

Addr = tuple[str, int]


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
    shard that owns the channel's slot, so both the publisher and the broker route every channel
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


class Router:
    """Pipelined commands for Redis: on one connection, or on a Redis Cluster on one connection
    per shard, each command sent to the shard owning the slot of the name it is for.

    On a cluster a ``MOVED``/``TRYAGAIN`` answer (Redis did not run the command) refreshes the
    slot map and is retried; an ``ASK`` answer (the slot is migrating and this key has left
    already) sends that one command to the importing node after ``ASKING``, map unchanged; a
    failed connection is not retried (the command may have run), but the next command looks
    the owner up again, in case the shard failed over.
    """

    def __init__(
        self,
        make_connection: Callable[[], AbstractConnection] | None = None,
        slot_map: SlotMap | None = None,
    ) -> None:
        if (make_connection is None) == (slot_map is None):
            raise ValueError("give a connection factory or a cluster slot map")
        self.slot_map = slot_map
        self._single = None if make_connection is None else Pipeline(make_connection)
        self._shards: dict[Addr, Pipeline] = {}
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
                shard = self._shards[addr] = Pipeline(slots.pool(addr).make_connection)
            try:
                return await shard.execute_packed(command)
            except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError):
                self._stale = True
                raise
            except AskError as ask:
                try:
                    return await self._asking(ask.node_addr, command)
                except (MovedError, AskError, TryAgainError):  # the migration moved on
                    if attempt == 2:
                        raise
                    await slots.refresh()
            except (MovedError, TryAgainError):
                if attempt == 2:
                    raise
                await slots.refresh()  # not executed by Redis: safe to send again
        raise AssertionError("unreachable")

    async def _asking(self, addr: Addr, command: tuple[Any, ...] | bytes) -> Any:
        """``ASKING`` then ``command`` on the node importing the slot, written together on its
        pipeline (``ASKING`` holds for the next command of the connection only)."""
        assert self.slot_map is not None
        shard = self._shards.get(addr)
        if shard is None:
            shard = self._shards[addr] = Pipeline(self.slot_map.pool(addr).make_connection)
        replies = await shard.execute_many([(b"ASKING",), command])
        return replies[1]

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
