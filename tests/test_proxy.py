"""The backend decides (docs/proxy.md): real ``hub serve`` processes asking a real HTTP backend
(tests/backendfix.py) whether to let connections, subscriptions, publications and RPCs through,
with real ``websockets`` clients. A backend that is down, slow, broken or answering garbage
costs a clear error and publishes nothing; each hub's log is free of tracebacks at the end."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from backendfix import Backend, backend
from hubfix import API_KEY, SECRET, api, client, metric, scrape
from procfix import ServedHub, free_port, hub_serve
from wshelp import run

from hub.tokens import mint_token

PROXY_SECRET = "proxy-test-secret-0123456789abcdef0123456789"


def config(app: Backend, personal: bool = False, **top: Any) -> str:
    """The hub's settings: proxies to ``app``; ``personal``: every user is subscribed to its
    channel in ``user`` on the server."""
    down = f"http://127.0.0.1:{free_port()}/nobody-listens"
    settings = {
        "token_secret": SECRET,
        "api_key": API_KEY,
        "proxy_secret": PROXY_SECRET,
        "connect_proxy": app.url("/connect"),
        "rpc_proxy": app.url("/rpc"),
        "proxy_timeout": 1.5,
        "proxy_concurrency": 2,
        "proxy_headers": ["User-Agent", "X-Rooms"],
        "join_leave_interval": 0.05,
        **top,
    }
    head = "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
    return (
        head
        + f"""
[namespaces.room]
publish = true
subscribe_proxy = "{app.url("/subscribe")}"
publish_proxy = "{app.url("/publish")}"

[namespaces.lounge]
publish = true
presence = true
join_leave = true
subscribe_proxy = "{app.url("/subscribe")}"

[namespaces.capped]
publish = true
max_message_size = 1000
subscribe_proxy = "{app.url("/subscribe")}"
publish_proxy = "{app.url("/publish")}"

[namespaces.slow]
publish = true
publish_proxy = "{app.url("/slow")}"

[namespaces.garbage]
publish = true
publish_proxy = "{app.url("/garbage")}"

[namespaces.broken]
publish = true
publish_proxy = "{app.url("/status500")}"

[namespaces.huge]
publish = true
publish_proxy = "{app.url("/huge")}"

[namespaces.hugestream]
publish = true
publish_proxy = "{app.url("/huge-stream")}"

[namespaces.empty]
publish = true
publish_proxy = "{app.url("/empty")}"

[namespaces.longreason]
publish = true
publish_proxy = "{app.url("/long-reason")}"

[namespaces.down]
publish = true
publish_proxy = "{down}"

[namespaces.downsub]
subscribe_proxy = "{down}"

[namespaces.private]
subscribe = "token"
publish = true

[namespaces.news]
server_side = true

