"""Hostile neighbours: 50 well-behaved subscribers next to flooders, against a real ``hub serve``
joined to a private Redis, for ``HUB_SOAK_SECONDS`` (90 by default). Opt-in (slow).

The flooders (tests/flooders.py, their own process) ping in bursts, ping without ever reading,
send commands the hub refuses, read the history of random channels, send messages over the size
limit and frames claiming 2**62 bytes, send garbage, and subscribe to the soak's channel without
reading; each reconnects whenever the hub closes it. Meanwhile the HTTP API publishes a numbered
sequence on that channel. What must hold whatever the flooders do:

- every well-behaved subscriber gets every publication, in order, and is never disconnected;
- the hub's resident memory stays under ``MEMORY_BOUND`` the whole time (sampled each second and
  the kernel's peak, VmHWM);
- the hub is alive and ready (``/readyz``) at the end, and its log has no traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from stallfix import API_KEY, hub_process, memory_kb, metric, status, token
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

if TYPE_CHECKING:
    from hubproc import HubProcess
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

TESTS = Path(__file__).resolve().parent
SECONDS = float(os.environ.get("HUB_SOAK_SECONDS", "90"))
SUBSCRIBERS = 50
RATE = 25  # publications per second on the soak's channel
PAD = "x" * 4000  # so that a stalled reader fills its buffer within seconds
OUTBOUND = 128 * 1024
#: The hub's resident memory must stay under this, whatever the flooders do. Measured: about
#: 60 MiB at the peak (48 MiB idle), on CPython 3.11 on Linux.
MEMORY_BOUND = 160 * 1024  # KiB

HUB_TOML = f"""
outbound_buffer = {OUTBOUND}
ping_interval = 5
ping_timeout = 5

[namespaces.hist]
history_size = 10
history_ttl = 60

[namespaces.secret]
subscribe = "token"
"""


class MemoryWatch(threading.Thread):
    """Samples the hub's resident memory every second."""

    def __init__(self, hub: HubProcess) -> None:
        super().__init__(daemon=True)
        self.hub = hub
        self.samples: list[int] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            self.samples.append(memory_kb(self.hub))


async def _subscriber(hub: HubProcess, i: int) -> ClientConnection:
    ws = await connect(
        f"ws://127.0.0.1:{hub.port}/ws?token={token(f'good-{i}')}",
        subprotocols=[Subprotocol("hub.v1.json")],
        proxy=None,
        max_size=None,
    )
    await ws.send(json.dumps({"op": "subscribe", "channel": "feed", "id": 1}))
    assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"id": 1, "result": {}}
    return ws


async def _soak(hub: HubProcess) -> dict[str, Any]:
    subscribers = [await _subscriber(hub, i) for i in range(SUBSCRIBERS)]
    flooders = subprocess.Popen(
        [sys.executable, str(TESTS / "flooders.py"), str(hub.port), str(SECONDS)],
        cwd=TESTS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    published = 0
    try:
        readers: list[asyncio.Task[list[int]]] = []
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, headers={"X-API-Key": API_KEY}) as http:

            async def publish(seq: int) -> None:
                body = {"channel": "feed", "data": {"seq": seq, "pad": PAD}}
                async with http.post(hub.base + "/api/publish", json=body) as response:
                    assert response.status == 200, await response.text()

            # Readers learn at the end where to stop: the number of the end marker.
            done = asyncio.get_running_loop().create_future()

            async def read_all(ws: ClientConnection) -> list[int]:
                seqs: list[int] = []
                while True:
                    push = json.loads(await ws.recv())
                    assert push["channel"] == "feed", push
                    seqs.append(push["data"]["seq"])
                    if done.done() and seqs[-1] >= done.result():
                        return seqs

            readers = [asyncio.create_task(read_all(ws)) for ws in subscribers]
            started = time.monotonic()
            while time.monotonic() - started < SECONDS or flooders.poll() is None:
                await publish(published)
                published += 1
                for reader in readers:
                    if reader.done():
                        reader.result()  # a subscriber failed early: show why
                await asyncio.sleep(1 / RATE)
                assert time.monotonic() - started < SECONDS + 60, "flooders did not stop"
            done.set_result(published)
            await publish(published)  # the end marker: each reader stops there
            received = await asyncio.wait_for(asyncio.gather(*readers), 60)
        for i, seqs in enumerate(received):
            assert seqs == list(range(published + 1)), f"subscriber {i} missed or reordered"
        assert all(ws.close_code is None for ws in subscribers), "a good subscriber was closed"
    finally:
        if flooders.poll() is None:
            flooders.kill()
        out, err = flooders.communicate(timeout=30)
        for ws in subscribers:
            await ws.close()
    assert flooders.returncode == 0, err[-3000:]
    return {"published": published, "flooders": json.loads(out)}


@pytest.mark.slow
def test_well_behaved_subscribers_are_unharmed_by_hostile_neighbours(
    redis_server: RedisServer,
) -> None:
    with hub_process(HUB_TOML, redis_url=redis_server.url) as hub:
        idle = memory_kb(hub)
        watch = MemoryWatch(hub)
        watch.start()
        try:
            figures = asyncio.run(_soak(hub))
        finally:
            watch.halt.set()
            watch.join()
        peak = memory_kb(hub, "VmHWM")
        figures.update(
            idle_kb=idle,
            peak_kb=peak,
            largest_sample_kb=max(watch.samples),
            slow_consumers=metric(hub, "hub_slow_consumer_disconnects_total"),
            command_errors=metric(hub, "hub_command_errors_total"),
        )
        print(json.dumps(figures, indent=1))
        assert peak < MEMORY_BOUND, figures
        assert hub.process is not None and hub.process.poll() is None
        assert status(hub, "/readyz") == 200
        assert status(hub, "/healthz") == 200
        # The flooders did flood: each kind connected again and again and did its thing.
        for kind, seen in figures["flooders"].items():
            assert seen["connections"] >= 1 and seen["actions"] >= 1, (kind, seen)
        assert figures["slow_consumers"] >= 4
        log = hub.log.read_text()
    assert "Traceback" not in log, log[-4000:]
