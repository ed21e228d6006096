"""The admin page (``/admin``, ``admin = true``): its API over HTTP against real hubs, two of them
joined through a private Redis, and the page itself in the real headless Chromium.

Abuse: no key or a wrong one is refused (401, or 403 with no key configured is impossible: the
setting requires one), the admin page off is a plain 404, forged and malformed control messages
from Redis are dropped and counted, and names that users or Redis choose are shown as text, never
run as HTML.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import redis
import redis.asyncio as aioredis
from hubfix import API_KEY, client, eventually, make_settings, metric, running, scrape
from hubfix import http as http_request
from hubproc import WAIT, HubProcess
from test_browser import browser, client_page, context, wait_js  # noqa: F401
from wshelp import run, within

from hub import admin as admin_module
from hub.app import Hub
from hub.config import ConfigError

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]  # hubs (tests/hubproc.py) comes from conftest.py

KEY_HEADER = {"X-API-Key": API_KEY}
ADMIN_TOML = f'admin = true\napi_key = "{API_KEY}"\n[namespaces.chat]\npublish = true\n'
#: Names an attacker picks (a user id in dev mode or a token, anything forged through Redis).
EVIL_USER = '<img src=x onerror="window.__xss=1">'
EVIL_PROCESS = '<img src=x onerror="window.__xss=2">'
EVIL_CHANNEL = "<script>window.__xss=3</script>"


def admin_settings(**overrides: Any) -> Any:
    return make_settings(admin=True, api_key=API_KEY, **overrides)


async def get_json(hub: Hub, path: str, key: str | None = API_KEY) -> tuple[int, Any]:
    headers = {"X-API-Key": key} if key is not None else None
    status, _, body = await http_request(hub, "GET", path, headers=headers)
    return status, json.loads(body)


def forged(info: Any) -> bytes:
    return msgpack.packb({"op": "admin.node", "info": info}, use_bin_type=True)


def heartbeat(pid: str, **changes: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": pid,
        "host": "elsewhere",
        "version": "9.9",
        "redis": "up",
        "ready": True,
        "top": [["chat:far", 7]],
    }
    info.update({k: 1 for k in admin_module.COUNTS})
    info.update(changes)
    return info


# -- settings and HTTP --------------------------------------------------------------------------


def test_admin_needs_an_api_key() -> None:
    with pytest.raises(ConfigError, match="admin: the admin page needs api_key"):
        make_settings(admin=True)
    assert admin_settings().admin


def test_admin_off_is_not_found() -> None:
    async def main() -> None:
        async with running(make_settings(api_key=API_KEY)) as hub:
            for path in ("/admin", "/admin/admin.js", "/admin/api/overview", "/admin/x"):
                status, _, _ = await http_request(hub, "GET", path, headers=KEY_HEADER)
                assert status == 404, path

    run(main)


def test_admin_api_refuses_without_the_right_key_and_answers_with_it() -> None:
    async def main() -> None:
        async with running(admin_settings()) as hub:
            # The page and its script hold no data: served to anyone, with the strict headers.
            for path, kind in (("/admin", "text/html"), ("/admin/admin.js", "text/javascript")):
                status, headers, _ = await http_request(hub, "GET", path)
                assert status == 200 and headers["Content-Type"].startswith(kind), path
                assert headers["Cache-Control"] == "no-store"
                assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
                assert "script-src 'self'" in headers["Content-Security-Policy"]
                assert headers["X-Frame-Options"] == "DENY"
            for path in ("/admin/api/overview", "/admin/api/user?user=a"):
                assert (await get_json(hub, path, key=None))[0] == 401
                status, answer = await get_json(hub, path, key="wrong")
                assert (status, answer["error"]["message"]) == (401, "invalid api key")
                status, headers, _ = await http_request(hub, "POST", path, headers=KEY_HEADER)
                assert status == 405 and headers["Allow"] == "GET"
                assert (await get_json(hub, path))[0] == 200
            for bad in ("", "?user=", "?user=a&user=b", "?user=" + "x" * 201):
                status, answer = await get_json(hub, "/admin/api/user" + bad)
                assert status == 400 and "invalid query: user" in answer["error"]["message"]

            async with client(hub, user="ann") as ann, client(hub, user="ann") as ann2:
                await ann.ok("subscribe", channel="news")
                await ann2.ok("subscribe", channel="news")
                await ann2.ok("subscribe", channel="chat:x")
                status, answer = await get_json(hub, "/admin/api/overview")
                assert status == 200
                (me,) = answer["result"]["processes"]
                assert me["self"] and me["redis"] == "memory" and me["ready"]
                assert (me["connections"], me["subscriptions"], me["channels"]) == (2, 3, 2)
                assert answer["result"]["top"][0] == ["news", 2]
                _, found = await get_json(hub, "/admin/api/user?user=ann")
                conns = found["result"]["connections"]
                assert sorted(sorted(c["channels"]) for c in conns) == [
                    ["chat:x", "news"],
                    ["news"],
                ]
                assert {c["protocol"] for c in conns} == {"hub.v1.json"}
                _, nobody = await get_json(
                    hub, "/admin/api/user?user=" + urllib.parse.quote("bo b")
                )
                assert nobody["result"] == {"user": "bo b", "connections": [], "everywhere": True}

    run(main)


def test_processes_joined_through_redis_see_each_other(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_module, "HEARTBEAT", 0.1)
    monkeypatch.setattr(admin_module, "STALE", 1.0)

    async def main() -> None:
        settings = admin_settings(redis_url=redis_server.url)
        async with running(settings) as a, running(admin_settings(redis_url=redis_server.url)) as b:
            async with client(b, user="far") as far:
                await far.ok("subscribe", channel="chat:room")

                async def both() -> bool:
                    _, answer = await get_json(a, "/admin/api/overview")
                    processes = answer["result"]["processes"]
                    return len(processes) == 2 and processes[1]["connections"] == 1

                await eventually(both, timeout=5)
                _, answer = await get_json(a, "/admin/api/overview")
                me, other = answer["result"]["processes"]
                assert me["self"] and not other["self"] and other["id"] == b.admin.id
                assert me["redis"] == other["redis"] == "up"
                assert other["connections"] == 1 and ["chat:room", 1] in answer["result"]["top"]

                # A user on the other process is found from this one.
                _, found = await get_json(a, "/admin/api/user?user=far")
                (conn,) = found["result"]["connections"]
                assert conn["process"] == b.admin.id and conn["channels"] == ["chat:room"]

                # Forged control messages: the malformed are dropped and counted, a valid one
                # is listed as it is (the page shows it as text).
                before = metric(await scrape(a), "hub_bridge_malformed_total")
                with redis.Redis.from_url(redis_server.url) as r:
                    for bad in (
                        "not a map",
                        {"id": "x"},
                        heartbeat("x", redis="sideways"),
                        heartbeat("x", connections=-1),
                        heartbeat("x", connections=float("nan")),
                        heartbeat("x", top=[["c", 1]] * 11),
                        heartbeat("x", top=[[1, 1]]),
                    ):
                        r.publish("hub:ctl", forged(bad))
                    r.publish("hub:ctl", forged(heartbeat(EVIL_PROCESS, top=[[EVIL_CHANNEL, 9]])))
                    r.publish("hub:ctl", msgpack.packb({"op": "admin.seen", "req": 5}))

                async def counted() -> bool:
                    samples = await scrape(a)
                    return metric(samples, "hub_bridge_malformed_total") - before == 8

                await eventually(counted, timeout=5)
                _, answer = await get_json(a, "/admin/api/overview")
                ids = [p["id"] for p in answer["result"]["processes"]]
                assert EVIL_PROCESS in ids and "x" not in ids, ids
                assert [EVIL_CHANNEL, 9] in answer["result"]["top"]

                # Redis goes away: this process says its link is down, the other drops out.
                redis_server.kill()

                async def cut_off() -> bool:
                    _, answer = await get_json(a, "/admin/api/overview")
                    processes = answer["result"]["processes"]
                    return len(processes) == 1 and processes[0]["redis"] == "down"

                await eventually(cut_off, timeout=10)
                _, found = await get_json(a, "/admin/api/user?user=far")
                assert found["result"] == {"user": "far", "connections": [], "everywhere": False}

    run(main, timeout=60)


def test_a_search_flood_from_redis_is_bounded(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``admin.seen`` replies to a search are capped, whoever sends them and however many."""
    monkeypatch.setattr(admin_module, "WHO_WAIT", 1.0)

    async def main() -> None:
        async with running(admin_settings(redis_url=redis_server.url)) as hub:
            assert hub.admin is not None
            spy = aioredis.Redis.from_url(redis_server.url)
            pubsub = spy.pubsub()
            await pubsub.subscribe("hub:ctl")
            search = asyncio.ensure_future(hub.admin.find_user("ghost"))
            who: dict[str, Any] = {}
            while who.get("op") != "admin.who":  # heartbeats pass by on the same channel
                message = await within(pubsub.get_message(True, timeout=1.0), 3)
                if message is not None:
                    who = msgpack.unpackb(message["data"])
            entry = {"process": "p", "client": "c", "channels": ["a"]}
            reply = {"op": "admin.seen", "req": who["req"], "to": who["from"]}
            for _ in range(30):
                await spy.publish("hub:ctl", msgpack.packb({**reply, "found": [entry] * 100}))
            found, everywhere = await within(search, 5)
            assert everywhere and len(found) == admin_module.MAX_CONNECTIONS * 10
            await pubsub.aclose()
            await spy.aclose()

    run(main)


