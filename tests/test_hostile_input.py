"""Hostile input against a real ``hub serve``: reads of random history channels, channel names
and numbers the HTTP API must refuse, nesting that exhausts a decoder, garbage on the hub's Redis
channels. Each test asserts the answer (an error reply, a 4xx, a dropped and counted message),
that nothing was harmed, and that the hub's log holds no traceback."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hubfix import MSGPACK_PROTO, client, http, metric, running, scrape
from servefix import API_KEY, SECRET, hub_serve, raw_http
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wshelp import run

from hub.config import load_settings
from hub.errors import ErrorCode
from hub.history import EMPTY_TTL, META_TTL_MIN, UNTIMED_TTL
from hub.redis.publisher import Publisher
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

CONFIG = """
[namespaces.feed]
history_size = 20
history_ttl = 300
publish = true

[namespaces.log]
history_size = 20

[namespaces.room]
presence = true
join_leave = true
publish = true

[namespaces.chat]
publish = true
"""


def token(user: str) -> str:
    return mint_token(user, SECRET)


async def api(hub: Any, path: str, body: Any = None, data: bytes | None = None) -> tuple[int, Any]:
    headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
    status, _, raw = await http(hub, "POST", path, json_body=body, data=data, headers=headers)
    return status, raw


def random_name() -> str:
    return os.urandom(8).hex()


# --- 1. a history read creates nothing; every Redis key expires -------------------------------


def test_history_reads_of_unknown_channels_create_nothing_on_the_memory_broker(
    tmp_path: Path,
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(CONFIG)
    settings = load_settings(
        config, env={}, overrides={"port": 0, "token_secret": SECRET, "command_rate": 0}
    )  # reads in a row, unthrottled
    settings.api_key = API_KEY

    async def main() -> None:
        async with running(settings) as hub:
            store = hub.node.broker.store  # type: ignore[attr-defined]
            async with client(hub, token=token("alice")) as alice:
                for i in range(300):
                    channel = f"{('feed', 'log')[i % 2]}:{random_name()}"
                    reply = await alice.call("history", channel=channel)
                    result = reply["result"]
                    assert (result["publications"], result["offset"]) == ([], 0), reply
                for _ in range(100):
                    status, raw = await api(
                        hub, "/api/history", {"channel": f"feed:{random_name()}"}
                    )
                    assert status == 200, raw
                assert len(store) == 0
                # A subscribe keeps the epoch it answers (briefly), for the first publication.
                epoch = (await alice.call("subscribe", channel="feed:kept"))["result"]["epoch"]
                assert len(store) == 1
                sent = await hub.node.publish("feed:kept", "first")
                assert sent == (1, epoch)

    run(main)


def test_history_reads_of_unknown_channels_leave_redis_as_it_was(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    with hub_serve(tmp_path, CONFIG, redis_server.url, command_rate=0) as hub:  # unthrottled

        async def main() -> None:
            async with client(hub, token=token("alice")) as alice:  # type: ignore[arg-type]
                await alice.ok("subscribe", channel="chat:warm")  # the bridge is up
                before = r.dbsize()
                for i in range(300):
                    channel = f"{('feed', 'log')[i % 2]}:{random_name()}"
                    reply = await alice.call("history", channel=channel, limit=5)
                    assert reply["result"]["publications"] == [], reply
                for _ in range(100):
                    status, raw = await api(
                        hub, "/api/history", {"channel": f"log:{random_name()}"}
                    )
                    assert status == 200, raw
                assert r.dbsize() == before == 0
                # Subscribes keep an epoch each, and only for EMPTY_TTL.
                for _ in range(20):
                    channel = f"feed:{random_name()}"
                    await alice.call("subscribe", channel=channel)
                    await alice.ok("unsubscribe", channel=channel)
                keys = r.keys("*")
                assert len(keys) == 20, keys
                assert all(0 < r.pttl(k) <= EMPTY_TTL * 1000 for k in keys)

        run(main)
        hub.assert_clean()


def test_every_key_the_hub_writes_to_redis_expires(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    with hub_serve(tmp_path, CONFIG, redis_server.url) as hub:

        async def main() -> None:
            async with (
                client(hub, token=token("alice")) as alice,  # type: ignore[arg-type]
                client(hub, MSGPACK_PROTO, token=token("bob")) as bob,  # type: ignore[arg-type]
            ):
                for channel in ("feed:1", "log:1", "room:1", "chat:1"):
                    await alice.call("subscribe", channel=channel)
                    await bob.call("subscribe", channel=channel)
                for channel in ("feed:1", "room:1", "chat:1"):
                    await alice.ok("publish", channel=channel, data={"n": 1})
                status, raw = await api(hub, "/api/publish", {"channel": "log:1", "data": 2})
                assert status == 200, raw
                with Publisher(redis_server.url) as pub:
                    pub.publish("feed:2", "backend", history_size=20, history_ttl=300)
                    pub.publish("log:2", "backend", history_size=20)  # untimed
                    pub.history("log:never", history_size=20)
                await alice.call("presence", channel="room:1")
                await alice.call("history", channel="feed:1")
                await bob.call("history", channel="log:1", since={"offset": 0, "epoch": "x"})
                return {k.decode(): r.pttl(k) for k in r.keys("*")}  # presence too, while here

        keys = run(main)
        hub.assert_clean()
    expected = {
        "{hub:ch:feed:1}:history",
        "{hub:ch:feed:1}:meta",
        "{hub:ch:feed:2}:history",
        "{hub:ch:feed:2}:meta",
        "{hub:ch:log:1}:history",
        "{hub:ch:log:1}:meta",
        "{hub:ch:log:2}:history",
        "{hub:ch:log:2}:meta",
        "{hub:ch:room:1}:presence",
        "{hub:ch:room:1}:presence:exp",
    }
    assert expected <= set(keys), keys
    assert all(ttl > 0 for ttl in keys.values()), keys  # -1 would be a key kept for good
    day, month = META_TTL_MIN * 1000, UNTIMED_TTL * 1000
    assert 299_000 < keys["{hub:ch:feed:1}:history"] <= 300_000
    assert day - 60_000 < keys["{hub:ch:feed:1}:meta"] <= day
    assert month - 60_000 < keys["{hub:ch:log:1}:history"] <= month
    assert month - 60_000 < keys["{hub:ch:log:2}:meta"] <= month


# --- 2. the HTTP API checks channel names as clients' commands are checked --------------------

BAD_CHANNELS: list[Any] = ["a b\r\n*", "x" * 200_000, "", "news/\u00e9", "tab\there", 5, None]


def test_http_api_refuses_bad_channel_names_on_every_endpoint(tmp_path: Path) -> None:
    with hub_serve(tmp_path, CONFIG) as hub:

        async def main() -> None:
            async with client(hub, token=token("alice")) as alice:  # type: ignore[arg-type]
                await alice.ok("subscribe", channel="chat:ok")
                before = metric(await scrape(hub), "hub_http_errors_total", status="400")  # type: ignore[arg-type]
                refused = 0
                for path, extra in (
                    ("/api/publish", {"data": "x"}),
                    ("/api/history", {}),
                    ("/api/presence", {}),
                    ("/api/presence_stats", {}),
                ):
                    for channel in BAD_CHANNELS:
                        status, raw = await api(hub, path, {"channel": channel, **extra})
                        assert status == 400 and b"channel" in raw, (path, channel, raw)
                        refused += 1
                # The same names from a client are refused the same way (the huge one cannot
                # even be sent: it is past max_message_size).
                for channel in BAD_CHANNELS:
                    if channel is not None and len(str(channel)) < 1000:
                        code = await alice.error("subscribe", channel=channel)
                        assert code == ErrorCode.BAD_REQUEST, channel
                after = metric(await scrape(hub), "hub_http_errors_total", status="400")  # type: ignore[arg-type]
                assert after - before == refused
                # Good names still work on both surfaces, and nothing was published.
                status, raw = await api(hub, "/api/publish", {"channel": "chat:ok", "data": 1})
                assert status == 200, raw
                push = await alice.push()
                assert push == {"channel": "chat:ok", "data": 1}, push

        run(main)
        hub.assert_clean()


def test_metrics_can_have_their_own_key(tmp_path: Path) -> None:
    key = "metrics-key-0123456789abcdef0123456789"
    with hub_serve(tmp_path, CONFIG, metrics_key=key) as hub:

        async def main() -> None:
            status, headers, _ = await http(hub, "GET", "/metrics")  # type: ignore[arg-type]
            assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
            for wrong in ("Bearer nope", f"apikey {key}", key, f"Bearer {API_KEY}"):
                status, _, _ = await http(hub, "GET", "/metrics", headers={"Authorization": wrong})  # type: ignore[arg-type]
                assert status == 401, wrong
            bearer = {"Authorization": f"Bearer {key}"}
            status, _, body = await http(hub, "GET", "/metrics", headers=bearer)  # type: ignore[arg-type]
            assert status == 200 and b'hub_http_errors_total{status="401"} 5.0' in body, body

        run(main)
        hub.assert_clean()


def test_metrics_can_be_served_on_their_own_port(tmp_path: Path) -> None:
    from procfix import free_port

    port = free_port()
    with hub_serve(tmp_path, CONFIG, metrics_port=port) as hub:

        async def main() -> None:
            status, _, _ = await http(hub, "GET", "/metrics")  # type: ignore[arg-type]
            assert status == 404  # not on the public port any more
            status, _, _ = await http(hub, "GET", "/healthz")  # type: ignore[arg-type]
            assert status == 200
            elsewhere = SimpleNamespace(port=port)
            status, _, body = await http(elsewhere, "GET", "/metrics")  # type: ignore[arg-type]
            assert status == 200 and b"hub_connections " in body
            for path in ("/healthz", "/api/stats", "/ws", "/"):
                status, _, _ = await http(elsewhere, "GET", path)  # type: ignore[arg-type]
                assert status == 404, path

        run(main)
        hub.assert_clean()


# --- 3. nesting that exhausts a decoder is an error reply or a 400 -----------------------------

DEEP_JSON = "[" * 60_000
DEEP_MSGPACK = b"\x91" * 60_000


def test_deeply_nested_commands_get_an_error_reply(tmp_path: Path) -> None:
    with hub_serve(tmp_path, CONFIG) as hub:

        async def main() -> None:
            before = metric(await scrape(hub), "hub_command_errors_total", code="107")  # type: ignore[arg-type]
            async with client(hub, token=token("alice")) as alice:  # type: ignore[arg-type]
                await alice.send_raw(DEEP_JSON)
                reply = await alice.reply()
                assert reply["error"]["code"] == ErrorCode.BAD_REQUEST, reply
                await alice.ok("subscribe", channel="chat:x")  # still served
            async with client(hub, MSGPACK_PROTO, token=token("bob")) as bob:  # type: ignore[arg-type]
                await bob.send_raw(DEEP_MSGPACK)
                reply = await bob.reply()
                assert reply["error"]["code"] == ErrorCode.BAD_REQUEST, reply
                await bob.ok("subscribe", channel="chat:x")
            after = metric(await scrape(hub), "hub_command_errors_total", code="107")  # type: ignore[arg-type]
            assert after - before == 2

        run(main)
        hub.assert_clean()


def test_deeply_nested_http_bodies_are_a_400(tmp_path: Path) -> None:
    with hub_serve(tmp_path, CONFIG) as hub:

        async def main() -> None:
            for path in ("/api/publish", "/api/history", "/api/broadcast"):
                status, raw = await api(hub, path, data=DEEP_JSON.encode())
                assert status == 400 and b"invalid json" in raw, raw
            samples = await scrape(hub)  # type: ignore[arg-type]
            assert metric(samples, "hub_http_errors_total", status="400") == 3
            assert metric(samples, "hub_http_errors_total", status="500") == 0

        run(main)
        hub.assert_clean()


# --- 4. numbers in headers are ASCII digits ---------------------------------------------------

BAD_LENGTHS = [b"\xb2", b"\xd9\xa3", b"5_0", b"+5", b"-1", b" 0x5", b"1e3", b"5 5", b"9" * 19]


def test_a_content_length_that_is_not_ascii_digits_is_a_400(tmp_path: Path) -> None:
    with hub_serve(tmp_path, CONFIG) as hub:
        for length in [*BAD_LENGTHS, b"2"]:
            request = (
                b"POST /api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"X-API-Key: " + API_KEY.encode() + b"\r\nContent-Length: " + length + b"\r\n\r\n{}"
            )
            answer = raw_http(hub.port, request)
            if length == b"2":  # the same request with a real number is served
                assert answer.startswith(b"HTTP/1.1 400 ") and b"missing field: data" in answer
            else:
                assert answer.startswith(b"HTTP/1.1 400 "), (length, answer)
                assert b"missing field" not in answer
        hub.assert_clean()


# --- 5. every field from Redis is type-checked; a bad message is dropped and counted ----------

BAD_PUBLICATIONS: list[Any] = [
    {"data": "x", "offset": "evil"},
    {"data": "x", "offset": 3},  # an offset without an epoch
    {"data": "x", "epoch": "e"},
    {"data": "x", "offset": True, "epoch": "e"},
    {"data": "x", "offset": None, "epoch": None},
    {"data": "x", "offset": -1, "epoch": "e"},
    {"data": "x", "offset": 1, "epoch": 5},
    {"data": "x", "offset": 1, "epoch": "e" * 65},
    {"data": "x", "ts": "now"},
    {"data": "x", "ts": float("nan")},
    {"data": "x", "event": 5},
    {"join": [{"user": 1, "client": "c"}]},
    {"join": [{"user": "u"}]},
    {"leave": "everyone"},
    {"nothing": "here"},
    ["data", "x"],
    "x",
]
BAD_CONTROLS: list[Any] = [
    {"op": "disconnect", "user": 5},
    {"op": "disconnect", "user": ""},
    {"op": "disconnect", "user": "alice", "code": 99999},
    {"op": "disconnect", "user": "alice", "code": True},
    {"op": "disconnect", "user": "alice", "reason": "r" * 121},
    {"op": 5, "user": "alice"},
    {"user": "alice"},
]


def test_bad_envelopes_and_control_messages_are_dropped_and_counted(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    with hub_serve(tmp_path, CONFIG, redis_server.url) as hub:

        async def main() -> None:
            async with client(hub, token=token("alice")) as alice:  # type: ignore[arg-type]
                await alice.ok("subscribe", channel="news")
                await alice.ok("subscribe", channel="chat:1")
                sent = 0
                for envelope in BAD_PUBLICATIONS:
                    sent += r.publish("hub:ch:news", msgpack.packb(envelope))
                    sent += r.publish("hub:ch:chat:1", msgpack.packb(envelope))
                for payload in (b"", b"\xc1", b"\x81\x01\xa1x", b"\x82\xa4data\x01"):
                    sent += r.publish("hub:ch:news", payload)  # no msgpack, int key, truncated
                for control in BAD_CONTROLS:
                    sent += r.publish("hub:ctl", msgpack.packb(control))
                for name in ("hub:user:alice", "hub:all"):
                    sent += r.publish(name, msgpack.packb({"no": "data"}))
                    sent += r.publish(name, msgpack.packb([1, 2]))
                assert sent == 2 * len(BAD_PUBLICATIONS) + 4 + len(BAD_CONTROLS) + 4
                # A newer hub's op is ignored, not counted.
                r.publish("hub:ctl", msgpack.packb({"op": "rebalance"}))
                r.publish("hub:ch:news", msgpack.packb({"data": "marker", "ts": 1.5}))
                push = await alice.push()
                assert push == {"channel": "news", "data": "marker", "ts": 1.5}, push
                samples = await scrape(hub)  # type: ignore[arg-type]
                assert metric(samples, "hub_bridge_malformed_total") == sent
                assert metric(samples, "hub_bridge_handler_errors_total") == 0
                await alice.ok("subscribe", channel="chat:still-here")  # never disconnected

        run(main)
        hub.assert_clean()


def test_history_entries_with_bad_fields_are_skipped_and_counted(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A writer with Redis access can run the history script with any map: the live copy is
    dropped (counted), and so is the stored one whenever history is read."""
    r = redis_server.client()
    with hub_serve(tmp_path, CONFIG, redis_server.url) as hub:

        async def main() -> None:
            async with client(hub, token=token("alice")) as alice:  # type: ignore[arg-type]
                first = await alice.call("subscribe", channel="feed:h")
                epoch = first["result"]["epoch"]
                with Publisher(redis_server.url) as pub:
                    pub.publish("feed:h", "good", history_size=20, history_ttl=300)
                    script = r.register_script(
                        (Path(__file__).parent.parent / "hub" / "history.lua").read_text()
                    )
                    name = "hub:ch:feed:h"
                    bad = msgpack.packb({"data": "bad", "ts": "not a number"})
                    script(
                        keys=[f"{{{name}}}:history", f"{{{name}}}:meta"],
                        args=[name, bad, 20, 300_000, 86_400_000, "cand", 0],
                    )
                    pub.publish("feed:h", "good again", history_size=20, history_ttl=300)
                pushes = [await alice.push(), await alice.push()]
                assert [p["data"] for p in pushes] == ["good", "good again"], pushes
                assert [p["offset"] for p in pushes] == [1, 3]
                reply = await alice.call("history", channel="feed:h")
                publications = reply["result"]["publications"]
                assert [p["data"] for p in publications] == ["good", "good again"], reply
                assert reply["result"]["epoch"] == epoch
                # Recovery gets what live subscribers got: offset 2 reached nobody.
                async with client(hub, token=token("alice")) as again:  # type: ignore[arg-type]
                    reply = await again.call(
                        "subscribe", channel="feed:h", since={"offset": 0, "epoch": epoch}
                    )
                    assert reply["result"]["recovered"] is True, reply
                    recovered = [(await again.push())["data"] for _ in range(2)]
                    assert recovered == ["good", "good again"]
                samples = await scrape(hub)  # type: ignore[arg-type]
                # Live once, then skipped by the history read and the recovering subscribe.
                assert metric(samples, "hub_bridge_malformed_total") == 3

        run(main)
        hub.assert_clean()


def test_duplicate_headers_are_a_400_or_a_refused_connection(tmp_path: Path) -> None:
    """Which of two Content-Type, X-API-Key or Authorization headers to believe? Neither."""
    with hub_serve(tmp_path, CONFIG) as hub:
        base = b"POST /api/broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
        key = b"X-API-Key: " + API_KEY.encode() + b"\r\n"
        json_type = b"Content-Type: application/json\r\n"
        apikey = b"Authorization: apikey " + API_KEY.encode() + b"\r\n"
        for headers in (key + json_type * 2, key * 2 + json_type, apikey * 2 + json_type):
            request = base + headers + b'\r\n{"data": 1}'
            answer = raw_http(hub.port, request)
            assert answer.startswith(b"HTTP/1.1 400 ") and b"more than one" in answer, answer
        answer = raw_http(hub.port, base + key + json_type + b'\r\n{"data": 1}')
        assert answer.startswith(b"HTTP/1.1 200 "), answer

        async def main() -> None:
            bearer = f"Bearer {token('alice')}"
            async with connect(
                f"ws://127.0.0.1:{hub.port}/ws",
                additional_headers=[("Authorization", bearer), ("Authorization", bearer)],
                proxy=None,
            ) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4500

        run(main)
        hub.assert_clean()
