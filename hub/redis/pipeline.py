"""One Redis connection, pipelined: what the publisher SDK, presence and inboxes send commands on.

Concurrent callers share writes instead of each waiting for its own round trip (or queueing
behind a lock), one process's commands reach Redis in the order they were made, and replies are
matched to callers in that order.

Writing does not wait for replies. Callers queued during one event-loop turn go out together
at the end of it, and once ``FLUSH_AT`` of them are queued they go out at once: a burst of
callers (say 32 tasks whose previous replies came back in one read) reaches Redis in slices, so
Redis runs the first slice's commands while this process is still packing the next, instead of
each side waiting for the other to finish the whole burst. A reader task takes the replies as
they come. :class:`hub.redis.cluster.Router` puts one of these in front of each shard of a
cluster.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AuthenticationError, BusyLoadingError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from .resp import RespStream, pack_command

__all__ = ["FLUSH_AT", "Pipeline"]

#: A caller waiting on a pipeline: its commands, its future, whether it wants all the replies.
_Waiting = tuple[list[tuple[Any, ...] | bytes], asyncio.Future[Any], bool]

#: Callers queued that are written at once, without waiting for the end of the loop turn.
FLUSH_AT = 8
#: Bytes the connection may hold unsent before writes wait for the socket to drain.
WRITE_BUFFER_LIMIT = 1 << 20


class _Link:
    """One connection of a pipeline and the callers written on it whose replies are due."""

    __slots__ = ("checking", "connection", "incoming", "pack", "reader", "resp", "sent", "stream")

    def __init__(self, connection: AbstractConnection) -> None:
        # redis-py's asyncio connections (5 to 8) keep their streams here once connected;
        # writes go straight to the stream, as hub.redis.resp reads straight from it.
        stream = getattr(connection, "_writer", None)
        incoming = getattr(connection, "_reader", None)
        if not isinstance(stream, asyncio.StreamWriter) or incoming is None:
            raise RedisConnectionError("redis-py connection without its streams")
        self.connection = connection
        self.resp = RespStream.of(connection)  # replies read past redis-py (hub.redis.resp)
        # Without hiredis (no RespStream) redis-py reads the replies, and packs the commands.
        self.pack: Callable[..., bytes] = (
            pack_command if self.resp is not None else self._packed_by_redis_py
        )
        self.stream: asyncio.StreamWriter = stream
        self.incoming: asyncio.StreamReader = incoming
        self.sent: deque[_Waiting] = deque()
        self.reader: asyncio.Task[None] | None = None
        self.checking = False  # the writer task is looking for an EOF on it (idle)

    def _packed_by_redis_py(self, *args: Any) -> bytes:
        return b"".join(self.connection.pack_command(*args))

    def busy(self) -> bool:
        return bool(self.sent) or self.reader is not None

    def writable(self) -> bool:
        """Up as far as the transport knows (no EOF from the peer, as the writer task checks
        on an idle connection) and its socket takes more now."""
        transport = self.stream.transport
        return (
            not self.checking
            and not self.incoming.at_eof()
            and not transport.is_closing()
            and transport.get_write_buffer_size() < WRITE_BUFFER_LIMIT
        )


class Pipeline:
    """One pipelined Redis connection (see the module docstring). A command that fails on a
    broken connection is not retried: it may have been executed. Every caller written on a
    connection that breaks fails with that error; callers queued after it go out on a new one.

    An error reply fails its caller's future with redis-py's exception for it, whatever its
    kind: ``LOADING`` (a restarted Redis reading its data) is a ``BusyLoadingError`` and
    ``NOAUTH`` an ``AuthenticationError``, both of which redis-py files under
    ``ConnectionError``; ``BUSY``, ``MASTERDOWN`` and the rest are ``ResponseError``s. The
    connection stays up (the reply was read in order), and no caller gets an error as a
    value. A caller whose arguments cannot be packed fails alone, before anything is sent."""

    def __init__(self, make_connection: Callable[[], AbstractConnection]) -> None:
        self._make_connection = make_connection
        self._link: _Link | None = None  # the live connection
        # Callers not written yet, in order: their commands (each its arguments, or bytes
        # already in RESP, see hub.redis.resp.pack_command), one future for all of them, and
        # whether that future takes the list of replies (execute_many) or the one reply.
        self._queue: list[_Waiting] = []
        self._writer: asyncio.Task[None] | None = None
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

    @property
    def in_flight(self) -> int:
        """Callers written whose replies have not all come back yet."""
        return len(self._link.sent) if self._link is not None else 0

    def _enqueue(self, commands: list[tuple[Any, ...] | bytes], many: bool) -> asyncio.Future[Any]:
        if self._closed:
            raise RedisConnectionError("publisher closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        queue = self._queue
        queue.append((commands, future, many))
        link = self._link
        if len(queue) >= FLUSH_AT and link is not None and link.writable():
            self._write(link)  # a writer task due at the end of this turn sends what follows
        elif self._writer is None:
            self._writer = loop.create_task(self._run())
        return future

    async def _ready(self) -> _Link:
        """The live connection, or a new one. One with replies due is known to be up; an idle
        one may have been closed by the peer (a Redis restart): EOF already read by the
        transport shows here, and a fresh connection avoids failing the next callers."""
        link = self._link
        if link is not None:
            if link.busy():
                return link
            connection = link.connection
            link.checking = True
            try:
                if connection.is_connected and not await connection.can_read():
                    return link
            except Exception:  # replaced below; nothing was due on it
                pass
            finally:
                link.checking = False
            await self._broken(link, RedisConnectionError("connection lost"))
        connection = self._make_connection()
        try:
            await connection.connect()
            link = self._link = _Link(connection)
        except BaseException:
            await connection.disconnect(nowait=True)
            raise
        return link

    async def _run(self) -> None:
        """The writer task: connect when there is no live connection, write what is queued,
        and wait for the socket to drain before writing more."""
        try:
            while self._queue:
                try:
                    link = await self._ready()
                except Exception as exc:  # nothing was sent: the callers waiting fail
                    queue, self._queue = self._queue, []
                    for _, future, _ in queue:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self._write(link)
                try:
                    await link.stream.drain()
                except Exception as exc:
                    await self._broken(link, exc)
        finally:
            self._writer = None

    def _write(self, link: _Link) -> None:
        """Write queued callers on ``link``, in order, until its socket holds about
        ``WRITE_BUFFER_LIMIT`` (at least one caller), and have a reader take the replies; what
        is left waits for the writer task, which waits for the socket to drain."""
        queue, sent, pack = self._queue, link.sent, link.pack
        room = WRITE_BUFFER_LIMIT - link.stream.transport.get_write_buffer_size()
        chunks: list[bytes] = []
        taken = 0
        for waiting in queue:
            if room <= 0 and chunks:
                break
            taken += 1
            try:
                packed = b"".join(c if type(c) is bytes else pack(*c) for c in waiting[0])
            except Exception as exc:  # this caller's arguments: it fails alone
                if not waiting[1].done():
                    waiting[1].set_exception(exc)
                continue
            chunks.append(packed)
            sent.append(waiting)
            room -= len(packed)
        del queue[:taken]
        if queue and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._run())
        if not chunks:
            return
        link.stream.write(b"".join(chunks))
        if link.reader is None:
            link.reader = asyncio.get_running_loop().create_task(self._read(link))

    @staticmethod
    async def _reply(connection: AbstractConnection) -> Any:
        """The next reply; an error reply is returned as its exception, not raised. redis-py's
        parser raises ``LOADING`` and ``NOAUTH`` itself (``ConnectionError``s), the rest from
        ``read_response``: either way the reply was read and the connection is in step."""
        try:
            return await connection.read_response()
        except (ResponseError, BusyLoadingError, AuthenticationError) as exc:
            return exc

    async def _read(self, link: _Link) -> None:
        """The reader task of ``link``: the replies of the callers written on it, in order,
        until none is due; then it ends (the next write starts another)."""
        resp, sent, connection = link.resp, link.sent, link.connection
        try:
            while sent:
                waiting, future, many = sent[0]
                if resp is not None:
                    replies = await resp.take(len(waiting))
                else:
                    replies = [await self._reply(connection) for _ in waiting]
                sent.popleft()
                if future.done():
                    continue
                error = next((r for r in replies if isinstance(r, Exception)), None)
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(replies if many else replies[0])
        except Exception as exc:
            await self._broken(link, exc)
        except BaseException:  # cancelled (close): the replies can no longer be matched
            for _, future, _ in sent:
                future.cancel()
            sent.clear()
            raise
        finally:
            link.reader = None

    async def _broken(self, link: _Link, exc: Exception) -> None:
        """``link`` failed: every caller written on it fails with ``exc`` (each may have run),
        it is closed, and the next write connects again."""
        if self._link is link:
            self._link = None
        sent = link.sent
        while sent:
            _, future, _ = sent.popleft()
            if not future.done():
                future.set_exception(exc)
        reader = link.reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        await link.connection.disconnect(nowait=True)

    async def close(self) -> None:
        self._closed = True
        link = self._link
        tasks = [t for t in (self._writer, link and link.reader) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, future, _ in self._queue:
            future.cancel()
        self._queue.clear()
        if link is not None:
            for _, future, _ in link.sent:
                future.cancel()
            link.sent.clear()
            await link.connection.disconnect()
