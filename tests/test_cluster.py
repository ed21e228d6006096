"""The bridge on a private 3-master Redis Cluster (``redisfix.LocalCluster``) with sharded pub/sub:
two brokers standing in for two processes, then two real hubs configured by a
``redis+cluster://`` URL with real clients, then a shard killed and restarted.

Channels are picked so that every shard owns some, and the owning shard is asked
(``PUBSUB SHARDNUMSUB``) whether the subscription landed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from hubfix import ANY_CLIENT, api, client, eventually, make_settings, running
from test_bridge import Recorder, brokers
from wshelp import run, within

from hub.errors import RedisUnavailable
from hub.redis.broker import RedisBroker
from hub.redis.cluster_broker import RedisClusterBroker
from hub.redis.publisher import AsyncPublisher, Publisher

if TYPE_CHECKING:
    from redisfix import LocalCluster, RedisServer

pytest_plugins = ["redisfix"]  # the redis_cluster fixture

NAMESPACES = """
[namespaces.chat]
publish = true
"""


def by_shard(cluster: LocalCluster, per_shard: int, stem: str = "c") -> dict[int, list[str]]:
    """``per_shard`` channel names owned by each node (by port), for the default prefix."""
    found: dict[int, list[str]] = {node.port: [] for node in cluster.masters}
    for i in itertools.count():
        name = f"{stem}{i}"
        owned = found[cluster.owner(f"hub:ch:{name}").port]
        if len(owned) < per_shard:
            owned.append(name)
        if all(len(names) == per_shard for names in found.values()):
            return found
    raise AssertionError("unreachable")


def bridge_links(node: RedisServer) -> int:
    """How many bridge pub/sub connections ``node`` holds (by client name)."""
    with redis.Redis(port=node.port, socket_timeout=5) as r:
        return sum(c["name"] == "hub-bridge-sub" for c in r.client_list())


def shard_numsub(node: RedisServer, name: str) -> int:
    with redis.Redis(port=node.port, socket_timeout=5) as r:
        reply = r.execute_command("PUBSUB", "SHARDNUMSUB", name)
    return int(reply[1])


def test_two_brokers_exchange_on_every_shard(redis_cluster: LocalCluster) -> None:
    async def main() -> None:
        shards = by_shard(redis_cluster, 2)
        channels = [c for names in shards.values() for c in names]
        async with brokers(redis_cluster, unsubscribe_delay=0.2) as [(a, ra), (b, rb)]:
            assert isinstance(a, RedisClusterBroker) and a.ready and b.ready
            await a.subscribe(channels)
            for node in redis_cluster.nodes:
                for c in shards[node.port]:
                    assert shard_numsub(node, f"hub:ch:{c}") == 1
            for i, c in enumerate(channels):
                await b.publish(c, {"i": i}, event="e")
            await eventually(lambda: len(ra.publications) == len(channels))
            assert [(p.channel, p.data) for p in ra.publications] == [
                (c, {"i": i}) for i, c in enumerate(channels)
            ]
            assert ra.publications[0].meta == {"event": "e"}
            assert rb.publications == []

            # Per-user messages, broadcast and disconnect, each on the shard owning its name.
            await a.subscribe_user("alice")
            await b.send_to_user("alice", {"note": 1})
            await a.broadcast("everyone")
            await b.disconnect("alice", 4503, "banned")
            await eventually(lambda: ra.disconnects and rb.disconnects and rb.broadcasts)
            assert ra.user_messages == [("alice", {"note": 1})]
            assert ra.broadcasts == rb.broadcasts == ["everyone"]
            assert ra.disconnects == rb.disconnects == [("alice", 4503, "banned")]

            # Lazy unsubscribe, on the owning shard; nothing reaches A afterwards.
            await a.unsubscribe(channels)
            await a.unsubscribe_user("alice")
            for node in redis_cluster.nodes:
                for c in shards[node.port]:
                    await eventually(lambda n=node, c=c: shard_numsub(n, f"hub:ch:{c}") == 0, 3)
            await b.publish(channels[0], "nobody here")
            await b.broadcast("marker")
            await eventually(lambda: ra.broadcasts[-1:] == ["marker"])
            assert len(ra.publications) == len(channels)
            assert a.ready
            # A shard left with nothing to carry loses its link; the others keep theirs.
            special = {redis_cluster.owner(n).port for n in ("hub:all", "hub:ctl")}
            for node in redis_cluster.nodes:
                expected = 2 if node.port in special else 0
                await eventually(lambda n=node, e=expected: bridge_links(n) == e, 3)
            # And comes back for a new subscription.
            await a.subscribe(channels)
            await b.publish(channels[-1], "again")
            await eventually(lambda: ra.data(channels[-1])[-1:] == ["again"])

    run(main)


def test_a_thousand_publishes_arrive_in_order_per_channel(redis_cluster: LocalCluster) -> None:
    async def main() -> None:
        shards = by_shard(redis_cluster, 3, "seq")
        channels = [c for names in shards.values() for c in names]
        async with brokers(redis_cluster) as [(a, ra), (b, _)]:
            await a.subscribe(channels)
            # Concurrent publishes (pipelined per shard) then sequential ones.
            await within(asyncio.gather(*(b.publish(channels[i % 9], i) for i in range(500))))
            for i in range(500, 1000):
                await b.publish(channels[i % 9], i)
            await eventually(lambda: len(ra.publications) >= 1000)
            await asyncio.sleep(0.05)
            assert len(ra.publications) == 1000
            for k, c in enumerate(channels):
                assert ra.data(c) == list(range(k, 1000, 9))

            # Backends publish with SPUBLISH too, blocking or asyncio.
            with Publisher(redis_cluster.url) as pub:
                assert pub.publish(channels[0], "sync") == 1
                assert pub.send_to_user("nobody", 1) == 0
            async with AsyncPublisher(redis_cluster.url) as apub:
                assert await apub.publish(channels[1], "async") == 1
                assert await apub.broadcast("all") == 2
            await eventually(lambda: ra.broadcasts == ["all"])
            assert ra.data(channels[0])[-1] == "sync" and ra.data(channels[1])[-1] == "async"

    run(main)


def test_two_hubs_on_the_cluster_end_to_end(redis_cluster: LocalCluster) -> None:
    async def main() -> None:
        settings = make_settings(NAMESPACES, redis_url=redis_cluster.url)
        async with running(settings) as h1, running(settings) as h2:
            assert isinstance(h1.node.broker, RedisClusterBroker)
            assert h1.node.ready and h2.node.ready
            async with client(h1, user="alice") as a, client(h2, user="bob") as b:
                rooms = [
                    f"chat:{c}" for names in by_shard(redis_cluster, 1).values() for c in names
                ]
                for room in rooms:
                    await a.ok("subscribe", channel=room)
                for room in rooms:
                    await b.ok("publish", channel=room, data={"room": room})
                for room in rooms:
                    sender = {"user": "bob", "client": ANY_CLIENT, "info": None}
                    push = {"channel": room, "data": {"room": room}, "from": sender}
                    assert (await a.push()) == push
                status, _ = await api(h1, "/api/send", {"user": "bob", "data": "hi bob"})
                assert status == 200
                assert (await b.push()) == {"data": "hi bob"}
                status, _ = await api(h2, "/api/broadcast", {"data": "all"})
                assert status == 200
                assert (await a.push()) == {"data": "all"}
                assert (await b.push()) == {"data": "all"}
                status, _ = await api(h2, "/api/disconnect", {"user": "alice", "reason": "bye"})
                assert status == 200
                assert (await a.closed_with()) == (4503, "bye")

    run(main)


def pick_victim(cluster: LocalCluster) -> tuple[RedisServer, list[str], list[str], list[str]]:
    """A master that owns neither hub:all nor hub:ctl (so broadcasts go on while it is down),
    two channels per shard, those of the victim (sorted) and the others."""
    shards = by_shard(cluster, 2)
    channels = [c for names in shards.values() for c in names]
    special = {cluster.owner("hub:all").port, cluster.owner("hub:ctl").port}
    victim = next(n for n in cluster.masters if n.port not in special)
    lost = sorted(shards[victim.port])
    return victim, channels, lost, [c for c in channels if c not in lost]


async def delivered_again(broker: RedisBroker, recorder: Recorder, channel: str) -> bool:
    """Publish "back" on ``channel`` and say whether it arrived: False while its shard is
    still unavailable to the publisher or to the subscriber."""
    try:
        await broker.publish(channel, "back")
    except RedisUnavailable:
        return False
    await asyncio.sleep(0.05)
    return "back" in recorder.data(channel)


def test_a_killed_shard_gaps_its_channels_and_recovers(redis_cluster: LocalCluster) -> None:
    async def main() -> None:
        victim, channels, lost, kept = pick_victim(redis_cluster)
        async with brokers(redis_cluster) as [(a, ra), (b, _)]:
            await a.subscribe(channels)
            assert ra.gaps == []
            victim.kill()
            await eventually(lambda: ra.gaps, 3)
            assert ra.gaps == [lost] and ra.ready_at_gap == [False]
            assert not a.ready
            # The other shards deliver meanwhile; the dead one is unavailable.
            await b.publish(kept[0], "still here")
            await b.broadcast("still")
            await eventually(lambda: ra.data(kept[0]) == ["still here"] and ra.broadcasts)
            with pytest.raises(RedisUnavailable):
                await b.publish(lost[0], "lost")

            victim.start()
            await eventually(lambda: a.ready, 15)
            await eventually(lambda: len(ra.gaps) == 2)
            assert ra.gaps[1] == lost and ra.ready_at_gap[1] is True
            assert a.reconnects >= 1

            await eventually(lambda: delivered_again(b, ra, lost[0]), 10, 0.1)
            await b.publish(lost[1], "back too")
            await eventually(lambda: ra.data(lost[1]) == ["back too"])

    run(main)


def test_cluster_urls_and_flags() -> None:
    from hub.redis.cluster import parse_cluster_url

    seeds, auth, query = parse_cluster_url("redis+cluster://u:p@h1:7000,h2:7001/0?ssl_cert_reqs=x")
    assert seeds == [("h1", 7000), ("h2", 7001)] and auth == "u:p@" and query == "?ssl_cert_reqs=x"
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url("redis+cluster://h1")
    assert type(RedisBroker("redis://127.0.0.1:1/0")) is RedisBroker
    assert type(RedisBroker("redis+cluster://127.0.0.1:1")) is RedisClusterBroker


def move_slot(cluster: LocalCluster, name: str, target: RedisServer) -> None:
    """Hand the (empty) slot of ``name`` to ``target``, as a resharding does, telling every
    node (``CLUSTER SETSLOT <slot> NODE``)."""
    from redis.crc import key_slot

    slot = key_slot(name.encode())
    with redis.Redis(port=target.port, socket_timeout=5) as r:
        target_id = r.execute_command("CLUSTER", "MYID").decode()
    source = cluster.owner(name)
    for node in [target, source, *(n for n in cluster.nodes if n not in (target, source))]:
        with redis.Redis(port=node.port, socket_timeout=5) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


def test_a_moved_slot_moves_its_subscription(redis_cluster: LocalCluster) -> None:
    """Redis drops the shard channels of a slot that leaves a node; the bridge notices, reports
    a gap, learns the new map and subscribes on the new owner; the publisher follows MOVED."""

    async def main() -> None:
        shards = by_shard(redis_cluster, 1)
        channels = [c for names in shards.values() for c in names]
        async with brokers(redis_cluster) as [(a, ra), (b, _)]:
            await a.subscribe(channels)
            for c in channels:
                await b.publish(c, "before")
            await eventually(lambda: len(ra.publications) == len(channels))
            moving = channels[0]
            source = redis_cluster.owner(f"hub:ch:{moving}")
            target = next(n for n in redis_cluster.nodes if n is not source)
            move_slot(redis_cluster, f"hub:ch:{moving}", target)
            assert redis_cluster.owner(f"hub:ch:{moving}") is target
            await eventually(lambda: any(moving in g for g in ra.gaps), 3)
            await eventually(lambda: shard_numsub(target, f"hub:ch:{moving}") == 1, 5)
            await eventually(lambda: a.ready, 5)
            await b.publish(moving, "after")  # B's map is stale: MOVED, refresh, retry
            await eventually(lambda: ra.data(moving) == ["before", "after"])
            for c in channels[1:]:
                await b.publish(c, "after")
                await eventually(lambda c=c: ra.data(c) == ["before", "after"])

    run(main)


def start_migration(cluster: LocalCluster, name: str, target: RedisServer) -> None:
    """Begin moving the slot of ``name`` to ``target`` as a resharding does: ``IMPORTING`` on
    the target, ``MIGRATING`` on the source, then the slot's keys migrated."""
    from redis.crc import key_slot

    slot = key_slot(name.encode())
    source = cluster.owner(name)
    with redis.Redis(port=source.port, socket_timeout=5) as r:
        source_id = r.execute_command("CLUSTER", "MYID").decode()
    with redis.Redis(port=target.port, socket_timeout=5) as r:
        target_id = r.execute_command("CLUSTER", "MYID").decode()
        r.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    with redis.Redis(port=source.port, socket_timeout=5) as r:
        r.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = r.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
        assert keys, "the slot holds the channel's history"
        r.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)


