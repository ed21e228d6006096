"""hub.redis.resp: the RESP fast path under the broker's pub/sub link and the publisher's pipeline,
checked against redis-py's own packing and error classes and against a real Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgpack
import pytest
import redis.asyncio
from redis.asyncio.connection import Connection
from redis.exceptions import AskError, MovedError, NoScriptError, ResponseError, TryAgainError
from wshelp import run

from hub.redis.pipeline import Pipeline
from hub.redis.resp import RespStream, pack_commands, pack_publish, reply_error
from hub.redis.wire import pack_message

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]


@pytest.mark.parametrize(
    "commands",
    [
        [("PUBLISH", "hub:user:é", b"\x00\r\n\xff")],
        [("SUBSCRIBE", b"a", "b", 7), ("PING",), ("PUBLISH", "x", b"")],
        [("SET", "k", 10**20), ("GET", "k")],
        [("EXPIRE", "k", 1.5), ("ZADD", "z", 0.1, "m", 2.0, "n")],
    ],
)
def test_pack_commands_writes_what_redis_py_writes(commands: list[tuple]) -> None:
    assert pack_commands(commands) == b"".join(Connection().pack_commands(commands))


@pytest.mark.parametrize("command", [b"PUBLISH", b"SPUBLISH"])
@pytest.mark.parametrize("channel", ["hub:user:u1", "hub:ch:é 🙂", "x" * 300])
def test_pack_publish_writes_what_redis_py_writes(command: bytes, channel: str) -> None:
    for payload in (b"", b"\x81\xa4data\x01", bytes(range(256)) * 3):
        expected = b"".join(Connection().pack_command(command, channel, payload))
        assert pack_publish(command, channel, payload) == expected


@pytest.mark.parametrize(
    "data",
    [None, 1, -(2**63), "é", b"\x00\xff", [1, {"a": b"b"}], {"u": 3, "r": 7}, 1.5, "x" * 70_000],
)
def test_pack_message_is_the_envelope_packed_by_msgpack(data: object) -> None:
    assert pack_message(data) == msgpack.packb({"data": data}, use_bin_type=True)
    fields = {"event": "e", "ts": 5}
    assert pack_message(data, fields) == msgpack.packb({"data": data, **fields}, use_bin_type=True)
    with pytest.raises(TypeError):  # unpackable data fails, and leaves the packer usable
        pack_message({"bad": object()})
    assert pack_message(data) == msgpack.packb({"data": data}, use_bin_type=True)


def test_error_replies_become_redis_py_exceptions() -> None:
    moved = reply_error(Exception("MOVED 3999 127.0.0.1:6381"))
    assert type(moved) is MovedError
    assert (moved.slot_id, moved.host, moved.port) == (3999, "127.0.0.1", 6381)
    assert type(reply_error(Exception("ASK 1 127.0.0.1:7000"))) is AskError
    assert type(reply_error(Exception("TRYAGAIN Multiple keys"))) is TryAgainError
    assert type(reply_error(Exception("NOSCRIPT No matching script."))) is NoScriptError
    other = reply_error(Exception("ERR wrong number of arguments for 'publish' command"))
    assert type(other) is ResponseError
    assert "wrong number of arguments for 'publish' command" in str(other)


def test_a_failing_command_in_a_batch_fails_alone(redis_server: RedisServer) -> None:
    """One error reply fails its own command; the commands around it still get their replies,
    and the connection stays usable."""

    async def main() -> None:
        pool = redis.asyncio.ConnectionPool.from_url(redis_server.url)
        pipeline = Pipeline(pool.make_connection)
        try:
            with pytest.raises(ResponseError, match="wrong number of arguments"):
                await pipeline.execute_many([("SET", "a", "1"), ("PUBLISH", "x"), ("GET", "a")])
            assert await pipeline.execute_many([("GET", "a"), ("PING",)]) == [b"1", b"PONG"]
            assert pipeline._link is not None and pipeline._link.resp is not None  # the fast path
        finally:
            await pipeline.close()
            await pool.disconnect()

    run(main)


def test_replies_split_across_reads_are_reassembled(redis_server: RedisServer) -> None:
    """A reply larger than one socket read arrives in pieces and is still one reply."""

    async def main() -> None:
        pool = redis.asyncio.ConnectionPool.from_url(redis_server.url)
        connection = pool.make_connection()
        await connection.connect()
        try:
            resp = RespStream.of(connection)
            assert resp is not None
            big = b"x" * (3 << 16)
            await connection.send_packed_command(
                pack_commands([("SET", "big", big), ("GET", "big"), ("GET", "none")])
            )
            assert [await resp.next() for _ in range(3)] == [b"OK", big, None]
            # take(): several replies at once, across reads, errors returned in place
            await connection.send_packed_command(
                pack_commands([("GET", "big"), ("PUBLISH", "x"), ("PING",), ("GET", "big")])
            )
            replies = await resp.take(4)
            assert replies[0] == big and replies[2] == b"PONG" and replies[3] == big
            assert type(replies[1]) is ResponseError
        finally:
            await connection.disconnect()
            await pool.disconnect()

    run(main)
