"""Outbound policies against a real ``hub serve`` (hub.fanout): what a client that does not keep
up gets, per namespace ``slow_consumer`` policy, and what a publication bigger than the
outbound budget does, through the HTTP API and through Redis.

The clients are ``websockets`` clients on sockets with a tiny ``SO_RCVBUF`` and ``max_queue=1``:
once they stop reading, the kernel's buffers fill and the hub's own buffer for them grows, as
with a phone on a bad network. The hub's view is read from ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from stallfix import API_KEY, client_frame, hub_process, memory_kb, metric, stalled_client, token
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from hub.publisher import Publisher

if TYPE_CHECKING:
    from hubproc import HubProcess
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

OUTBOUND = 64 * 1024  # the hub's budget per connection in these tests (default 1 MiB)
PAD = "x" * 30_000  # one publication: ~30 KB
FLOOD = 400  # publications while the slow client reads nothing: ~12 MB, past every buffer


async def _client(hub: HubProcess, user: str, *, stalled: bool = False) -> ClientConnection:
    """A websockets client; ``stalled``: a tiny receive buffer and a queue of one message, so it
    pushes back on the hub as soon as the test stops reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if stalled:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", hub.port))
    return await connect(
        f"ws://127.0.0.1:{hub.port}/ws?token={token(user)}",
        sock=sock,
        subprotocols=[Subprotocol("hub.v1.json")],
        compression=None,
        max_size=None,
        max_queue=1 if stalled else 16,
        ping_interval=None,
        proxy=None,
    )


async def _call(ws: ClientConnection, cid: int, **command: Any) -> dict[str, Any]:
    """Send a command; the reply (pushes that come first are returned in ``pushes``)."""
    await ws.send(json.dumps({"id": cid, **command}))
    pushes = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if msg.get("id") == cid:
            msg["pushes"] = pushes
            return msg
        pushes.append(msg)


async def _publish_http(hub: HubProcess, channel: str, seqs: range, pad: str = PAD) -> None:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, headers={"X-API-Key": API_KEY}) as http:
        for seq in seqs:
            body = {"channel": channel, "data": {"seq": seq, "pad": pad}}
            async with http.post(hub.base + "/api/publish", json=body) as response:
                assert response.status == 200, await response.text()


def _toml(namespaces: str = "") -> str:
    return f'outbound_buffer = {OUTBOUND}\nlog_level = "info"\n{namespaces}'