[namespaces.user]
personal = true
server_side = {"true" if personal else "false"}
"""
    )


def _toml(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


@pytest.fixture(scope="module")
def app() -> Iterator[Backend]:
    with backend(PROXY_SECRET) as app:
        yield app


@pytest.fixture(scope="module")
def hub(app: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedHub]:
    with hub_serve(tmp_path_factory.mktemp("proxy"), config(app)) as served:
        yield served
    assert app.bad_signatures == 0  # every call this hub made was signed with proxy_secret


def token(user: str, **kwargs: Any) -> str:
    return mint_token(user, SECRET, **kwargs)


def alice(hub: ServedHub, **kwargs: Any) -> Any:
    return client(hub, headers={"Cookie": "theme=dark; sid=s-alice", "User-Agent": "t/1"}, **kwargs)


async def marker_next(hub: ServedHub, subscriber: Any, channel: str) -> None:
    """The subscriber's next push is a marker the backend publishes now: nothing refused or
    failed reached the channel before it."""
    status, _ = await api(hub, "/api/publish", {"channel": channel, "data": "marker"})
    assert status == 200
    assert await subscriber.push() == {"channel": channel, "data": "marker"}


# --- connect proxy -------------------------------------------------------------------------------


def test_connect_proxy_lets_a_cookie_session_in(hub: ServedHub, app: Backend) -> None:
    async def main() -> None:
        async with alice(hub) as a:
            who = await a.call("rpc", method="whoami")
            assert who["result"]["data"]["user"] == "alice"
            await a.ok("subscribe", channel="chat")
        body = [
            c for c in app.calls_to("/connect") if c["client"] == who["result"]["data"]["client"]
        ]
        assert len(body) == 1
        assert body[0]["transport"] == "websocket"
        assert body[0]["cookies"] == {"theme": "dark", "sid": "s-alice"}
        assert body[0]["headers"] == {"User-Agent": "t/1"}  # only proxy_headers
        assert body[0]["remote_addr"] == "127.0.0.1"

    run(main)


def test_connect_proxy_refusal_closes_with_4500(hub: ServedHub, app: Backend) -> None:
    async def main() -> None:
        async with client(hub, headers={"Cookie": "sid=nobody"}) as c:
            assert await c.closed_with() == (4500, "no such session")
        async with client(hub) as c:  # no cookie at all: the backend refuses it too
            assert (await c.closed_with())[0] == 4500
        async with client(hub, headers={"Cookie": "sid=banned"}) as c:
            assert await c.closed_with() == (4507, "banned")

    run(main)


@pytest.mark.parametrize(
    ("sid", "reason", "message"),
    [
        ("slow", "timeout", "backend timeout (connect proxy)"),
        ("status500", "status", "backend answered 500"),
        ("garbage", "malformed", "backend answer is not json"),
        ("longuser", "malformed", "connect answer: user must be a string of 1 to 200 characters"),
        ("biginfo", "malformed", "connect answer: info is over 4096 bytes"),
    ],
)
def test_a_failing_connect_proxy_closes_with_4004(
    hub: ServedHub, sid: str, reason: str, message: str
) -> None:
    """The backend, not the client, failed: 4004 (retry with backoff), counted, and the
    address's budget of failed authentications is not charged."""

    async def main() -> None:
        before = await scrape(hub)
        async with client(hub, headers={"Cookie": f"sid={sid}"}) as c:
            assert await c.closed_with() == (4004, message)
        after = await scrape(hub)
        for name, labels in (
            ("hub_proxy_errors_total", {"proxy": "connect", "reason": reason}),
            ("hub_handshake_failures_total", {"reason": "connect_proxy"}),
        ):
            assert metric(after, name, **labels) == metric(before, name, **labels) + 1, name
        unauthorized = {"reason": "unauthorized"}
        assert metric(after, "hub_handshake_failures_total", **unauthorized) == metric(
            before, "hub_handshake_failures_total", **unauthorized
        )

    run(main)


