"""Stalled clients against a real ``hub serve``: clients that subscribe and then never read.

Each stalled client sets a tiny ``SO_RCVBUF`` before connecting, does the WebSocket handshake,
subscribes, and stops reading, while a channel gets about 30 MB of publications over the HTTP API.
The hub must give up on every one of them (its slow-consumer counter says so) and reset the TCP
connection, so that:

- each client sees the connection end (a reset) within a few seconds, without reading a byte;
- the kernel keeps no orphaned socket of the hub's port holding queued data (``/proc/net/tcp``:
  no socket without an owner, other than TIME_WAIT) and ``/proc/net/sockstat`` counts no new
  orphans: a graceful close would leave each one with up to ``tcp_wmem`` max (4 MB) of kernel
  memory and a FIN stuck behind a zero window;
- a healthy subscriber next to them gets every publication, in order, and stays connected;
- the hub's memory stays bounded and its log has no traceback.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
from stallfix import (
    API_KEY,
    TCP_CLOSE,
    TCP_CLOSE_WAIT,
    TCP_ESTABLISHED,
    client_frame,
    hub_process,
    memory_kb,
    metric,
    orphans_of,
    sockstat,
    stalled_client,
    status,
    tcp_state,
    token,
)
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

if TYPE_CHECKING:
    from hubproc import HubProcess
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

OUTBOUND = 256 * 1024  # the hub's per-connection buffer in these tests (default 1 MiB)
PAD = "x" * 30_000  # one publication: ~30 KB
WINDOW = 4  # publications the healthy reader may be behind (far below OUTBOUND)
END_WITHIN = 5.0  # seconds after the last publication by which every stalled client sees the end


def _hub_toml() -> str:
    return f'outbound_buffer = {OUTBOUND}\nlog_level = "info"\n'


async def _flood(hub: HubProcess, messages: int, tick: Callable[[], None]) -> list[int]:
    """Publish ``messages`` ~30 KB publications on ``news`` over the HTTP API while a healthy
    subscriber reads them, calling ``tick`` every tenth; returns the sequence numbers the healthy
    subscriber got."""
    url = f"ws://127.0.0.1:{hub.port}/ws?token={token('healthy')}"
    received: list[int] = []
    arrived = asyncio.Event()
    async with connect(
        url,
        subprotocols=[Subprotocol("hub.v1.json")],
        compression=None,
        max_size=None,
        ping_interval=None,
        proxy=None,
    ) as healthy:
        await healthy.send(json.dumps({"op": "subscribe", "channel": "news", "id": 1}))
        assert json.loads(await asyncio.wait_for(healthy.recv(), 5)) == {"id": 1, "result": {}}

        async def read() -> None:
            while len(received) < messages:
                push = json.loads(await healthy.recv())
                assert push["channel"] == "news" and push["data"]["pad"] == PAD
                received.append(push["data"]["seq"])
                arrived.set()

        reader = asyncio.create_task(read())
        reader.add_done_callback(lambda _: arrived.set())
        timeout = aiohttp.ClientTimeout(total=10)
        headers = {"X-API-Key": API_KEY}
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            for seq in range(messages):
                body = {"channel": "news", "data": {"seq": seq, "pad": PAD}}
                async with http.post(hub.base + "/api/publish", json=body) as response:
                    assert response.status == 200, await response.text()
                while len(received) <= seq - WINDOW and not reader.done():
                    arrived.clear()
                    await asyncio.wait_for(arrived.wait(), 10)
                if reader.done():
                    reader.result()  # raises what the reader hit
                if seq % 10 == 0:
                    tick()
        await asyncio.wait_for(reader, 10)
        # Still connected and answered: the healthy client never noticed its neighbours.
        await healthy.send(json.dumps({"op": "unsubscribe", "channel": "news", "id": 2}))
        assert json.loads(await asyncio.wait_for(healthy.recv(), 5)) == {"id": 2, "result": {}}
    return received


def _read_to_end(sock: socket.socket, timeout: float) -> str:
    """Read what the kernel still holds for ``sock``; how the stream ended."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"
    return "eof"


class Watch:
    """What the stalled clients and the kernel show over time, sampled while the flood runs."""

    def __init__(self, hub: HubProcess, stalled: list[socket.socket]) -> None:
        self.hub = hub
        self.stalled = stalled
        self.ended_at: dict[int, float] = {}  # client index -> when it saw the end
        self.given_up_at: float | None = None  # when the slow-consumer counter reached them all
        self.peak_tcp_mem = 0  # pages, /proc/net/sockstat

    def __call__(self) -> None:
        now = time.monotonic()
        for i, sock in enumerate(self.stalled):
            if i not in self.ended_at and tcp_state(sock) != TCP_ESTABLISHED:
                self.ended_at[i] = now
        if self.given_up_at is None:
            if metric(self.hub, "hub_slow_consumer_disconnects_total") >= len(self.stalled):
                self.given_up_at = now
        self.peak_tcp_mem = max(self.peak_tcp_mem, sockstat()["mem"])


