"""Rate and connection limits against real ``hub serve`` processes: a flooding client is refused
(error 112) and then closed (4504) without touching its neighbours, per-namespace publish rates,
``max_connections`` counting every open socket with no race (503), the per-address limit
(429), and ``handshake_timeout`` for sockets that never finish their upgrade. Each hub's log must
end without a traceback (procfix.hub_serve)."""

from __future__ import annotations

import asyncio
import base64
import os
from contextlib import AsyncExitStack
from pathlib import Path

from hubfix import client, eventually, metric, scrape
from procfix import ServedHub, hub_serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from wshelp import run, within


class Upgrade:
    """A raw TCP connection to the hub, optionally from another loopback source address, that
    sends a WebSocket upgrade (or nothing) and stays open until closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, hub: ServedHub, source: str = "127.0.0.1") -> Upgrade:
        reader, writer = await within(
            asyncio.open_connection("127.0.0.1", hub.port, local_addr=(source, 0))
        )
        return cls(reader, writer)

    async def status(self, path: str = "/ws?user=x") -> int:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.writer.write(request.encode())
        line = await within(self.reader.readline())
        assert line.startswith(b"HTTP/1.1 "), line
        return int(line.split()[1])

    def close(self) -> None:
        self.writer.close()


# --- command rate -------------------------------------------------------------------------------


def test_a_command_flood_gets_error_112_then_close_4504(tmp_path: Path) -> None:
    """Five commands at once pass, then each is refused with 112 (not run), and after 20 refused
    in a row the connection is closed with 4504; a client next to it is untouched."""

    async def main(hub: ServedHub) -> None:
        async with client(hub, user="flood") as flood, client(hub, user="calm") as calm:
            try:
                for i in range(60):
                    await flood.send({"op": "unsubscribe", "channel": "news", "id": i})
            except ConnectionClosed:
                pass  # closed before the last ones went out
            codes = []
            while True:
                try:
                    reply = await flood.reply()
                except ConnectionClosed:
                    break
                except TimeoutError:
                    raise AssertionError(f"neither a reply nor the close after {codes}") from None
                codes.append(reply["error"]["code"])
            assert codes[:5] == [109] * 5, codes  # admitted and run: "not subscribed"
            assert codes[5:] == [112] * 20, codes
            assert await flood.closed_with() == (4504, "rate limit exceeded")
            await calm.ok("subscribe", channel="news")

            async def closed_as_4504() -> bool:
                samples = await scrape(hub)
                return metric(samples, "hub_connections_closed_total", code="4504") == 1

            await eventually(closed_as_4504)
            samples = await scrape(hub)
            assert metric(samples, "hub_rate_limited_total", limit="command") == 20
            assert metric(samples, "hub_command_errors_total", code="112") == 20

    with hub_serve(tmp_path, "command_rate = 0.1\ncommand_burst = 5\n", "--insecure") as hub:
        run(lambda: main(hub))


def test_commands_within_the_rate_are_never_limited(tmp_path: Path) -> None:
    async def main(hub: ServedHub) -> None:
        async with client(hub, user="chatty") as c:
            for i in range(30):  # 3 s at 10/s against a rate of 20/s and a burst of 2
                await c.ok("subscribe", channel=f"room-{i}")
                await asyncio.sleep(0.1)
            assert metric(await scrape(hub), "hub_rate_limited_total", limit="command") == 0

    with hub_serve(tmp_path, "command_rate = 20\ncommand_burst = 2\n", "--insecure") as hub:
        run(lambda: main(hub))


def test_a_namespace_publish_rate_applies_per_connection(tmp_path: Path) -> None:
    toml = """
    [namespaces.slow]
    publish = true
    publish_rate = 0.1
    publish_burst = 2

    [namespaces.chat]
    publish = true
    """

    async def main(hub: ServedHub) -> None:
        async with client(hub, user="a") as a, client(hub, user="b") as b:
            await a.ok("publish", channel="slow:1", data=1)
            await a.ok("publish", channel="slow:2", data=2)
            assert await a.error("publish", channel="slow:1", data=3) == 112
            await a.ok("publish", channel="chat:1", data=4)  # another namespace: no extra limit
            await b.ok("publish", channel="slow:1", data=5)  # another connection: its own
            assert metric(await scrape(hub), "hub_rate_limited_total", limit="publish") == 1

    with hub_serve(tmp_path, toml, "--insecure") as hub:
        run(lambda: main(hub))


# --- connection limits ----------------------------------------------------------------------------


def test_max_connections_counts_every_open_socket_and_answers_503(tmp_path: Path) -> None:
    """Sockets that have sent nothing yet (or failed to authenticate and are still open) take
    their place too: three idle ones fill a hub of three."""

    async def main(hub: ServedHub) -> None:
        idle = [await Upgrade.connect(hub) for _ in range(3)]
        try:
            probe = await Upgrade.connect(hub)
            assert await probe.status() == 503
            probe.close()
            idle.pop().close()
            await asyncio.sleep(0.2)  # the hub sees the close
            async with client(hub, user="alice") as a:
                await a.ok("subscribe", channel="news")
        finally:
            for sock in idle:
                sock.close()
        samples = await scrape(hub)
        assert metric(samples, "hub_handshake_failures_total", reason="connection_limit") == 1

    with hub_serve(tmp_path, "max_connections = 3\n", "--insecure") as hub:
        run(lambda: main(hub))


def test_concurrent_handshakes_never_exceed_max_connections(tmp_path: Path) -> None:
    """30 upgrades at once on a hub of 5: never more than 5 open, the rest 503 (while more
    sockets than that are open at once, even none may get in); afterwards the places are free
    again (nothing leaks in the count)."""

    async def one(hub: ServedHub, stack: AsyncExitStack, i: int) -> bool:
        try:
            await stack.enter_async_context(client(hub, user=f"u{i}"))
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            return False
        return True

    async def main(hub: ServedHub) -> None:
        async with AsyncExitStack() as stack:
            admitted = await asyncio.gather(*(one(hub, stack, i) for i in range(30)))
            assert sum(admitted) <= 5, admitted
            assert metric(await scrape(hub), "hub_connections") <= 5
        await asyncio.sleep(0.2)
        async with AsyncExitStack() as stack:
            for i in range(4):  # the scrape above was a socket too
                c = await stack.enter_async_context(client(hub, user=f"again{i}"))
                await c.ok("subscribe", channel="news")

    with hub_serve(tmp_path, "max_connections = 5\n", "--insecure") as hub:
        run(lambda: main(hub))


def test_max_connections_per_ip_answers_429_to_that_address_only(tmp_path: Path) -> None:
    async def main(hub: ServedHub) -> None:
        held = [await Upgrade.connect(hub) for _ in range(2)]
        try:
            assert [await u.status() for u in held] == [101, 101]
            third = await Upgrade.connect(hub)
            assert await third.status() == 429
            third.close()
            other = await Upgrade.connect(hub, source="127.0.0.2")
            assert await other.status() == 101
            other.close()
        finally:
            for u in held:
                u.close()
        samples = await scrape(hub)
        assert metric(samples, "hub_handshake_failures_total", reason="ip_connection_limit") == 1

    with hub_serve(tmp_path, "max_connections_per_ip = 2\n", "--insecure") as hub:
        run(lambda: main(hub))


# --- opening handshake --------------------------------------------------------------------------


def test_a_handshake_never_finished_is_dropped_and_counted(tmp_path: Path) -> None:
    """Sockets that send nothing, or stop halfway through the request (slowloris), are dropped
    after ``handshake_timeout``, each counted as a timeout; a client next to them is untouched."""

    async def main(hub: ServedHub) -> None:
        async with client(hub, user="calm") as calm:
            silent = await Upgrade.connect(hub)
            half = await Upgrade.connect(hub)
            half.writer.write(b"GET /ws?user=x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: web")
            for sock in (silent, half):
                assert await within(sock.reader.read(), 5) == b""  # dropped, nothing written
            samples = await scrape(hub)
            assert metric(samples, "hub_handshake_failures_total", reason="timeout") == 2
            await calm.ok("subscribe", channel="news")
            for sock in (silent, half):
                sock.close()

    with hub_serve(tmp_path, "handshake_timeout = 0.5\n", "--insecure") as hub:
        run(lambda: main(hub))
