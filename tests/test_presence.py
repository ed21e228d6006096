"""Presence and join/leave: one hub (memory), two hubs on a private Redis, two hubs on a private
Redis Cluster, and two real ``hub serve`` processes, one of them SIGKILLed so that its entries
must expire. Clients are real ``websockets`` clients; the HTTP API is called with aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import redis
from hubfix import (
    API_KEY,
    MSGPACK_PROTO,
    SECRET,
    HubClient,
    api,
    client,
    eventually,
    make_settings,
    metric,
    running,
    scrape,
    secure_settings,
)
from websockets.asyncio.client import connect
from wshelp import run, within

from hub.broker import MemoryBroker
from hub.config import ConfigError
from hub.membership import JOIN_LEAVE_CHUNK
from hub.node import Node
from hub.presence import MemoryPresence, RedisPresence
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import LocalCluster, RedisServer

pytest_plugins = ["redisfix"]

NAMESPACES = """
[namespaces.chat]
presence = true
join_leave = true

[namespaces.room]
presence = true

[namespaces.secret]
presence = true
subscribe = "token"

[namespaces.user]
presence = true
personal = true

[namespaces.plain]
"""


def token(user: str, **kwargs: Any) -> str:
    return mint_token(user, SECRET, **kwargs)


async def presence(c: HubClient, channel: str) -> dict[str, Any]:
    reply = await c.call("presence", channel=channel)
    assert "result" in reply, reply
    clients: dict[str, Any] = reply["result"]["clients"]
    return clients


async def stats(c: HubClient, channel: str) -> dict[str, int]:
    reply = await c.call("presence_stats", channel=channel)
    assert "result" in reply, reply
    result: dict[str, int] = reply["result"]
    return result


async def joins_and_leaves(c: HubClient, until: Any, timeout: float = 10.0) -> list[Any]:
    """Pushes (join/leave only) until ``until(pushes)`` holds."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        assert left > 0, f"join/leave pushes so far: {got}"
        push = await c.push(timeout=left)
        if "join" in push or "leave" in push:
            got.append(push)
    return got


def clients_in(pushes: list[Any], key: str) -> list[str]:
    return [e["client"] for p in pushes if key in p for e in p[key]]


# --- one hub (memory) ----------------------------------------------------------------------------


def test_presence_lists_connections_with_token_info_and_counts_users() -> None:
    async def main() -> None:
        async with running(secure_settings(NAMESPACES)) as hub:
            info = {"name": "Alice", "avatar": 3}
            async with AsyncExitStack() as stack:
                a1 = await stack.enter_async_context(client(hub, token=token("alice", info=info)))
                a2 = await stack.enter_async_context(
                    client(hub, MSGPACK_PROTO, token=token("alice", info=info))
                )
                b = await stack.enter_async_context(client(hub, token=token("bob")))
                for c in (a1, a2, b):
                    await c.ok("subscribe", channel="room:1")
                clients = await presence(b, "room:1")
                assert len(clients) == 3
                for cid, entry in clients.items():
                    assert entry["client"] == cid and len(cid) == 32
                users = sorted((e["user"], json.dumps(e["info"])) for e in clients.values())
                assert users == [("alice", json.dumps(info))] * 2 + [("bob", "null")]
                assert await stats(a2, "room:1") == {"num_clients": 3, "num_users": 2}
                # A client need not be subscribed to read presence (only allowed to subscribe).
                assert await stats(a1, "room:other") == {"num_clients": 0, "num_users": 0}

                await a2.ok("unsubscribe", channel="room:1")
                assert await stats(b, "room:1") == {"num_clients": 2, "num_users": 2}
                await a1.raw.close()
                await eventually(
                    lambda: _equals(stats(b, "room:1"), {"num_clients": 1, "num_users": 1})
                )
                assert [e["user"] for e in (await presence(b, "room:1")).values()] == ["bob"]

    run(main)


async def _equals(aw: Any, expected: Any) -> bool:
    return bool(await aw == expected)


