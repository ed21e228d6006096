"""The process-wide keepalive (``hub.ws.keepalive``): one timer pings every connection once per
``ping_interval`` with a shared frame, and the connections whose pong has not come
``ping_timeout`` after their ping are closed with 1011.

Real ``hub.ws`` servers on loopback (asyncio and uvloop), raw-socket peers that answer pings or
do not, and the ``websockets`` client for the per-connection ``ping()``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect

import hub.ws
from hub.ws.keepalive import PAYLOAD, TICK, Keepalive

LOOPS = ["asyncio", "uvloop"]
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    if loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(main(), 60))
    else:
        asyncio.run(asyncio.wait_for(main(), 60))


class Peer:
    """A raw WebSocket client: records when each frame arrived; pongs each ping if ``answer``."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.pings: list[tuple[float, bytes]] = []
        self.close: tuple[float, int] | None = None
        self.opened = 0.0
        self.ended = asyncio.Event()

    async def connect(self, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.writer.write(UPGRADE)
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.opened = time.monotonic()
        self.port = self.writer.get_extra_info("sockname")[1]
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                first, second = await self.reader.readexactly(2)
                n = second & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await self.reader.readexactly(2))[0]
                payload = await self.reader.readexactly(n)
                opcode = first & 0x0F
                now = time.monotonic()
                if opcode == 0x9:
                    self.pings.append((now, payload))
                    if self.answer:  # masked with a zero key: the payload as is
                        self.writer.write(bytes((0x8A, 0x80 | n)) + b"\0\0\0\0" + payload)
                elif opcode == 0x8:
                    self.close = (now, struct.unpack("!H", payload[:2])[0])
                    self.writer.write(b"\x88\x82\0\0\0\0" + payload[:2])
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.ended.set()

    def shut(self) -> None:
        self.writer.close()


#: When each connection's handler started (its keepalive starts just before), by peer port.
STARTED: dict[int, float] = {}


async def serve(**options: Any) -> tuple[Any, int, list[Any]]:
    """A hub.ws server whose handler keeps each connection open; the connections it got."""
    connections: list[Any] = []

    async def handler(connection: Any) -> None:
        STARTED[connection.remote_address[1]] = time.monotonic()
        connections.append(connection)
        await connection.wait_closed()

    server = await hub.ws.serve(handler, "127.0.0.1", 0, compression=None, **options)
    return server, server.sockets[0].getsockname()[1], connections


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_never_answers_is_closed_after_interval_plus_timeout(loop: str) -> None:
    interval, timeout = 0.4, 0.3
    tick = interval / 8  # the keepalive's slice for a short interval

    async def main() -> None:
        server, port, _ = await serve(ping_interval=interval, ping_timeout=timeout)
        async with server:
            peers = [Peer(answer=False) for _ in range(20)]
            for peer in peers:
                await peer.connect(port)
            await asyncio.wait_for(asyncio.gather(*(p.ended.wait() for p in peers)), 10)
        for peer in peers:
            assert peer.close is not None and peer.close[1] == 1011, peer.close
            assert [payload for _, payload in peer.pings] == [PAYLOAD]  # one ping, no second
            ping_at = peer.pings[0][0]
            opened = STARTED[peer.port]  # the server's clock: the client may read the 101 late
            # Pinged one interval after opening (a slice early at most while the loop keeps
            # up, two when it runs its ticks late), closed no earlier than ping_timeout after
            # the ping; the upper bound allows for a loaded machine.
            assert ping_at - opened >= interval - 2 * tick - 0.01
            assert peer.close[0] - ping_at >= timeout - 0.01
            assert peer.close[0] - opened <= interval + timeout + tick + 2.0

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_live_peers_are_pinged_once_per_interval_and_never_closed(loop: str) -> None:
    interval = 0.2

    async def main() -> None:
        server, port, connections = await serve(ping_interval=interval, ping_timeout=0.5)
        async with server:
            peers = [Peer(answer=True) for _ in range(50)]
            for peer in peers:
                await peer.connect(port)
                await asyncio.sleep(0.005)  # spread over the slices
            await asyncio.sleep(interval * 8)
            assert all(not p.ended.is_set() for p in peers)
            assert len(connections) == 50
            now = time.monotonic()
            for peer in peers:
                # Once per interval since it opened (late timers skip a tick rather than bunch
                # up): never more than that, and at least 4 in its 8 or more intervals.
                intervals = (now - peer.opened) / interval
                assert 4 <= len(peer.pings) <= intervals + 1, (intervals, peer.pings)
            for peer in peers:
                peer.shut()
        assert all(p.close is None for p in peers)

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_without_ping_timeout_an_unanswered_ping_is_not_repeated_nor_fatal(loop: str) -> None:
    async def main() -> None:
        server, port, _ = await serve(ping_interval=0.1, ping_timeout=None)
        async with server:
            peer = Peer(answer=False)
            await peer.connect(port)
            await asyncio.sleep(0.8)
            assert not peer.ended.is_set()
            assert len(peer.pings) == 1
            peer.shut()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_the_connections_own_ping_works_beside_the_keepalive(loop: str) -> None:
    """``ping()`` of the websockets API: its future resolves on its pong, payloads never mix
    with the keepalive's, and a keepalive pong resolves the earlier pings it follows."""

    async def main() -> None:
        latencies: list[float] = []

        async def handler(connection: Any) -> None:
            for _ in range(5):
                waiter = await connection.ping()
                latencies.append(await asyncio.wait_for(waiter, 5))
                waiter = await connection.ping(b"mine")
                latencies.append(await asyncio.wait_for(waiter, 5))
                await asyncio.sleep(0.05)
            with pytest.raises(TypeError):
                await connection.ping(1)
            await connection.send("done")
            await connection.wait_closed()

        server = await hub.ws.serve(
            handler, "127.0.0.1", 0, compression=None, ping_interval=0.05, ping_timeout=1
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}/", ping_interval=None) as client:
                assert await asyncio.wait_for(client.recv(), 10) == "done"
        assert len(latencies) == 10 and all(x >= 0 for x in latencies)

    run(loop, main)


