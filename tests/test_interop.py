"""Interoperability: clients we did not write (``websockets``, ``aiohttp``) against our server.

Each client is driven through its public API only, so a pass means real applications using those
libraries can talk to a hub.ws server: compression negotiation, text and binary, fragmentation,
16 MiB messages, ping/pong, close codes and reasons, subprotocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from wshelp import STEP, run, uri, within

BIG = 16 * 2**20  # 16 MiB
MAX_SIZE = 2**25  # server and clients accept 32 MiB, so 16 MiB fits with room to spare
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 2**20]


@dataclass
class Record:
    """What the server saw, reported back to the test in-process."""

    closes: asyncio.Queue[tuple[int | None, str | None]] = field(default_factory=asyncio.Queue)
    subprotocols: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)


def make_handler(websockets: ModuleType, record: Record) -> Any:
    """One server for every case, routed by path so each test reads as client-side steps."""

    async def handler(websocket: Any) -> None:
        path = websocket.request.path.partition("?")[0]
        record.subprotocols.put_nowait(websocket.subprotocol)
        if path == "/fragments":
            await websocket.send(["frag", "ment", "ed ✓"])
            await websocket.send([b"\x00\x01", b"", b"\x02"])
        elif path == "/ping":
            pong_waiter = await websocket.ping(b"server ping")
            latency = await pong_waiter
            await websocket.send(f"latency {latency!r}")
        elif path.startswith("/close/"):
            _, _, code, reason = path.split("/", 3)
            await websocket.close(int(code), unquote(reason))
            return
        elif path == "/subprotocol":
            await websocket.send(websocket.subprotocol or "none")
        elif path == "/raise":
            await websocket.recv()
            raise RuntimeError("handler failure, on purpose")
        with contextlib.suppress(websockets.ConnectionClosedError):
            async for message in websocket:
                await websocket.send(message)
        await websocket.wait_closed()
        record.closes.put_nowait((websocket.close_code, websocket.close_reason))

    return handler


@contextlib.asynccontextmanager
async def echo_server(websockets: ModuleType, **kwargs: Any) -> AsyncIterator[tuple[Any, Record]]:
    """A running server with the shared handler; 16 MiB messages fit."""
    record = Record()
    kwargs.setdefault("max_size", MAX_SIZE)
    handler = make_handler(websockets, record)
    async with websockets.serve(handler, "127.0.0.1", 0, **kwargs) as server:
        yield server, record


@contextlib.asynccontextmanager
async def aiohttp_ws(
    url: str, **kwargs: Any
) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, Any]]:
    """An aiohttp WebSocket plus the handshake response headers (captured by a trace hook)."""
    captured: dict[str, Any] = {}

    async def on_request_end(session: Any, ctx: Any, params: Any) -> None:
        captured["headers"] = params.response.headers

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    timeout = aiohttp.ClientWSTimeout(ws_receive=STEP, ws_close=STEP)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        ws = await within(session.ws_connect(url, timeout=timeout, **kwargs))
        try:
            yield ws, captured["headers"]
        finally:
            await within(ws.close())


def deflate_expected(server_compression: str | None, client_compression: bool) -> bool:
    return server_compression == "deflate" and client_compression


# --- compression negotiation ---


@pytest.mark.parametrize("server_compression", ["deflate", None])
@pytest.mark.parametrize("client_compression", [True, False])
def test_websockets_client_negotiation(
    websockets: ModuleType, server_compression: str | None, client_compression: bool
) -> None:
    """permessage-deflate is in the response iff both sides enable it; echo works either way."""

    async def main() -> None:
        async with echo_server(websockets, compression=server_compression) as (server, _):
            async with connect(
                uri(server, "/echo"),
                compression="deflate" if client_compression else None,
                max_size=MAX_SIZE,
            ) as client:
                extensions = client.response.headers.get("Sec-WebSocket-Extensions")
                if deflate_expected(server_compression, client_compression):
                    assert extensions is not None
                    assert extensions.startswith("permessage-deflate")
                else:
                    assert extensions is None
                for size in SIZES:
                    text = ("héllo wörld " * (size // 12 + 1))[:size]
                    await within(client.send(text))
                    assert await within(client.recv()) == text
                    data = os.urandom(size)
                    await within(client.send(data))
                    assert await within(client.recv()) == data

    run(main)


@pytest.mark.parametrize("server_compression", ["deflate", None])
@pytest.mark.parametrize("client_compress", [15, 0])
def test_aiohttp_client_negotiation(
    websockets: ModuleType, server_compression: str | None, client_compress: int
) -> None:
    """aiohttp's ``compress=15`` negotiates deflate with a deflate server; echo works either way."""

    async def main() -> None:
        async with echo_server(websockets, compression=server_compression) as (server, _):
            async with aiohttp_ws(
                uri(server, "/echo"), compress=client_compress, max_msg_size=MAX_SIZE
            ) as (ws, headers):
                extensions = headers.get("Sec-WebSocket-Extensions")
                if deflate_expected(server_compression, client_compress != 0):
                    assert extensions is not None
                    assert extensions.startswith("permessage-deflate")
                    assert ws.compress != 0
                else:
                    assert extensions is None
                    assert ws.compress == 0
                for size in SIZES:
                    text = ("héllo wörld " * (size // 12 + 1))[:size]
                    await within(ws.send_str(text))
                    msg = await within(ws.receive())
                    assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, text)
                    data = os.urandom(size)
                    await within(ws.send_bytes(data))
                    msg = await within(ws.receive())
                    assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, data)

    run(main)


