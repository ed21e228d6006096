"""The Redis bridge against a private ``redis-server`` (``redisfix``): two brokers standing in for
two processes, each with a recording handler, then two real hubs with real clients.

Redis is killed, restarted, stopped (SIGSTOP) and made to drop the pub/sub connection; Redis
itself is inspected (``PUBSUB NUMSUB``, ``INFO commandstats``) to check what the bridge asks of
it, not only what it delivers.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import redis
from hubfix import JSON_PROTO, MSGPACK_PROTO, api, client, eventually, http, make_settings
from wshelp import run, within

from hub.app import Hub
from hub.broker import Publication
from hub.errors import RedisUnavailable
from hub.redis.broker import RedisBroker
from hub.redis.publisher import AsyncPublisher, Publisher

if TYPE_CHECKING:
    from redisfix import LocalCluster, RedisServer

pytest_plugins = ["redisfix"]  # the redis_server fixture

#: Short delays so kills and stops are noticed in well under a second.
FAST: dict[str, Any] = {
    "unsubscribe_delay": 0.3,
    "ping_interval": 0.2,
    "ping_timeout": 0.3,
    "connect_timeout": 1.0,
    "backoff_min": 0.05,
    "backoff_max": 0.2,
    "start_timeout": 2.0,
}


class Recorder:
    """The node's side of the broker interface, recording every callback in order."""

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self.user_messages: list[tuple[str, Any]] = []
        self.broadcasts: list[Any] = []
        self.disconnects: list[tuple[str, int, str]] = []
        self.gaps: list[list[str]] = []
        self.ready_at_gap: list[bool] = []
        self.user_gaps: list[list[str]] = []
        self.inbox: list[tuple[str, dict[str, Any], Any]] = []
        self.broker: RedisBroker | None = None

    def on_publication(self, publication: Publication) -> None:
        self.publications.append(publication)

    def on_user_message(self, user: str, data: Any) -> None:
        self.user_messages.append((user, data))

    def on_broadcast(self, data: Any) -> None:
        self.broadcasts.append(data)

    def on_disconnect(self, user: str, code: int, reason: str) -> None:
        self.disconnects.append((user, code, reason))

    def on_gap(self, channels: Iterable[str]) -> None:
        self.gaps.append(sorted(channels))
        self.ready_at_gap.append(self.broker is not None and self.broker.ready)

    def on_user_gap(self, users: list[str]) -> None:
        self.user_gaps.append(sorted(users))

    def on_inbox(self, user: str, mark: dict[str, Any], data: Any) -> None:
        self.inbox.append((user, mark, data))

    def data(self, channel: str | None = None) -> list[Any]:
        return [p.data for p in self.publications if channel is None or p.channel == channel]


@asynccontextmanager
async def brokers(
    server: RedisServer | LocalCluster, n: int = 2, **options: Any
) -> AsyncIterator[list[tuple[RedisBroker, Recorder]]]:
    """``n`` started brokers on ``server`` (a process each, in spirit), closed on exit; a
    cluster's URL gives cluster brokers."""
    started: list[tuple[RedisBroker, Recorder]] = []
    try:
        for _ in range(n):
            broker = RedisBroker(server.url, **{**FAST, **options})
            recorder = Recorder()
            recorder.broker = broker
            await within(broker.start(recorder))
            started.append((broker, recorder))
        yield started
    finally:
        for broker, _ in started:
            await within(broker.close())


# --- two brokers ----------------------------------------------------------------------------------


def test_publication_reaches_the_other_process_right_after_subscribe(
    redis_server: RedisServer,
) -> None:
    """subscribe() returns only once Redis confirmed it: a publish made at once is delivered,
    every time. Optional fields in ``forward`` are passed on; the publisher does not get it."""

    async def main() -> None:
        async with brokers(redis_server) as [(a, ra), (b, rb)]:
            assert a.ready and b.ready
            for i in range(50):
                await a.subscribe([f"news.{i}"])
                await b.publish(f"news.{i}", {"i": i}, ts=1700000000.5)
            await eventually(lambda: len(ra.publications) == 50)
            assert [(p.channel, p.data) for p in ra.publications] == [
                (f"news.{i}", {"i": i}) for i in range(50)
            ]
            assert ra.publications[0].meta == {"ts": 1700000000.5}
            assert rb.publications == []
            with pytest.raises(ValueError, match="not forwarded"):
                await b.publish("news.0", 1, colour="red")

    run(main)


