"""The hub's HTTP side, served on the WebSocket port: health checks, the publish API with its API
key and JSON errors, and the Prometheus metrics moving as clients and backends act.

Requests go through aiohttp (a real HTTP client); deliveries are checked with real WebSocket
clients.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hubfix import (
    API_KEY,
    JSON_PROTO,
    MSGPACK_PROTO,
    HubClient,
    api,
    client,
    eventually,
    http,
    make_settings,
    metric,
    running,
    scrape,
    secure_settings,
)
from wshelp import run

from hub.app import Hub
from hub.redis.publisher import Publisher
from hub.rules import MAX_USER_LENGTH
from hub.tokens import mint_token


def keyed_settings(**overrides: Any) -> Any:
    """Production-like settings: tokens required, the HTTP API behind ``API_KEY``."""
    return secure_settings(api_key=API_KEY, **overrides)


def error_message(body: Any) -> str:
    """The message of a JSON error body ``{"error": {"message": ...}}``."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


# --- health ------------------------------------------------------------------------------------


def test_healthz_and_readyz() -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            status, _, body = await http(hub, "GET", "/healthz")
            assert status == 200 and body.strip() == b"ok"
            status, _, body = await http(hub, "GET", "/readyz")
            assert status == 200 and body.strip() == b"ready"

    run(main)


def test_readyz_is_503_while_the_node_is_not_ready() -> None:
    """With the node (broker) stopped the hub is alive but not ready; it recovers on restart."""

    async def main() -> None:
        async with running(make_settings()) as hub:
            await hub.node.close()
            status, _, _ = await http(hub, "GET", "/readyz")
            assert status == 503
            status, _, _ = await http(hub, "GET", "/healthz")
            assert status == 200
            await hub.node.start()
            status, _, _ = await http(hub, "GET", "/readyz")
            assert status == 200

    run(main)


def test_unknown_path_is_404_json() -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            for path in ("/nope", "/api", "/api/unknown", "/api/publish/extra"):
                status, headers, body = await http(hub, "POST", path, json_body={})
                assert status == 404, path
                assert headers["Content-Type"].startswith("application/json")
                error_message(json.loads(body))

    run(main)


# --- the API key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"X-API-Key": "wrong"}, id="wrong-x-api-key"),
        pytest.param({"X-API-Key": ""}, id="empty-x-api-key"),
        pytest.param({"Authorization": "apikey wrong"}, id="wrong-authorization"),
        pytest.param({"Authorization": f"Bearer {API_KEY}"}, id="bearer-is-not-apikey"),
        pytest.param({"X-API-Key": API_KEY.upper()}, id="case-matters"),
    ],
)
def test_api_without_the_right_key_is_401(headers: dict[str, str]) -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            async with client(hub, token=mint_token("alice", hub.settings.token_secret)) as c:
                await c.ok("subscribe", channel="news")
                status, response_headers, raw = await http(
                    hub,
                    "POST",
                    "/api/publish",
                    json_body={"channel": "news", "data": "sneaky"},
                    headers=headers,
                )
                assert status == 401
                assert response_headers["Content-Type"].startswith("application/json")
                error_message(json.loads(raw))
                # Nothing was published.
                await hub.node.publish("news", "marker")
                assert await c.push() == {"channel": "news", "data": "marker"}

    run(main)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-API-Key": API_KEY}, id="x-api-key"),
        pytest.param({"Authorization": f"apikey {API_KEY}"}, id="authorization-apikey"),
        pytest.param({"Authorization": f"ApiKey {API_KEY}"}, id="authorization-scheme-case"),
    ],
)
def test_api_with_the_key_publishes(headers: dict[str, str]) -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            async with client(hub, token=mint_token("alice", hub.settings.token_secret)) as c:
                await c.ok("subscribe", channel="news")
                status, _, raw = await http(
                    hub,
                    "POST",
                    "/api/publish",
                    json_body={"channel": "news", "data": {"n": 1}},
                    headers=headers,
                )
                assert (status, json.loads(raw)) == (200, {"result": {}})
                assert await c.push() == {"channel": "news", "data": {"n": 1}}

    run(main)


def test_api_is_refused_when_no_key_is_configured_outside_dev_mode() -> None:
    async def main() -> None:
        async with running(secure_settings()) as hub:
            for key in (None, "anything"):
                status, body = await api(hub, "/api/broadcast", {"data": 1}, key=key)
                assert status in (401, 403)
                error_message(body)

    run(main)