# --- fragmentation ---


@pytest.mark.parametrize("compression", ["deflate", None])
def test_fragmented_messages_from_client(websockets: ModuleType, compression: str | None) -> None:
    """A message the client sends as an iterable of fragments arrives reassembled, typed right."""

    async def main() -> None:
        async with echo_server(websockets, compression=compression) as (server, _):
            async with connect(uri(server, "/echo"), compression=compression) as client:
                await within(client.send(["frag", "ment", "ed ✓"]))
                assert await within(client.recv()) == "fragmented ✓"
                await within(client.send([b"\x00" * 1000, b"", b"\xff" * 70_000]))
                assert await within(client.recv()) == b"\x00" * 1000 + b"\xff" * 70_000
                # A control frame may not interleave wrongly: ping right after still works.
                await within(await within(client.ping()))

    run(main)


def test_fragmented_messages_from_server(websockets: ModuleType) -> None:
    """``send(iterable)`` on the server fragments one message; both clients reassemble it."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with connect(uri(server, "/fragments")) as client:
                assert await within(client.recv()) == "fragmented ✓"
                assert await within(client.recv()) == b"\x00\x01\x02"
            async with aiohttp_ws(uri(server, "/fragments")) as (ws, _):
                msg = await within(ws.receive())
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "fragmented ✓")
                msg = await within(ws.receive())
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, b"\x00\x01\x02")

    run(main)


# --- large messages ---


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_16_mib_message_websockets_client(websockets: ModuleType, compression: str | None) -> None:
    """A 16 MiB binary and a 16 MiB text message echo intact (server max_size=2**25)."""

    async def main() -> None:
        async with echo_server(websockets, compression=compression) as (server, _):
            async with connect(
                uri(server, "/echo"), compression=compression, max_size=MAX_SIZE
            ) as client:
                data = os.urandom(BIG) if compression is None else os.urandom(4096) * (BIG // 4096)
                await within(client.send(data), 20)
                assert await within(client.recv(), 20) == data
                if compression is None:
                    text = "0123456789abcdef" * (BIG // 16)
                    await within(client.send(text), 20)
                    assert await within(client.recv(), 20) == text

    run(main, 60)


@pytest.mark.parametrize("compress", [0, 15])
def test_16_mib_message_aiohttp_client(websockets: ModuleType, compress: int) -> None:
    """aiohttp sends and receives a 16 MiB message through our server."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with aiohttp_ws(
                uri(server, "/echo"), compress=compress, max_msg_size=MAX_SIZE
            ) as (ws, _):
                data = os.urandom(BIG) if compress == 0 else os.urandom(4096) * (BIG // 4096)
                await within(ws.send_bytes(data), 20)
                msg = await within(ws.receive(), 20)
                assert msg.type == aiohttp.WSMsgType.BINARY
                assert msg.data == data

    run(main, 60)


def test_message_over_max_size_closes_with_1009(websockets: ModuleType) -> None:
    """One byte over max_size: each client sees close code 1009 (message too big)."""

    async def main() -> None:
        async with echo_server(websockets, max_size=2**16) as (server, _):
            async with connect(uri(server, "/echo")) as client:
                await within(client.send(b"x" * 2**16))
                assert await within(client.recv()) == b"x" * 2**16
                await within(client.send(b"x" * (2**16 + 1)))
                with pytest.raises(ConnectionClosedError) as caught:
                    await within(client.recv())
                assert caught.value.rcvd is not None
                assert caught.value.rcvd.code == 1009
            async with aiohttp_ws(uri(server, "/echo")) as (ws, _):
                await within(ws.send_bytes(b"x" * (2**16 + 1)))
                msg = await within(ws.receive())
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert msg.data == 1009

    run(main)


# --- ping / pong ---


def test_ping_pong_websockets_client(websockets: ModuleType) -> None:
    """Client pings get pongs; server pings get answered and yield a latency."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with connect(uri(server, "/echo")) as client:
                latency = await within(await within(client.ping(b"client ping")))
                assert 0 <= latency < STEP
            async with connect(uri(server, "/ping")) as client:
                reply = await within(client.recv())
                assert reply.startswith("latency ")
                assert 0 <= float(reply.split()[1]) < STEP

    run(main)


def test_ping_pong_aiohttp_client(websockets: ModuleType) -> None:
    """aiohttp sees our pong carrying its payload, and answers our ping (autoping)."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with aiohttp_ws(uri(server, "/echo"), autoping=False) as (ws, _):
                await within(ws.ping(b"payload-123"))
                msg = await within(ws.receive())
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"payload-123")
                await within(ws.send_str("after ping"))
                msg = await within(ws.receive())
                assert msg.data == "after ping"
            async with aiohttp_ws(uri(server, "/ping")) as (ws, _):
                msg = await within(ws.receive())
                assert msg.type == aiohttp.WSMsgType.TEXT
                assert msg.data.startswith("latency ")

    run(main)


