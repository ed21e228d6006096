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
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import msgpack
import redis
import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

__all__ = [
    "DEFAULT_PREFIX",
    "DISCONNECT_CODE",
    "AsyncPublisher",
    "Names",
    "Publisher",
    "pack_disconnect",
    "pack_message",
]

DEFAULT_PREFIX = "hub"
#: Close code of a server-side disconnect when none is given: "disconnected, do not reconnect".
DISCONNECT_CODE = 4503
#: A WebSocket close reason must fit a 125-byte control frame with its 2-byte code.
MAX_REASON_BYTES = 120


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
    envelope = {"data": data}
    if fields:
        if "data" in fields:
            raise ValueError("the data field is given separately")
        envelope.update(fields)
    return msgpack.packb(envelope, use_bin_type=True)


def pack_disconnect(user: str, code: int = DISCONNECT_CODE, reason: str = "") -> bytes:
    """The control message that closes every connection of ``user`` on every hub process.

    Checked here like the HTTP API checks it, so a bad value fails at the caller instead of being
    dropped (and counted as malformed) by every hub.
    """
    _non_empty("user", user)
    if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
        raise ValueError("code must be an integer from 4000 to 4999")
    if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON_BYTES:
        raise ValueError(f"reason must be a string of at most {MAX_REASON_BYTES} bytes")
    control = {"op": "disconnect", "user": user, "code": code, "reason": reason}
    return msgpack.packb(control, use_bin_type=True)


class Publisher:
    """Blocking publisher for backends (web apps, workers, scripts).

    Each method returns how many hub processes received the message (Redis counts subscribed
    connections; a hub process has one), which is 0 when no process has a local subscriber.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        client: redis.Redis | None = None,
        **redis_kwargs: Any,
    ) -> None:
        self.names = Names(prefix)
        if client is None:
            if url is None:
                raise ValueError("give a redis url or a client")
            client = redis.Redis.from_url(url, **redis_kwargs)
            self._owned = True
        else:
            self._owned = False
        self.client = client

    def publish(self, channel: str, data: Any, **fields: Any) -> int:
        """Publish ``data`` to ``channel``; ``fields`` are optional envelope fields."""
        name = self.names.channel(_non_empty("channel", channel))
        return int(self.client.publish(name, pack_message(data, fields)))

    def send_to_user(self, user: str, data: Any) -> int:
        name = self.names.user(_non_empty("user", user))
        return int(self.client.publish(name, pack_message(data)))

    def broadcast(self, data: Any) -> int:
        return int(self.client.publish(self.names.all, pack_message(data)))

    def disconnect(self, user: str, code: int = DISCONNECT_CODE, reason: str = "") -> int:
        return int(self.client.publish(self.names.ctl, pack_disconnect(user, code, reason)))

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
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def execute(self, *args: Any) -> Any:
        if self._closed:
            raise RedisConnectionError("publisher closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return await future

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
        return connection

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._task = None

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        index = 0
        try:
            connection = await self._connect()
            packed = connection.pack_commands([args for args, _ in batch])
            await connection.send_packed_command(packed, check_health=False)
            for index, (_, future) in enumerate(batch):  # noqa: B007 - read on failure
                try:
                    reply = await connection.read_response()
                except ResponseError as exc:
                    if not future.done():
                        future.set_exception(exc)
                    continue
                if not future.done():
                    future.set_result(reply)
            index = len(batch)
        except Exception as exc:
            if self._connection is not None:
                await self._connection.disconnect(nowait=True)
            for _, future in batch[index:]:
                if not future.done():
                    future.set_exception(exc)
        except BaseException:  # cancelled (close): the replies can no longer be matched
            if self._connection is not None:
                await self._connection.disconnect(nowait=True)
            for _, future in batch[index:]:
                future.cancel()
            raise

    async def close(self) -> None:
        self._closed = True
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        if self._connection is not None:
            await self._connection.disconnect()


class AsyncPublisher:
    """Publisher for asyncio backends, on one pipelined connection of its own.

    Publishes made concurrently share round trips; publishes from one task arrive in order. A
    publish that meets a broken connection raises ``redis.exceptions.ConnectionError`` (or
    ``TimeoutError``) and is not retried; the next one reconnects.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        client: redis.asyncio.Redis | None = None,
        timeout: float = 5.0,
        **redis_kwargs: Any,
    ) -> None:
        self.names = Names(prefix)
        if client is not None:
            # A dedicated connection made with the client's settings (address, auth, TLS).
            pool: ConnectionPool = client.connection_pool
        elif url is not None:
            redis_kwargs.setdefault("socket_timeout", timeout)
            redis_kwargs.setdefault("socket_connect_timeout", timeout)
            pool = ConnectionPool.from_url(url, **redis_kwargs)
        else:
            raise ValueError("give a redis url or a client")
        self._pipeline = _Pipeline(pool.make_connection)

    async def _publish(self, name: str, payload: bytes) -> int:
        return int(await self._pipeline.execute("PUBLISH", name, payload))

    async def publish(self, channel: str, data: Any, **fields: Any) -> int:
        """Publish ``data`` to ``channel``; ``fields`` are optional envelope fields."""
        name = self.names.channel(_non_empty("channel", channel))
        return await self._publish(name, pack_message(data, fields))

    async def send_to_user(self, user: str, data: Any) -> int:
        return await self._publish(self.names.user(_non_empty("user", user)), pack_message(data))

    async def broadcast(self, data: Any) -> int:
        return await self._publish(self.names.all, pack_message(data))

    async def disconnect(self, user: str, code: int = DISCONNECT_CODE, reason: str = "") -> int:
        return await self._publish(self.names.ctl, pack_disconnect(user, code, reason))

    async def aclose(self) -> None:
        await self._pipeline.close()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