async def _wait_for(hub: HubProcess, name: str, at_least: float = 1, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while metric(hub, name) < at_least:
        assert time.monotonic() < deadline, f"{name} never reached {at_least}"
        await asyncio.sleep(0.05)


def test_drop_sends_a_gap_notice_and_a_history_client_recovers_without_reconnecting() -> None:
    """``slow_consumer = "drop"``: the stalled client is not closed; pushes are skipped while it
    is over budget, it gets a gap notice once drained, and a subscribe with ``since`` fills the
    hole: every publication, in order, on the same connection."""
    ns = '[namespaces.feed]\nhistory_size = 1000\nslow_consumer = "drop"\n'

    async def main(hub: HubProcess) -> None:
        slow = await _client(hub, "slow", stalled=True)
        reply = await _call(slow, 1, op="subscribe", channel="feed:x")
        epoch = reply["result"]["epoch"]
        await _publish_http(hub, "feed:x", range(FLOOD))  # nothing read meanwhile
        await _wait_for(hub, "hub_slow_consumer_skipped_total")
        seqs: list[int] = []
        last, gaps, cid = 0, 0, 1

        def take(push: dict[str, Any]) -> bool:
            """Note one push; True for a gap notice."""
            nonlocal last
            if push.get("gap"):
                assert push == {"channel": "feed:x", "gap": True}
                return True
            assert push["epoch"] == epoch and push["offset"] == last + 1, (push["offset"], last)
            last = push["offset"]
            seqs.append(push["data"]["seq"])
            return False

        while len(seqs) < FLOOD:
            if not take(json.loads(await asyncio.wait_for(slow.recv(), 10))):
                continue
            # A gap: recover on the same connection, as hub.client and hub.js do. The burst
            # of recovered pushes may pass the budget again: then another gap notice follows.
            gaps += 1
            assert gaps < 100, f"no progress: {len(seqs)} of {FLOOD} after {gaps} gaps"
            cid += 2
            reply = await _call(slow, cid, op="unsubscribe", channel="feed:x")
            assert reply["result"] == {} and not any(map(take, reply["pushes"]))
            since = {"offset": last, "epoch": epoch}
            reply = await _call(slow, cid + 1, op="subscribe", channel="feed:x", since=since)
            assert reply["result"]["recovered"] is True and not reply["pushes"]
        assert gaps >= 1, "nothing was dropped: the test did not stall the client"
        assert seqs == list(range(FLOOD))
        assert metric(hub, "hub_slow_consumer_gaps_total") == gaps
        await slow.close()
        assert metric(hub, "hub_slow_consumer_disconnects_total") == 0

    with hub_process(_toml(ns)) as hub:
        asyncio.run(main(hub))


def test_latest_keeps_the_newest_push_per_channel_after_a_gap_notice() -> None:
    """``slow_consumer = "latest"`` (tickers): the stalled client stays connected and, once it
    reads again, gets a gap notice and the newest publication; what it got is in order."""
    ns = '[namespaces.ticker]\nslow_consumer = "latest"\n'

    async def main(hub: HubProcess) -> None:
        slow = await _client(hub, "slow", stalled=True)
        assert (await _call(slow, 1, op="subscribe", channel="ticker:x"))["result"] == {}
        await _publish_http(hub, "ticker:x", range(FLOOD))
        await _wait_for(hub, "hub_slow_consumer_skipped_total")
        seqs: list[int] = []
        gaps = 0
        while not seqs or seqs[-1] != FLOOD - 1:
            push = json.loads(await asyncio.wait_for(slow.recv(), 10))
            if push.get("gap"):
                assert push == {"channel": "ticker:x", "gap": True}
                gaps += 1
                continue
            seqs.append(push["data"]["seq"])
        assert gaps >= 1 and len(seqs) < FLOOD
        assert seqs == sorted(set(seqs))
        await slow.close()
        assert metric(hub, "hub_slow_consumer_disconnects_total") == 0

    with hub_process(_toml(ns)) as hub:
        asyncio.run(main(hub))


def test_close_stays_the_default() -> None:
    """Without a policy a stalled subscriber is closed with 4000 (or reset once its grace is
    over), as before, and nothing is counted as skipped."""

    async def main(hub: HubProcess) -> None:
        slow = await _client(hub, "slow", stalled=True)
        assert (await _call(slow, 1, op="subscribe", channel="news"))["result"] == {}
        await _publish_http(hub, "news", range(FLOOD))
        await _wait_for(hub, "hub_slow_consumer_disconnects_total")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(slow.recv(), 10)
        assert closed.value.rcvd is None or closed.value.rcvd.code == 4000
        assert metric(hub, "hub_slow_consumer_skipped_total") == 0

    with hub_process(_toml()) as hub:
        asyncio.run(main(hub))


BIG = "y" * 100_000  # bigger than OUTBOUND


async def _idle_subscribers(hub: HubProcess, channel: str, n: int) -> list[ClientConnection]:
    clients = [await _client(hub, f"idle-{i}") for i in range(n)]
    for ws in clients:
        assert (await _call(ws, 1, op="subscribe", channel=channel))["result"] == {}
    return clients


async def _all_get_big(clients: list[ClientConnection], seq: int) -> None:
    for ws in clients:
        push = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert push["data"] == {"seq": seq, "pad": BIG}


def test_a_publication_bigger_than_the_budget_reaches_every_idle_subscriber(
    redis_server: RedisServer,
) -> None:
    """One frame always goes through to an empty buffer: a 100 KB publication with a 64 KiB
    budget reaches every idle subscriber, published over HTTP and through Redis (a backend's
    Publisher), and nobody is closed."""

    async def main(hub: HubProcess) -> None:
        clients = await _idle_subscribers(hub, "news", 5)
        await _publish_http(hub, "news", range(1), pad=BIG)
        await _all_get_big(clients, 0)
        publisher = Publisher(redis_server.url)
        try:
            await asyncio.to_thread(publisher.publish, "news", {"seq": 1, "pad": BIG})
        finally:
            publisher.close()
        await _all_get_big(clients, 1)
        for ws in clients:
            assert (await _call(ws, 2, op="unsubscribe", channel="news"))["result"] == {}
            await ws.close()
        assert metric(hub, "hub_slow_consumer_disconnects_total") == 0

    with hub_process(_toml(), redis_url=redis_server.url) as hub:
        asyncio.run(main(hub))


def test_pongs_count_in_the_budget_a_ping_flood_never_read_is_closed() -> None:
    """Pongs the core writes by itself count like pushes: a client that sends pings and never
    reads is closed as a slow consumer (4000, then reset after its grace), the hub's memory
    stays flat however much it sends, and a subscriber next to it is not disturbed."""
    budget = 4096

    async def main(hub: HubProcess) -> None:
        healthy = await _client(hub, "healthy")
        assert (await _call(healthy, 1, op="subscribe", channel="news"))["result"] == {}
        rss_before = memory_kb(hub)
        sock = stalled_client(hub.port, "pinger", "other")
        sock.setblocking(False)
        pings = client_frame(0x9, b"p" * 125) * 512  # 64 KiB of pings per send
        sent, ended = 0, False
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until the hub resets the connection
            try:
                sent += sock.send(pings)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except (ConnectionResetError, BrokenPipeError):
                ended = True
                break
        sock.close()
        assert ended, f"the hub kept the pinger: {sent} bytes of pings sent"
        peak = memory_kb(hub, "VmHWM")  # the peak RSS of the hub's life
        assert peak - rss_before < 8 * 1024, f"hub grew {peak - rss_before} KiB"
        await _wait_for(hub, "hub_slow_consumer_disconnects_total")
        await _publish_http(hub, "news", range(1), pad="after")
        push = json.loads(await asyncio.wait_for(healthy.recv(), 10))
        assert push["data"] == {"seq": 0, "pad": "after"}
        await healthy.close()

    with hub_process(f'outbound_buffer = {budget}\nlog_level = "info"\n') as hub:
        asyncio.run(main(hub))


def test_write_delay_holds_pushes_and_keeps_their_order() -> None:
    """``write_delay``: pushes of the namespace arrive in order, complete, on every encoding; a
    client gone while its pushes are held costs nothing but their bytes (no traceback)."""
    ns = "[namespaces.tick]\nwrite_delay = 50\n"

    async def main(hub: HubProcess) -> None:
        clients = [await _client(hub, f"reader-{i}") for i in range(3)]
        for ws in clients:
            assert (await _call(ws, 1, op="subscribe", channel="tick:x"))["result"] == {}
        leaving = await _client(hub, "leaving")
        assert (await _call(leaving, 1, op="subscribe", channel="tick:x"))["result"] == {}
        await _publish_http(hub, "tick:x", range(1), pad="p")
        leaving.transport.abort()  # gone while the first push is held for it
        await _publish_http(hub, "tick:x", range(1, 40), pad="p")
        for ws in clients:
            got = [json.loads(await asyncio.wait_for(ws.recv(), 10)) for _ in range(40)]
            assert [push["data"]["seq"] for push in got] == list(range(40))
            await ws.close()
        assert "Traceback" not in hub.log.read_text()

    with hub_process(_toml(ns)) as hub:
        asyncio.run(main(hub))