def test_keepalive_closes_unresponsive_client_with_1011(websockets: ModuleType) -> None:
    """With ping_interval/ping_timeout set, a client that never pongs is closed with 1011."""

    async def main() -> None:
        async with echo_server(websockets, ping_interval=0.2, ping_timeout=0.2) as (server, _):
            async with aiohttp_ws(uri(server, "/echo"), autoping=False) as (ws, _):
                pings = 0
                while (msg := await within(ws.receive())).type == aiohttp.WSMsgType.PING:
                    pings += 1
                assert pings >= 1
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1011)

    run(main)


def test_keepalive_keeps_responsive_client(websockets: ModuleType) -> None:
    """A client answering each keepalive ping stays connected through several of them."""

    async def main() -> None:
        async with echo_server(websockets, ping_interval=0.1, ping_timeout=1) as (server, _):
            async with aiohttp_ws(uri(server, "/echo"), autoping=False) as (ws, _):
                for _ in range(3):
                    msg = await within(ws.receive())
                    assert msg.type == aiohttp.WSMsgType.PING
                    await within(ws.pong(msg.data))
                await within(ws.send_str("alive"))
                while (msg := await within(ws.receive())).type == aiohttp.WSMsgType.PING:
                    await within(ws.pong(msg.data))
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "alive")

    run(main)


# --- close codes and reasons ---


CLOSES = [(1000, "bye"), (1001, "going away"), (4000, "custom reason"), (4999, "")]


@pytest.mark.parametrize(("code", "reason"), CLOSES)
def test_server_close_seen_by_websockets_client(
    websockets: ModuleType, code: int, reason: str
) -> None:
    """The code and reason the handler closes with are what the client receives."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with connect(uri(server, f"/close/{code}/{quote(reason)}")) as client:
                expected = ConnectionClosedOK if code in (1000, 1001) else ConnectionClosedError
                with pytest.raises(expected) as caught:
                    await within(client.recv())
                assert caught.value.rcvd is not None
                assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (code, reason)

    run(main)


@pytest.mark.parametrize(("code", "reason"), CLOSES)
def test_server_close_seen_by_aiohttp_client(
    websockets: ModuleType, code: int, reason: str
) -> None:
    """aiohttp gets a CLOSE message with our code and reason, and records the code."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with aiohttp_ws(uri(server, f"/close/{code}/{quote(reason)}")) as (ws, _):
                msg = await within(ws.receive())
                assert msg.type == aiohttp.WSMsgType.CLOSE
                assert (msg.data, msg.extra) == (code, reason)
                assert ws.close_code == code

    run(main)


