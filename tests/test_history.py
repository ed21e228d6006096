"""History and recovery: offsets and epochs on pushes, subscribe with ``since``, the history
command and HTTP endpoint, on the memory broker and through a private Redis shared by two hub
processes (one in this process, one a real ``hub serve`` subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hubfix import (
    API_KEY,
    MSGPACK_PROTO,
    api,
    client,
    eventually,
    make_settings,
    metric,
    running,
    scrape,
)
from wshelp import run

from hub.config import ConfigError
from hub.errors import ErrorCode
from hub.redis.publisher import AsyncPublisher, Publisher

if TYPE_CHECKING:
    from redisfix import LocalCluster, RedisServer

pytest_plugins = ["redisfix"]

SIZE = 2000
CONFIG = f"""
[namespaces.feed]
history_size = {SIZE}
history_ttl = 300
publish = true

[namespaces.small]
history_size = 3
history_ttl = 300
publish = true

[namespaces.chat]
publish = true
"""
HUB = str(Path(sys.executable).with_name("hub"))


def feed_publisher(url: str) -> AsyncPublisher:
    return AsyncPublisher(url)


async def publish_feed(pub: AsyncPublisher, channel: str, data: Any) -> Any:
    """What a backend does for a namespace with history: pass the namespace's options."""
    return await pub.publish(channel, data, history_size=SIZE, history_ttl=300)


