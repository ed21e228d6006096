"""Presence: which connections (and users) are subscribed to a channel, across all processes.

Only channels in namespaces with ``presence = true`` are tracked. An entry is
``{"user": ..., "client": <connection id>, "info": <the token's info claim>}``, keyed by the
connection's client id. :class:`MemoryPresence` serves one process; :class:`RedisPresence`
shares the entries of every process through the Redis broker's Redis (or Redis Cluster).

Kept apart from the broker on purpose: the broker moves messages, this stores state, and a
deployment could put the two on different backends.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from redis.exceptions import RedisError

from .codec import unpack_msgpack
from .errors import HubUnavailable
from .redis.cluster import Router
from .redis.script import Script
from .redis.wire import DEFAULT_PREFIX, Names

__all__ = ["MemoryPresence", "Presence", "PresenceUnavailable", "RedisPresence"]

log = logging.getLogger("hub.presence")

Entry = dict[str, Any]

#: Script calls a refresh keeps in flight at once (a window of the pipeline, not all at once).
REFRESH_WINDOW = 256


class PresenceUnavailable(HubUnavailable):
    """The presence store cannot answer right now (Redis is down or slow)."""


class Presence(abc.ABC):
    """Where presence entries live. ``add`` and ``remove`` never raise: a failed write is
    repaired by the next refresh (``add``) or by the entry's TTL (``remove``), so a Redis
    hiccup never fails a subscribe or leaks into a disconnect. Reads raise
    :class:`PresenceUnavailable` when the store cannot answer."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def add(self, channel: str, client: str, entry: Entry) -> None: ...

    @abc.abstractmethod
    async def remove(self, channel: str, client: str) -> None: ...

    @abc.abstractmethod
    async def clients(self, channel: str) -> dict[str, Entry]:
        """Every live entry of ``channel``, by client id."""

    @abc.abstractmethod
    async def stats(self, channel: str) -> dict[str, int]:
        """``{"num_clients": ..., "num_users": ...}`` (distinct user ids) of ``channel``."""


class MemoryPresence(Presence):
    """One process: the entries are this process's own subscribers, nothing can go stale."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, Entry]] = {}

    async def add(self, channel: str, client: str, entry: Entry) -> None:
        self._channels.setdefault(channel, {})[client] = entry

    async def remove(self, channel: str, client: str) -> None:
        entries = self._channels.get(channel)
        if entries is not None:
            entries.pop(client, None)
            if not entries:
                del self._channels[channel]

    async def clients(self, channel: str) -> dict[str, Entry]:
        return dict(self._channels.get(channel, {}))

    async def stats(self, channel: str) -> dict[str, int]:
        entries = self._channels.get(channel, {})
        users = {e["user"] for e in entries.values()}
        return {"num_clients": len(entries), "num_users": len(users)}


# -- Redis -------------------------------------------------------------------------------------
#
# Per channel, in the slot of its pub/sub name (hash tag), so every script touches one slot:
#   {<prefix>:ch:<channel>}:presence      hash  client id -> msgpack entry
#   {<prefix>:ch:<channel>}:presence:exp  zset  client id scored by expiry (Redis TIME, seconds)
# Times come from Redis itself, so hub hosts with skewed clocks agree on what has expired.

_PRUNE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #gone, 1000 do
  redis.call('HDEL', KEYS[1], unpack(gone, i, math.min(i + 999, #gone)))
end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"""

# ARGV: ttl seconds, then client id / entry pairs. The keys live as long as the newest entry,
# so a channel whose every process died vanishes without a reader.
_ADD = (
    _PRUNE
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[i])
end
local ms = math.ceil(ttl * 1000)
for _, key in ipairs(KEYS) do
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
return 1
"""
)

_REMOVE = """
redis.call('HDEL', KEYS[1], unpack(ARGV))
redis.call('ZREM', KEYS[2], unpack(ARGV))
return 1
"""

_CLIENTS = _PRUNE + "return redis.call('HGETALL', KEYS[1])\n"

_STATS = (
    _PRUNE
    + """
local users, n = {}, 0
for _, packed in ipairs(redis.call('HVALS', KEYS[1])) do
  local ok, entry = pcall(cmsgpack.unpack, packed)
  local user = ok and type(entry) == 'table' and entry['user'] or packed
  if not users[user] then users[user] = true; n = n + 1 end
