"""Memory after connections go: closed connections leave no reference cycle (refcounting frees
them at once, without the collector), and ``hub.runtime.MemoryReturn``'s rule collects and trims
once after a mass disconnect, never under churn, at most once per ``TRIM_MIN_INTERVAL``.

The cycle check runs real clients against a real hub with the collector off, then looks at what
a collection would find; the rule is driven with a counting trim and a settable clock.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import struct
from typing import Any

import pytest
from hubfix import JSON_PROTO, RawClient, client, eventually, make_settings, running
from wshelp import run

from hub import runtime
from hub.runtime import TRIM_MIN_DROP, TRIM_MIN_INTERVAL, MemoryReturn, return_memory
from hub.session import Session
from hub.ws import ServerConnection


def test_closed_connections_leave_nothing_for_the_collector() -> None:
    """A closing handshake, a dropped TCP connection and a reset: once the hub has let go of
    them, no session, connection or protocol waits in a cycle."""

    async def main() -> None:
        async with running(make_settings()) as hub:
            gc.collect()
            gc.disable()
            try:
                for i in range(5):
                    async with client(hub, JSON_PROTO, user=f"c{i}") as c:
                        await c.ok("subscribe", channel="news")
                raws = [await RawClient.open(hub, f"/ws?user=r{i}") for i in range(10)]
                for i, raw in enumerate(raws):
                    if i % 2:  # a reset rather than a FIN
                        linger = struct.pack("ii", 1, 0)
                        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    raw.sock.close()
                await eventually(lambda: len(hub.node.registry) == 0)
                await asyncio.sleep(0.1)  # the handler tasks finish
                gc.set_debug(gc.DEBUG_SAVEALL)
                gc.collect()
                left = [o for o in gc.garbage if isinstance(o, (Session, ServerConnection))]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert left == []

    run(main)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rule(monkeypatch: pytest.MonkeyPatch) -> tuple[MemoryReturn, list[int], Clock]:
    monkeypatch.setattr(runtime, "TRIM_SETTLE", 0.01)
    trims: list[int] = []
    clock = Clock()
    memory = MemoryReturn(trim=lambda: trims.append(1), clock=clock)
    return memory, trims, clock


def test_a_fall_to_half_the_peak_trims_once_after_the_wave(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        memory, trims, _ = rule(monkeypatch)
        for n in range(0, 10_001, 100):
            memory.seen(n)
        for n in range(10_000, 5_000, -100):
            memory.seen(n)
        await asyncio.sleep(0.05)
        assert trims == []  # 5,100 of a 10,000 peak: not yet half
        for n in range(5_000, -1, -100):
            memory.seen(n)  # the rest of the wave: one trim, not fifty
        await asyncio.sleep(0.05)
        assert trims == [1] and memory.trims == 1

    run(main)


@pytest.mark.parametrize(
    ("peak", "low", "trimmed"),
    [
        (TRIM_MIN_DROP + 500, 0, True),  # small, but fell by more than TRIM_MIN_DROP
        (TRIM_MIN_DROP - 1, 0, False),  # a small server never pays for a trim
        (1_500, 600, False),  # below half, but by less than TRIM_MIN_DROP
        (100_000, 50_000, True),
        (100_000, 50_001, False),
    ],
)
def test_the_drop_rule(monkeypatch: pytest.MonkeyPatch, peak: int, low: int, trimmed: bool) -> None:
    async def main() -> None:
        memory, trims, _ = rule(monkeypatch)
        memory.seen(peak)
        memory.seen(low)
        await asyncio.sleep(0.05)
        assert bool(trims) is trimmed

    run(main)


def test_churn_around_a_steady_count_never_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        memory, trims, _ = rule(monkeypatch)
        memory.seen(10_000)
        for i in range(2_000):
            memory.seen(9_000 + (i * 37) % 1_000)
        await asyncio.sleep(0.05)
        assert trims == []

    run(main)


def test_trims_are_spaced_and_the_peak_restarts_from_the_trim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        memory, trims, clock = rule(monkeypatch)
        memory.seen(20_000)
        memory.seen(10_000)
        await asyncio.sleep(0.05)
        assert len(trims) == 1
        # The count at the trim (10,000) is the new peak: 6,000 is not half of it.
        memory.seen(6_000)
        await asyncio.sleep(0.05)
        assert len(trims) == 1
        # Half of it, soon after: due, but not before TRIM_MIN_INTERVAL since the last one.
        clock.now += 5.0
        memory.seen(4_000)
        loop = asyncio.get_running_loop()
        due: Any = memory._due
        assert due is not None
        assert due.when() - loop.time() == pytest.approx(TRIM_MIN_INTERVAL - 5.0, abs=0.5)
        memory.cancel()
        assert memory._due is None
        await asyncio.sleep(0.05)
        assert len(trims) == 1

    run(main)


def test_return_memory_runs_here() -> None:
    """glibc's malloc_trim when the C library is glibc, a plain collection otherwise."""
    return_memory()
