"""The hub wired to Redis by configuration: ``redis_url`` selects the bridge, its counters are
scraped with the rest, and a Redis outage is answered as "unavailable", never as a crash."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hubfix import api, client, eventually, make_settings, running, scrape
from wshelp import run

from hub.redis.broker import RedisBroker

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

NAMESPACES = """
[namespaces.chat]
publish = true
"""


def test_redis_url_selects_the_bridge_and_metrics_show_it(redis_server: RedisServer) -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, redis_url=redis_server.url)
        async with running(settings) as hub:
            assert isinstance(hub.node.broker, RedisBroker)
            async with client(hub, user="a") as a:
                await a.ok("subscribe", channel="chat:room")
                status, _ = await api(hub, "/api/publish", {"channel": "chat:room", "data": 1})
                assert status == 200
                assert (await a.push()) == {"channel": "chat:room", "data": 1}
            samples = await scrape(hub)
            names = {name for name, _labels in samples}
            assert {"hub_bridge_malformed_total", "hub_bridge_reconnects_total"} <= names

    run(main)


def test_publishing_while_redis_is_down_is_unavailable(redis_server: RedisServer) -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, redis_url=redis_server.url)
        async with running(settings) as hub:
            async with client(hub, user="a") as a:
                await a.ok("subscribe", channel="chat:room")
                redis_server.kill()
                await eventually(lambda: not hub.node.ready)
                status, body = await api(hub, "/api/publish", {"channel": "chat:room", "data": 1})
                assert status == 503
                assert body == {"error": {"message": "broker unavailable"}}
                reply = await a.call("publish", channel="chat:room", data=2)
                assert reply["error"]["code"] == 111
                redis_server.start()
                await eventually(lambda: hub.node.ready, timeout=10)
                status, _ = await api(hub, "/api/publish", {"channel": "chat:room", "data": 3})
                assert status == 200

    run(main)


def test_cli_publish_through_redis(redis_server: RedisServer) -> None:
    """``hub publish --redis URL`` reaches a subscriber of a hub joined to that Redis."""
    import subprocess
    import sys

    async def main() -> None:
        settings = make_settings(redis_url=redis_server.url)
        async with running(settings) as hub:
            async with client(hub, user="a") as a:
                await a.ok("subscribe", channel="news")
                cmd = [sys.executable, "-m", "hub.cli", "publish", "news", '{"n":1}']
                done = subprocess.run(
                    [*cmd, "--redis", redis_server.url], capture_output=True, timeout=30
                )
                assert done.returncode == 0, done.stderr
                assert (await a.push()) == {"channel": "news", "data": {"n": 1}}
                bad = subprocess.run(
                    [*cmd, "--redis", "redis://127.0.0.1:1"], capture_output=True, timeout=30
                )
                assert bad.returncode == 1
                assert b"hub: publish: redis" in bad.stderr

    run(main)


def test_refused_handshakes_are_counted_by_status() -> None:
    async def main() -> None:
        from hubfix import http

        async with running(make_settings()) as hub:
            status, _, _ = await http(hub, "GET", "/ws")  # a plain GET, no upgrade: 426
            assert status == 426
            samples = await scrape(hub)
            key = ("hub_handshake_failures_total", frozenset({("reason", "426")}))
            assert samples.get(key) == 1.0

    run(main)
