"""Inboxes across real ``hub serve`` processes on a private Redis: a user offline for 500
notifications connects to another process; ``Publisher.notify`` and ``AsyncPublisher.notify``
on a private Redis Cluster reach a hub process there live and by catch-up; and the chaos run (a
publisher to 200 users non-stop, clients dropping and reconnecting at random, one hub SIGKILLed
and restarted, Redis SIGKILLed and restarted with AOF on): every client ends with every
notification exactly once, in order, after dropping repeats by ``seq`` as hub.js does."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import redis
from hubproc import HubProcess
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from wshelp import run

from hub.redis.publisher import AsyncPublisher, Publisher

if TYPE_CHECKING:
    from redisfix import LocalCluster, RedisServer

pytest_plugins = ["redisfix"]


async def dial(hub: HubProcess, user: str) -> ClientConnection:
    return await connect(
        f"ws://127.0.0.1:{hub.port}/ws?user={user}",
        subprotocols=["hub.v1.json"],  # type: ignore[list-item]
        open_timeout=5,
        close_timeout=1,
        ping_interval=None,
        compression=None,
        proxy=None,
    )


async def command(ws: ClientConnection, op: str, **fields: Any) -> tuple[dict[str, Any], list]:
    """Send a command; its reply and the pushes that came before it."""
    await ws.send(json.dumps({"op": op, "id": 1, **fields}))
    before = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if "id" in message:
            return message, before
        before.append(message)


async def pushes(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(n)]


def test_500_missed_notifications_arrive_on_another_process_once_each_in_order(
    hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    a = hubs("", redis_server.url)
    b = hubs("", redis_server.url)
    batch = [{"user": "u", "data": {"n": n}, "id": f"n{n}"} for n in range(500)]
    assert len(a.post("/api/notify", {"notifications": batch})["result"]["results"]) == 500

    async def main() -> None:
        ws = await dial(b, "u")
        reply, early = await command(ws, "inbox", device="phone")
        assert reply["result"]["seq"] == 500 and early == []
        got = await pushes(ws, 500)
        assert [p["data"]["n"] for p in got] == list(range(500))
        assert [p["inbox"]["seq"] for p in got] == list(range(1, 501))
        reply, _ = await command(ws, "ack", seq=250)
        assert reply["result"] == {"acked": 250}
        await ws.close()
        ws = await dial(a, "u")  # the other process, from the device's acknowledgement
        reply, early = await command(ws, "inbox", device="phone")
        assert reply["result"]["acked"] == 250 and early == []
        got = await pushes(ws, 250)
        assert [p["inbox"]["seq"] for p in got] == list(range(251, 501))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)
        await ws.close()

    run(main, timeout=60)


def one_user_per_shard(cluster: LocalCluster) -> list[str]:
    """A user whose pub/sub name (and so whose inbox keys) each master owns."""
    users: dict[int, str] = {}
    n = 0
    while len(users) < len(cluster.masters):
        user = f"c{n}"
        users.setdefault(cluster.owner(f"hub:user:{user}").port, user)
        n += 1
    return list(users.values())


def shard_subscribers(cluster: LocalCluster, user: str) -> int:
    name = f"hub:user:{user}"
    with redis.Redis(port=cluster.owner(name).port, socket_timeout=5) as shard:
        return int(shard.execute_command("PUBSUB", "SHARDNUMSUB", name)[1])


def test_publisher_notify_on_a_cluster_reaches_a_hub_live_and_by_catch_up(
    hubs: Callable[..., HubProcess], redis_cluster: LocalCluster
) -> None:
    """A ``hub serve`` process on a private 3-master cluster, one user per shard: the sync and
    the async publisher's notify are stored on the user's shard and pushed live with
    ``SPUBLISH``; what is notified while a client is away arrives when it asks again, in
    order, and its fallback entries land in the deployment's one set."""
    hub = hubs("", redis_cluster.url)
    users = one_user_per_shard(redis_cluster)

    async def main() -> None:
        sockets = {user: await dial(hub, user) for user in users}
        for user, ws in sockets.items():
            reply = await open_retrying(ws)
            assert reply["result"]["seq"] == 0, reply
            await asyncio.wait_for(
                asyncio.to_thread(
                    lambda u=user: wait_for(lambda: shard_subscribers(redis_cluster, u) == 1)
                ),
                15,
            )
        with Publisher(redis_cluster.url) as sync:
            for user in users:
                done = await asyncio.to_thread(sync.notify, user, {"n": 1}, id=f"{user}-1")
                assert (done.seq, done.receivers, done.duplicate) == (1, 1, False)
        async with AsyncPublisher(redis_cluster.url) as apub:
            sent = await asyncio.gather(*(apub.notify(u, {"n": n}) for n in (2, 3) for u in users))
            assert all(d.receivers == 1 for d in sent)
            again = await apub.notify(users[0], {"n": 1}, id=f"{users[0]}-1")
            assert (again.seq, again.duplicate) == (1, True)
        epochs = {}
        for user, ws in sockets.items():
            got = await pushes(ws, 3)
            epochs[user] = got[0]["inbox"]["epoch"]
            assert [p["data"]["n"] for p in got] == [1, 2, 3], user
            assert [p["inbox"]["seq"] for p in got] == [1, 2, 3]
            reply, _ = await command(ws, "ack", seq=3)
            assert reply["result"] == {"acked": 3}
            await ws.close()
        async with AsyncPublisher(redis_cluster.url) as apub:
            for user in users:  # offline now: stored for the catch-up
                for n in (4, 5):
                    done = await apub.notify(user, {"n": n}, fallback_after=600)
                    assert done.seq == n and not done.duplicate
        with Publisher(redis_cluster.url) as sync:
            for user in users:
                done = await asyncio.to_thread(sync.notify, user, {"n": 6}, fallback_after=600)
                assert done.seq == 6
        for user in users:
            ws = await dial(hub, user)
            result = (await open_retrying(ws))["result"]
            assert (result["acked"], result["seq"], result["epoch"]) == (3, 6, epochs[user])
            got = await pushes(ws, 3)
            assert [p["data"]["n"] for p in got] == [4, 5, 6], user
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 0.3)
            await ws.close()
        fallback = "hub:inbox:fallback"
        with redis.Redis(port=redis_cluster.owner(fallback).port, socket_timeout=5) as shard:
            members = {m.decode() for m in shard.zrange(fallback, 0, -1)}
        assert members == {f"{seq}:{user}" for user in users for seq in (4, 5, 6)}

    run(main, timeout=90)