# -- the page in Chromium -----------------------------------------------------------------------


class Publishing(threading.Thread):
    """POSTs to /api/publish every few ms until stopped: deliveries for the charts."""

    def __init__(self, hub: HubProcess, channel: str) -> None:
        super().__init__(daemon=True)
        self.hub, self.channel = hub, channel
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.hub.post("/api/publish", {"channel": self.channel, "data": self.sent}, KEY_HEADER)
            self.sent += 1
            time.sleep(0.01)


def canvas(page: Any, name: str) -> str:
    return str(page.evaluate(f"() => document.getElementById('chart-{name}').toDataURL()"))


def test_admin_page_in_chromium(
    context: Any,  # noqa: F811
    hubs: Callable[..., HubProcess],
    redis_server: RedisServer,
) -> None:
    from playwright.sync_api import expect

    a = hubs(ADMIN_TOML, redis_server.url)
    b = hubs(ADMIN_TOML, redis_server.url)
    page = context.new_page()
    page.goto(a.base + "/admin")

    # A wrong key is refused, and the data stays hidden.
    page.fill("#key", "wrong-key")
    page.click("#login button")
    expect(page.locator("#login-error")).to_have_text("refused: invalid api key")
    expect(page.locator("#main")).to_be_hidden()

    page.fill("#key", API_KEY)
    page.click("#login button")
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#processes tbody tr")).to_have_count(2, timeout=WAIT * 1000)
    expect(page.locator("#processes tbody")).to_contain_text("(this page)")
    expect(page.locator("#processes tbody")).to_contain_text("up")

    # A subscriber on the other process, with a user name made to be HTML.
    sub = client_page(context, b, [b.base.replace("http:", "ws:") + "/ws"], user=EVIL_USER)
    sub.evaluate("() => window.hub.subscribe('news')")
    expect(page.locator("#total-connections")).to_have_text("1", timeout=WAIT * 1000)

    # The charts move while messages flow.
    wait_js(page, "() => window.hubAdmin.series.rate.length >= 2")
    still = canvas(page, "rate")
    publisher = Publishing(a, "news")
    publisher.start()
    try:
        wait_js(page, "() => Number(document.getElementById('chart-rate').dataset.last) > 0")
        wait_js(page, "() => Number(document.getElementById('chart-latency').dataset.last) > 0")
    finally:
        publisher.stop.set()
        publisher.join(10)
    assert canvas(page, "rate") != still
    assert sub.evaluate("() => window.msgs.length") > 0

    # The publish form reaches the subscriber (on the other process).
    page.fill("#channel", "news")
    page.fill("#data", '{"from": "admin"}')
    page.click("#publish button")
    expect(page.locator("#publish-result")).to_contain_text("published")
    wait_js(sub, "() => window.msgs.some((m) => m.data && m.data.from === 'admin')")

    # The user search shows the name as text; a forged process and channel from Redis too.
    page.fill("#user", EVIL_USER)
    page.click("#search button")
    expect(page.locator("#user-result")).to_have_text(f"{EVIL_USER}: 1 connection")
    expect(page.locator("#connections tbody")).to_contain_text("news")
    with redis.Redis.from_url(redis_server.url) as r:
        r.publish("hub:ctl", forged(heartbeat(EVIL_PROCESS, top=[[EVIL_CHANNEL, 99]])))
    expect(page.locator("#processes tbody")).to_contain_text(EVIL_PROCESS, timeout=WAIT * 1000)
    expect(page.locator("#top tbody")).to_contain_text(EVIL_CHANNEL)
    for target in (page, sub):
        assert target.evaluate("() => window.__xss") is None
    assert page.locator("main img, main script").count() == 0

    # The disconnect button closes the user's connection for good (4503).
    page.click("#disconnect")
    expect(page.locator("#user-result")).to_contain_text("disconnected")
    closed = wait_js(sub, "() => window.states.find((s) => s.state === 'closed')")
    assert closed["code"] == 4503, closed


def test_the_page_locks_itself_when_the_key_stops_working(
    context: Any,  # noqa: F811
    hubs: Callable[..., HubProcess],
) -> None:
    """A key kept from an earlier visit that the hub no longer accepts: back to the key form."""
    from playwright.sync_api import expect

    hub = hubs(ADMIN_TOML)
    page = context.new_page()
    page.goto(hub.base + "/healthz")
    page.evaluate("() => sessionStorage.setItem('hub-admin-key', 'an-old-key')")
    page.goto(hub.base + "/admin")
    expect(page.locator("#login-error")).to_have_text("refused: invalid api key")
    assert page.evaluate("() => sessionStorage.getItem('hub-admin-key')") is None
    expect(page.locator("#main")).to_be_hidden()
    expect(page.locator("#login")).to_be_visible()
