"""Error replies of a real Redis reach every caller of ``hub.redis.pipeline`` as exceptions:
``LOADING`` from a restarted server still reading its RDB (redis-py files it under
``ConnectionError``, so it used to come back as a value), ``BUSY`` from a script that runs too
long. The connection stays in step: once Redis answers again the same connection goes on."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgpack
import pytest
import redis
import redis.asyncio
from hubfix import api, client, eventually, make_settings, running
from redis.exceptions import BusyLoadingError, ResponseError
from wshelp import run

from hub.inbox import RedisInbox
from hub.redis.cluster import Router
from hub.redis.pipeline import Pipeline
from hub.redis.publisher import AsyncPublisher

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

ENVELOPE = msgpack.packb({"data": {"n": 1}}, use_bin_type=True)


def test_loading_reaches_every_pipeline_caller_as_an_exception(redis_server: RedisServer) -> None:
    async def main() -> None:
        pool = redis.asyncio.ConnectionPool.from_url(redis_server.url)
        pipeline = Pipeline(pool.make_connection)
        store = RedisInbox(Router.from_url(redis_server.url))
        publisher = AsyncPublisher(redis_server.url)
        try:
            assert await pipeline.execute("PING") == b"PONG"
            assert (await store.notify("u", ENVELOPE)).seq == 1
            assert await publisher.publish("news", {"n": 0}) == 0
            redis_server.start_loading()  # a restart: every connection above is cut
            await asyncio.sleep(0.1)  # the event loop reads the EOFs
            for _ in range(2):  # the first reconnects, the second rides the same connection
                with pytest.raises(BusyLoadingError):
                    await pipeline.execute("GET", "load:1")
            with pytest.raises(BusyLoadingError):
                await pipeline.execute_many([("PING",), ("GET", "load:1")])
            for name, call in (
                ("read", lambda: store.read("u")),
                ("ack", lambda: store.ack("u", "phone", 1)),
                ("mark_read", lambda: store.mark_read("u", 1)),
                ("schedule_fallback", lambda: store.schedule_fallback("u", 1, time.time() + 60)),
                ("claim_due", lambda: store.claim_due()),
                ("history", lambda: publisher.history("news")),
                ("notify", lambda: publisher.notify("u", {"n": 2}, fallback_after=60)),
            ):
                for _ in range(2):
                    try:
                        await call()
                    except BusyLoadingError:
                        continue
                    raise AssertionError(f"{name} did not raise while redis was loading")
            # PUBLISH is served while loading (no data involved)
            assert await publisher.publish("news", {"n": 1}) == 0
            redis_server.finish_loading()
            assert await pipeline.execute("GET", "load:1") == b"1"
            ids = {await pipeline.execute("CLIENT", "ID") for _ in range(3)}
            assert len(ids) == 1  # still the connection that read the LOADING replies
            page = await store.read("u")
            assert page.top == 1 and len(page.entries) == 1  # saved before the restart
            assert await publisher.publish("news", {"n": 2}) == 0
            assert await publisher.send_to_users([("a", 1), ("b", 2)]) == [0, 0]
            assert await store.ack("u", "phone", 1) == 1
        finally:
            await publisher.aclose()
            await store.close()
            await pipeline.close()
            await pool.disconnect()

    run(main, timeout=60)


def test_busy_script_reaches_the_caller_as_an_exception(redis_server: RedisServer) -> None:
    """``BUSY``: another client's script runs past ``busy-reply-threshold``."""
    redis_server.kill()
    redis_server.extra["busy-reply-threshold"] = "50"
    redis_server.start()

    async def main() -> None:
        pool = redis.asyncio.ConnectionPool.from_url(redis_server.url)
        pipeline = Pipeline(pool.make_connection)
        spinner = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            assert await pipeline.execute("PING") == b"PONG"
            loop = asyncio.get_running_loop()
            spin = loop.create_task(
                spinner.eval("local t = redis.call('TIME')[1] while true do end", 0)
            )
            await eventually(lambda: busy(redis_server), timeout=10)
            with pytest.raises(ResponseError, match="BUSY"):
                await pipeline.execute_many([("SET", "a", "1"), ("GET", "a")])
            with redis.Redis.from_url(redis_server.url, socket_timeout=5) as killer:
                killer.script_kill()
            with pytest.raises(ResponseError):
                await spin  # the killed script's own error
            assert await pipeline.execute_many([("SET", "a", "1"), ("GET", "a")]) == [b"OK", b"1"]
        finally:
            await spinner.aclose()
            await pipeline.close()
            await pool.disconnect()

    run(main, timeout=30)


def busy(server: RedisServer) -> bool:
    with redis.Redis.from_url(server.url, socket_timeout=5) as probe:
        try:
            probe.ping()
        except ResponseError as exc:
            return "BUSY" in str(exc)
    return False


def test_a_hub_answers_unavailable_while_redis_loads(redis_server: RedisServer) -> None:
    """A hub on a Redis that restarts and loads: notify answers 503, inbox commands an error
    reply, nothing raises out of the hub; once loaded, notifications flow again."""

    async def main() -> None:
        async with running(make_settings(redis_url=redis_server.url)) as hub:
            async with client(hub, user="u") as phone:
                assert (await phone.call("inbox"))["result"]["seq"] == 0
                status, body = await api(hub, "/api/notify", {"user": "u", "data": 1})
                assert status == 200, body
                assert (await phone.push())["data"] == 1
                redis_server.start_loading()
                status, body = await api(hub, "/api/notify", {"user": "u", "data": 2})
                assert status == 503, body
                reply = await phone.call("ack", seq=1)
                assert "error" in reply and "unavailable" in reply["error"]["message"], reply
                redis_server.finish_loading()

                async def stored() -> bool:
                    status, _ = await api(hub, "/api/notify", {"user": "u", "data": 3})
                    return status == 200

                await eventually(stored, timeout=20, interval=0.2)
                reply = await phone.call("ack", seq=1)
                assert reply["result"] == {"acked": 1}, reply

    run(main, timeout=60)