def test_a_connect_proxy_that_is_down_closes_with_4004(
    app: Backend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    down = f"http://127.0.0.1:{free_port()}/nobody-listens"
    with hub_serve(tmp_path_factory.mktemp("down"), config(app, connect_proxy=down)) as served:

        async def main() -> None:
            async with alice(served) as a:
                assert await a.closed_with() == (4004, "backend unavailable (connect proxy)")
            samples = await scrape(served)
            labels = {"proxy": "connect", "reason": "unavailable"}
            assert metric(samples, "hub_proxy_errors_total", **labels) == 1

        run(main)


def test_a_token_is_still_checked_by_the_hub_not_the_backend(hub: ServedHub, app: Backend) -> None:
    async def main() -> None:
        before = len(app.calls_to("/connect"))
        async with client(hub, token=token("carol")) as c:
            assert (await c.call("rpc", method="whoami"))["result"]["data"]["user"] == "carol"
        async with client(hub, token="not-a-jwt", headers={"Cookie": "sid=s-alice"}) as c:
            assert (await c.closed_with())[0] == 4500
        assert len(app.calls_to("/connect")) == before

    run(main)


# --- subscribe and publish proxies ---------------------------------------------------------------


def test_subscribe_proxy_allows_refuses_and_disconnects(hub: ServedHub) -> None:
    async def main() -> None:
        async with alice(hub) as a, client(hub, token=token("bob")) as b:
            reply = await a.call("subscribe", channel="room:secret")
            assert reply["result"] == {"data": {"welcome": "alice"}}
            refused = await b.call("subscribe", channel="room:secret")
            assert refused["error"] == {"code": 403, "message": "not a member"}
            # Without the backend's yes, nothing else of the channel is open either.
            assert await b.error("publish", channel="room:secret", data={"text": "x"}) == 103
            await b.send({"op": "subscribe", "channel": "room:kick", "id": 99})
            assert await b.closed_with() == (4003, "kicked")

    run(main)


def test_publish_proxy_rewrites_or_refuses(hub: ServedHub, app: Backend) -> None:
    async def main() -> None:
        async with alice(hub) as a, client(hub, token=token("bob")) as b:
            assert "result" in await b.call("subscribe", channel="room:lobby")
            assert "result" in await a.call("subscribe", channel="room:lobby")
            await a.ok("publish", channel="room:lobby", data={"text": "  hi  "})
            push = await b.push()
            assert push["data"]["text"] == "hi" and push["data"]["by"] == "alice"
            assert isinstance(push["data"]["id"], int) and push["from"]["user"] == "alice"
            assert (await a.push())["data"]["text"] == "hi"
            refused = await a.call("publish", channel="room:lobby", data={"text": "spam"})
            assert refused["error"] == {"code": 403, "message": "moderated"}
            await marker_next(hub, b, "room:lobby")
            # Data the backend cannot be sent as JSON is refused before any call.
            calls = len(app.calls_to("/publish"))
            async with client(hub, "hub.v1.msgpack", token=token("bob")) as m:
                assert "result" in await m.call("subscribe", channel="room:lobby")
                assert await m.error("publish", channel="room:lobby", data=b"\x00") == 107
            assert len(app.calls_to("/publish")) == calls

    run(main)


def test_subscribe_proxy_info_is_the_subscribers_on_that_channel(hub: ServedHub) -> None:
    """The subscribe answer's ``info`` is the subscriber's on that channel only: in presence,
    join/leave and the ``from`` of its publications there; its ``data`` is in the reply."""

    async def main() -> None:
        async with alice(hub) as a, client(hub, token=token("bob")) as b:
            reply = await b.call("subscribe", channel="lounge:roles")
            assert reply["result"] == {"data": {"welcome": "bob"}}
            reply = await a.call("subscribe", channel="lounge:roles")
            assert reply["result"] == {"data": {"welcome": "alice"}}
            joined: dict[str, Any] = {}
            while "alice" not in joined:
                push = await b.push()
                joined.update({e["user"]: e["info"] for e in push.get("join", [])})
            assert joined == {"bob": {"role": "guest"}, "alice": {"role": "host"}}
            clients = (await b.call("presence", channel="lounge:roles"))["result"]["clients"]
            assert sorted((e["user"], e["info"]["role"]) for e in clients.values()) == [
                ("alice", "host"),
                ("bob", "guest"),
            ]
            await a.ok("publish", channel="lounge:roles", data="hi")
            push = await b.push()
            while "data" not in push:  # join notices may come first
                push = await b.push()
            assert push["from"]["info"] == {"role": "host"} and push["data"] == "hi"
            # Elsewhere alice is what her connection is (the connect answer's info).
            assert "result" in await a.call("subscribe", channel="room:elsewhere")
            assert "result" in await b.call("subscribe", channel="room:elsewhere")
            await a.ok("publish", channel="room:elsewhere", data={"text": "x"})
            assert (await b.push())["from"]["info"] == {"ua": "t/1"}
            # An unsubscribe forgets it: the leave still shows the channel's info.
            await a.ok("unsubscribe", channel="lounge:roles")
            push = await b.push()
            while "leave" not in push:
                push = await b.push()
            assert push["leave"][0]["info"] == {"role": "host"}

    run(main)


@pytest.mark.parametrize(
    ("channel", "message"),
    [
        ("room:biginfo", "subscribe answer: info is over 4096 bytes"),
        ("capped:bigdata", "subscribe answer's data exceeds 1000 bytes"),
        ("room:wrongtype", "backend result must be an object"),
    ],
)
def test_a_subscribe_answer_over_the_limits_subscribes_nothing(
    hub: ServedHub, channel: str, message: str
) -> None:
    async def main() -> None:
        before = await scrape(hub)
        async with client(hub, token=token("bob")) as b:
            reply = await b.call("subscribe", channel=channel)
            assert reply["error"] == {"code": 113, "message": message}
            # Nothing subscribed: not a member, nothing delivered, and no second reply.
            assert await b.error("history", channel=channel) == 103
            assert await b.error("unsubscribe", channel=channel) == 109
            status, _ = await api(hub, "/api/publish", {"channel": channel, "data": "marker"})
            assert status == 200
            assert (await b.call("rpc", method="echo", data=1))["result"] == {"data": 1}
            assert not b.pushes
        after = await scrape(hub)
        labels = {"proxy": "subscribe", "reason": "malformed"}
        assert metric(after, "hub_proxy_errors_total", **labels) == (
            metric(before, "hub_proxy_errors_total", **labels) + 1
        )

    run(main)


def test_a_publish_answer_over_the_size_limit_is_refused_as_a_client_is(
    hub: ServedHub, app: Backend
) -> None:
    """Replacement data over the namespace's max_message_size gets the error a client's own
    oversized publish gets (110), counted, and nothing is published."""

    async def main() -> None:
        before = await scrape(hub)
        async with alice(hub) as a, client(hub, token=token("bob")) as b:
            assert "result" in await b.call("subscribe", channel="capped:inflate")
            assert "result" in await a.call("subscribe", channel="capped:inflate")
            own = await a.call("publish", channel="capped:inflate", data={"text": "x" * 2000})
            inflated = await a.call("publish", channel="capped:inflate", data={"text": "inflate"})
            assert (
                inflated["error"]
                == own["error"]
                == {
                    "code": 110,
                    "message": "data exceeds 1000 bytes",
                }
            )
            await marker_next(hub, b, "capped:inflate")
        after = await scrape(hub)
        labels = {"proxy": "publish", "reason": "too_large"}
        assert metric(after, "hub_proxy_errors_total", **labels) == (
            metric(before, "hub_proxy_errors_total", **labels) + 1
        )
        assert not any(c["data"].get("text") == "x" * 2000 for c in app.calls_to("/publish"))

    run(main)


def test_publish_proxy_answer_outside_the_contract_is_no_yes(hub: ServedHub) -> None:
    async def main() -> None:
        async with client(hub, token=token("bob")) as b:
            await b.ok("subscribe", channel="empty:x")
            # {} is no answer of the contract: refused, never taken as a yes.
            reply = await b.call("publish", channel="empty:x", data="as sent")
            assert reply["error"]["code"] == 113
            await marker_next(hub, b, "empty:x")

    run(main)


@pytest.mark.parametrize(
    ("namespace", "message", "reason"),
    [
        ("down", "backend unavailable (publish proxy)", "unavailable"),
        ("slow", "backend timeout (publish proxy)", "timeout"),
        ("garbage", "backend answer is not json", "malformed"),
        ("broken", "backend answered 500", "status"),
        ("huge", "backend answer too large", "malformed"),
        ("hugestream", "backend answer too large", "malformed"),
        (
            "longreason",
            "backend disconnect: reason must be a string of at most 120 bytes",
            "malformed",
        ),
    ],
)
def test_a_failing_backend_costs_a_clear_error_and_publishes_nothing(
    hub: ServedHub, namespace: str, message: str, reason: str
) -> None:
    async def main() -> None:
        before = metric(await scrape(hub), "hub_proxy_errors_total", proxy="publish", reason=reason)
        channel = f"{namespace}:x"
        async with client(hub, token=token("bob")) as b, client(hub, token=token("eve")) as e:
            await b.ok("subscribe", channel=channel)
            reply = await e.call("publish", channel=channel, data={"text": "lost"})
            assert reply["error"] == {"code": 113, "message": message}
            await marker_next(hub, b, channel)
            # The hub is healthy: other commands and proxies still answer.
            assert (await e.call("rpc", method="echo", data=1))["result"] == {"data": 1}
        samples = await scrape(hub)
        errors = metric(samples, "hub_proxy_errors_total", proxy="publish", reason=reason)
        assert errors == before + 1

    run(main)


def test_a_subscribe_proxy_that_is_down_refuses(hub: ServedHub) -> None:
    async def main() -> None:
        async with client(hub, token=token("bob")) as b:
            refused = await b.call("subscribe", channel="downsub:x")
            assert refused["error"] == {
                "code": 113,
                "message": "backend unavailable (subscribe proxy)",
            }
            assert await b.error("history", channel="downsub:x") == 103
            assert await b.error("unsubscribe", channel="downsub:x") == 109

    run(main)


# --- rpc -----------------------------------------------------------------------------------------


def test_rpc_round_trip(hub: ServedHub) -> None:
    async def main() -> None:
        before = await scrape(hub)
        async with client(hub, token=token("bob")) as b:
            data = {"a": [1, 2.5, "x", None, True]}
            assert (await b.call("rpc", method="echo", data=data))["result"] == {"data": data}
            assert (await b.call("rpc", method="nothing"))["result"] == {}
            unknown = await b.call("rpc", method="nope")
            assert unknown["error"] == {"code": 404, "message": "unknown method nope"}
            assert await b.error("rpc", method=42) == 107
            assert await b.error("rpc", method="x" * 201) == 107
        after = await scrape(hub)
        calls = metric(after, "hub_proxy_calls_total", proxy="rpc")
        assert calls - metric(before, "hub_proxy_calls_total", proxy="rpc") == 3
        assert metric(after, "hub_proxy_duration_seconds_count", proxy="rpc") >= 3

    run(main)


def test_flooding_rpc_and_publish_stays_within_the_bound_and_starves_no_one(
    hub: ServedHub, app: Backend
) -> None:
    """Four connections pipelining RPCs and three pipelining publishes as fast as they can:
    the backend never has more than ``proxy_concurrency`` (2) calls of a proxy in flight
    (without the bound it would be one per connection), and another client's RPC and publish
    still get their answers meanwhile."""

    async def main() -> None:
        app.most_in_flight.pop("/rpc", None)
        app.most_in_flight.pop("/publish", None)
        async with contextlib.AsyncExitStack() as stack:
            rpcs = [
                await stack.enter_async_context(client(hub, token=token(f"r{i}"))) for i in range(4)
            ]
            pubs = [
                await stack.enter_async_context(client(hub, token=token(f"p{i}"))) for i in range(3)
            ]
            victim = await stack.enter_async_context(alice(hub))
            for f in pubs:
                assert "result" in await f.call("subscribe", channel="room:flood")
            for i in range(30):
                for f in rpcs:
                    await f.send({"op": "rpc", "id": 100 + i, "method": "sleep"})
                for f in pubs:
                    data = {"text": "flood"}
                    await f.send(
                        {"op": "publish", "id": 100 + i, "channel": "room:flood", "data": data}
                    )
            who = await victim.call("rpc", method="whoami")
            assert who["result"]["data"]["user"] == "alice"
            assert "result" in await victim.call("subscribe", channel="room:calm")
            await victim.ok("publish", channel="room:calm", data={"text": "still here"})
            for f in rpcs:
                for i in range(30):
                    assert (await f.reply(100 + i)).get("result") == {"data": "slept"}
            for f in pubs:
                for i in range(30):
                    assert (await f.reply(100 + i)).get("result") == {}
        assert app.most_in_flight["/rpc"] == 2
        assert app.most_in_flight["/publish"] <= 2

    run(main, timeout=60)


# --- subscription tokens -------------------------------------------------------------------------


def test_subscription_token_must_match_channel_and_user(hub: ServedHub) -> None:
    async def main() -> None:
        async with client(hub, token=token("bob")) as b:
            assert await b.error("subscribe", channel="private:a") == 103
            wrong_channel = token("bob", channel="private:b")
            assert await b.error("subscribe", channel="private:a", token=wrong_channel) == 103
            wrong_user = token("mallory", channel="private:a")
            assert await b.error("subscribe", channel="private:a", token=wrong_user) == 103
            forged = mint_token("bob", "another-secret-0123456789abcdef0123", channel="private:a")
            assert await b.error("subscribe", channel="private:a", token=forged) == 101
            assert await b.error("subscribe", channel="private:a", token=12) == 107
            await b.ok("subscribe", channel="private:a", token=token("bob", channel="private:a"))
            await b.ok("publish", channel="private:a", data="in")  # subscribed: may write too
            assert (await b.push())["data"] == "in"

    run(main)


# --- refresh without reconnecting ---------------------------------------------------------------


def test_refresh_before_expiry_keeps_the_connection(hub: ServedHub) -> None:
    async def main() -> None:
        async with client(hub, token=token("bob", ttl=3)) as b:
            notice = await b.push(timeout=5)
            assert set(notice) == {"refresh"} and notice["refresh"]["expire_at"] > 0
            fresh = await b.call("refresh", token=token("bob", ttl=60))
            assert fresh["result"]["expire_at"] > notice["refresh"]["expire_at"]
            assert await b.error("refresh", token=token("mallory", ttl=60)) == 103
            assert await b.error("refresh", token="garbage") == 101
            await asyncio.sleep(3.5)  # past the first token's exp
            assert (await b.call("rpc", method="echo", data=1))["result"] == {"data": 1}

    run(main)


def test_no_refresh_closes_with_4002(hub: ServedHub) -> None:
    async def main() -> None:
        async with client(hub, token=token("bob", ttl=3)) as b:
            assert "refresh" in await b.push(timeout=5)
            assert await b.closed_with(timeout=5) == (4002, "token expired")

    run(main)


def test_subscription_token_refresh_or_unsubscribed(hub: ServedHub) -> None:
    async def main() -> None:
        async with client(hub, token=token("bob")) as b:
            short = token("bob", channel="private:r", ttl=3)
            await b.ok("subscribe", channel="private:r", token=short)
            await b.ok(
                "subscribe", channel="private:s", token=token("bob", channel="private:s", ttl=3)
            )
            notices = [await b.push(timeout=5), await b.push(timeout=5)]
            assert {n["channel"] for n in notices} == {"private:r", "private:s"}
            renewed = token("bob", channel="private:r", ttl=60)
            assert (
                "expire_at"
                in (await b.call("refresh", channel="private:r", token=renewed))["result"]
            )
            ended = await b.push(timeout=5)
            assert ended == {"channel": "private:s", "unsubscribed": {"reason": "token expired"}}
            await marker_next(hub, b, "private:r")

    run(main)


def test_connect_proxy_is_asked_again_before_expire_at(
    app: Backend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A renewal is the connect call again, body for body (docs/proxy.md, Expiry): the
    handshake's cookies and headers, since an open WebSocket carries no newer ones; a backend
    that rotated the session answers ``disconnect`` 4003, and the client reconnects."""
    app.expire_in = 2
    try:
        with hub_serve(tmp_path_factory.mktemp("renew"), config(app)) as served:

            async def main() -> None:
                async with alice(served) as a:
                    who = await a.call("rpc", method="whoami")
                    cid = who["result"]["data"]["client"]
                    await asyncio.sleep(3)  # past the first expire_at
                    assert (await a.call("rpc", method="echo", data=2))["result"] == {"data": 2}
                    asked = [c for c in app.calls_to("/connect") if c["client"] == cid]
                    assert len(asked) >= 2
                    assert all(body == asked[0] for body in asked)
                    assert asked[0]["cookies"] == {"theme": "dark", "sid": "s-alice"}
                    rotated = b'{"disconnect": {"code": 4003, "reason": "session rotated"}}'
                    app.connect_fault = (200, rotated)
                    assert await a.closed_with(timeout=5) == (4003, "session rotated")

            run(main)
    finally:
        app.expire_in = None
        app.connect_fault = None


# --- server-side subscriptions -------------------------------------------------------------------


def test_server_side_subscriptions_from_token_and_connect_proxy(
    app: Backend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async def main(hub: ServedHub) -> None:
        bob = token("bob", channels=["news:daily", "news:*"])
        async with client(hub, token=bob) as b:
            first = [await b.push(), await b.push()]
            assert {p["channel"] for p in first} == {"news:daily", "user:bob"}
            assert all(p["subscribed"] == {"server": True} for p in first)
            await marker_next(hub, b, "news:daily")
            await marker_next(hub, b, "user:bob")
            assert await b.error("subscribe", channel="news:daily") == 105
        headers = {"Cookie": "sid=s-alice", "X-Rooms": "chat,room:secret"}
        async with client(hub, headers=headers) as a:
            got = {(await a.push())["channel"] for _ in range(3)}
            assert got == {"chat", "room:secret", "user:alice"}
            await marker_next(hub, a, "room:secret")

    with hub_serve(tmp_path_factory.mktemp("server-side"), config(app, personal=True)) as served:
        run(lambda: main(served))


# --- the signature -------------------------------------------------------------------------------


def test_the_backend_refuses_a_hub_with_the_wrong_secret(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with (
        backend(PROXY_SECRET) as app,
        hub_serve(
            tmp_path_factory.mktemp("wrong"),
            config(app, proxy_secret="not-the-backends-secret-0123456789abcdef"),
        ) as served,
    ):
        before = app.bad_signatures

        async def main() -> None:
            async with client(served, token=token("bob")) as b:
                reply = await b.call("rpc", method="echo", data=1)
                assert reply["error"] == {"code": 113, "message": "backend answered 403"}
            async with alice(served) as a:
                assert await a.closed_with() == (4004, "backend answered 403")

        run(main)
        assert app.bad_signatures == before + 2


def test_every_call_matches_the_openapi_webhooks(hub: ServedHub, app: Backend) -> None:
    """The bodies the backend got (these and every earlier test's) are what docs/openapi.yaml
    describes under ``webhooks``."""

    async def main() -> None:
        async with alice(hub) as a:
            assert "result" in await a.call("subscribe", channel="room:spec")
            await a.ok("publish", channel="room:spec", data={"text": "x"})
            assert "result" in await a.call("rpc", method="echo")

    run(main)
    spec = yaml.safe_load((Path(__file__).parent.parent / "docs" / "openapi.yaml").read_text())
    for name in ("connect", "subscribe", "publish", "rpc"):
        operation = spec["webhooks"][name]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        bodies = app.calls_to(f"/{name}")
        assert bodies, name
        for body in bodies:
            jsonschema.validate(body, {**schema, "components": spec["components"]})