def test_presence_where_not_enabled_is_108_and_permissions_follow_subscribe() -> None:
    async def main() -> None:
        async with running(secure_settings(NAMESPACES)) as hub:
            async with client(hub, token=token("alice", channels=["secret:a*"])) as a:
                for op in ("presence", "presence_stats"):
                    assert await a.error(op, channel="plain:x") == 108
                    assert await a.error(op, channel="news") == 108  # default namespace
                    assert await a.error(op, channel="secret:b") == 103  # token does not grant
                    assert await a.error(op, channel="user:bob") == 103  # another's personal
                    assert await a.error(op, channel="bad channel") == 107
                    assert await a.error(op) == 107
                assert await stats(a, "secret:a1") == {"num_clients": 0, "num_users": 0}
                await a.ok("subscribe", channel="user:alice")
                assert [e["user"] for e in (await presence(a, "user:alice")).values()] == ["alice"]

    run(main)


def test_http_presence_endpoints_need_the_api_key() -> None:
    async def main() -> None:
        async with running(secure_settings(NAMESPACES, api_key=API_KEY)) as hub:
            async with client(hub, token=token("alice", info="hi")) as a:
                await a.ok("subscribe", channel="room:1")
                mine = await presence(a, "room:1")
                for path in ("/api/presence", "/api/presence_stats"):
                    status, body = await api(hub, path, {"channel": "room:1"}, key=None)
                    assert status == 401, body
                    status, body = await api(hub, path, {"channel": "room:1"}, key="wrong")
                    assert status == 401, body
                    status, body = await api(hub, path, {"channel": "plain:1"})
                    assert status == 400 and "not enabled" in body["error"]["message"]
                    status, body = await api(hub, path, {"channel": "a b"})
                    assert status == 400 and "channel" in body["error"]["message"]
                    status, body = await api(hub, path, {})
                    assert (status, body) == (400, {"error": {"message": "missing field: channel"}})
                status, body = await api(hub, "/api/presence", {"channel": "room:1"})
                assert (status, body) == (200, {"result": {"clients": mine}})
                assert next(iter(mine.values()))["info"] == "hi"
                status, body = await api(hub, "/api/presence_stats", {"channel": "room:1"})
                assert (status, body) == (200, {"result": {"num_clients": 1, "num_users": 1}})

    run(main)


def test_join_and_leave_are_pushed_to_subscribers() -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, join_leave_interval=0.05)
        async with running(settings) as hub:
            async with client(hub, user="watcher") as w, client(hub, user="bob") as b:
                await w.ok("subscribe", channel="chat:1")
                # The watcher's own join reaches the watcher too (one encoding for everyone).
                own = await joins_and_leaves(w, lambda got: len(got) >= 1)
                assert [e["user"] for e in own[0]["join"]] == ["watcher"]

                await b.ok("subscribe", channel="chat:1")
                [push] = await joins_and_leaves(w, lambda got: len(got) >= 1)
                assert push == {
                    "channel": "chat:1",
                    "join": [{"user": "bob", "client": push["join"][0]["client"], "info": None}],
                }
                bob = push["join"][0]["client"]
                await b.ok("unsubscribe", channel="chat:1")
                [push] = await joins_and_leaves(w, lambda got: len(got) >= 1)
                assert push == {
                    "channel": "chat:1",
                    "leave": [{"user": "bob", "client": bob, "info": None}],
                }
                await b.ok("subscribe", channel="chat:1")
                await joins_and_leaves(w, lambda got: len(got) >= 1)
                await b.raw.close()  # a disconnect is a leave too
                [push] = await joins_and_leaves(w, lambda got: len(got) >= 1)
                assert [e["user"] for e in push["leave"]] == ["bob"]
                # Namespaces without join_leave push none.
                async with client(hub, user="carol") as c:
                    await w.ok("subscribe", channel="room:1")
                    await c.ok("subscribe", channel="room:1")
                    await c.ok("subscribe", channel="chat:1")
                    [push] = await joins_and_leaves(w, lambda got: len(got) >= 1)
                    assert push["channel"] == "chat:1"
                    assert [e["user"] for e in push["join"]] == ["carol"]

    run(main)