def _stall(
    clients: int, messages: int, workers: int = 1, mss: int = 0, redis_url: str | None = None
) -> dict[str, Any]:
    with hub_process(_hub_toml(), workers=workers, redis_url=redis_url) as hub:
        before = sockstat()
        rss_idle = memory_kb(hub)
        stalled = [
            stalled_client(hub.port, f"stalled-{i}", "news", mss=mss) for i in range(clients)
        ]
        try:
            watch = Watch(hub, stalled)
            started = time.monotonic()
            received = asyncio.run(_flood(hub, messages, watch))
            flooded = time.monotonic()
            assert received == list(range(messages)), "the healthy subscriber missed or reordered"
            assert metric(hub, "hub_slow_consumer_disconnects_total") == clients
            given_up_at = watch.given_up_at or flooded

            # Every stalled client sees its connection end, without reading anything.
            while len(watch.ended_at) < clients and time.monotonic() < given_up_at + END_WITHIN:
                watch()
                time.sleep(0.05)
            stuck = clients - len(watch.ended_at)
            assert not stuck, (
                f"{stuck} of {clients} stalled clients still see an established connection "
                f"{END_WITHIN}s after the hub gave up on them"
            )
            # A reset (CLOSE, with ECONNRESET pending) or at least an end of stream (CLOSE_WAIT).
            endings = []
            for sock in stalled:
                state = tcp_state(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if (state, error) == (TCP_CLOSE, errno.ECONNRESET):
                    endings.append("reset")
                else:
                    assert (state, error) == (TCP_CLOSE_WAIT, 0), (state, error)
                    assert _read_to_end(sock, 2.0) == "eof"
                    endings.append("eof")

            # The kernel keeps nothing behind: no orphan of the hub's port, no new orphans at all.
            deadline = time.monotonic() + 2
            while orphans_of(hub.port) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = orphans_of(hub.port)
            assert not left, f"{len(left)} orphaned sockets, {sum(s.tx_queue for s in left)} bytes"
            after = sockstat()
            # Other processes on the machine may have a few orphans of their own in flight.
            assert after["orphan"] <= before["orphan"] + clients // 20, (before, after)

            rss_peak = memory_kb(hub, "VmHWM")
            assert hub.process is not None and hub.process.poll() is None
            assert status(hub, "/readyz") == 200
        finally:
            for sock in stalled:
                sock.close()
        log = hub.log.read_text()
    assert "Traceback" not in log, log[-4000:]
    return {
        "flood_s": round(flooded - started, 2),
        "given_up_s": round(given_up_at - started, 2),
        "last_end_after_given_up_s": round(max(watch.ended_at.values()) - given_up_at, 2),
        "endings": {e: endings.count(e) for e in set(endings)},
        "rss_idle_kb": rss_idle,
        "rss_peak_kb": rss_peak,
        "peak_tcp_mem_pages": watch.peak_tcp_mem,
        "sockstat_before": before,
        "sockstat_after": after,
    }


def test_stalled_clients_are_reset_and_leave_no_orphans() -> None:
    """300 stalled clients, ~30 MB published: every one is dropped and reset."""
    figures = _stall(clients=300, messages=1000)
    print(figures)
    # The hub holds at most OUTBOUND per stalled client, briefly, plus its own baseline.
    assert figures["rss_peak_kb"] - figures["rss_idle_kb"] < 300 * OUTBOUND // 1024 + 64 * 1024


@pytest.mark.slow
def test_many_stalled_clients_on_workers(redis_server: RedisServer) -> None:
    """2,000 stalled clients on two workers (uvloop when installed) joined by a private Redis,
    ~60 MB published, with Ethernet-sized segments so that the kernel memory they pin stays
    reasonable on a shared machine."""
    figures = _stall(clients=2000, messages=2000, workers=2, mss=1400, redis_url=redis_server.url)
    print(figures)
    assert figures["rss_peak_kb"] - figures["rss_idle_kb"] < 2000 * OUTBOUND // 1024 + 128 * 1024


# --- the mechanism in hub.ws: every way of giving up on a peer ends in a reset --------------------

LOOPS = ["asyncio", "uvloop"]


def _run(loop: str, main: Callable[[], Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(20):
            return await main()

    if loop == "uvloop":
        import uvloop

        return uvloop.run(bounded())
    return asyncio.run(bounded())


async def _stalled_ws(port: int, sndbuf: int = 0) -> socket.socket:
    """A WebSocket client on a non-blocking socket with a tiny receive buffer, never read after
    the handshake."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(
        sock,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await loop.sock_recv(sock, 1)  # byte by byte: leave every frame unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def _fill(connection: Any) -> None:
    """Send until the peer's window and the kernel's send queue are full and asyncio buffers."""
    message = b"x" * 65536
    for _ in range(1000):
        try:
            await asyncio.wait_for(connection.send(message), 0.2)
        except TimeoutError:
            return  # send waits for a drain that never comes: everything is full
    raise AssertionError("the stalled peer never pushed back")


async def _ended(sock: socket.socket, port: int, timeout: float) -> float:
    """Wait until the stalled client's connection is reset; how long that took. Then check that
    the kernel keeps no orphan of ``port``."""
    started = time.monotonic()
    while tcp_state(sock) == TCP_ESTABLISHED:
        assert time.monotonic() - started < timeout, "the stalled client never saw a reset"
        await asyncio.sleep(0.02)
    took = time.monotonic() - started
    assert tcp_state(sock) == TCP_CLOSE
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
    for _ in range(50):
        if not orphans_of(port):
            break
        await asyncio.sleep(0.02)
    assert not orphans_of(port)
    return took


async def _serve_one(handler: Callable[[Any], Any], **options: Any) -> tuple[Any, int]:
    import hub.ws

    options.setdefault("ping_interval", None)
    server = await hub.ws.serve(handler, "127.0.0.1", 0, compression=None, **options)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("loop", LOOPS)
def test_abort_resets_a_connection_behind_an_unread_send_queue(loop: str) -> None:
    """``ServerConnection.abort()`` resets at once, though megabytes wait for the peer."""

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def handler(connection: Any) -> None:
            await _fill(connection)
            connection.abort()
            await connection.wait_closed()
            connection.abort()  # a no-op once closed
            done.set_result(connection.close_code)

        server, port = await _serve_one(handler)
        async with server:
            sock = await _stalled_ws(port)
            try:
                assert await _ended(sock, port, 10) < 5
                assert await asyncio.wait_for(done, 5) == 1006  # no closing handshake
                assert not server.connections
            finally:
                sock.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_close_timeout_resets_a_peer_that_does_not_read_the_close(loop: str) -> None:
    """``close()`` to a stalled peer: the close frame waits behind the queue; at
    ``close_timeout`` the connection is reset, not left to the kernel."""

    async def main() -> None:
        async def handler(connection: Any) -> None:
            await _fill(connection)
            await connection.close(1000)

        server, port = await _serve_one(handler, close_timeout=0.5)
        async with server:
            sock = await _stalled_ws(port)
            try:
                took = await _ended(sock, port, 10)
                assert 0.3 < took < 5, took
            finally:
                sock.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_ping_timeout_resets_a_stalled_peer(loop: str) -> None:
    """A stalled peer never answers the keepalive ping: failed with 1011, then reset at
    ``close_timeout``."""

    async def main() -> None:
        async def handler(connection: Any) -> None:
            await _fill(connection)
            await connection.wait_closed()

        server, port = await _serve_one(
            handler, ping_interval=0.3, ping_timeout=0.3, close_timeout=0.3
        )
        async with server:
            sock = await _stalled_ws(port)
            try:
                await _ended(sock, port, 10)
            finally:
                sock.close()

    _run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_that_pings_without_reading_is_pushed_back(loop: str) -> None:
    """Pings are answered by the core itself, so a peer that floods them and never reads would
    grow the server's write buffer with pongs for ever. The server stops reading while its
    writes are paused: the peer's own sends stall, the server's buffer stays small."""

    async def main() -> None:
        connections: list[Any] = []

        async def handler(connection: Any) -> None:
            connections.append(connection)
            await connection.wait_closed()

        server, port = await _serve_one(handler)
        async with server:
            sock = await _stalled_ws(port, sndbuf=16384)  # Ethernet-sized segments, small queues
            try:
                pings = bytearray(client_frame(0x9, b"p" * 125) * 64)
                pending = bytearray(pings)
                sent = largest = 0
                blocked_since = None
                started = time.monotonic()
                while True:
                    now = time.monotonic()
                    assert now - started < 10, f"the server kept reading: {sent} bytes of pings"
                    try:
                        n = sock.send(pending)
                    except BlockingIOError:
                        if blocked_since is None:
                            blocked_since = now
                        elif now - blocked_since > 0.5:
                            break  # pushed back for half a second: the server stopped reading
                        await asyncio.sleep(0.01)
                    else:
                        blocked_since = None
                        sent += n
                        del pending[:n]
                        if not pending:
                            pending = bytearray(pings)
                        await asyncio.sleep(0)
                    if connections:
                        buffered = connections[0].transport.get_write_buffer_size()
                        largest = max(largest, buffered)
                print(f"{sent} bytes of pings sent in {now - started:.1f}s, {largest} buffered")
                assert sent > 1 << 16  # the flood did fill every buffer on the way
                assert largest < 1 << 20, largest
                assert connections[0].open
            finally:
                sock.close()

    _run(loop, main)