# --- a second hub process -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """A ``hub serve`` subprocess; ``port`` is all ``hubfix.client`` needs of a hub."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@contextmanager
def hub_process(redis_url: str, tmp_path: Path) -> Iterator[Proc]:
    config = tmp_path / "hub.toml"
    config.write_text(CONFIG)
    log_path = tmp_path / "hub-proc.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
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
        deadline = time.monotonic() + 30
        while " ready: ws://" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "hub serve did not start"
            time.sleep(0.05)
        yield Proc(port, proc, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- the soak: non-stop publishing, clients hopping between hubs --------------------------------


async def hopping_client(
    hubs: list[Any],
    channel: str,
    total: int,
    seed: int,
    proto: str | None,
    subscribed: asyncio.Queue[int],
) -> tuple[list[int], int]:
    """Subscribe, read a random number of pushes, drop the connection, resubscribe on the next
    hub with ``since``; until sequence number ``total - 1`` arrived. Every sequence number seen
    and the number of hops."""
    rng = random.Random(seed)
    seen: list[int] = []
    since: dict[str, Any] | None = None
    hops = 0
    while not seen or seen[-1] != total - 1:
        hub = hubs[hops % len(hubs)]
        hops += 1
        async with client(hub, proto, user=f"c{seed}") as c:
            if since is None:
                reply = await c.call("subscribe", channel=channel)
                assert set(reply["result"]) == {"offset", "epoch"}, reply
                subscribed.put_nowait(seed)
            else:
                reply = await c.call("subscribe", channel=channel, since=since)
                assert reply["result"]["recovered"] is True, (reply, since)
                assert reply["result"]["epoch"] == since["epoch"]
            epoch = reply["result"]["epoch"]
            last = reply["result"]["offset"] if since is None else since["offset"]
            budget = rng.randint(20, 300)
            while budget and (not seen or seen[-1] != total - 1):
                push = await c.push(timeout=10)
                assert push["channel"] == channel and push["epoch"] == epoch, push
                assert push["offset"] == last + 1, (push, last)  # no hole, no duplicate
                last = push["offset"]
                seen.append(push["data"])
                budget -= 1
            since = {"offset": last, "epoch": epoch}
            if rng.random() < 0.5:
                c.raw.transport.abort()  # a crash, not a goodbye
    return seen, hops


def test_clients_hopping_between_hub_processes_get_every_publication_once_in_order(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    total = 1500
    channel = "feed:ticks"

    async def main() -> None:
        settings = make_settings(CONFIG, redis_url=redis_server.url)
        with hub_process(redis_server.url, tmp_path) as other:
            async with running(settings) as hub:
                pub = feed_publisher(redis_server.url)
                # Subscribed before the first publication, so everyone wants 0..total-1.
                started = asyncio.Event()

                async def publisher() -> None:
                    await started.wait()
                    for seq in range(total):
                        await publish_feed(pub, channel, seq)
                        if seq % 5 == 0:
                            await asyncio.sleep(0.001)

                subscribed: asyncio.Queue[int] = asyncio.Queue()
                clients = [
                    hopping_client([hub, other], channel, total, seed, proto, subscribed)
                    for seed, proto in enumerate([None, MSGPACK_PROTO, None, MSGPACK_PROTO])
                ]
                tasks = [asyncio.ensure_future(c) for c in clients]
                for _ in tasks:  # every client's first subscribe is done
                    await asyncio.wait_for(subscribed.get(), 10)
                started.set()
                await publisher()
                results = await asyncio.gather(*tasks)
                await pub.aclose()
        for seen, hops in results:
            assert seen == list(range(total))
            assert hops >= 3

    run(main, timeout=120)


def test_memory_broker_recovery_under_non_stop_publishing() -> None:
    total = 1500
    channel = "feed:mem"

    async def main() -> None:
        async with running(make_settings(CONFIG)) as hub:
            started = asyncio.Event()
            subscribed: asyncio.Queue[int] = asyncio.Queue()

            async def publisher() -> None:
                await started.wait()
                for seq in range(total):
                    await hub.node.publish(channel, seq)
                    if seq % 5 == 0:
                        await asyncio.sleep(0.001)

            tasks = [
                asyncio.ensure_future(
                    hopping_client([hub], channel, total, seed, proto, subscribed)
                )
                for seed, proto in enumerate([None, MSGPACK_PROTO, None])
            ]
            for _ in tasks:
                await asyncio.wait_for(subscribed.get(), 10)
            started.set()
            await publisher()
            for seen, _hops in await asyncio.gather(*tasks):
                assert seen == list(range(total))
            # Every joining session's bookkeeping went away with it.
            await eventually(lambda: len(hub.node.registry) == 0)
            assert not hub.node.fanout.joining

    run(main, timeout=120)


# --- recovered: false ---------------------------------------------------------------------------


def test_flushed_redis_changes_the_epoch(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with running(make_settings(CONFIG, redis_url=redis_server.url)) as hub:
            pub = feed_publisher(redis_server.url)
            async with client(hub, user="a") as a:
                reply = await a.call("subscribe", channel="feed:x")
                epoch = reply["result"]["epoch"]
                assert reply["result"]["offset"] == 0
                first = await publish_feed(pub, "feed:x", "one")
                assert (first.offset, first.epoch) == (1, epoch)
                assert await a.push() == {
                    "channel": "feed:x",
                    "data": "one",
                    "offset": 1,
                    "epoch": epoch,
                }
            redis_server.client().flushall()
            await publish_feed(pub, "feed:x", "after the flush")
            async with client(hub, user="a") as a:
                since = {"offset": 1, "epoch": epoch}
                reply = await a.call("subscribe", channel="feed:x", since=since)
                result = reply["result"]
                assert result["recovered"] is False and result["epoch"] != epoch, result
                assert result["offset"] == 1
                # Not recovered: nothing old is sent; the next push is live.
                await publish_feed(pub, "feed:x", "live")
                assert await a.push() == {
                    "channel": "feed:x",
                    "data": "live",
                    "offset": 2,
                    "epoch": result["epoch"],
                }
            await pub.aclose()

    run(main)


def test_restarted_empty_redis_changes_the_epoch(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with running(make_settings(CONFIG, redis_url=redis_server.url)) as hub:
            await api(hub, "/api/publish", {"channel": "feed:r", "data": 1})
            async with client(hub, user="a") as a:
                before = (await a.call("subscribe", channel="feed:r"))["result"]
                assert before["offset"] == 1
            redis_server.kill()
            await eventually(lambda: not hub.node.ready)
            async with client(hub, user="a") as a:
                # Not live at the broker: no recovery attempt that could leave a hole.
                code = await a.error("subscribe", channel="feed:r", since=before)
                assert code == ErrorCode.UNAVAILABLE
                assert hub.node.registry.subscription_count == 0
            redis_server.start()  # empty
            await eventually(lambda: hub.node.ready, timeout=10)
            async with client(hub, user="a") as a:
                reply = await a.call("subscribe", channel="feed:r", since=before)
                assert reply["result"]["recovered"] is False, reply
                assert reply["result"]["epoch"] != before["epoch"]

    run(main)


def test_trimmed_history_is_not_recovered(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with running(make_settings(CONFIG, redis_url=redis_server.url)) as hub:
            async with client(hub, user="a") as a:
                epoch = (await a.call("subscribe", channel="small:t"))["result"]["epoch"]
            for i in range(5):  # keeps 3: offsets 3, 4, 5
                await api(hub, "/api/publish", {"channel": "small:t", "data": i})
            since = {"offset": 1, "epoch": epoch}
            async with client(hub, user="a") as a:
                reply = await a.call("subscribe", channel="small:t", since=since)
                assert reply["result"] == {"recovered": False, "offset": 5, "epoch": epoch}
            async with client(hub, user="a") as a:
                since = {"offset": 2, "epoch": epoch}  # 3, 4, 5 are all still there
                reply = await a.call("subscribe", channel="small:t", since=since)
                assert reply["result"] == {"recovered": True, "offset": 5, "epoch": epoch}
                assert [(await a.push())["data"] for _ in range(3)] == [2, 3, 4]
            async with client(hub, user="a") as a:  # a client from the future, or confused
                since = {"offset": 9, "epoch": epoch}
                reply = await a.call("subscribe", channel="small:t", since=since)
                assert reply["result"]["recovered"] is False
                await a.call("history", channel="small:t")
            await api(hub, "/api/history", {"channel": "small:t"})
            samples = await scrape(hub)
            assert metric(samples, "hub_history_recoveries_total", result="lost") == 2
            assert metric(samples, "hub_history_recoveries_total", result="recovered") == 1
            assert metric(samples, "hub_history_recovered_publications_total") == 3
            assert metric(samples, "hub_history_reads_total") == 2  # subscribes are not reads

    run(main)


def test_memory_broker_trim_epoch_and_ttl() -> None:
    toml = CONFIG + "\n[namespaces.brief]\nhistory_size = 10\nhistory_ttl = 0.3\n"

    async def main() -> None:
        async with running(make_settings(toml)) as hub:
            async with client(hub, user="a") as a:
                epoch = (await a.call("subscribe", channel="small:m"))["result"]["epoch"]
                for i in range(5):
                    await hub.node.publish("small:m", i)
                pushes = [await a.push() for _ in range(5)]
                assert [p["offset"] for p in pushes] == [1, 2, 3, 4, 5]
            async with client(hub, user="a") as a:
                trimmed = await a.call(
                    "subscribe", channel="small:m", since={"offset": 1, "epoch": epoch}
                )
                assert trimmed["result"] == {"recovered": False, "offset": 5, "epoch": epoch}
                other = await a.call(
                    "subscribe", channel="small:n", since={"offset": 0, "epoch": "nope"}
                )
                assert other["result"]["recovered"] is False
                assert other["result"]["epoch"] != epoch  # epochs are per channel
            async with client(hub, user="a") as a:
                offset, brief = await hub.node.publish("brief:x", "old")
                assert offset == 1
                await asyncio.sleep(0.5)  # past history_ttl: the history is dropped
                reply = await a.call(
                    "subscribe", channel="brief:x", since={"offset": 0, "epoch": brief}
                )
                assert reply["result"] == {"recovered": False, "offset": 1, "epoch": brief}

    run(main)


# --- the history command and endpoint -----------------------------------------------------------


async def check_history(hub: Any) -> None:
    offsets = []
    for i in range(5):
        status, body = await api(hub, "/api/publish", {"channel": "small:h", "data": {"n": i}})
        assert status == 200
        offsets.append(body["result"]["offset"])
    assert offsets == [1, 2, 3, 4, 5]
    status, body = await api(hub, "/api/publish", {"channel": "chat:h", "data": 1})
    assert (status, body) == (200, {"result": {}})  # no history there
    async with client(hub, user="a") as a:
        reply = await a.call("history", channel="small:h")
        result = reply["result"]
        epoch = result["epoch"]
        assert result["offset"] == 5
        status, body = await api(hub, "/api/history", {"channel": "small:h", "limit": 0})
        assert body["result"] == {"publications": [], "offset": 5, "epoch": epoch}
        assert result["publications"] == [
            {"data": {"n": 2}, "offset": 3},
            {"data": {"n": 3}, "offset": 4},
            {"data": {"n": 4}, "offset": 5},
        ]
        reply = await a.call("history", channel="small:h", limit=1)
        assert reply["result"]["publications"] == [{"data": {"n": 4}, "offset": 5}]
        reply = await a.call("history", channel="small:h", limit=0)
        assert reply["result"] == {"publications": [], "offset": 5, "epoch": epoch}
        since = {"offset": 3, "epoch": epoch}
        reply = await a.call("history", channel="small:h", since=since, limit=1)
        assert reply["result"]["publications"] == [{"data": {"n": 3}, "offset": 4}]
        since = {"offset": 3, "epoch": "another"}
        reply = await a.call("history", channel="small:h", since=since)
        assert reply["result"]["publications"] == []
        assert await a.error("history", channel="chat:x") == ErrorCode.NOT_ENABLED
        assert await a.error("history", channel="small:h", limit=-1) == ErrorCode.BAD_REQUEST
        assert await a.error("history", channel="small:h", limit="2") == ErrorCode.BAD_REQUEST
        bad = {"offset": "3", "epoch": epoch}
        assert await a.error("history", channel="small:h", since=bad) == ErrorCode.BAD_REQUEST
    status, body = await api(hub, "/api/history", {"channel": "small:h", "limit": 2})
    assert status == 200
    assert body["result"]["publications"] == [
        {"data": {"n": 3}, "offset": 4},
        {"data": {"n": 4}, "offset": 5},
    ]
    assert body["result"]["epoch"] == epoch
    since = {"offset": 4, "epoch": epoch}
    status, body = await api(hub, "/api/history", {"channel": "small:h", "since": since})
    assert (status, body["result"]["publications"]) == (200, [{"data": {"n": 4}, "offset": 5}])
    status, body = await api(hub, "/api/history", {"channel": "chat:x"})
    assert status == 400 and "not enabled" in body["error"]["message"]
    status, body = await api(hub, "/api/history", {"channel": "small:h", "since": {"offset": 1}})
    assert status == 400 and "since" in body["error"]["message"]
    status, _ = await api(hub, "/api/history", {"channel": "small:h"}, key="wrong")
    assert status == 401


def test_history_command_and_endpoint_memory() -> None:
    async def main() -> None:
        async with running(make_settings(CONFIG, api_key=API_KEY)) as hub:
            await check_history(hub)

    run(main)


def test_history_command_and_endpoint_redis(redis_server: RedisServer) -> None:
    async def main() -> None:
        settings = make_settings(CONFIG, redis_url=redis_server.url, api_key=API_KEY)
        async with running(settings) as hub:
            await check_history(hub)

    run(main)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_since_values_get_error_replies() -> None:
    async def main() -> None:
        async with running(make_settings(CONFIG)) as hub:
            async with client(hub, user="a") as a:
                # A subscribe keeps the epoch of a channel with no history yet (a read would not).
                epoch = (await a.call("subscribe", channel="feed:b"))["result"]["epoch"]
            bad_values: list[Any] = [
                5,
                "5",
                [],
                {},
                {"offset": 5},
                {"epoch": epoch},
                {"offset": -1, "epoch": epoch},
                {"offset": 1.5, "epoch": epoch},
                {"offset": True, "epoch": epoch},
                {"offset": 1, "epoch": ""},
                {"offset": 1, "epoch": 7},
                {"offset": 1, "epoch": "x" * 65},
            ]
            for start in range(0, len(bad_values), 6):  # ten bad commands close a connection
                async with client(hub, user="a") as a:
                    for since in bad_values[start : start + 6]:
                        code = await a.error("subscribe", channel="feed:b", since=since)
                        assert code == ErrorCode.BAD_REQUEST, since
            async with client(hub, user="a") as a:
                since = {"offset": 0, "epoch": epoch}
                code = await a.error("subscribe", channel="chat:b", since=since)
                assert code == ErrorCode.NOT_ENABLED
                # Nothing was subscribed by the failed attempts.
                assert hub.node.registry.subscription_count == 0
                reply = await a.call("subscribe", channel="feed:b", since=since)
                assert reply["result"] == {"recovered": True, "offset": 0, "epoch": epoch}
                code = await a.error("subscribe", channel="feed:b", since=since)
                assert code == ErrorCode.ALREADY_SUBSCRIBED


def test_history_settings_are_validated() -> None:
    for value in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"namespaces\.x\.history_ttl"):
            make_settings(f"[namespaces.x]\nhistory_size = 5\nhistory_ttl = {value}\n")
    with pytest.raises(ConfigError, match=r"namespaces\.x\.history_size"):
        make_settings("[namespaces.x]\nhistory_size = -5\n")


# --- the publisher and the script -----------------------------------------------------------------


def test_publisher_history_keeps_bytes_and_fields(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with running(make_settings(CONFIG, redis_url=redis_server.url)) as hub:
            with Publisher(redis_server.url) as pub:
                async with client(hub, MSGPACK_PROTO, user="a") as a:
                    epoch = (await a.call("subscribe", channel="feed:bin"))["result"]["epoch"]
                    sent = await asyncio.to_thread(
                        pub.publish,
                        "feed:bin",
                        b"\x00\xffraw",
                        history_size=SIZE,
                        history_ttl=300,
                        ts=1.5,
                        event="tick",
                    )
                    assert sent == 1 and (sent.offset, sent.epoch) == (1, epoch)
                    push = await a.push()
                    assert push == {
                        "channel": "feed:bin",
                        "data": b"\x00\xffraw",
                        "ts": 1.5,
                        "event": "tick",
                        "offset": 1,
                        "epoch": epoch,
                    }
                    page = pub.history("feed:bin", history_size=SIZE)
                    assert page.entries[0]["data"] == b"\x00\xffraw"
                    plain = pub.publish("chat:x", "no history")
                    assert plain.offset is None and plain == 0
                    with pytest.raises(ValueError, match="offset and epoch"):
                        pub.publish("feed:bin", 1, history_size=5, offset=3)
                    with pytest.raises(ValueError, match="history_size"):
                        pub.publish("feed:bin", 1, history_size=-1)
            keys = redis_server.client().keys("*")
            assert set(keys) == {b"{hub:ch:feed:bin}:history", b"{hub:ch:feed:bin}:meta"}
            ttl = redis_server.client().ttl("{hub:ch:feed:bin}:meta")
            assert 86000 < ttl <= 86400

    run(main)


def test_the_script_is_loaded_again_after_script_flush(redis_server: RedisServer) -> None:
    async def main() -> None:
        pub = feed_publisher(redis_server.url)
        first = await publish_feed(pub, "feed:s", 1)
        redis_server.client().script_flush()
        second = await publish_feed(pub, "feed:s", 2)
        assert (second.offset, second.epoch) == (2, first.epoch)
        page = await pub.history("feed:s", history_size=SIZE)
        assert [e["data"] for e in page.entries] == [1, 2]
        await pub.aclose()

    run(main)


def test_a_publication_still_in_the_end_of_turn_queue_is_not_sent_twice() -> None:
    """The node fans out at the end of the event-loop turn: a publication already stored in
    history but not yet fanned out reaches a joining session once (from history, or live)."""

    async def main() -> None:
        async with running(make_settings(CONFIG)) as hub:
            node = hub.node
            ns = node.settings.namespace("feed:q")
            async with client(hub, user="a") as a, client(hub, user="b") as b:
                epoch = (await a.call("subscribe", channel="feed:q"))["result"]["epoch"]
                await a.ok("unsubscribe", channel="feed:q")
                await b.call("history", channel="feed:q")
                sa, sb = sorted(node.registry.sessions, key=lambda s: s.user)
                # One turn: stored and queued, then both join before the queue is fanned out.
                await node.publish("feed:q", "queued")
                plain, live_a = await node.subscribe_history(sa, "feed:q", ns, None)
                since = (0, epoch)
                recovering, live_b = await node.subscribe_history(sb, "feed:q", ns, since)
                live_a()
                live_b()
                assert plain == {"offset": 1, "epoch": epoch}
                assert recovering == {"recovered": True, "offset": 1, "epoch": epoch}
                await node.publish("feed:q", "next")
                # a had offset 1 in its reply: only "next"; b recovered "queued", then "next".
                assert [(await a.push())["data"]] == ["next"]
                assert [(await b.push())["data"] for _ in range(2)] == ["queued", "next"]
                assert not node.fanout.joining  # both trackers saw a newer push and went away
                await a.ok("unsubscribe", channel="feed:q")
                await b.ok("unsubscribe", channel="feed:q")

    run(main)


def test_history_on_a_redis_cluster(redis_cluster: LocalCluster) -> None:
    """On a cluster the script stores and SPUBLISHes on the shard owning the channel (its keys
    share the channel's hash slot), for every shard."""
    from test_cluster import by_shard

    async def main() -> None:
        channels = [
            f"feed:{c}" for names in by_shard(redis_cluster, 1, "h").values() for c in names
        ]
        settings = make_settings(CONFIG, redis_url=redis_cluster.url)
        async with running(settings) as hub:
            pub = AsyncPublisher(redis_cluster.url)
            async with client(hub, MSGPACK_PROTO, user="a") as a:
                epochs = {}
                for channel in channels:
                    epochs[channel] = (await a.call("subscribe", channel=channel))["result"][
                        "epoch"
                    ]
                for channel in channels:
                    sent = await publish_feed(pub, channel, channel)
                    assert (sent.offset, sent.epoch) == (1, epochs[channel])
                    push = await a.push()
                    assert (push["data"], push["offset"], push["epoch"]) == (channel, 1, sent.epoch)
            for channel in channels:
                await publish_feed(pub, channel, "missed")
            async with client(hub, user="a") as a:
                for channel in channels:
                    since = {"offset": 1, "epoch": epochs[channel]}
                    reply = await a.call("subscribe", channel=channel, since=since)
                    assert reply["result"] == {
                        "recovered": True,
                        "offset": 2,
                        "epoch": since["epoch"],
                    }
                    push = await a.push()
                    assert (push["channel"], push["data"], push["offset"]) == (channel, "missed", 2)
            await pub.aclose()
            with Publisher(redis_cluster.url) as sync:
                sent = sync.publish(channels[0], "sync", history_size=SIZE, history_ttl=300)
                assert sent.offset == 3
                page = sync.history(channels[0], since=1, history_size=SIZE)
                assert [e["data"] for e in page.entries] == ["missed", "sync"]

    run(main, timeout=60)


def test_cli_publish_through_redis_follows_the_namespace(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    argv = [HUB, "publish", "--config", str(config), "--redis", redis_server.url]
    outputs = [
        subprocess.run(
            [*argv, channel, '{"n":1}'], env=env, capture_output=True, text=True, timeout=30
        )
        for channel in ("feed:cli", "feed:cli", "chat:cli")
    ]
    for done in outputs:
        assert done.returncode == 0, done.stderr
    first, second, plain = (json.loads(done.stdout)["result"] for done in outputs)
    assert (first["offset"], second["offset"]) == (1, 2) and first["epoch"] == second["epoch"]
    assert plain == {}  # the HTTP API's answer, as `hub publish` over HTTP prints it
    assert outputs[2].stdout == '{"result":{}}\n'
    with Publisher(redis_server.url) as pub:
        page = pub.history("feed:cli", history_size=SIZE)
    assert [e["data"] for e in page.entries] == [{"n": 1}, {"n": 1}]


def test_history_endpoint_refuses_data_json_cannot_carry(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with running(make_settings(CONFIG, redis_url=redis_server.url)) as hub:
            with Publisher(redis_server.url) as pub:
                pub.publish("feed:raw", b"\x00", history_size=SIZE, history_ttl=300)
            status, body = await api(hub, "/api/history", {"channel": "feed:raw"})
            assert status == 422 and "json" in body["error"]["message"]
            async with client(hub, MSGPACK_PROTO, user="a") as a:
                reply = await a.call("history", channel="feed:raw")
                assert reply["result"]["publications"] == [{"data": b"\x00", "offset": 1}]

    run(main)


def test_async_publisher_history_offsets_follow_call_order_and_failures_are_clean(
    redis_server: RedisServer,
) -> None:
    """Pipelined history publishes get offsets in call order, and a connection lost with
    commands in flight fails each of them once (none hangs); then the publisher reconnects."""
    from redis.exceptions import RedisError

    async def main() -> None:
        pub = feed_publisher(redis_server.url)
        sent = await asyncio.gather(*(publish_feed(pub, "feed:o", i) for i in range(2000)))
        assert [s.offset for s in sent] == list(range(1, 2001))

        async def keep_publishing() -> list[Any]:
            results: list[Any] = []
            for i in range(200):
                batch = [publish_feed(pub, "feed:o", i) for _ in range(20)]
                results += await asyncio.gather(*batch, return_exceptions=True)
                if any(isinstance(r, BaseException) for r in results):
                    return results
            return results

        task = asyncio.ensure_future(keep_publishing())
        await asyncio.sleep(0.05)
        redis_server.kill()
        results = await asyncio.wait_for(task, 10)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, (RedisError, OSError)) for e in errors), errors
        offsets = [r.offset for r in results if not isinstance(r, BaseException)]
        assert offsets == list(range(2001, 2001 + len(offsets)))
        redis_server.start()
        again = await publish_feed(pub, "feed:o", "after")
        assert again.offset == 1 and again.epoch != sent[0].epoch  # restarted empty
        await pub.aclose()

    run(main)


def test_memory_history_forgets_idle_channels_under_a_new_epoch() -> None:
    """Like the Redis meta, a channel's offset and epoch outlive its entries by
    ``max(ttl, 24 h)``; then the channel is forgotten (memory stays bounded) and comes back
    under a new epoch, so an old ``since`` is never taken for a new publication."""
    from hub.history import META_TTL_MIN, MemoryHistory

    now = [1000.0]
    store = MemoryHistory(clock=lambda: now[0])
    first = store.add("feed:a", {"data": 1}, 10, 60)
    assert first[0] == 1
    now[0] += 61  # entries expired, offset and epoch kept
    page = store.read("feed:a", 0, None, 10, 60)
    assert (page.offset, page.epoch, page.entries) == (1, first[1], [])
    assert store.add("feed:a", {"data": 2}, 10, 60) == (2, first[1])
    for i in range(5):
        store.add(f"feed:other{i}", {"data": i}, 10, 60)
    assert len(store) == 6
    now[0] += META_TTL_MIN + 1
    page = store.read("feed:a", None, None, 10, 60)
    assert page.offset == 0 and page.epoch != first[1]
    store.SWEEP_EVERY = 1
    store.read("feed:a", None, 0, 10, 60)
    assert len(store) == 0  # the idle ones were swept, and a read made nothing
    store.read("feed:a", None, 0, 10, 60, create=True)  # a subscribe keeps its epoch
    assert len(store) == 1
