"""One Redis connection, pipelined: what the publisher SDK, presence and inboxes send commands on.

Everything queued during one event-loop turn is written in one go and the replies are matched
in order, so concurrent callers share round trips instead of each waiting for its own (or
queueing behind a lock), and one process's commands reach Redis in the order they were made.
:class:`hub.redis.cluster.Router` puts one of these in front of each shard of a cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AuthenticationError, BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from .resp import RespStream, pack_command

__all__ = ["Pipeline"]

#: A caller waiting on a pipeline: its commands, its future, whether it wants all the replies.
_Waiting = tuple[list[tuple[Any, ...] | bytes], asyncio.Future[Any], bool]


class Pipeline:
    """One pipelined Redis connection (see the module docstring). A command that fails on a
    broken connection is not retried: it may have been executed.

    An error reply fails its caller's future with redis-py's exception for it, whatever its
    kind: ``LOADING`` (a restarted Redis reading its data) is a ``BusyLoadingError`` and
    ``NOAUTH`` an ``AuthenticationError``, both of which redis-py files under
    ``ConnectionError``; ``BUSY``, ``MASTERDOWN`` and the rest are ``ResponseError``s. The
    connection stays up (the reply was read in order), and no caller gets an error as a
    value."""

    def __init__(self, make_connection: Callable[[], AbstractConnection]) -> None:
        self._make_connection = make_connection
        self._connection: AbstractConnection | None = None
        self._resp: RespStream | None = None  # replies read past redis-py (see hub.redis.resp)
        # Callers waiting, in order: their commands (each its arguments, or bytes already in
        # RESP, see hub.redis.resp.pack_command), one future for all of them, and whether that
        # future takes the list of replies (execute_many) or the one reply.
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
        """The next reply; an error reply is returned as its exception, not raised. redis-py's
        parser raises ``LOADING`` and ``NOAUTH`` itself (``ConnectionError``s), the rest from
        ``read_response``: either way the reply was read and the connection is in step."""
        if self._resp is not None:
            return await self._resp.next()
        try:
            return await connection.read_response()
        except (ResponseError, BusyLoadingError, AuthenticationError) as exc:
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
                error = next((r for r in replies if isinstance(r, Exception)), None)
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