def burst_of_joins(settings_for: Any, n: int = 40, interval: float = 1.0) -> None:
    """``n`` clients subscribe at once; a watcher gets every join exactly once, in lists, and no
    more pushes than one per interval per process (plus the edges)."""

    async def main() -> None:
        async with AsyncExitStack() as stack:
            hubs = [
                await stack.enter_async_context(running(s))
                for s in settings_for(join_leave_interval=interval)
            ]
            w = await stack.enter_async_context(client(hubs[0], user="watcher"))
            await w.ok("subscribe", channel="chat:burst")
            await joins_and_leaves(w, lambda got: len(got) >= 1)  # its own join
            crowd = [
                await stack.enter_async_context(client(hubs[i % len(hubs)], user=f"u{i}"))
                for i in range(n)
            ]
            started = time.monotonic()
            await within(
                asyncio.gather(*(c.ok("subscribe", channel="chat:burst") for c in crowd)), 30
            )
            pushes = await joins_and_leaves(
                w, lambda got: len(clients_in(got, "join")) >= n, timeout=30
            )
            elapsed = time.monotonic() - started
            joined = clients_in(pushes, "join")
            assert len(joined) == len(set(joined)) == n
            assert all(p["channel"] == "chat:burst" and "leave" not in p for p in pushes)
            per_process = elapsed / interval + 2
            # Coalesced: each process flushes at most once per interval, however many joined.
            assert len(pushes) <= per_process * len(hubs), (len(pushes), elapsed)

    run(main)


def test_a_burst_of_joins_is_coalesced_memory() -> None:
    burst_of_joins(lambda **kw: [make_settings(NAMESPACES, **kw)])


def test_a_burst_of_joins_is_coalesced_across_two_hubs_on_redis(
    redis_server: RedisServer,
) -> None:
    burst_of_joins(lambda **kw: [make_settings(NAMESPACES, redis_url=redis_server.url, **kw)] * 2)


class RecordingBroker(MemoryBroker):
    """The memory broker, recording the join/leave messages the node sends through it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any], list[Any]]] = []

    async def join_leave(self, channel: str, join: list[Any], leave: list[Any]) -> None:
        self.sent.append((channel, join, leave))
        await super().join_leave(channel, join, leave)


def entry(client: str) -> dict[str, Any]:
    return {"user": "u", "client": client, "info": None}


def test_join_then_leave_within_one_interval_cancels_out_and_big_batches_are_split() -> None:
    """The node's batching, driven directly: the flush is called instead of waited for."""

    async def main() -> None:
        broker = RecordingBroker()
        node = Node(make_settings(NAMESPACES, join_leave_interval=60), broker)
        await node.start()
        try:
            note = node.membership._note
            note("chat:1", entry("a"), joined=True)
            note("chat:1", entry("b"), joined=True)
            note("chat:1", entry("a"), joined=False)  # came and went: nobody hears of it
            note("chat:1", entry("old"), joined=False)
            note("chat:1", entry("old"), joined=True)  # left and came back: nothing either
            note("chat:2", entry("c"), joined=False)
            node.membership._flush()
            await eventually(lambda: len(broker.sent) == 2)
            assert sorted(broker.sent) == [
                ("chat:1", [entry("b")], []),
                ("chat:2", [], [entry("c")]),
            ]
            broker.sent.clear()
            many = JOIN_LEAVE_CHUNK + 7
            for i in range(many):
                note("chat:3", entry(f"j{i}"), joined=True)
                note("chat:3", entry(f"l{i}"), joined=False)
            node.membership._flush()
            await eventually(lambda: sum(len(j) + len(x) for _, j, x in broker.sent) == 2 * many)
            assert all(len(j) + len(x) <= JOIN_LEAVE_CHUNK for _, j, x in broker.sent)
            assert len(broker.sent) == 3
        finally:
            await node.close()

    run(main)


