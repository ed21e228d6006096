"""hub.js and the demo page in a real headless Chromium, against real ``hub serve`` processes.

Debian's ``/usr/bin/chromium`` (``make sysdeps``) is driven by Playwright's sync API; Playwright
downloads no browser. Hubs run as subprocesses (so they can be killed like a crashed server) and
share a private Redis. Every wait is event-driven with a generous bound.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hubfix import API_KEY, SECRET, http, make_settings, running, secure_settings
from hubproc import HubProcess, SequencePublisher
from wshelp import run

from hub.redis.publisher import Publisher
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Bound (ms) of any single browser-side wait; a healthy run needs a fraction of it.
WAIT_MS = 30_000
WAIT = WAIT_MS / 1000

CHAT = """
[namespaces.chat]
publish = true
"""
HISTORY = """
[namespaces.chat]
publish = true
history_size = 100000
history_ttl = 600
"""

# Loaded into a page served by a hub: a hub.js client whose events are recorded on window.
SETUP_JS = """
async ({urls, options, src}) => {
  const { Hub } = await import(src || "/hub.js");
  const hub = new Hub(urls, options);
  window.hub = hub;
  window.states = [];
  window.msgs = [];
  window.events = [];
  hub.on("state", (d) => states.push(d));
  hub.on("message", (d) => msgs.push(d));
  for (const name of ["gap", "reload", "error"]) hub.on(name, (d) => events.push([name, d]));
  hub.connect();
}
"""
FAST = {"minDelay": 100, "maxDelay": 400}


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} not found: the browser tests drive Debian's chromium; "
            "run `make sysdeps` (scripts/system-deps.sh) to install it",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    try:
        yield context
    finally:
        context.close()


def client_page(context: Any, hub: HubProcess, urls: list[str], **options: Any) -> Any:
    """A page from ``hub`` running a recorded hub.js client (see SETUP_JS)."""
    page = context.new_page()
    page.goto(hub.base + "/healthz")
    page.evaluate(SETUP_JS, {"urls": urls, "options": {**FAST, **options}})
    return page


def wait_js(page: Any, expression: str, arg: Any = None) -> Any:
    return page.wait_for_function(expression, arg=arg, timeout=WAIT_MS).json_value()


def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- 1. chat through two hub processes ------------------------------------------------------------


def test_demo_pages_chat_through_two_hub_processes(
    context: Any, hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    from playwright.sync_api import expect

    a = hubs(CHAT, redis_server.url)
    b = hubs(CHAT, redis_server.url)
    # Dev mode lets only a hub's own page connect; b also serves an app page on a's origin
    # (below), so it is told both origins, as a deployment would be.
    b.stop()
    b.config.write_text(f'allowed_origins = ["{a.base}", "{b.base}"]\n' + CHAT)
    b.start()
    alice = context.new_page()
    alice.goto(a.base + "/?user=alice&channel=chat:lobby")
    bob = context.new_page()
    bob.goto(b.base + "/?user=bob&channel=chat:lobby")
    for page in (alice, bob):
        expect(page.locator("#state")).to_have_text("connected")
        expect(page.locator("#log")).to_contain_text("joined chat:lobby")
        # each page is the one connection and subscription of its own hub process
        expect(page.locator("#connections")).to_have_text("1")
        expect(page.locator("#subscriptions")).to_have_text("1")

    alice.fill("#text", "hello from alice")
    alice.press("#text", "Enter")
    expect(bob.locator("#log")).to_contain_text("alice: hello from alice")
    expect(alice.locator("#log")).to_contain_text("alice: hello from alice")
    bob.fill("#text", "hi alice")
    bob.press("#text", "Enter")
    expect(alice.locator("#log")).to_contain_text("bob: hi alice")

    # A namespace without client publishing: the demo falls back to dev mode's HTTP API.
    carol = context.new_page()
    carol.goto(a.base + "/?user=carol&channel=room")
    expect(carol.locator("#log")).to_contain_text("joined room")
    expect(carol.locator("#subscriptions")).to_have_text("2")
    dave = context.new_page()
    dave.goto(b.base + "/?user=dave&channel=room")
    expect(dave.locator("#log")).to_contain_text("joined room")
    carol.fill("#text", "via http")
    carol.press("#text", "Enter")
    expect(dave.locator("#log")).to_contain_text("carol: via http")

    # An app page on another origin imports hub.js from a hub (CORS) and connects to it.
    app = context.new_page()
    app.goto(a.base + "/healthz")
    ws_b = b.base.replace("http:", "ws:") + "/ws"
    app.evaluate(SETUP_JS, {"urls": [ws_b], "options": {"user": "erin"}, "src": b.base + "/hub.js"})
    app.evaluate("() => window.hub.subscribe('chat:lobby')")
    alice.fill("#text", "cross-origin hello")
    alice.press("#text", "Enter")
    wait_js(app, "() => window.msgs.some((m) => m.data.text === 'cross-origin hello')")


# -- 2. a hub restart loses nothing on a history channel ------------------------------------------


@pytest.mark.parametrize("mode", ["restart", "failover"])
def test_hub_restart_loses_no_message_on_a_history_channel(
    context: Any, hubs: Callable[..., HubProcess], redis_server: RedisServer, mode: str
) -> None:
    """A publisher goes on while the page's hub goes away; hub.js resubscribes with ``since``
    and every sequence number arrives exactly once, in order.

    restart: one url; the hub is SIGKILLed (1006) and restarted on its port, hub.js retries with
    backoff until it is back. failover: two urls (hubs sharing Redis); the page's hub is stopped
    with SIGTERM (drain, 1001) and hub.js reconnects to the other one, which is only started once
    20 publications went out with no hub for the page to be on: they must be recovered.
    """
    a = hubs(HISTORY, redis_server.url)
    urls = ["/ws"]
    if mode == "failover":
        b = hubs(HISTORY, redis_server.url)
        b.stop()
        # The page is on a's origin: b, in dev mode, must be told it (as a deployment would).
        b.config.write_text(f'allowed_origins = ["{a.base}"]\n' + HISTORY)
        urls = [a.base.replace("http:", "ws:") + "/ws", b.base.replace("http:", "ws:") + "/ws"]
    delays = {"minDelay": 200, "maxDelay": 500} if mode == "failover" else {}
    page = client_page(context, a, urls, user="reader", **delays)
    channel = "chat:feed"
    reply = page.evaluate("(ch) => window.hub.subscribe(ch)", channel)
    assert isinstance(reply, dict) and isinstance(reply.get("offset"), int), (
        f"subscribe reply on a history channel has no offset ({reply!r}): history is not "
        "enabled in this hub (it lands with the history branch)"
    )
    publisher = SequencePublisher(redis_server.url, channel)
    publisher.start()
    try:
        wait_js(page, "() => window.msgs.length >= 50")
        if mode == "restart":
            a.kill()
            wait_js(page, "() => window.hub.state !== 'connected'")
            at_kill = publisher.count
            until(lambda: publisher.count >= at_kill + 100, "publications while the hub is down")
            a.start()
        else:
            a.stop()
            wait_js(page, "() => window.hub.state !== 'connected'")
            at_drop = publisher.count
            until(lambda: publisher.count >= at_drop + 20, "publications while no hub is up")
            b.start()
        wait_js(page, "() => window.hub.state === 'connected' && window.hub.connections === 2")
        if mode == "failover":
            assert page.evaluate("window.hub.url").startswith(urls[1])
            states = page.evaluate("window.states")
            codes = [s["code"] for s in states if s["state"] == "disconnected"]
            assert codes[0] == 1001, codes  # drained; then refused attempts until b is up
        at_restart = publisher.count
        wait_js(page, "(n) => window.msgs.length > n + 50", at_restart)
    finally:
        total = publisher.finish()
    wait_js(page, "(n) => window.msgs.length >= n", total)
    got = page.evaluate("() => window.msgs.map((m) => [m.data.seq, m.offset])")
    events = page.evaluate("() => window.events")
    seqs = [seq for seq, _ in got]
    assert seqs == list(range(total)), (
        f"missing or repeated: {sorted(set(range(total)) ^ set(seqs))[:20]}"
    )
    offsets = [offset for _, offset in got]
    assert offsets == sorted(set(offsets)), "offsets must increase strictly"
    assert not [e for e in events if e[0] == "reload"], events


# -- 3. permessage-deflate ------------------------------------------------------------------------


def test_browser_negotiates_permessage_deflate(
    context: Any, hubs: Callable[..., HubProcess]
) -> None:
    hub = hubs(CHAT)
    page = context.new_page()
    handshakes: list[dict[str, Any]] = []
    cdp = context.new_cdp_session(page)
    cdp.on("Network.webSocketHandshakeResponseReceived", lambda e: handshakes.append(e))
    cdp.send("Network.enable")
    page.goto(hub.base + "/healthz")
    page.evaluate(SETUP_JS, {"urls": ["/ws"], "options": {**FAST, "user": "zip"}})
    page.evaluate("() => window.hub.subscribe('chat:big')")
    until(lambda: handshakes, "the websocket handshake response")
    response = handshakes[0]["response"]
    assert response["status"] == 101
    headers = {k.lower(): v for k, v in response["headers"].items()}
    assert "permessage-deflate" in headers.get("sec-websocket-extensions", ""), headers
    assert headers.get("sec-websocket-protocol") == "hub.v1.json"

    sent_before = _metric(hub, "hub_bytes_sent_total")
    text = "all work and no play makes jack a dull boy. " * 1000  # 44 KB, very compressible
    page.evaluate("(t) => window.hub.publish('chat:big', {text: t})", text)
    received = wait_js(page, "() => window.msgs.length && window.msgs[0].data.text")
    assert received == text
    sent = _metric(hub, "hub_bytes_sent_total") - sent_before
    # the push went out compressed: far fewer bytes on the wire than its JSON
    assert 0 < sent < len(text) / 10, sent


def test_binary_pushes_are_decoded_from_msgpack(
    context: Any, hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    """Data JSON cannot carry reaches a JSON client as a msgpack binary frame; hub.js decodes it
    into the same message event."""
    hub = hubs(CHAT, redis_server.url)
    page = client_page(context, hub, ["/ws"], user="bin")
    page.evaluate("() => window.hub.subscribe('chat:bin')")
    data = {
        "blob": bytes(range(256)) * 2,
        "big": 2**40 + 3,
        "neg": -(2**33),
        "small": [-1, -33, 200, 70000],
        "f": 1.5,
        "s": "\u00e9" * 40,
        "nested": {"ok": True, "none": None, "list": list(range(20))},
    }
    with Publisher(redis_server.url, prefix="hub") as publisher:
        publisher.publish("chat:bin", data)
    got = wait_js(
        page,
        """() => {
          const m = window.msgs[0];
          if (!m) return null;
          const d = m.data;
          return {...d, blob: d.blob instanceof Uint8Array ? Array.from(d.blob) : d.blob};
        }""",
    )
    assert got == {**data, "blob": list(data["blob"])}


def _metric(hub: HubProcess, name: str) -> float:
    with urllib.request.urlopen(hub.base + "/metrics", timeout=WAIT) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


# -- 4. close codes -----------------------------------------------------------------------------


SECURE = f"""
token_secret = "{SECRET}"
api_key = "{API_KEY}"
"""
KEY = {"X-API-Key": API_KEY}


def test_close_codes_decide_reconnection(context: Any, hubs: Callable[..., HubProcess]) -> None:
    hub = hubs(SECURE)
    stats = lambda: hub.get("/api/stats", KEY)["result"]  # noqa: E731

    # An invalid token: closed with 4500, and hub.js does not try again.
    bad = client_page(context, hub, ["/ws"], token="not-a-jwt")
    closed = wait_js(bad, "() => window.states.find((s) => s.state === 'closed')")
    assert closed["code"] == 4500, closed
    time.sleep(2)  # several maxDelay periods: a reconnecting client would have tried again
    assert bad.evaluate("() => [window.hub.attempts, window.hub.state]") == [1, "closed"]
    assert _metric(hub, 'hub_handshake_failures_total{reason="unauthorized"}') == 1

    # A valid token: drops that allow reconnecting are followed by a reconnect + resubscribe.
    token = mint_token("carol", SECRET, ttl=3600)
    page = client_page(context, hub, ["/ws"], token=token)
    page.evaluate("() => window.hub.subscribe('news')")
    until(lambda: stats()["subscriptions"] == 1, "carol's subscription")

    hub.post("/api/disconnect", {"user": "carol", "code": 4003, "reason": "move"}, KEY)
    wait_js(page, "() => window.hub.connections === 2 && window.hub.state === 'connected'")
    assert [s["code"] for s in page.evaluate("window.states") if s["state"] == "disconnected"] == [
        4003
    ]
    until(lambda: stats()["subscriptions"] == 1, "the resubscription after 4003")

    hub.kill()  # a crash: 1006, reconnect with backoff until the hub is back
    wait_js(page, "() => window.hub.state === 'disconnected'")
    hub.start()
    wait_js(page, "() => window.hub.connections === 3 && window.hub.state === 'connected'")
    until(lambda: stats()["subscriptions"] == 1, "the resubscription after the restart")
    hub.post("/api/publish", {"channel": "news", "data": "after restart"}, KEY)
    wait_js(page, "() => window.msgs.some((m) => m.data === 'after restart')")

    # Disconnected for good (4503, the default of /api/disconnect): no reconnect.
    hub.post("/api/disconnect", {"user": "carol"}, KEY)
    closed = wait_js(page, "() => window.states.find((s) => s.state === 'closed')")
    assert closed["code"] == 4503, closed
    attempts = page.evaluate("window.hub.attempts")
    time.sleep(2)
    assert page.evaluate("() => [window.hub.attempts, window.hub.state]") == [attempts, "closed"]
    assert stats() == {"connections": 0, "subscriptions": 0, "channels": 0, "users": 0}


# -- HTTP: /hub.js, /, /api/stats ------------------------------------------------------------------


def test_static_routes_and_stats() -> None:
    async def main() -> None:
        async with running(make_settings()) as dev:
            status, headers, body = await http(dev, "GET", "/hub.js")
            assert status == 200
            assert headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert "max-age" in headers["Cache-Control"]
            assert headers["Access-Control-Allow-Origin"] == "*"  # importable from app pages
            assert b"export class Hub" in body
            etag = headers["ETag"]
            status, _, body = await http(dev, "GET", "/hub.js", headers={"If-None-Match": etag})
            assert (status, body) == (304, b"")
            status, headers, body = await http(dev, "GET", "/")
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            assert b'from "/hub.js"' in body
            status, _, body = await http(dev, "GET", "/api/stats")
            assert status == 200
            assert json.loads(body) == {
                "result": {"connections": 0, "subscriptions": 0, "channels": 0, "users": 0}
            }
            status, headers, _ = await http(dev, "POST", "/api/stats")
            assert status == 405 and headers["Allow"] == "GET"

        async with running(secure_settings(api_key=API_KEY)) as prod:
            status, _, _ = await http(prod, "GET", "/")
            assert status == 404  # the demo page is for dev mode only
            status, _, _ = await http(prod, "GET", "/hub.js")
            assert status == 200
            status, _, _ = await http(prod, "GET", "/api/stats")
            assert status == 401
            status, _, body = await http(prod, "GET", "/api/stats", headers={"X-API-Key": API_KEY})
            assert status == 200 and json.loads(body)["result"]["connections"] == 0

    run(main)


# -- 5. gaps: Redis goes away under a subscribed page ----------------------------------------------


@pytest.mark.parametrize("history", [False, True], ids=["plain", "history"])
def test_redis_restart_surfaces_a_gap(
    context: Any, hubs: Callable[..., HubProcess], redis_server: RedisServer, history: bool
) -> None:
    """The hub's Redis restarts empty: the page hears of the gap. On a plain channel hub.js only
    reports it; on a history channel it resubscribes with ``since``, retrying while the hub
    answers "unavailable", and, as the restarted Redis lost the history, asks for a reload."""
    hub = hubs(HISTORY if history else CHAT, redis_server.url)
    page = client_page(context, hub, ["/ws"], user="gappy")
    channel = "chat:gappy"
    fields: dict[str, Any] = {"history_size": 100, "history_ttl": 600} if history else {}
    reply = page.evaluate("(ch) => window.hub.subscribe(ch)", channel)
    assert ("offset" in reply) is history, reply
    with Publisher(redis_server.url, prefix="hub") as publisher:
        publisher.publish(channel, "before", **fields)
    wait_js(page, "() => window.msgs.some((m) => m.data === 'before')")

    redis_server.kill()
    gap = wait_js(page, "() => window.events.find((e) => e[0] === 'gap')")
    assert gap[1] == {"channel": channel, "recovering": history}, gap
    redis_server.start()
    until(hub.ready, "the hub's redis link")
    if history:
        reload = wait_js(page, "() => window.events.find((e) => e[0] === 'reload')")
        assert reload[1]["channel"] == channel, reload
    # live again: a publication after the restart arrives (retried: the link may still be coming up)
    deadline = time.monotonic() + WAIT
    with Publisher(redis_server.url, prefix="hub") as publisher:
        while not page.evaluate("() => window.msgs.some((m) => m.data === 'after')"):
            assert time.monotonic() < deadline, "no publication after the redis restart"
            publisher.publish(channel, "after", **fields)
            time.sleep(0.5)
    assert page.evaluate("window.hub.state") == "connected"
    assert page.evaluate("window.hub.connections") == 1  # the websocket itself never dropped