async def open_retrying(ws: ClientConnection) -> dict[str, Any]:
    """``inbox``, asked again while it answers "unavailable, try again" (as hub.js does): an
    inbox opens once the link to the user's shard is up, and the first user on a shard starts
    that shard's link."""
    for _ in range(50):
        reply, early = await command(ws, "inbox", device="phone")
        assert early == []
        if reply.get("error", {}).get("code") != 111:
            return reply
        await asyncio.sleep(0.1)
    raise AssertionError("inbox still unavailable")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


USERS = 200
ROUNDS = 80


@dataclass
class Follower:
    """One user's client: what it kept (data ``n`` in arrival order) and its cursor."""

    user: str
    got: list[int] = field(default_factory=list)
    last: int = 0
    epoch: str | None = None
    repeats: int = 0
    connects: int = 0
    resets: int = 0


async def follow(f: Follower, hubs: list[HubProcess], done: asyncio.Event) -> None:
    """Connect to a random hub, ask for the inbox after what it has, keep what is new, ack now
    and then, drop the connection at a random moment; again, until it has every round."""
    rng = random.Random(f.user)
    while not (done.is_set() and len(f.got) >= ROUNDS):
        hub = rng.choice(hubs)
        try:
            ws = await dial(hub, f.user)
        except (OSError, InvalidHandshake, TimeoutError):
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            continue
        f.connects += 1
        try:
            fields: dict[str, Any] = {"op": "inbox", "id": 1, "device": "d"}
            if f.epoch is not None:
                fields.update(since=f.last, epoch=f.epoch)
            await ws.send(json.dumps(fields))
            drop_at = time.monotonic() + rng.uniform(0.3, 3.0)
            while not (done.is_set() and len(f.got) >= ROUNDS):
                left = drop_at - time.monotonic()
                if left <= 0 and not done.is_set():
                    break
                message = json.loads(await asyncio.wait_for(ws.recv(), max(left, 1.0)))
                if "id" in message:
                    if "error" in message:
                        break  # unavailable (Redis is down): reconnect
                    result = message.get("result", {})
                    if "epoch" in result:
                        if result.get("reset"):
                            f.resets += 1
                        f.epoch = result["epoch"] or f.epoch
                    continue
                mark = message.get("inbox", {})
                if "seq" not in mark:
                    continue
                if mark["seq"] <= f.last and mark["epoch"] == f.epoch:
                    f.repeats += 1
                    continue
                f.last, f.epoch = mark["seq"], mark["epoch"]
                f.got.append(message["data"]["n"])
                if len(f.got) % 7 == 0:
                    await ws.send(json.dumps({"op": "ack", "id": 2, "seq": f.last}))
        except (ConnectionClosed, OSError, TimeoutError):
            pass
        finally:
            await ws.close()
        await asyncio.sleep(rng.uniform(0.02, 0.2))


