"""Sending as a websockets user expects it: one message at a time on the wire, fragments sent as
they are produced, ``text=`` to pick the frame type, and broadcasts that skip a busy connection.

Every test drives a real ``websockets`` client against the server under test; the server-side
code is what an application writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from wshelp import STEP, run, uri, within

CHUNK = os.urandom(65536)  # incompressible: deflate must not shrink it below the buffers


def test_send_waits_for_a_fragmented_send_blocked_on_a_slow_reader(websockets: ModuleType) -> None:
    """A client that stops reading blocks a fragmented send on flow control; a second send from
    another task must wait for the whole message, not slip a frame between its fragments (a real
    client fails such a stream with "expected a continuation frame")."""
    blocked = asyncio.Event()
    sent: list[int] = []

    async def handler(ws: Any) -> None:
        def fragments() -> Iterator[bytes]:
            for _ in range(2000):  # at most 125 MiB: the client's buffers fill long before
                yield CHUNK
                sent.append(len(CHUNK))
                if blocked.is_set():
                    yield CHUNK
                    sent.append(len(CHUNK))
                    return

        async def other_sender() -> None:
            while ws.transport.get_write_buffer_size() == 0:  # until the kernel is full
                await asyncio.sleep(0.005)
            blocked.set()
            await ws.send("after")

        task = asyncio.create_task(other_sender())
        await ws.send(fragments())
        await task
        await ws.wait_closed()

    async def main() -> None:
        async with websockets.serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
            async with connect(uri(server), max_size=None, ping_interval=None) as client:
                client.transport.pause_reading()
                await within(blocked.wait())
                await asyncio.sleep(0.05)  # let the second sender reach its send()
                client.transport.resume_reading()
                message = await within(client.recv(), 30)
                assert isinstance(message, bytes) and len(message) == sum(sent)
                assert await within(client.recv()) == "after"

    run(main, timeout=60)


def test_each_fragment_leaves_when_it_is_produced(websockets: ModuleType) -> None:
    """Streaming from a slow source: the client gets the first fragment while the source still
    waits for the second (no look-ahead), and the message ends with an empty final frame."""
    gate: asyncio.Future[None] | None = None

    async def handler(ws: Any) -> None:
        async def fragments() -> AsyncIterator[str]:
            yield "first"
            assert gate is not None
            await gate
            yield "second"

        await ws.send(fragments())
        await ws.wait_closed()

    async def main() -> None:
        nonlocal gate
        gate = asyncio.get_running_loop().create_future()
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                frames = client.recv_streaming()
                assert await within(anext(frames)) == "first"
                assert not gate.done()
                gate.set_result(None)
                assert [f async for f in frames] == ["second", ""]

    run(main)


def test_send_during_a_paused_fragmented_send_waits_in_order(websockets: ModuleType) -> None:
    """While a fragmented message waits on its source, another task's send() waits; it goes out
    right after the final frame, and a broadcast in the meantime skips the connection."""
    gate: asyncio.Future[None] | None = None
    outcome: dict[str, Any] = {}

    async def handler(ws: Any) -> None:
        async def fragments() -> AsyncIterator[bytes]:
            yield b"part-1"
            assert gate is not None
            await gate
            yield b"part-2"

        sending = asyncio.create_task(ws.send(fragments()))
        await asyncio.sleep(0.05)
        later = asyncio.create_task(ws.send("later"))
        await asyncio.sleep(0.05)
        outcome["later_waits"] = not later.done()
        websockets.broadcast([ws], "skipped")
        try:
            websockets.broadcast([ws], "skipped too", raise_exceptions=True)
        except ExceptionGroup as group:
            outcome["reported"] = [type(e).__name__ for e in group.exceptions]
        assert gate is not None
        gate.set_result(None)
        await sending
        await later
        await ws.wait_closed()

    async def main() -> None:
        nonlocal gate
        gate = asyncio.get_running_loop().create_future()
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == b"part-1part-2"
                assert await within(client.recv()) == "later"
                with pytest.raises(TimeoutError):  # neither broadcast reached the wire
                    await asyncio.wait_for(client.recv(), 0.2)
        assert outcome == {"later_waits": True, "reported": ["ConcurrencyError"]}

    run(main)


def test_broadcast_skip_is_logged(websockets: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    """A broadcast that skips a connection busy with a fragmented message says so in the log."""
    gate: asyncio.Future[None] | None = None

    async def handler(ws: Any) -> None:
        async def fragments() -> AsyncIterator[str]:
            yield "a"
            assert gate is not None
            await gate
            yield "b"

        sending = asyncio.create_task(ws.send(fragments()))
        await asyncio.sleep(0.05)
        websockets.broadcast([ws], "skipped")
        assert gate is not None
        gate.set_result(None)
        await sending

    async def main() -> None:
        nonlocal gate
        gate = asyncio.get_running_loop().create_future()
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == "ab"

    with caplog.at_level(logging.WARNING):
        run(main)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped broadcast: sending a fragmented message" in messages


@pytest.mark.parametrize(
    ("message", "text", "expected"),
    [
        ("é", False, "é".encode()),
        ("é".encode(), True, "é"),
        (["é", "è"], False, "éè".encode()),
        (["é".encode(), "è".encode()], True, "éè"),
    ],
)
def test_text_argument_picks_the_frame_type(
    websockets: ModuleType, message: Any, text: bool, expected: Any
) -> None:
    """``send(..., text=False)`` sends a str as binary, ``text=True`` sends bytes as text, for
    single messages and fragmented ones alike."""

    async def handler(ws: Any) -> None:
        await ws.send(message, text=text)
        await ws.wait_closed()

    async def main() -> None:
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == expected

    run(main)


def test_async_text_argument(websockets: ModuleType) -> None:
    """``text=`` applies to async iterables too."""

    async def handler(ws: Any) -> None:
        async def fragments() -> AsyncIterator[bytes]:
            yield b"x"
            yield b"y"

        await ws.send(fragments(), text=True)
        await ws.wait_closed()

    async def main() -> None:
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == "xy"

    run(main)


def test_bad_fragment_fails_the_connection_with_1011(websockets: ModuleType) -> None:
    """A fragment of the wrong type half-way through cannot be finished: TypeError for the
    sender, 1011 for the peer, and nothing of another message on the wire in between."""
    outcome: dict[str, str] = {}

    async def handler(ws: Any) -> None:
        try:
            await ws.send(["ok", b"not text"])
        except TypeError as exc:
            outcome["error"] = type(exc).__name__
        await ws.wait_closed()

    async def main() -> None:
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.wait_closed())
                assert client.close_code == 1011
        assert outcome == {"error": "TypeError"}

    run(main)


def test_concurrent_fragmented_sends_do_not_mix(websockets: ModuleType) -> None:
    """Many tasks each sending a fragmented message at once: every message arrives whole."""

    async def handler(ws: Any) -> None:
        async def fragments(n: int) -> AsyncIterator[str]:
            for i in range(5):
                yield f"{n}:{i};"
                await asyncio.sleep(0)

        await asyncio.gather(*(ws.send(fragments(n)) for n in range(20)))
        await ws.wait_closed()

    async def main() -> None:
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                got = [await within(client.recv()) for _ in range(20)]
        assert sorted(got) == sorted("".join(f"{n}:{i};" for i in range(5)) for n in range(20))

    run(main)


def test_recv_concurrency_error_names_both_calls(websockets: ModuleType) -> None:
    """A second receiver gets ConcurrencyError, worded as websockets words it."""
    outcome: dict[str, str] = {}

    async def handler(ws: Any) -> None:
        first = asyncio.create_task(ws.recv())
        await asyncio.sleep(0.01)
        try:
            await ws.recv()
        except websockets.ConcurrencyError as exc:
            outcome["recv"] = str(exc)
        first.cancel()
        await ws.close()

    async def main() -> None:
        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.wait_closed(), STEP)
        assert outcome["recv"] == (
            "cannot call recv while another coroutine is already running recv or recv_streaming"
        )

    run(main)