def test_a_slot_migration_moves_only_its_channels_and_history_follows_ask(
    redis_cluster: LocalCluster,
) -> None:
    """During a migration a history publish whose keys have moved is answered ``ASK``: the
    publisher sends it to the importing node after ``ASKING`` and offsets go on. When the
    migration ends Redis drops the slot's shard channels on the source: the channel gets a gap
    notice and is subscribed on the new owner, and the source's other channels, on the same
    link, carry on without a gap."""

    async def main() -> None:
        shards = by_shard(redis_cluster, 3)
        channels = [c for names in shards.values() for c in names]
        moving = channels[0]
        source = redis_cluster.owner(f"hub:ch:{moving}")
        target = next(n for n in redis_cluster.nodes if n is not source)
        neighbours = [c for c in shards[source.port] if c != moving]
        async with brokers(redis_cluster) as [(a, ra), (b, _)]:
            await a.subscribe(channels)
            offset, epoch = await b.publish(moving, "one", history_size=10)  # type: ignore[misc]
            assert offset == 1
            start_migration(redis_cluster, f"hub:ch:{moving}", target)
            assert await b.publish(moving, "two", history_size=10) == (2, epoch)
            move_slot(redis_cluster, f"hub:ch:{moving}", target)
            await eventually(lambda: shard_numsub(target, f"hub:ch:{moving}") == 1, 10)
            await eventually(lambda: len(ra.gaps) == 2, 5)
            assert ra.gaps == [[moving], [moving]]
            assert a.ready and a.reconnects == 0
            for c in neighbours:
                assert shard_numsub(source, f"hub:ch:{c}") == 1
            page = await a.history(moving, since=0, limit=None, history_size=10, history_ttl=0)
            assert [e["data"] for e in page.entries] == ["one", "two"] and page.epoch == epoch
            assert await b.publish(moving, "three", history_size=10) == (3, epoch)
            await eventually(lambda: ra.data(moving) == ["one", "three"])
            for c in channels[1:]:
                await b.publish(c, "after")
                await eventually(lambda c=c: ra.data(c) == ["after"])
            assert ra.gaps == [[moving], [moving]]

    run(main)


