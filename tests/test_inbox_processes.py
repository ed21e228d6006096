"""Inboxes across real ``hub serve`` processes on a private Redis: a user offline for 500
notifications connects to another process; and the chaos run (a publisher to 200 users
non-stop, clients dropping and reconnecting at random, one hub SIGKILLed and restarted, Redis
SIGKILLed and restarted with AOF on): every client ends with every notification exactly once,
in order, after dropping repeats by ``seq`` as hub.js does."""

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
from hubproc import HubProcess
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from wshelp import run

if TYPE_CHECKING:
    from redisfix import RedisServer

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