def test_memory_presence_alone() -> None:
    async def main() -> None:
        p = MemoryPresence()
        await p.add("c", "1", {"user": "a", "client": "1", "info": None})
        await p.add("c", "2", {"user": "a", "client": "2", "info": None})
        assert await p.stats("c") == {"num_clients": 2, "num_users": 1}
        await p.remove("c", "1")
        await p.remove("c", "2")
        await p.remove("c", "2")  # twice is harmless
        assert await p.clients("c") == {}

    run(main)


# --- two hubs on one Redis -----------------------------------------------------------------------


def test_presence_across_two_hubs_sharing_redis(redis_server: RedisServer) -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, redis_url=redis_server.url)
        async with running(settings) as h1, running(settings) as h2:
            assert isinstance(h1.node.presence, RedisPresence)
            async with (
                client(h1, user="alice") as a,
                client(h2, user="bob") as b,
                client(h2, user="alice") as a2,
            ):
                for c in (a, b, a2):
                    await c.ok("subscribe", channel="room:x")
                one, two = await presence(a, "room:x"), await presence(b, "room:x")
                assert one == two and len(one) == 3
                assert sorted(e["user"] for e in one.values()) == ["alice", "alice", "bob"]
                assert await stats(b, "room:x") == {"num_clients": 3, "num_users": 2}
                status, body = await api(h2, "/api/presence_stats", {"channel": "room:x"})
                assert status == 200 and body == {"result": {"num_clients": 3, "num_users": 2}}

                # The keys: cluster-safe names in the channel's slot, with an expiry.
                r = redis_server.client()
                h, z = "{hub:ch:room:x}:presence", "{hub:ch:room:x}:presence:exp"
                assert set(r.hkeys(h)) == {k.encode() for k in one}
                assert r.zcard(z) == 3 and 0 < r.pttl(h) <= 60_000
                assert msgpack.unpackb(r.hget(h, next(iter(one)))) == next(iter(one.values()))

                await a.ok("unsubscribe", channel="room:x")
                assert await stats(b, "room:x") == {"num_clients": 2, "num_users": 2}
                await b.raw.close()
                await eventually(
                    lambda: _equals(stats(a, "room:x"), {"num_clients": 1, "num_users": 1})
                )
            # Every connection gone: nothing left in Redis.
            await eventually(lambda: r.exists(h) == 0 and r.exists(z) == 0)

    run(main)


def test_join_leave_crosses_hubs_through_redis(redis_server: RedisServer) -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, redis_url=redis_server.url, join_leave_interval=0.05)
        async with running(settings) as h1, running(settings) as h2:
            async with client(h1, user="watcher") as w, client(h2, user="bob") as b:
                await w.ok("subscribe", channel="chat:1")
                await joins_and_leaves(w, lambda got: len(got) >= 1)
                await b.ok("subscribe", channel="chat:1")
                [push] = await joins_and_leaves(w, lambda got: len(got) >= 1)
                assert [e["user"] for e in push["join"]] == ["bob"]
                await b.raw.close()
                [push] = await joins_and_leaves(w, lambda got: len(got) >= 1)
                assert [e["user"] for e in push["leave"]] == ["bob"]

                # A backend's hand-made join message reaches clients too; a malformed one is
                # dropped and counted, never pushed.
                r = redis_server.client()
                before = h1.node.broker.malformed  # type: ignore[attr-defined]
                r.publish("hub:ch:chat:1", msgpack.packb({"join": "nope"}))
                r.publish("hub:ch:chat:1", msgpack.packb({"join": [entry("x")]}))
                [push] = await joins_and_leaves(w, lambda got: len(got) >= 1)
                assert push == {"channel": "chat:1", "join": [entry("x")]}
                assert h1.node.broker.malformed == before + 1  # type: ignore[attr-defined]

    run(main)