def test_a_replica_takes_over_a_killed_master(tmp_path: Path) -> None:
    """Three masters with a replica each: a master is killed, its replica is promoted (a new
    address for those slots). The link to the dead master reports a gap for its channels, the
    slot map names the replica, the channels are subscribed there and get their second gap
    notice, and publishes reach them again; the other shards' channels never miss a beat."""
    from redisfix import LocalCluster

    cluster = LocalCluster(tmp_path, replicas=1)
    try:
        cluster.start()

        async def main() -> None:
            victim, channels, lost, kept = pick_victim(cluster)
            async with brokers(cluster) as [(a, ra), (b, _)]:
                await a.subscribe(channels)
                victim.kill()
                await eventually(lambda: ra.gaps, 5)
                assert ra.gaps == [lost]
                await eventually(lambda: cluster.owner(f"hub:ch:{lost[0]}") is not victim, 20)
                promoted = cluster.owner(f"hub:ch:{lost[0]}")
                assert promoted in cluster.replicas_of(victim)
                await eventually(lambda: a.ready, 20)
                await eventually(lambda: len(ra.gaps) == 2, 5)
                assert ra.gaps[1] == lost and ra.ready_at_gap[1] is True
                for c in lost:
                    assert shard_numsub(promoted, f"hub:ch:{c}") == 1

                await eventually(lambda: delivered_again(b, ra, lost[0]), 10, 0.1)
                for c in [*lost[1:], *kept]:
                    await b.publish(c, "after")
                    await eventually(lambda c=c: ra.data(c) == ["after"])
                assert len(ra.gaps) == 2  # the kept channels never got one

        run(main)
    finally:
        cluster.close()