def test_one_timer_for_every_connection() -> None:
    """However many connections, the server's keepalive is one timer per settings in use, and it
    stops once the last connection is gone."""

    async def main() -> None:
        server, port, _ = await serve(ping_interval=30, ping_timeout=20)
        async with server:
            peers = [Peer(answer=True) for _ in range(30)]
            for peer in peers:
                await peer.connect(port)
            await asyncio.sleep(0.1)
            keepalives = list(server._keepalives.values())
            assert len(keepalives) == 1
            keepalive: Keepalive = keepalives[0]
            assert keepalive.tick == pytest.approx(TICK)
            assert sum(len(b) for b in keepalive.buckets) == 30
            assert keepalive.handle is not None
            for peer in peers:
                peer.shut()
            await asyncio.wait_for(asyncio.gather(*(p.ended.wait() for p in peers)), 10)
            for _ in range(100):
                if not any(keepalive.buckets):
                    break
                await asyncio.sleep(0.02)
            assert not any(keepalive.buckets)

    asyncio.run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_only_a_pong_with_the_keepalive_payload_answers_it(loop: str) -> None:
    """A pong read on its own skips the parser only when it is the keepalive's answer: one
    with other data does not count (closed at ping_timeout), and a pong that comes in one read
    with a message is parsed with it (the message arrives, the connection stays)."""

    async def main() -> None:
        got: list[str] = []

        async def handler(connection: Any) -> None:
            async for message in connection:
                got.append(message)

        server = await hub.ws.serve(
            handler, "127.0.0.1", 0, compression=None, ping_interval=0.2, ping_timeout=0.3
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            wrong, right = Peer(answer=False), Peer(answer=False)
            for peer in (wrong, right):
                await peer.connect(port)
            for _ in range(200):
                if wrong.pings and right.pings:
                    break
                await asyncio.sleep(0.01)
            mask = b"\x01\x02\x03\x04"
            other = bytes(a ^ b for a, b in zip(b"nope", mask, strict=True))
            wrong.writer.write(b"\x8a\x84" + mask + other)
            pong = bytes(a ^ b for a, b in zip(PAYLOAD, mask, strict=True))
            text = bytes(a ^ b for a, b in zip(b"hi", mask[:2], strict=True))
            right.writer.write(b"\x8a\x84" + mask + pong + b"\x81\x82" + mask + text)
            right.answer = True  # the pings after this one
            await asyncio.wait_for(wrong.ended.wait(), 10)
            assert wrong.close is not None and wrong.close[1] == 1011
            await asyncio.sleep(0.4)  # past the ping's timeout: answered, so still open
            assert not right.ended.is_set() and got == ["hi"]
            right.shut()

    run(loop, main)