def test_presence_while_redis_is_down_is_unavailable_and_heals(redis_server: RedisServer) -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, redis_url=redis_server.url)
        async with running(settings) as hub:
            async with client(hub, user="a") as a:
                await a.ok("subscribe", channel="room:1")
                redis_server.kill()
                await eventually(lambda: not hub.node.ready)
                assert await a.error("presence", channel="room:1") == 111
                assert await a.error("presence_stats", channel="room:1") == 111
                before = metric(await scrape(hub), "hub_presence_write_errors_total")
                status, body = await api(hub, "/api/presence", {"channel": "room:1"})
                assert (status, body) == (503, {"error": {"message": "presence unavailable"}})
                await a.ok("subscribe", channel="room:2")  # presence down never fails this
                after = metric(await scrape(hub), "hub_presence_write_errors_total")
                assert after >= before + 1
                redis_server.start()  # empty: every entry is gone
                await eventually(lambda: hub.node.ready, timeout=10)
                presence_ = hub.node.presence
                assert isinstance(presence_, RedisPresence)
                await within(presence_.refresh())  # what the periodic refresh does
                assert await stats(a, "room:1") == {"num_clients": 1, "num_users": 1}
                assert await stats(a, "room:2") == {"num_clients": 1, "num_users": 1}

    run(main)


def test_entries_of_a_silent_process_expire(redis_server: RedisServer) -> None:
    """Two presence stores standing in for two processes; one stops refreshing (as if frozen)
    and its entry expires, while the other's, refreshed, stays."""

    async def main() -> None:
        live = RedisPresence(redis_server.url, ttl=1.0)
        frozen = RedisPresence(redis_server.url, ttl=1.0, refresh_interval=3600)
        await live.start()
        await frozen.start()
        try:
            await live.add("room:1", "l", {"user": "a", "client": "l", "info": None})
            await frozen.add("room:1", "f", {"user": "b", "client": "f", "info": [1, 2]})
            assert sorted(await live.clients("room:1")) == ["f", "l"]
            await eventually(lambda: _keys(live.clients("room:1"), ["l"]), timeout=10)
            assert await frozen.stats("room:1") == {"num_clients": 1, "num_users": 1}
        finally:
            await live.close()
            await frozen.close()

    run(main)


def test_a_removal_that_failed_is_retried_by_the_refresh(tmp_path: Path) -> None:
    """Redis (persistent here, so the entries survive) goes away just when a connection
    leaves: the removal fails, and the next refresh after Redis is back performs it instead of
    leaving the entry for a whole TTL."""
    from redisfix import RedisServer

    server = RedisServer(tmp_path)
    server.extra = {"appendonly": "yes", "appendfsync": "always"}
    server.start()

    async def main() -> None:
        store = RedisPresence(server.url, ttl=60, refresh_interval=3600, timeout=2)
        await store.start()
        try:
            await store.add("room:1", "gone", entry("gone"))
            await store.add("room:1", "stays", entry("stays"))
            server.kill()
            await store.remove("room:1", "gone")  # fails: redis is down
            assert store.write_errors == 1
            server.start()
            assert sorted(await store.clients("room:1")) == ["gone", "stays"]  # still there
            await store.refresh()
            assert sorted(await store.clients("room:1")) == ["stays"]
            assert store.write_errors == 1
        finally:
            await store.close()

    try:
        run(main)
    finally:
        server.close()


async def _keys(aw: Any, expected: list[str]) -> bool:
    return sorted(await aw) == expected


# --- Redis Cluster -------------------------------------------------------------------------------


def test_presence_and_join_leave_across_two_hubs_on_a_redis_cluster(
    redis_cluster: LocalCluster,
) -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, redis_url=redis_cluster.url, join_leave_interval=0.05)
        # Channels on every shard.
        channels: dict[int, str] = {}
        for i in range(200):
            owner = redis_cluster.owner(f"hub:ch:chat:{i}").port
            channels.setdefault(owner, f"chat:{i}")
        assert len(channels) == 3
        async with running(settings) as h1, running(settings) as h2:
            async with client(h1, user="a") as a, client(h2, user="b") as b:
                for channel in channels.values():
                    await a.ok("subscribe", channel=channel)
                own = await joins_and_leaves(a, lambda got: len(got) >= 3)
                assert sorted(p["channel"] for p in own) == sorted(channels.values())
                for channel in channels.values():
                    await b.ok("subscribe", channel=channel)
                joins = await joins_and_leaves(a, lambda got: len(got) >= 3)
                assert sorted(p["channel"] for p in joins) == sorted(channels.values())
                assert {e["user"] for p in joins for e in p["join"]} == {"b"}
                for port, channel in channels.items():
                    assert await stats(a, channel) == {"num_clients": 2, "num_users": 2}
                    users = sorted(e["user"] for e in (await presence(b, channel)).values())
                    assert users == ["a", "b"]
                    with redis.Redis(port=port, socket_timeout=5) as r:  # the owning shard
                        assert r.hlen("{hub:ch:" + channel + "}:presence") == 2
                await b.raw.close()
                leaves = await joins_and_leaves(a, lambda got: len(got) >= 3)
                assert {e["user"] for p in leaves for e in p["leave"]} == {"b"}
                for channel in channels.values():
                    await eventually(
                        lambda c=channel: _equals(stats(a, c), {"num_clients": 1, "num_users": 1})
                    )

    run(main)