def one_user_per_shard(cluster: LocalCluster) -> dict[int, str]:
    """A user name whose inbox (and user channel) each master owns, by port."""
    users: dict[int, str] = {}
    for i in itertools.count():
        users.setdefault(cluster.owner(f"hub:user:u{i}").port, f"u{i}")
        if len(users) == len(cluster.masters):
            return users
    raise AssertionError("unreachable")


async def open_inbox(c: Any, timeout: float = 15) -> dict[str, Any]:
    """``inbox``, asked again while it answers 111 (unavailable, try again), as hub.js does."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reply = await c.call("inbox", device="d")
        if reply.get("error", {}).get("code") != 111:
            assert "result" in reply, reply
            return reply["result"]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"inbox still unavailable: {reply}")
        await asyncio.sleep(0.1)


HISTORY = """
[namespaces.room]
history_size = 10
"""


def test_a_dead_shard_answers_unavailable_only_for_what_it_owns(
    redis_cluster: LocalCluster,
) -> None:
    """With one master killed, the inbox and history subscriptions of users and channels on
    the other shards open and go on live; only what the dead shard owns answers 111, and it
    opens once the shard is back."""
    victim = pick_victim(redis_cluster)[0]
    rooms = {port: names[0] for port, names in by_shard(redis_cluster, 1, "room:r").items()}
    users = one_user_per_shard(redis_cluster)
    dead_user, live_users = users[victim.port], [u for p, u in users.items() if p != victim.port]

    async def main() -> None:
        settings = make_settings(HISTORY, redis_url=redis_cluster.url)
        async with (
            running(settings) as h,
            AsyncPublisher(redis_cluster.url) as pub,
            contextlib.AsyncExitStack() as stack,
        ):
            # One connection per user with its inbox open: every shard's link is up and stays.
            for user in users.values():
                await open_inbox(await stack.enter_async_context(client(h, user=user)))
            await eventually(lambda: h.node.broker.ready, 15)
            victim.kill()
            await eventually(lambda: not h.node.broker.ready, 5)
            conns = {u: await stack.enter_async_context(client(h, user=u)) for u in users.values()}
            for user in live_users:
                result = (await conns[user].call("inbox", device="d"))["result"]
                assert result["seq"] == 0, result
                assert (await pub.notify(user, {"to": user})).receivers == 1
                push = await conns[user].push()
                assert push["data"] == {"to": user} and push["inbox"]["seq"] == 1, push
            assert await conns[dead_user].error("inbox", device="d") == 111
            room = conns[live_users[0]]
            for port, channel in rooms.items():
                if port == victim.port:
                    assert await room.error("subscribe", channel=channel) == 111
                else:
                    reply = await room.call("subscribe", channel=channel)
                assert reply["result"]["offset"] == 0, reply

            victim.start()
            result = await open_inbox(conns[dead_user], 20)
            assert result["seq"] == 0, result
            assert (await pub.notify(dead_user, {"to": dead_user})).receivers == 1
            assert (await conns[dead_user].push())["data"] == {"to": dead_user}

    run(main, timeout=90)