def test_api_needs_no_key_in_dev_mode() -> None:
    async def main() -> None:
        async with running(make_settings()) as hub:
            assert hub.settings.insecure
            async with client(hub, user="a") as c:
                status, body = await api(hub, "/api/broadcast", {"data": "dev"}, key=None)
                assert (status, body) == (200, {"result": {}})
                assert await c.push() == {"data": "dev"}

    run(main)


# --- the API's routes --------------------------------------------------------------------------


def test_api_publish_send_broadcast_and_disconnect_deliver() -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            secret = hub.settings.token_secret
            async with (
                client(hub, JSON_PROTO, token=mint_token("alice", secret)) as a1,
                client(hub, MSGPACK_PROTO, token=mint_token("alice", secret)) as a2,
                client(hub, JSON_PROTO, token=mint_token("bob", secret)) as bob,
            ):
                await bob.ok("subscribe", channel="news")
                ok = (200, {"result": {}})
                assert await api(hub, "/api/publish", {"channel": "news", "data": [1]}) == ok
                assert await bob.push() == {"channel": "news", "data": [1]}
                assert await api(hub, "/api/send", {"user": "alice", "data": "hi"}) == ok
                assert await api(hub, "/api/broadcast", {"data": None}) == ok
                for a in (a1, a2):
                    assert await a.push() == {"data": "hi"}
                    assert await a.push() == {"data": None}
                assert await bob.push() == {"data": None}
                body = {"user": "alice", "code": 4003, "reason": "moved"}
                assert await api(hub, "/api/disconnect", body) == ok
                assert await a1.closed_with() == (4003, "moved")
                assert await a2.closed_with() == (4003, "moved")
                assert await api(hub, "/api/disconnect", {"user": "bob"}) == ok
                assert (await bob.closed_with())[0] == 4503

    run(main)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/publish", b"{not json"),
        ("/api/publish", b"[1, 2]"),
        ("/api/publish", b'"text"'),
        ("/api/publish", b'{"data": 1}'),
        ("/api/publish", b'{"channel": "news"}'),
        ("/api/publish", b'{"channel": 5, "data": 1}'),
        ("/api/publish", b'{"channel": "", "data": 1}'),
        ("/api/broadcast", b"{}"),
        ("/api/send", b'{"data": 1}'),
        ("/api/send", b'{"user": 7, "data": 1}'),
        ("/api/send", b'{"user": "alice"}'),
        ("/api/disconnect", b"{}"),
        ("/api/disconnect", b'{"user": "alice", "code": 1000}'),
        ("/api/disconnect", b'{"user": "alice", "code": "4003"}'),
        ("/api/disconnect", b'{"user": "alice", "reason": 5}'),
        ("/api/disconnect", b'{"user": "alice", "reason": "' + b"x" * 200 + b'"}'),
    ],
)
def test_api_bad_body_is_400_json(path: str, body: bytes) -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            status, headers, raw = await http(
                hub,
                "POST",
                path,
                data=body,
                headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
            )
            assert status == 400
            assert headers["Content-Type"].startswith("application/json")
            error_message(json.loads(raw))

    run(main)


@asynccontextmanager
async def news_subscribers(
    hub: Hub, json_user: str, msgpack_user: str
) -> AsyncIterator[tuple[HubClient, HubClient]]:
    """A JSON and a msgpack client, both subscribed to ``news``."""
    secret = hub.settings.token_secret
    async with (
        client(hub, JSON_PROTO, token=mint_token(json_user, secret)) as j,
        client(hub, MSGPACK_PROTO, token=mint_token(msgpack_user, secret)) as m,
    ):
        for c in (j, m):
            await c.ok("subscribe", channel="news")
        yield j, m


async def only_the_marker_arrives(hub: Hub, clients: tuple[HubClient, HubClient]) -> None:
    """Publish a marker: each client's next push must be it (a refused publish left nothing)."""
    await hub.node.publish("news", "marker")
    for c in clients:
        assert await c.push() == {"channel": "news", "data": "marker"}


@pytest.mark.parametrize(
    "literal", ["NaN", "Infinity", "-Infinity", r'"\ud800"', r'"x\udfff"', r'{"\udc00": 1}']
)
def test_api_what_json_cannot_carry_is_400_and_not_delivered(literal: str) -> None:
    """``NaN``/``Infinity`` are not JSON (RFC 8259) and an unpaired surrogate cannot be written
    as UTF-8 (I-JSON forbids it): the body is a bad request, and no subscriber, in either
    encoding, receives anything (a surrogate once got through and failed the fan-out)."""

    async def main() -> None:
        async with running(keyed_settings()) as hub, news_subscribers(hub, "a", "b") as clients:
            status, headers, raw = await http(
                hub,
                "POST",
                "/api/publish",
                data=b'{"channel": "news", "data": %s}' % literal.encode(),
                headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
            )
            assert status == 400
            assert headers["Content-Type"].startswith("application/json")
            error_message(json.loads(raw))
            await only_the_marker_arrives(hub, clients)

    run(main)


