"""How many ``send`` calls a burst costs: the write coalescing of hub.ws and the hub's fan-out.

Counted with the kernel's own tally of this process's write syscalls (``syscw`` in
``/proc/self/io``) around code that runs without yielding to the event loop, so nothing else
in the process writes meanwhile. The tally counts ``write``/``writev``, which is how uvloop (what
the workers run on) sends; asyncio's loop uses ``send``, which it does not count, so these tests
run on uvloop. The clients are real ``websockets`` clients on real sockets, and every frame is
checked on arrival, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hubfix import client, make_settings, running
from websockets.asyncio.client import connect
from wshelp import STEP, within

from hub.app import Hub
from hub.ws import ServerConnection, broadcast, serve
from hub.ws.broadcast import encode_once
from hub.ws.connection import WriteCoalescer

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts syscalls through /proc/self/io"
)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(20):
            await main()

    uvloop.run(bounded())


def write_syscalls() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "syscw":
            return int(value)
    raise AssertionError("no syscw in /proc/self/io")


@contextlib.asynccontextmanager
async def parked_server() -> AsyncIterator[tuple[int, list[ServerConnection]]]:
    """A hub.ws server whose handlers hold their connections open until the block ends: its
    port, and its connections in the order they opened."""
    conns: list[ServerConnection] = []
    done = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        conns.append(connection)
        await done.wait()

    async with serve(handler, "127.0.0.1", 0) as server:
        try:
            yield server.sockets[0].getsockname()[1], conns
        finally:
            done.set()


async def opened(conns: list[ServerConnection], n: int) -> None:
    while len(conns) < n:
        await asyncio.sleep(0.01)


def test_held_writes_leave_in_one_send_per_connection() -> None:
    """Three broadcasts while the coalescer holds: nothing is written until release, then each
    connection gets all three frames in one send."""

    async def main() -> None:
        async with parked_server() as (port, conns):
            clients = [
                await within(connect(f"ws://127.0.0.1:{port}", compression=None)) for _ in range(5)
            ]
            await opened(conns, 5)
            coalescer = WriteCoalescer.of(asyncio.get_running_loop())
            before = write_syscalls()
            coalescer.hold()
            for text in ("one", "two", "three"):
                broadcast(conns, text)
            held = write_syscalls()
            coalescer.release()
            after = write_syscalls()
            assert held - before == 0
            assert after - held == 5
            for c in clients:
                assert [await within(c.recv()) for _ in range(3)] == ["one", "two", "three"]
            # Not held: the first frame of a turn goes out at once, the rest at the turn's end.
            before = write_syscalls()
            broadcast(conns, "four")
            assert write_syscalls() - before == 5
            broadcast(conns, "five")
            broadcast(conns, "six")
            assert write_syscalls() - before == 5
            coalescer.flush()
            assert write_syscalls() - before == 10
            for c in clients:
                assert [await within(c.recv()) for _ in range(3)] == ["four", "five", "six"]
            for c in clients:
                await within(c.close())

    run(main)


def test_queue_within_is_write_frame_under_a_budget() -> None:
    """The fan-out's one call per connection: the frame ``write_frame`` would queue (shared plain
    or compressed), straight to the kernel as a turn's first frame, buffered after it; over the
    budget nothing is queued and the pending total comes back negative; a closed connection
    gets nothing."""

    async def main() -> None:
        async with parked_server() as (port, conns):
            plain = await within(connect(f"ws://127.0.0.1:{port}", compression=None))
            await opened(conns, 1)
            deflated = await within(connect(f"ws://127.0.0.1:{port}"))
            await opened(conns, 2)
            gone = await within(connect(f"ws://127.0.0.1:{port}", compression=None))
            await opened(conns, 3)
            c_plain, c_deflate, c_gone = conns
            assert c_plain.protocol.deflate is None and c_deflate.protocol.deflate is not None
            await within(gone.close())
            while c_gone.writable:
                await asyncio.sleep(0.01)
            text = "hello " * 40  # long enough to be compressed
            one, two = encode_once(1, text.encode()), encode_once(1, b"two")
            coalescer = WriteCoalescer.of(asyncio.get_running_loop())
            coalescer.flush()
            before = write_syscalls()
            assert one.queue_within(c_plain, 1 << 20) == len(one.for_connection(c_plain))
            size = one.queue_within(c_deflate, 1 << 20)
            assert 0 < size < len(text)  # the compressed frame
            assert write_syscalls() - before == 2  # a turn's first frames: at once
            assert one.queue_within(c_gone, 1 << 20) == 0
            assert c_plain.pending_bytes == 0
            # Now buffered for this turn; a budget it would pass refuses it, nothing queued.
            assert two.queue_within(c_plain, 1 << 20) == 5
            assert c_plain.pending_bytes == 5
            assert two.queue_within(c_plain, 9) == -10
            assert c_plain.pending_bytes == 5
            assert write_syscalls() - before == 2
            coalescer.flush()
            assert write_syscalls() - before == 3
            assert [await within(plain.recv()) for _ in range(2)] == [text, "two"]
            assert await within(deflated.recv()) == text
            for c in (plain, deflated):
                await within(c.close())

    run(main)


def test_a_burst_of_per_user_pushes_costs_one_send_per_connection() -> None:
    """Pushes queued in one turn (as a burst read from Redis is): a user who gets two of them
    still costs one send; each user gets exactly theirs, in order."""

    async def main() -> None:
        async with running(make_settings()) as hub:
            await burst(hub)

    async def burst(hub: Hub) -> None:
        users = [f"u{i}" for i in range(4)]
        async with (
            client(hub, user=users[0]) as c0,
            client(hub, user=users[1]) as c1,
            client(hub, user=users[2]) as c2,
            client(hub, user=users[3]) as c3,
        ):
            for rnd in (1, 2):
                for user in users:
                    hub.node.on_user_message(user, {"user": user, "round": rnd})
            before = write_syscalls()
            # What the loop runs at the end of this turn: the fan-out, then the write flush.
            hub.node.fanout._flush()
            WriteCoalescer.of(asyncio.get_running_loop()).flush()
            assert write_syscalls() - before == len(users)
            for user, c in zip(users, (c0, c1, c2, c3), strict=True):
                got = [await c.push(STEP) for _ in range(2)]
                assert got == [{"data": {"user": user, "round": r}} for r in (1, 2)]

    run(main)
