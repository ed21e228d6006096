"""``hub.redis.pipeline`` against a private ``redis-server``: callers keep their order, writes go
out while replies are still due (in slices of ``FLUSH_AT`` within one loop turn), a bad caller
fails alone, a lost connection fails exactly what was written on it and the next calls connect
again, a stopped Redis bounds what is buffered, and close leaves no caller waiting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import pytest
import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from wshelp import run

from hub.redis.pipeline import FLUSH_AT, WRITE_BUFFER_LIMIT, Pipeline

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]


def pipeline_of(server: RedisServer) -> Pipeline:
    pool = redis.asyncio.ConnectionPool.from_url(server.url, client_name="pipe-test")
    return Pipeline(pool.make_connection)


@asynccontextmanager
async def opened(server: RedisServer) -> AsyncIterator[Pipeline]:
    pipe = pipeline_of(server)
    try:
        yield pipe
    finally:
        await pipe.close()


def test_concurrent_callers_keep_their_order(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with opened(redis_server) as pipe:

            async def caller(n: int) -> tuple[int, int]:
                return n, int(await pipe.execute("INCR", "counter"))

            # Bursts of many sizes, so slices of FLUSH_AT, end-of-turn writes and replies
            # split across reads all happen.
            for size in (1, FLUSH_AT - 1, FLUSH_AT, 3 * FLUSH_AT + 1, 500):
                before = int(await pipe.execute("GET", "counter") or 0)
                got = await asyncio.gather(*(caller(n) for n in range(size)))
                assert [value for _, value in got] == list(range(before + 1, before + size + 1))
            many = await pipe.execute_many([("RPUSH", "l", i) for i in range(100)])
            assert many == list(range(1, 101))

    run(main)


def test_writes_go_out_while_a_reply_is_due(redis_server: RedisServer) -> None:
    """A BLPOP holds its reply for a second: what callers queue meanwhile is written at once
    (Redis's query buffer of the connection holds it), not after the BLPOP's reply, and a burst
    of FLUSH_AT goes out within the loop turn that made it."""

    async def main() -> None:
        pipe = pipeline_of(redis_server)
        watcher = redis_server.client()
        try:
            assert await pipe.execute("PING") == b"PONG"
            blocked = asyncio.ensure_future(pipe.execute("BLPOP", "nothing", 1))
            await asyncio.sleep(0.1)
            assert pipe.in_flight == 1
            burst = [
                asyncio.ensure_future(pipe.execute("ECHO", b"x" * 100)) for _ in range(FLUSH_AT)
            ]
            await asyncio.sleep(0)  # the burst's callers run; the end-of-turn writer not yet
            assert pipe.in_flight == 1 + FLUSH_AT
            await asyncio.sleep(0.1)
            (line,) = [c for c in watcher.client_list() if c["name"] == "pipe-test"]
            assert line["cmd"] == "blpop" and int(line["qbuf"]) >= FLUSH_AT * 100
            assert not any(f.done() for f in burst)
            assert await blocked is None
            assert await asyncio.gather(*burst) == [b"x" * 100] * FLUSH_AT
        finally:
            watcher.close()
            await pipe.close()

    run(main)


def test_an_error_reply_or_unpackable_arguments_fail_only_that_caller(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with opened(redis_server) as pipe:
            results = await asyncio.gather(
                pipe.execute("SET", "a", "1"),
                pipe.execute("INCR", "a", "extra"),  # wrong number of arguments
                pipe.execute("SET", "b", object()),  # cannot be packed: never sent
                pipe.execute("GET", "a"),
                return_exceptions=True,
            )
            assert results[0] == b"OK"
            assert isinstance(results[1], ResponseError)
            assert isinstance(results[2], Exception) and not isinstance(results[2], ResponseError)
            assert results[3] == b"1"
            assert await pipe.execute("EXISTS", "b") == 0
            assert await pipe.execute("PING") == b"PONG"  # the connection is still in step

    run(main)


def test_a_lost_connection_fails_what_was_written_and_the_next_calls_reconnect(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with opened(redis_server) as pipe:
            assert await pipe.execute("PING") == b"PONG"
            written = [asyncio.ensure_future(pipe.execute("BLPOP", "never", 0)) for _ in range(3)]
            await asyncio.sleep(0.1)
            assert pipe.in_flight == 3
            redis_server.kill()
            done = await asyncio.wait_for(asyncio.gather(*written, return_exceptions=True), 5)
            assert all(isinstance(r, RedisConnectionError) for r in done), done
            assert pipe.in_flight == 0
            with pytest.raises(RedisConnectionError):
                await pipe.execute("PING")  # nothing listens: fails, nothing hangs
            redis_server.restart()
            assert await pipe.execute("PING") == b"PONG"
            assert await asyncio.gather(*(pipe.execute("INCR", "n") for _ in range(50))) == list(
                range(1, 51)
            )

    run(main)


def test_a_stopped_redis_bounds_what_is_buffered_and_then_everything_completes(
    redis_server: RedisServer,
) -> None:
    """While Redis is stopped, writes go into the socket and the transport until it holds
    WRITE_BUFFER_LIMIT; the rest waits in the queue (not in the transport) and every caller
    completes, in order, once Redis goes on."""

    async def main() -> None:
        async with opened(redis_server) as pipe:
            try:
                assert await pipe.execute("PING") == b"PONG"
                redis_server.pause()
                value = b"v" * 10_000
                calls = [
                    asyncio.ensure_future(pipe.execute("RPUSH", "big", value)) for _ in range(2000)
                ]
                for _ in range(30):
                    await asyncio.sleep(0.05)
                link = pipe._link
                assert link is not None
                buffered = link.stream.transport.get_write_buffer_size()
                assert buffered <= WRITE_BUFFER_LIMIT + FLUSH_AT * (len(value) + 64)
                assert not any(c.done() for c in calls)
                redis_server.resume()
                assert await asyncio.wait_for(asyncio.gather(*calls), 30) == list(range(1, 2001))
            finally:
                redis_server.resume()

    run(main)


def test_close_cancels_every_caller_and_refuses_new_ones(redis_server: RedisServer) -> None:
    async def main() -> None:
        pipe = pipeline_of(redis_server)
        assert await pipe.execute("PING") == b"PONG"
        written = asyncio.ensure_future(pipe.execute("BLPOP", "never", 0))
        await asyncio.sleep(0.1)
        queued = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(3)]
        await pipe.close()
        await asyncio.sleep(0)
        assert written.cancelled() or isinstance(written.exception(), Exception)
        assert all(q.done() for q in queued)
        with pytest.raises(RedisConnectionError, match="closed"):
            await pipe.execute("PING")

    run(main)