@pytest.mark.parametrize("path", ["/api/publish", "/api/send", "/api/broadcast"])
def test_api_data_redis_cannot_carry_is_400(path: str) -> None:
    """A 65-bit integer is JSON but not msgpack: refused with a message naming the field, and
    subscribers of both encodings keep getting what follows."""

    async def main() -> None:
        async with running(keyed_settings()) as hub, news_subscribers(hub, "a", "a") as clients:
            body = {"channel": "news", "user": "a", "data": {"n": 2**65}}
            status, answer = await api(hub, path, body)
            assert status == 400
            assert error_message(answer) == (
                "invalid field: data (cannot be encoded: integer out of 64-bit range)"
            )
            await only_the_marker_arrives(hub, clients)

    run(main)


def test_api_wrong_content_type_is_415() -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            status, _, raw = await http(
                hub,
                "POST",
                "/api/publish",
                data=b'{"channel": "news", "data": 1}',
                headers={"X-API-Key": API_KEY, "Content-Type": "text/plain"},
            )
            assert status == 415
            error_message(json.loads(raw))

    run(main)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_api_wrong_method_is_405_with_allow(method: str) -> None:
    async def main() -> None:
        async with running(keyed_settings()) as hub:
            status, headers, raw = await http(
                hub, method, "/api/publish", headers={"X-API-Key": API_KEY}
            )
            assert status == 405
            assert headers.get("Allow") == "POST"
            error_message(json.loads(raw))

    run(main)


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_endpoint_is_prometheus_text() -> None:
    async def main() -> None:
        async with running(make_settings()) as hub:
            status, headers, _ = await http(hub, "GET", "/metrics")
            assert status == 200
            assert headers["Content-Type"].startswith("text/plain")
            samples = await scrape(hub)
            names = {name for name, _ in samples}
            for name in (
                "hub_connections",
                "hub_subscriptions",
                "hub_channels",
                "hub_connections_accepted_total",
                "hub_bytes_sent_total",
                "hub_slow_consumer_disconnects_total",
            ):
                assert name in names, name

    run(main)


def test_metrics_follow_connections_publications_and_errors() -> None:
    async def main() -> None:
        toml = "[namespaces.chat]\npublish = true\n"
        async with running(make_settings(toml)) as hub:
            before = await scrape(hub)
            assert metric(before, "hub_connections") == 0
            async with (
                client(hub, JSON_PROTO, user="alice") as alice,
                client(hub, MSGPACK_PROTO, user="bob") as bob,
            ):
                await alice.ok("subscribe", channel="chat:room")
                await bob.ok("subscribe", channel="chat:room")
                await bob.ok("subscribe", channel="news")
                s = await scrape(hub)
                assert metric(s, "hub_connections") == 2
                assert metric(s, "hub_connections_accepted_total") == 2
                assert metric(s, "hub_subscriptions") == 3
                assert metric(s, "hub_channels") == 2
                assert metric(s, "hub_client_messages_received_total") == 3

                # One publication from each source; measure the frames the clients receive.
                sizes = 0
                await api(hub, "/api/publish", {"channel": "chat:room", "data": "h"}, key=None)
                await alice.ok("publish", channel="chat:room", data="c")
                await hub.node.publish("news", "a")
                for c, n in ((alice, 2), (bob, 3)):
                    for _ in range(n):
                        await c.push()
                        payload = c.raw_last
                        sizes += len(payload) + 2  # every frame here is < 126 bytes
                s = await scrape(hub)
                for source in ("http", "client", "api"):
                    assert metric(s, "hub_messages_published_total", source=source) == 1
                assert metric(s, "hub_messages_delivered_total", kind="channel") == 5
                assert metric(s, "hub_bytes_sent_total") == sizes

                await hub.node.send_to_user("alice", "u")
                await hub.node.broadcast("b")
                assert await alice.push() == {"data": "u"}
                for c in (alice, bob):
                    assert await c.push() == {"data": "b"}
                s = await scrape(hub)
                assert metric(s, "hub_messages_delivered_total", kind="user") == 1
                assert metric(s, "hub_messages_delivered_total", kind="broadcast") == 2

                assert await alice.error("frobnicate") == 104
                assert await alice.error("publish", channel="news", data=1) == 103
                assert await alice.error("publish", channel="news", data=2) == 103
                s = await scrape(hub)
                assert metric(s, "hub_command_errors_total", code="104") == 1
                assert metric(s, "hub_command_errors_total", code="103") == 2

                await bob.raw.close()
                await eventually(lambda: len(hub.node.registry) == 1)
                s = await scrape(hub)
                assert metric(s, "hub_connections") == 1
                assert metric(s, "hub_subscriptions") == 1
                assert metric(s, "hub_channels") == 1
                assert metric(s, "hub_connections_closed_total", code="1000") == 1
            await eventually(lambda: len(hub.node.registry) == 0)
            s = await scrape(hub)
            assert metric(s, "hub_connections") == 0
            assert metric(s, "hub_connections_closed_total", code="1000") == 2
            assert metric(s, "hub_connections_accepted_total") == 2

    run(main)