# --- real processes ------------------------------------------------------------------------------

HUB = str(Path(sys.executable).with_name("hub"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def hub_serve(
    config: Path, redis_url: str, log_path: Path, ttl: float
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """A real ``hub serve`` process (one, no supervisor): its port and process, killed on
    exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["HUB_PRESENCE_TTL"] = str(ttl)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                HUB,
                "serve",
                "--insecure",
                "--port",
                str(port),
                "--redis",
                redis_url,
                "--config",
                str(config),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while b" ready: ws://" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "hub serve did not start"
            time.sleep(0.05)
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def post(port: int, path: str, body: Any) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def test_killed_hub_process_presence_expires(redis_server: RedisServer, tmp_path: Path) -> None:
    """Two ``hub serve`` processes on one Redis; SIGKILL one (no goodbye, no cleanup) and its
    clients vanish from presence once the short TTL has passed, while the survivor's stay."""
    config = tmp_path / "hub.toml"
    config.write_text(NAMESPACES)
    ttl = 3.0
    with (
        hub_serve(config, redis_server.url, tmp_path / "one.log", ttl) as (one, doomed),
        hub_serve(config, redis_server.url, tmp_path / "two.log", ttl) as (two, _),
    ):

        async def main() -> None:
            opts: dict[str, Any] = {"compression": None, "ping_interval": None, "proxy": None}
            c1 = await within(connect(f"ws://127.0.0.1:{one}/ws?user=doomed", **opts))
            c2 = await within(connect(f"ws://127.0.0.1:{two}/ws?user=survivor", **opts))
            subscribed_at = time.monotonic()  # no entry of c1 can be written before this
            for i, c in enumerate((c1, c2)):
                await within(c.send(json.dumps({"op": "subscribe", "channel": "room:k", "id": i})))
                assert json.loads(await within(c.recv())) == {"id": i, "result": {}}
            both = post(two, "/api/presence_stats", {"channel": "room:k"})
            assert both == {"result": {"num_clients": 2, "num_users": 2}}

            doomed.send_signal(signal.SIGKILL)

            def survivor_only() -> bool:
                found = post(two, "/api/presence", {"channel": "room:k"})["result"]["clients"]
                return [e["user"] for e in found.values()] == ["survivor"]

            await eventually(survivor_only, timeout=ttl + 15, interval=0.2)
            # Not before the TTL: expiry is what removed it (Redis's clock, the same host's).
            assert time.monotonic() - subscribed_at >= ttl - 0.1
            # The survivor's own entry outlives several TTLs: it is refreshed.
            await asyncio.sleep(ttl * 1.5)
            assert survivor_only()
            await within(c2.close())
            await within(c1.close())

        run(main)


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"presence_ttl": 0}, "presence_ttl: expected 1 to 86400 seconds, got 0.0"),
        ({"join_leave_interval": -1}, "join_leave_interval: expected 0 to 60 seconds, got -1.0"),
        ({"presence_ttl": "soon"}, "--presence-ttl: expected float, got 'soon'"),
    ],
)
def test_bad_presence_settings_are_one_line_errors(overrides: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_settings(**overrides)
    assert str(info.value) == message