async def publish(hubs: list[HubProcess], rounds: int, log: list[str]) -> None:
    """Round n notifies every user ``{"n": n}`` (a batch to a random hub), retried on any
    failure with the same ids, so a retry after a lost answer stores nothing twice."""
    rng = random.Random(7)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for n in range(rounds):
            batch = [{"user": f"u{i}", "data": {"n": n}, "id": f"r{n}"} for i in range(USERS)]
            while True:
                hub = rng.choice(hubs)
                try:
                    async with http.post(
                        hub.base + "/api/notify", json={"notifications": batch}
                    ) as response:
                        if response.status == 200:
                            break
                        log.append(f"round {n}: {response.status}")
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    log.append(f"round {n}: {type(exc).__name__}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.08)


@pytest.mark.slow
def test_chaos_every_client_ends_with_every_notification_once_in_order(
    hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    redis_server.kill()
    redis_server.extra.update({"appendonly": "yes", "appendfsync": "always"})
    redis_server.start()
    procs = [hubs("", redis_server.url), hubs("", redis_server.url)]
    followers = [Follower(f"u{i}") for i in range(USERS)]
    log: list[str] = []

    async def chaos() -> None:
        await asyncio.sleep(2.0)
        procs[0].kill()  # SIGKILL: its clients drop without a close frame
        log.append("hub0 killed")
        await asyncio.sleep(1.5)
        await asyncio.to_thread(procs[0].start)
        log.append("hub0 back")
        await asyncio.sleep(1.5)
        redis_server.kill()  # SIGKILL too: only the AOF (fsync always) keeps the inboxes
        log.append("redis killed")
        await asyncio.sleep(1.0)
        redis_server.start()
        log.append("redis back")

    async def main() -> None:
        done = asyncio.Event()
        clients = [asyncio.create_task(follow(f, procs, done)) for f in followers]
        try:
            await asyncio.gather(publish(procs, ROUNDS, log), chaos())
            done.set()
            finished = asyncio.gather(*clients)
            await asyncio.wait_for(finished, 90)
        finally:
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

    run(main, timeout=240)
    wrong = [f for f in followers if f.got != list(range(ROUNDS))]
    assert not wrong, (wrong[0], log)
    assert sum(f.resets for f in followers) == 0  # the AOF kept every epoch
    assert min(f.connects for f in followers) >= 3
    assert any("redis killed" == line for line in log)
    print(
        f"connects {sum(f.connects for f in followers)}, "
        f"repeats dropped {sum(f.repeats for f in followers)}, publish retries {len(log) - 4}"
    )
