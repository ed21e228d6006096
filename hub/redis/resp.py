"""RESP on a connection redis-py has opened, without redis-py's per-command layers.

redis-py connects, authenticates, selects the database and names the client; after that the
broker's pub/sub link and the publisher's pipeline only ever send known commands and read their
replies or pushes. Per reply, ``read_response`` costs several coroutine layers and (with a socket
timeout) a timer; per command, ``pack_command`` costs more than the PUBLISH it packs. On the hot
paths (a burst of pushes from Redis, a batch of publishes) this module reads whole socket chunks
into a hiredis reader and packs commands with one format string each.

It relies on the connection's ``_reader`` stream (redis-py 5 to 8); :meth:`RespStream.of`
returns None where that is not there (or hiredis is missing) and callers fall back to redis-py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

try:
    import hiredis
except ImportError:  # redis-py without its hiredis extra: callers use redis-py's parser
    hiredis = None

__all__ = ["RespStream", "bulk", "pack_command", "pack_commands", "pack_publish"]

#: Bytes read from the socket at a time.
READ_SIZE = 1 << 16

try:  # redis-py's own table of error replies to exception classes, where it is importable
    from redis._parsers.base import BaseParser

    _parse_error: Callable[[str], ResponseError] | None = BaseParser.parse_error
except ImportError:
    _parse_error = None

#: Without redis-py's table: the error replies callers tell apart (cluster redirections, a
#: script not loaded yet).
_ERRORS: dict[str, type[ResponseError]] = {
    "MOVED": MovedError,
    "ASK": AskError,
    "TRYAGAIN": TryAgainError,
    "NOSCRIPT": NoScriptError,
}


def bulk(arg: bytes | str | int | float) -> bytes:
    """One argument as a RESP bulk string (numbers as redis-py writes them)."""
    if isinstance(arg, str):
        arg = arg.encode()
    elif isinstance(arg, float):
        arg = repr(arg).encode()
    elif not isinstance(arg, bytes):
        arg = b"%d" % arg
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


def pack_command(*args: bytes | str | int | float) -> bytes:
    """One command as a RESP array of bulk strings."""
    return b"*%d\r\n%b" % (len(args), b"".join(map(bulk, args)))


def pack_publish(command: bytes, channel: str, payload: bytes) -> bytes:
    """``PUBLISH``/``SPUBLISH channel payload`` in one format step: the publisher's per-message
    path, where the general :func:`pack_command` costs several times more than this."""
    name = channel.encode()
    return b"*3\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(command),
        command,
        len(name),
        name,
        len(payload),
        payload,
    )


def pack_commands(commands: Iterable[tuple[bytes | str | int | float, ...]]) -> bytes:
    """Commands packed for one write."""
    return b"".join(pack_command(*command) for command in commands)


def reply_error(reply: Exception) -> ResponseError:
    """The redis-py exception for an error reply (what ``read_response`` would have raised)."""
    text = str(reply)
    if _parse_error is not None:
        return _parse_error(text)
    code, _, rest = text.partition(" ")
    error = _ERRORS.get(code)
    return error(rest) if error is not None else ResponseError(text)


class RespStream:
    """Replies and pushes read straight off a connected redis-py connection's stream."""

    __slots__ = ("_feed", "_gets", "_read", "timeout")

    def __init__(self, stream: asyncio.StreamReader, timeout: float | None) -> None:
        assert hiredis is not None
        parser = hiredis.Reader()
        self._feed, self._gets, self._read = parser.feed, parser.gets, stream.read
        #: Seconds a read may wait for Redis (None: forever), like redis-py's socket_timeout.
        self.timeout = timeout

    @classmethod
    def of(cls, connection: AbstractConnection) -> RespStream | None:
        """For a connection that has just connected (nothing unread), or None to fall back."""
        stream = getattr(connection, "_reader", None)
        if hiredis is None or not isinstance(stream, asyncio.StreamReader):
            return None
        return cls(stream, getattr(connection, "socket_timeout", None))

    async def _fill(self) -> None:
        if self.timeout is None:
            chunk = await self._read(READ_SIZE)
        else:
            async with asyncio.timeout(self.timeout):
                chunk = await self._read(READ_SIZE)
        if not chunk:
            raise RedisConnectionError("redis closed the connection")
        self._feed(chunk)

    async def next(self) -> Any:
        """The next reply; an error reply is returned as its redis-py exception, not raised, so
        a pipeline can fail one command and go on with the next."""
        reply = self._gets()
        while reply is False:
            await self._fill()
            reply = self._gets()
        if isinstance(reply, hiredis.ReplyError):
            return reply_error(reply)
        return reply

    async def take(self, count: int) -> list[Any]:
        """The next ``count`` replies, as :meth:`next` returns them, awaiting only when the
        buffer runs dry (a pipeline's replies mostly arrive in one chunk)."""
        replies: list[Any] = []
        gets = self._gets
        while len(replies) < count:
            reply = gets()
            if reply is False:
                await self._fill()
                continue
            if isinstance(reply, hiredis.ReplyError):
                reply = reply_error(reply)
            replies.append(reply)
        return replies

    async def chunk(self) -> list[Any]:
        """Read one chunk and return every complete reply in it (a burst of pushes costs one
        await, and the caller loops over them without a call per reply). An error reply
        raises."""
        await self._fill()
        gets = self._gets
        replies: list[Any] = []
        reply = gets()
        while reply is not False:
            if isinstance(reply, hiredis.ReplyError):
                raise reply_error(reply)
            replies.append(reply)
            reply = gets()
        return replies