@pytest.mark.parametrize(("code", "reason"), [(1000, "done"), (4001, "client reason ✓")])
def test_client_close_seen_by_server(websockets: ModuleType, code: int, reason: str) -> None:
    """The handler's ``close_code`` / ``close_reason`` are what each client closed with."""

    async def main() -> None:
        async with echo_server(websockets) as (server, record):
            async with connect(uri(server, "/echo")) as client:
                await within(client.close(code, reason))
            assert await within(record.closes.get()) == (code, reason)
            async with aiohttp_ws(uri(server, "/echo")) as (ws, _):
                await within(ws.close(code=code, message=reason.encode()))
                assert ws.close_code == code
            assert await within(record.closes.get()) == (code, reason)

    run(main)


def test_handler_error_seen_as_1011_by_aiohttp(websockets: ModuleType) -> None:
    """A failing handler reaches aiohttp as close code 1011."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with aiohttp_ws(uri(server, "/raise")) as (ws, _):
                await within(ws.send_str("go"))
                msg = await within(ws.receive())
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1011)

    run(main)


# --- subprotocols ---


def test_subprotocol_negotiation_websockets_client(websockets: ModuleType) -> None:
    """The server picks the subprotocol it supports from what the client offers."""

    async def main() -> None:
        async with echo_server(websockets, subprotocols=["chat"]) as (server, record):
            for offered in (["chat"], ["superchat", "chat"]):
                async with connect(uri(server, "/subprotocol"), subprotocols=offered) as client:
                    assert client.subprotocol == "chat"
                    assert client.response.headers["Sec-WebSocket-Protocol"] == "chat"
                    assert await within(client.recv()) == "chat"
                assert await within(record.subprotocols.get()) == "chat"

    run(main)


def test_subprotocol_negotiation_aiohttp_client(websockets: ModuleType) -> None:
    """aiohttp's ``protocols=`` negotiates the same way."""

    async def main() -> None:
        async with echo_server(websockets, subprotocols=["chat"]) as (server, _):
            async with aiohttp_ws(uri(server, "/subprotocol"), protocols=("chat",)) as (ws, hdrs):
                assert ws.protocol == "chat"
                assert hdrs["Sec-WebSocket-Protocol"] == "chat"
                msg = await within(ws.receive())
                assert msg.data == "chat"

    run(main)


def test_no_subprotocol_when_server_has_none(websockets: ModuleType) -> None:
    """A server without subprotocols answers without one; the connection still works."""

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            async with connect(uri(server, "/subprotocol"), subprotocols=["chat"]) as client:
                assert client.subprotocol is None
                assert "Sec-WebSocket-Protocol" not in client.response.headers
                assert await within(client.recv()) == "none"
            async with aiohttp_ws(uri(server, "/subprotocol"), protocols=("chat",)) as (ws, _):
                assert ws.protocol is None
                msg = await within(ws.receive())
                assert msg.data == "none"

    run(main)


# --- many clients at once ---


def test_many_mixed_clients_concurrently(websockets: ModuleType) -> None:
    """Twenty clients of both libraries, interleaved, each get only their own echoes."""

    async def one_websockets(server: Any, n: int) -> None:
        async with connect(uri(server, "/echo")) as client:
            for i in range(20):
                await within(client.send(f"ws{n}-{i}"))
                assert await within(client.recv()) == f"ws{n}-{i}"

    async def one_aiohttp(server: Any, n: int) -> None:
        async with aiohttp_ws(uri(server, "/echo"), compress=15) as (ws, _):
            for i in range(20):
                await within(ws.send_bytes(f"aio{n}-{i}".encode()))
                msg = await within(ws.receive())
                assert msg.data == f"aio{n}-{i}".encode()

    async def main() -> None:
        async with echo_server(websockets) as (server, _):
            await within(
                asyncio.gather(
                    *(one_websockets(server, n) for n in range(10)),
                    *(one_aiohttp(server, n) for n in range(10)),
                ),
                15,
            )

    run(main)