def test_metrics_count_server_initiated_closes_by_code() -> None:
    async def main() -> None:
        async with running(make_settings()) as hub:
            async with client(hub, user="abuser") as abuser, client(hub, user="gone") as gone:
                for _ in range(10):
                    await abuser.send_raw("{bad")
                assert (await abuser.closed_with())[0] == 4502
                await hub.node.disconnect("gone")
                assert (await gone.closed_with())[0] == 4503
            await eventually(lambda: len(hub.node.registry) == 0)
            s = await scrape(hub)
            assert metric(s, "hub_connections_closed_total", code="4502") == 1
            assert metric(s, "hub_connections_closed_total", code="4503") == 1
            assert metric(s, "hub_command_errors_total", code="107") == 10

    run(main)


def test_metrics_count_a_protocol_failure_under_the_code_sent() -> None:
    """A message over ``max_message_size`` closes with 1009; the closed counter says 1009."""

    async def main() -> None:
        async with running(make_settings(max_message_size=1024)) as hub:
            async with client(hub, user="big") as big:
                await big.send_raw("x" * 2000)
                assert (await big.closed_with())[0] == 1009
            await eventually(lambda: len(hub.node.registry) == 0)
            s = await scrape(hub)
            closed = {
                dict(labels)["code"]: value
                for (name, labels), value in s.items()
                if name == "hub_connections_closed_total"
            }
            assert closed == {"1009": 1.0}

    run(main)


def test_one_user_id_rule_on_every_surface() -> None:
    """A user id of 1 to 200 characters (rules.MAX_USER_LENGTH), whoever names it: the HTTP
    API's send, disconnect and ``from`` answer 400 (counted), a token is refused, the
    publishers raise before sending anything."""
    long_user = "u" * (MAX_USER_LENGTH + 1)
    bodies = [
        ("/api/send", {"user": long_user, "data": 1}),
        ("/api/send", {"user": "", "data": 1}),
        ("/api/send", {"user": ["alice"], "data": 1}),
        ("/api/disconnect", {"user": long_user}),
        ("/api/disconnect", {"user": 12}),
        ("/api/publish", {"channel": "news", "data": 1, "from": {"user": long_user}}),
    ]

    async def main() -> None:
        async with running(keyed_settings()) as hub:
            before = metric(await scrape(hub), "hub_http_errors_total", status="400")
            for path, body in bodies:
                status, answer = await api(hub, path, body)
                assert status == 400, (path, body)
                message = error_message(answer)
                assert "user must be a string of 1 to 200 characters" in message, message
            after = metric(await scrape(hub), "hub_http_errors_total", status="400")
            assert after == before + len(bodies)
            longest = "u" * MAX_USER_LENGTH
            assert (await api(hub, "/api/send", {"user": longest, "data": 1}))[0] == 200
            assert (await api(hub, "/api/disconnect", {"user": longest}))[0] == 200
            secret = hub.settings.token_secret
            async with client(hub, JSON_PROTO, token=mint_token(long_user, secret)) as c:
                assert (await c.closed_with())[0] == 4500
            async with client(hub, JSON_PROTO, token=mint_token(longest, secret)) as c:
                await c.ok("subscribe", channel="news")

    run(main)
    publisher = Publisher("redis://127.0.0.1:1")  # nothing listens: the rule fails first
    for call in (
        lambda: publisher.send_to_user(long_user, 1),
        lambda: publisher.send_to_users([("alice", 1), (long_user, 2)]),
        lambda: publisher.disconnect(long_user),
    ):
        with pytest.raises(ValueError, match="user must be a string of 1 to 200 characters"):
            call()