def test_concurrent_subscribes_share_one_confirmation(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with brokers(redis_server, 1) as [(a, _)]:
            redis_server.reset_stats()
            await within(asyncio.gather(*(a.subscribe(["same"]) for _ in range(20))))
            assert redis_server.calls("subscribe") == 1
            assert redis_server.numsub("hub:ch:same") == 1
            # Many channels subscribed in one event-loop turn leave in one write.
            await within(asyncio.gather(*(a.subscribe([f"c{i}"]) for i in range(100))))
            assert redis_server.calls("subscribe") <= 3

    run(main)


def test_per_user_messages_broadcast_and_disconnect_reach_every_process(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with brokers(redis_server, 3) as [(a, ra), (b, rb), (c, rc)]:
            await a.subscribe_user("alice")
            await b.subscribe_user("alice")
            await c.subscribe_user("bob")
            await c.send_to_user("alice", {"note": 1})
            await a.broadcast("everyone")
            await b.disconnect("alice", 4503, "banned")
            for r in (ra, rb):
                await eventually(lambda r=r: r.disconnects)
                assert r.user_messages == [("alice", {"note": 1})]
                assert r.broadcasts == ["everyone"]
                assert r.disconnects == [("alice", 4503, "banned")]
            await eventually(lambda: rc.disconnects)
            assert rc.user_messages == [] and rc.broadcasts == ["everyone"]
            # Every process gets every disconnect; the node closes only the local connections.
            assert rc.disconnects == [("alice", 4503, "banned")]
            assert redis_server.numsub("hub:user:alice") == 2
            with pytest.raises(ValueError):
                await a.disconnect("alice", 1000, "")

    run(main)


def test_lazy_unsubscribe_drops_the_redis_subscription_only_after_the_delay(
    redis_server: RedisServer,
) -> None:
    """Churn within the delay costs no Redis command; a channel left alone is unsubscribed
    after it, and then nothing is delivered to this process any more."""

    async def main() -> None:
        async with brokers(redis_server, 2, unsubscribe_delay=0.4) as [(a, ra), (b, _)]:
            await a.subscribe(["news"])
            await a.subscribe_user("alice")
            redis_server.reset_stats()
            for _ in range(10):
                await a.unsubscribe(["news"])
                await a.unsubscribe_user("alice")
                await asyncio.sleep(0.02)
                await a.subscribe(["news"])
                await a.subscribe_user("alice")
            await asyncio.sleep(0.6)
            assert redis_server.calls("subscribe") == 0
            assert redis_server.calls("unsubscribe") == 0
            assert redis_server.numsub("hub:ch:news") == 1

            await a.unsubscribe(["news"])
            await a.unsubscribe_user("alice")
            started = time.monotonic()
            assert redis_server.numsub("hub:ch:news") == 1  # not yet
            await eventually(lambda: redis_server.numsub("hub:ch:news") == 0, 3)
            assert time.monotonic() - started >= 0.3
            await eventually(lambda: redis_server.numsub("hub:user:alice") == 0, 3)
            assert redis_server.channels("hub:*") == {"hub:all", "hub:ctl"}
            await b.publish("news", "nobody here")
            await b.broadcast("marker")
            await eventually(lambda: ra.broadcasts == ["marker"])
            assert ra.data("news") == []
            # Subscribing again after the drop works.
            await a.subscribe(["news"])
            await b.publish("news", "again")
            await eventually(lambda: ra.data("news") == ["again"])

    run(main)


def test_a_thousand_publishes_arrive_in_order_without_loss_or_duplicates(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with brokers(redis_server) as [(a, ra), (b, _)]:
            await a.subscribe(["seq"])
            redis_server.reset_stats()
            # Concurrent publishes (pipelined on B's publishing connection) then sequential ones.
            await within(asyncio.gather(*(b.publish("seq", i) for i in range(500))))
            for i in range(500, 1000):
                await b.publish("seq", i)
            await eventually(lambda: len(ra.publications) >= 1000)
            await asyncio.sleep(0.05)
            assert ra.data("seq") == list(range(1000))
            assert redis_server.calls("publish") == 1000

    run(main)


def test_malformed_payloads_are_counted_and_do_not_break_delivery(
    redis_server: RedisServer,
) -> None:
    """Garbage on each kind of Redis channel is counted and dropped; unknown fields and unknown
    control ops are ignored (forward compatibility), not counted."""

    async def main() -> None:
        async with brokers(redis_server, 1) as [(a, ra)]:
            await a.subscribe(["news"])
            await a.subscribe_user("alice")
            garbage = [
                b"\xc1",  # never used in msgpack
                b"not msgpack at all \xff",
                msgpack.packb([1, 2, 3]),
                msgpack.packb("just a string"),
                msgpack.packb({"nodata": 1}),
                msgpack.packb({1: "int key"}),
                msgpack.packb({"data": {2: "int key"}}),  # refused by the client codec too
            ]
            control_garbage = [
                b"\xc1",
                msgpack.packb(["disconnect"]),
                msgpack.packb({"user": "alice"}),
                msgpack.packb({"op": "disconnect"}),
                msgpack.packb({"op": "disconnect", "user": "alice", "code": 1000}),
                msgpack.packb({"op": "disconnect", "user": "alice", "code": True}),
                msgpack.packb({"op": "disconnect", "user": "alice", "reason": "x" * 200}),
            ]
            sent = 0
            with redis_server.client() as r:
                for name in ("hub:ch:news", "hub:user:alice", "hub:all"):
                    for payload in garbage:
                        sent += r.publish(name, payload)
                for payload in control_garbage:
                    sent += r.publish("hub:ctl", payload)
                # Valid, with extra fields and a control op from the future: delivered / ignored.
                r.publish("hub:ctl", msgpack.packb({"op": "rebalance", "to": 3}))
                r.publish("hub:ch:news", msgpack.packb({"data": "ok", "x": 1, "event": "e"}))
                r.publish("hub:user:alice", msgpack.packb({"data": "ok", "x": 1}))
                r.publish("hub:all", msgpack.packb({"data": "ok", "x": 1}))
                r.publish("hub:ctl", msgpack.packb({"op": "disconnect", "user": "alice"}))
            assert sent == 3 * len(garbage) + len(control_garbage)
            await eventually(lambda: ra.disconnects)
            assert a.malformed == sent
            assert [(p.channel, p.data, p.meta) for p in ra.publications] == [
                ("news", "ok", {"event": "e"})
            ]
            assert ra.user_messages == [("alice", "ok")]
            assert ra.broadcasts == ["ok"]
            assert ra.disconnects == [("alice", 4503, "")]
            assert a.ready and a.reconnects == 0 and a.handler_errors == 0

    run(main)


def test_a_failing_handler_is_counted_and_the_link_survives(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with brokers(redis_server, 1) as [(a, ra)]:

            def boom(data: Any) -> None:
                raise RuntimeError("node bug")

            ra.on_broadcast = boom  # type: ignore[method-assign]
            await a.subscribe(["news"])
            await a.broadcast("x")
            await a.publish("news", "still here")
            await eventually(lambda: ra.data() == ["still here"])
            assert a.handler_errors == 1 and a.ready

    run(main)


def test_redis_restart_gap_readiness_and_resumed_delivery(redis_server: RedisServer) -> None:
    """Killing Redis is reported at once (gap, not ready) while it is down; after the restart
    everything is resubscribed, a second gap is reported, and delivery resumes."""

    async def main() -> None:
        async with brokers(redis_server) as [(a, ra), (b, rb)]:
            await a.subscribe(["news", "sport"])
            await a.subscribe_user("alice")
            await b.subscribe(["news"])
            redis_server.kill()
            await eventually(lambda: ra.gaps and rb.gaps, 3)
            assert ra.gaps == [["news", "sport"]] and rb.gaps == [["news"]]
            assert ra.user_gaps == [["alice"]] and rb.user_gaps == []  # inboxes catch up
            assert ra.ready_at_gap == [False]
            assert not a.ready and not b.ready
            with pytest.raises(RedisUnavailable):
                await b.publish("news", "lost")
            # Subscribed while down: returns at once, subscribed on reconnect.
            await within(a.subscribe(["late"]), 0.5)
            await asyncio.sleep(0.3)  # a few failed reconnect attempts
            assert not a.ready

            redis_server.start()
            await eventually(lambda: a.ready and b.ready, 5)
            assert a.reconnects == 1 and b.reconnects == 1
            assert ra.gaps == [["news", "sport"], ["late", "news", "sport"]]
            assert ra.user_gaps == [["alice"], ["alice"]]
            assert ra.ready_at_gap == [False, True]
            assert redis_server.numsub("hub:user:alice") == 1
            assert redis_server.channels("hub:*") >= {"hub:all", "hub:ctl", "hub:ch:late"}
            await b.publish("news", "back")
            await b.publish("late", "late")
            await b.send_to_user("alice", "hi")
            await eventually(lambda: ra.data() == ["back", "late"] and ra.user_messages)
            await eventually(lambda: rb.data() == ["back"])

    run(main)


def test_a_silent_redis_is_detected_by_the_ping_probe(redis_server: RedisServer) -> None:
    """SIGSTOP keeps the TCP connection open but answers nothing: the probe must notice."""

    async def main() -> None:
        async with brokers(redis_server, 1) as [(a, ra)]:
            await a.subscribe(["news"])
            redis_server.pause()
            try:
                started = time.monotonic()
                await eventually(lambda: ra.gaps, 3)
                assert time.monotonic() - started < 1.5
                assert not a.ready
            finally:
                redis_server.resume()
            await eventually(lambda: a.ready, 5)
            assert a.reconnects == 1
            await a.publish("news", "after")
            await eventually(lambda: ra.data() == ["after"])

    run(main)


def test_a_killed_pubsub_connection_is_replaced(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with brokers(redis_server, 1) as [(a, ra)]:
            await a.subscribe(["news"])
            with redis_server.client() as r:
                assert r.client_kill_filter(_type="pubsub") == 1
            await eventually(lambda: a.reconnects == 1 and a.ready, 3)
            assert ra.gaps == [["news"], ["news"]]
            await a.publish("news", "after")
            await eventually(lambda: ra.data() == ["after"])

    run(main)


def test_start_without_redis_then_redis_appears(redis_server: RedisServer) -> None:
    """A hub may start before Redis: start() returns, not ready; it connects when Redis comes up
    and subscribes what was asked for meanwhile."""

    async def main() -> None:
        redis_server.kill()
        broker = RedisBroker(redis_server.url, **{**FAST, "start_timeout": 0.5})
        recorder = Recorder()
        await within(broker.start(recorder))
        try:
            assert not broker.ready
            await within(broker.subscribe(["news"]), 0.5)
            with pytest.raises(RedisUnavailable):
                await broker.publish("news", 0)
            redis_server.start()
            await eventually(lambda: broker.ready, 5)
            assert broker.reconnects == 0
            assert recorder.gaps == [["news"]]
            await broker.publish("news", 1)
            await eventually(lambda: recorder.data() == [1])
        finally:
            await within(broker.close())
        assert not broker.ready

    run(main)


# --- publishers -------------------------------------------------------------------------------


def test_publisher_and_async_publisher_write_the_documented_envelope(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        raw = redis.Redis.from_url(redis_server.url)
        pubsub = raw.pubsub()
        pubsub.psubscribe("shop:*")  # the test's own listener, not the bridge
        assert pubsub.get_message(timeout=1)["type"] == "psubscribe"
        try:
            async with brokers(redis_server, 1, prefix="shop") as [(a, ra)]:
                await a.subscribe(["news"])
                await a.subscribe_user("alice")
                with Publisher(redis_server.url, prefix="shop") as pub:
                    assert pub.publish("news", {"n": 1}, ts=5) == 2  # bridge + listener
                    pub.publish("news", b"\x00bytes")
                    pub.send_to_user("alice", "hi")
                    pub.broadcast([1, 2])
                    pub.disconnect("alice", reason="bye")
                    with pytest.raises(ValueError):
                        pub.disconnect("alice", code=1000)
                async with AsyncPublisher(redis_server.url, prefix="shop") as apub:
                    counts = await asyncio.gather(
                        apub.publish("news", "async", event="e"),
                        apub.send_to_user("alice", "async"),
                        apub.broadcast("async"),
                        apub.disconnect("alice", 4003, "again"),
                    )
                    assert counts == [2, 2, 2, 2]
                await eventually(lambda: len(ra.disconnects) == 2)
                assert [(p.data, p.meta) for p in ra.publications] == [
                    ({"n": 1}, {"ts": 5}),
                    (b"\x00bytes", {}),
                    ("async", {"event": "e"}),
                ]
                assert ra.user_messages == [("alice", "hi"), ("alice", "async")]
                assert ra.broadcasts == [[1, 2], "async"]
                assert ra.disconnects == [("alice", 4503, "bye"), ("alice", 4003, "again")]
                assert a.malformed == 0

            seen = []
            for _ in range(9):
                message = pubsub.get_message(timeout=1)
                assert message is not None
                seen.append((message["channel"].decode(), msgpack.unpackb(message["data"])))
            disconnect = {"op": "disconnect", "user": "alice", "code": 4503, "reason": "bye"}
            assert seen[:5] == [
                ("shop:ch:news", {"data": {"n": 1}, "ts": 5}),
                ("shop:ch:news", {"data": b"\x00bytes"}),
                ("shop:user:alice", {"data": "hi"}),
                ("shop:all", {"data": [1, 2]}),
                ("shop:ctl", disconnect),
            ]
            assert sorted(seen[5:]) == sorted(
                [
                    ("shop:ch:news", {"data": "async", "event": "e"}),
                    ("shop:user:alice", {"data": "async"}),
                    ("shop:all", {"data": "async"}),
                    ("shop:ctl", {**disconnect, "code": 4003, "reason": "again"}),
                ]
            )
        finally:
            pubsub.close()
            raw.close()

    run(main)


def test_send_to_users_sends_every_message_in_order_in_one_round_trip(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with brokers(redis_server, 1) as [(a, ra)]:
            await a.subscribe_user("alice")
            await a.subscribe_user("carol")
            batch = [("alice", 1), ("bob", 2), ("carol", b"\x03"), ("alice", {"n": 4})]
            with Publisher(redis_server.url) as pub:
                assert pub.send_to_users(batch) == [1, 0, 1, 1]  # bob is connected nowhere
                with pytest.raises(ValueError):
                    pub.send_to_users([("alice", 5), ("", 6)])  # checked before anything is sent
            async with AsyncPublisher(redis_server.url) as apub:
                assert await apub.send_to_users(batch) == [1, 0, 1, 1]
                assert await apub.send_to_users([]) == []
                with pytest.raises(ValueError):
                    await apub.send_to_users([("alice", 5), ("", 6)])
            expected = [("alice", 1), ("carol", b"\x03"), ("alice", {"n": 4})]
            await eventually(lambda: len(ra.user_messages) == 6)
            assert ra.user_messages == expected + expected

    run(main)


def test_hub_publisher_is_the_sdk_under_its_first_name() -> None:
    """Code written against ``hub.publisher`` gets the SDK of ``hub.redis.publisher``."""
    import hub.publisher
    import hub.redis.publisher

    assert hub.publisher.Publisher is hub.redis.publisher.Publisher
    assert hub.publisher.AsyncPublisher is hub.redis.publisher.AsyncPublisher
    assert all(hasattr(hub.publisher, name) for name in hub.publisher.__all__)


def test_async_publisher_reconnects_after_a_redis_restart(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with AsyncPublisher(redis_server.url, timeout=1) as pub:
            assert await pub.publish("x", 1) == 0
            redis_server.restart()
            await asyncio.sleep(0.05)  # the event loop sees the old connection's EOF
            assert await pub.publish("x", 2) == 0  # the closed idle connection is replaced
            redis_server.kill()
            with pytest.raises(redis.exceptions.ConnectionError):
                await pub.publish("x", 3)
            redis_server.start()
            assert await pub.publish("x", 4) == 0

    run(main)


def test_the_redis_cli_examples_in_the_docs(redis_server: RedisServer) -> None:
    """The ``printf ... | redis-cli -x PUBLISH hub:ch:news`` lines of README.md and
    docs/publish-api.md, run as written by ``sh`` (not bash: its printf takes octal escapes
    only), publish ``{"data": "hello"}``, byte for byte."""
    cli = shutil.which("redis-cli")
    assert cli is not None, "redis-cli not on PATH: run `make sysdeps`"
    root = Path(__file__).resolve().parent.parent
    lines = [
        line.strip()
        for doc in ("README.md", "docs/publish-api.md")
        for line in (root / doc).read_text().splitlines()
        if line.startswith("printf ") and "| redis-cli -x PUBLISH hub:ch:news" in line
    ]
    assert len(lines) >= 2, lines

    async def main() -> None:
        async with brokers(redis_server, 1) as [(a, ra)]:
            await a.subscribe(["news"])
            for n, line in enumerate(lines, 1):
                command = line.replace("redis-cli", f"{cli} -p {redis_server.port}")
                done = subprocess.run(["sh", "-c", command], capture_output=True, timeout=5)
                assert done.stdout.strip() == b"1", (line, done)
                await eventually(lambda n=n: ra.data() == ["hello"] * n)
            assert a.malformed == 0

    run(main)


# --- two hubs, real clients -----------------------------------------------------------------------


@asynccontextmanager
async def hubs(server: RedisServer, n: int = 2) -> AsyncIterator[list[Hub]]:
    async with AsyncExitStack() as stack:
        started = []
        for _ in range(n):
            hub = Hub(make_settings(), broker=RedisBroker(server.url, **FAST))
            await within(hub.start())
            stack.push_async_callback(lambda hub=hub: within(hub.close(), 15))
            started.append(hub)
        yield started


def test_two_hubs_end_to_end(redis_server: RedisServer) -> None:
    """Clients on two hubs: publications (node and HTTP API), per-user messages, broadcast,
    disconnect and unsubscribe all cross between the hubs through Redis."""

    async def main() -> None:
        async with hubs(redis_server) as [ha, hb]:
            async with (
                client(ha, JSON_PROTO, user="alice") as a1,
                client(hb, MSGPACK_PROTO, user="alice") as a2,
                client(hb, JSON_PROTO, user="bob") as bob,
            ):
                for c in (a1, a2, bob):
                    await c.ok("subscribe", channel="news")
                await hb.node.publish("news", {"via": "node"})
                status, _ = await api(hb, "/api/publish", {"channel": "news", "data": "http"})
                assert status == 200
                for c in (a1, a2, bob):
                    assert await c.push() == {"channel": "news", "data": {"via": "node"}}
                    assert await c.push() == {"channel": "news", "data": "http"}

                await api(ha, "/api/send", {"user": "alice", "data": "for alice"})
                await api(hb, "/api/broadcast", {"data": "all"})
                for c in (a1, a2):
                    assert await c.push() == {"data": "for alice"}
                    assert await c.push() == {"data": "all"}
                assert await bob.push() == {"data": "all"}

                # Data JSON cannot carry (bytes, bin map keys, extension types) reaches a JSON
                # client as a binary msgpack frame, unchanged.
                await a1.ok("subscribe", channel="raw")
                odd = [b"\x00\x01", {b"k": 1}, msgpack.ExtType(5, b"x"), msgpack.Timestamp(7)]
                with redis_server.client() as r:
                    for data in odd:
                        r.publish("hub:ch:raw", msgpack.packb({"data": data}))
                for data in odd:
                    assert await a1.push() == {"channel": "raw", "data": data}
                    assert a1.frame_types[-1] is bytes
                broker = ha.node.broker
                assert isinstance(broker, RedisBroker) and broker.malformed == 0

                # Unsubscribe on hub A: its Redis subscription goes after the delay.
                await a1.ok("unsubscribe", channel="news")
                await eventually(lambda: redis_server.numsub("hub:ch:news") == 1, 3)
                await hb.node.publish("news", "only b")
                await hb.node.broadcast("marker")
                assert await a1.push() == {"data": "marker"}
                for c in (a2, bob):
                    assert await c.push() == {"channel": "news", "data": "only b"}
                    assert await c.push() == {"data": "marker"}

                status, _ = await api(ha, "/api/disconnect", {"user": "alice", "reason": "bye"})
                assert status == 200
                assert await a1.closed_with() == (4503, "bye")
                assert await a2.closed_with() == (4503, "bye")
                await hb.node.publish("news", "bob still here")
                assert await bob.push() == {"channel": "news", "data": "bob still here"}

    run(main)


def test_two_hubs_redis_restart_pushes_gaps_and_flips_readiness(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with hubs(redis_server) as [ha, hb]:
            async with client(ha, user="a") as a:
                await a.ok("subscribe", channel="news")
                assert (await http(ha, "GET", "/readyz"))[0] == 200
                redis_server.kill()
                assert await a.push() == {"channel": "news", "gap": True}
                assert (await http(ha, "GET", "/readyz"))[0] == 503
                body = {"channel": "news", "data": "lost"}
                status, _, _ = await http(hb, "POST", "/api/publish", json_body=body)
                assert status >= 500
                redis_server.start()
                assert await a.push(5) == {"channel": "news", "gap": True}
                await eventually(lambda: hb.node.ready, 5)
                assert (await http(ha, "GET", "/readyz"))[0] == 200
                await hb.node.publish("news", "back")
                assert await a.push() == {"channel": "news", "data": "back"}

    run(main)