end
return {redis.call('HLEN', KEYS[1]), n}
"""
)


ADD, REMOVE, CLIENTS, STATS = (Script(s) for s in (_ADD, _REMOVE, _CLIENTS, _STATS))


class RedisPresence(Presence):
    """Presence shared through Redis (or a Redis Cluster, by its ``redis+cluster://`` URL).

    Each process writes its own subscribers' entries with an expiry ``ttl`` seconds ahead and
    rewrites them every ``refresh_interval`` (``ttl / 3`` by default), ``batch`` entries per
    script call, all calls pipelined. A process that dies stops refreshing, and its entries are
    dropped by the first read (or write) after they expire.
    """

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = 60.0,
        *,
        refresh_interval: float | None = None,
        batch: int = 500,
        timeout: float = 5.0,
        **redis_kwargs: Any,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.names = Names(prefix)
        self.ttl = ttl
        self.refresh_interval = refresh_interval or ttl / 3
        self.batch = batch
        redis_kwargs.setdefault("socket_timeout", timeout)
        redis_kwargs.setdefault("socket_connect_timeout", timeout)
        redis_kwargs.setdefault("client_name", f"{prefix}-presence")
        self._url = url
        self._kwargs = redis_kwargs
        self._router: Router | None = None
        # This process's entries, packed, by channel and client id: what the refresh rewrites.
        self._local: dict[str, dict[str, bytes]] = {}
        # Removals that failed (Redis down), with when they failed: retried by the refresh, so
        # a connection that left during an outage does not linger for a TTL once Redis is back.
        # After a TTL the entry has expired anyway and the retry is dropped (memory stays
        # bounded during a long outage).
        self._unremoved: dict[str, dict[str, float]] = {}
        self._refresher: asyncio.Task[None] | None = None
        self._last_error = -1e9
        self.write_errors = 0

    def keys(self, channel: str) -> list[str]:
        base = "{" + self.names.channel(channel) + "}:presence"
        return [base, base + ":exp"]

    async def start(self) -> None:
        self._router = Router.from_url(self._url, **self._kwargs)
        loop = asyncio.get_running_loop()
        self._refresher = loop.create_task(self._refresh_forever(), name="hub-presence-refresh")

    async def close(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        router, self._router = self._router, None
        if router is not None:
            await router.close()

    async def _script(self, script: Script, channel: str, args: list[Any]) -> Any:
        """Run ``script`` on the channel's two keys (on the shard owning them)."""
        if self._router is None:
            raise PresenceUnavailable("presence not started")
        keys = self.keys(channel)
        return await self._router.script(keys[0], script, [len(keys), *keys, *args])

    # -- writes --------------------------------------------------------------------------------

    async def add(self, channel: str, client: str, entry: Entry) -> None:
        packed = msgpack.packb(entry, use_bin_type=True)
        self._local.setdefault(channel, {})[client] = packed
        self._forget_unremoved(channel, [client])
        await self._write(ADD, channel, [self.ttl, client, packed])

    async def remove(self, channel: str, client: str) -> None:
        entries = self._local.get(channel)
        if entries is not None:
            entries.pop(client, None)
            if not entries:
                del self._local[channel]
        if not await self._write(REMOVE, channel, [client]):
            self._unremoved.setdefault(channel, {})[client] = time.monotonic()

    def _forget_unremoved(self, channel: str, clients: list[str]) -> None:
        pending = self._unremoved.get(channel)
        if pending is not None:
            for client in clients:
                pending.pop(client, None)
            if not pending:
                del self._unremoved[channel]

    async def _write(self, script: Script, channel: str, args: list[Any]) -> bool:
        try:
            await self._script(script, channel, args)
        except (HubUnavailable, RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return False
        return True

    def _failed(self, exc: BaseException) -> None:
        self.write_errors += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_error > 10.0:  # one line per 10 s, not one per subscriber
            self._last_error = now
            log.warning("presence write to redis failed (retried by the refresh): %s", exc)

    async def refresh(self) -> None:
        """Retry failed removals, then rewrite every local entry with a fresh expiry: one
        script call per ``batch`` entries of a channel, ``REFRESH_WINDOW`` calls pipelined at a
        time."""
        unremoved, self._unremoved = self._unremoved, {}
        oldest = time.monotonic() - self.ttl
        # (function, arguments): coroutines are made per window, never left unawaited.
        calls: list[tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]] = []
        for channel, gone in unremoved.items():
            live = [(client, failed) for client, failed in gone.items() if failed > oldest]
            for start in range(0, len(live), self.batch):
                some = dict(live[start : start + self.batch])
                calls.append((self._remove_again, (channel, some)))
        for channel, entries in self._local.items():
            clients = list(entries)
            for start in range(0, len(clients), self.batch):
                calls.append((self._rewrite, (channel, clients[start : start + self.batch])))
        for start in range(0, len(calls), REFRESH_WINDOW):
            window = calls[start : start + REFRESH_WINDOW]
            await asyncio.gather(*(function(*args) for function, args in window))

    async def _remove_again(self, channel: str, gone: dict[str, float]) -> None:
        entries = self._local.get(channel, {})
        clients = [c for c in gone if c not in entries]  # not re-added meanwhile
        if clients and not await self._write(REMOVE, channel, clients):
            pending = self._unremoved.setdefault(channel, {})
            for client in clients:
                pending[client] = gone[client]

    async def _rewrite(self, channel: str, clients: list[str]) -> None:
        # Read the entries when the call is made, not when the list was taken: one removed in
        # between must not be written back.
        entries = self._local.get(channel, {})
        args: list[Any] = [self.ttl]
        for client in clients:
            packed = entries.get(client)
            if packed is not None:
                args += (client, packed)
        if len(args) > 1:
            await self._write(ADD, channel, args)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the refreshing for good
                log.exception("presence refresh failed")

    # -- reads ---------------------------------------------------------------------------------

    async def _read(self, script: Script, channel: str) -> Any:
        try:
            return await self._script(script, channel, [])
        except (RedisError, OSError, TimeoutError) as exc:
            raise PresenceUnavailable(f"redis unavailable: {exc}") from exc

    async def clients(self, channel: str) -> dict[str, Entry]:
        flat = await self._read(CLIENTS, channel)
        result: dict[str, Entry] = {}
        for i in range(0, len(flat) - 1, 2):
            try:
                entry = unpack_msgpack(flat[i + 1])
            except Exception:
                continue  # not ours; never fail a whole answer for one bad field
            if isinstance(entry, dict):
                result[_text(flat[i])] = entry
        return result

    async def stats(self, channel: str) -> dict[str, int]:
        num_clients, num_users = await self._read(STATS, channel)
        return {"num_clients": int(num_clients), "num_users": int(num_users)}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
