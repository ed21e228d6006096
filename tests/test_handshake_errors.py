"""Bad opening handshakes, written byte by byte on raw TCP sockets.

A WebSocket server faces whatever the network sends: wrong methods, old HTTP, missing or bogus
headers, oversized requests, garbage, silence. Each case pins the HTTP status the server answers
with (per RFC 6455 / RFC 9110) and checks that a well-behaved client on the same server is served
right after, because one misbehaving client must never disturb the others.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.typing import Origin
from wshelp import (
    address,
    new_key,
    open_raw,
    raw_exchange,
    read_response,
    read_to_eof,
    run,
    upgrade_request,
    uri,
    within,
)

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def echo(websocket: Any) -> None:
    async for message in websocket:
        await websocket.send(message)


async def assert_serving(server: Any, origin: str | None = None) -> None:
    """A well-behaved client connects and round-trips a message."""
    async with connect(uri(server), origin=Origin(origin) if origin else None) as client:
        await within(client.send("still serving"))
        assert await within(client.recv()) == "still serving"


async def rejected(websockets: ModuleType, request: bytes, **kwargs: Any) -> Any:
    """Send ``request`` to a fresh echo server, return its response, check others still work."""
    async with websockets.serve(echo, "127.0.0.1", 0, **kwargs) as server:
        response = await raw_exchange(server, request)
        allowed = [origin for origin in kwargs.get("origins") or [] if origin is not None]
        await assert_serving(server, allowed[0] if allowed else None)
        return response


def accept_for(key: str) -> str:
    """The Sec-WebSocket-Accept value RFC 6455 section 4.2.2 derives from a key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A single final client frame (payload < 126 bytes), masked as clients must."""
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


# --- the baseline the error cases are measured against ---


def test_valid_raw_handshake(websockets: ModuleType) -> None:
    """A valid request gets 101 with the RFC's accept value, then frames flow."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            key = new_key()
            reader, writer = await open_raw(*address(server))
            try:
                writer.write(upgrade_request(Sec_WebSocket_Key=key))
                response = await read_response(reader)
                assert response.status == 101
                assert response.header("Sec-WebSocket-Accept") == accept_for(key)
                assert (response.header("Upgrade") or "").lower() == "websocket"
                assert "upgrade" in (response.header("Connection") or "").lower()
                writer.write(masked_frame(0x1, b"raw frame"))
                # The echo: an unmasked final text frame carrying the same payload.
                assert await within(reader.readexactly(11)) == b"\x81\x09raw frame"
            finally:
                writer.close()

    run(main)


def test_frame_pipelined_with_request_is_not_lost(websockets: ModuleType) -> None:
    """A frame arriving in the same segment as the request (a client that doesn't wait for the
    101, which RFC 6455 section 4.1 forbids but the network can't rule out) is processed: bytes
    read past the end of the request must stay buffered, never be dropped."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            reader, writer = await open_raw(*address(server))
            try:
                writer.write(upgrade_request() + masked_frame(0x1, b"pipelined"))
                assert (await read_response(reader)).status == 101
                assert await within(reader.readexactly(11)) == b"\x81\x09pipelined"
            finally:
                writer.close()

    run(main)


def test_request_trickled_byte_by_byte(websockets: ModuleType) -> None:
    """A request split across many tiny TCP segments is reassembled and accepted."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            reader, writer = await open_raw(*address(server))
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                for i, byte in enumerate(upgrade_request()):
                    writer.write(bytes([byte]))
                    await within(writer.drain())
                    if i % 16 == 0:
                        await asyncio.sleep(0)  # let the server see partial data
                assert (await read_response(reader)).status == 101
            finally:
                writer.close()

    run(main)


def test_lowercase_header_names_accepted(websockets: ModuleType) -> None:
    """Header names are case-insensitive (HTTP/2-style lowercase proxies exist)."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            request = (
                "GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
                f"connection: upgrade\r\nsec-websocket-key: {new_key()}\r\n"
                "sec-websocket-version: 13\r\n\r\n"
            )
            response = await raw_exchange(server, request.encode())
            assert response.status == 101

    run(main)


@pytest.mark.parametrize(
    "overrides",
    [
        {"Upgrade": "WebSocket"},
        {"Connection": "keep-alive, Upgrade"},
        {"Connection": "upgrade"},
    ],
    ids=["upgrade-case", "connection-list", "connection-case"],
)
def test_tolerated_header_variants(websockets: ModuleType, overrides: dict[str, str]) -> None:
    """Header values are case-insensitive and Connection is a list (browsers send both forms)."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            response = await raw_exchange(server, upgrade_request(**overrides))
            assert response.status == 101

    run(main)


# --- request line ---


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_method_not_get_is_405(websockets: ModuleType, method: str) -> None:
    """Only GET can open a WebSocket; 405 must say so with an ``Allow`` header."""
    response = run(lambda: rejected(websockets, upgrade_request(method=method)))
    assert response.status == 405
    assert "GET" in (response.header("Allow") or "")


def test_http_1_0_is_505(websockets: ModuleType) -> None:
    """The opening handshake needs HTTP/1.1 or later: HTTP/1.0 gets 505."""
    response = run(lambda: rejected(websockets, upgrade_request(version="HTTP/1.0")))
    assert response.status == 505


def test_request_line_too_long_is_414(websockets: ModuleType) -> None:
    """A 10 KB request target is refused with 414 rather than buffered."""
    response = run(lambda: rejected(websockets, upgrade_request("/" + "a" * 10_000)))
    assert response.status == 414


# --- Upgrade / Connection ---


@pytest.mark.parametrize(
    ("drop", "overrides"),
    [
        (["Upgrade"], {}),
        ([], {"Upgrade": "h2c"}),
        (["Connection"], {}),
        ([], {"Connection": "keep-alive"}),
        (["Upgrade", "Connection"], {}),
    ],
    ids=["no-upgrade", "upgrade-h2c", "no-connection", "connection-keep-alive", "plain-get"],
)
def test_missing_or_invalid_upgrade_is_426(
    websockets: ModuleType, drop: list[str], overrides: dict[str, str]
) -> None:
    """Without a WebSocket upgrade request the answer is 426 naming ``Upgrade: websocket``."""
    request = upgrade_request(drop=drop, **overrides)
    response = run(lambda: rejected(websockets, request))
    assert response.status == 426
    assert (response.header("Upgrade") or "").lower() == "websocket"


# --- Sec-WebSocket-Key / Sec-WebSocket-Version ---


@pytest.mark.parametrize(
    ("drop", "overrides"),
    [
        (["Sec-WebSocket-Key"], {}),
        ([], {"Sec_WebSocket_Key": "not base64!"}),
        ([], {"Sec_WebSocket_Key": base64.b64encode(b"fifteen bytes!!").decode()}),
        ([], {"Sec_WebSocket_Key": base64.b64encode(b"seventeen bytes!!").decode()}),
    ],
    ids=["missing", "not-base64", "15-bytes", "17-bytes"],
)
def test_bad_key_is_400(websockets: ModuleType, drop: list[str], overrides: dict[str, str]) -> None:
    """The key must be present and be base64 of exactly 16 bytes."""
    request = upgrade_request(drop=drop, **overrides)
    response = run(lambda: rejected(websockets, request))
    assert response.status == 400


def test_duplicate_key_is_400(websockets: ModuleType) -> None:
    """Two Sec-WebSocket-Key headers make the request ambiguous: 400."""
    request = upgrade_request(extra=[("Sec-WebSocket-Key", new_key())])
    response = run(lambda: rejected(websockets, request))
    assert response.status == 400


@pytest.mark.parametrize(
    ("drop", "overrides"),
    [(["Sec-WebSocket-Version"], {}), ([], {"Sec_WebSocket_Version": "8"})],
    ids=["missing", "version-8"],
)
def test_bad_version_is_400(
    websockets: ModuleType, drop: list[str], overrides: dict[str, str]
) -> None:
    """Only version 13 is spoken; anything else, or nothing, is 400."""
    request = upgrade_request(drop=drop, **overrides)
    response = run(lambda: rejected(websockets, request))
    assert response.status == 400


@pytest.mark.hub_only("websockets answers 400 without the Sec-WebSocket-Version header")
def test_bad_version_response_names_13(websockets: ModuleType) -> None:
    """RFC 6455 section 4.4: the 400 for a wrong version tells the client to use 13."""
    request = upgrade_request(Sec_WebSocket_Version="8")
    response = run(lambda: rejected(websockets, request))
    assert response.status == 400
    assert response.header_values("Sec-WebSocket-Version") == ["13"]


# --- Origin ---


@pytest.mark.parametrize(
    ("origin", "status"),
    [("https://good.example", 101), ("https://evil.example", 403), (None, 403)],
    ids=["allowed", "foreign", "absent"],
)
def test_origin_checked_against_origins(
    websockets: ModuleType, origin: str | None, status: int
) -> None:
    """With ``origins=[...]``, only listed origins pass; no Origin passes only if None is listed."""
    request = (
        upgrade_request(Origin=origin) if origin is not None else upgrade_request(drop=["Origin"])
    )
    response = run(lambda: rejected(websockets, request, origins=["https://good.example"]))
    assert response.status == status


def test_absent_origin_allowed_when_none_listed(websockets: ModuleType) -> None:
    """``None`` in ``origins`` admits clients that send no Origin (non-browser clients)."""
    response = run(
        lambda: rejected(websockets, upgrade_request(), origins=["https://good.example", None])
    )
    assert response.status == 101


# --- size limits ---


@pytest.mark.parametrize(
    "extra",
    [
        [(f"X-Header-{i}", "v") for i in range(300)],
        [("X-Big", "v" * 100_000)],
    ],
    ids=["300-headers", "one-100KB-header"],
)
def test_headers_too_many_or_too_large_is_431(
    websockets: ModuleType, extra: list[tuple[str, str]]
) -> None:
    """Header floods are refused with 431 instead of being buffered without bound."""
    response = run(lambda: rejected(websockets, upgrade_request(extra=extra)))
    assert response.status == 431


@pytest.mark.hub_only("websockets bounds header count and line length, not the block's total")
def test_header_block_too_large_in_total_is_431(websockets: ModuleType) -> None:
    """100 headers of 1 KB each (100 KB in all, every line short) are refused too."""
    extra = [(f"X-Header-{i}", "v" * 1000) for i in range(100)]
    response = run(lambda: rejected(websockets, upgrade_request(extra=extra)))
    assert response.status == 431


# --- garbage and silence ---


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello
        b"\x00" * 64 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nthis is not a header\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\r\n\r\n",
    ],
    ids=["tls", "nul-bytes", "headerless-line", "ssh-banner", "empty-lines"],
)
def test_garbage_gets_connection_closed(websockets: ModuleType, data: bytes) -> None:
    """Bytes that aren't HTTP end with the TCP connection closed (after at most a 400)."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0) as server:
            reader, writer = await open_raw(*address(server))
            try:
                writer.write(data)
                await within(writer.drain())
                received = await read_to_eof(reader)
                assert received == b"" or received.startswith(b"HTTP/1.1 400 "), received[:80]
            finally:
                writer.close()
            await assert_serving(server)

    run(main)


@pytest.mark.parametrize(
    "data",
    [b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["silent", "stalled-mid-headers"],
)
def test_open_timeout_closes_idle_connection(websockets: ModuleType, data: bytes) -> None:
    """A client that sends nothing (or stops mid-request) is dropped after ``open_timeout``,
    and while it idles, other clients are served normally."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with websockets.serve(echo, "127.0.0.1", 0, open_timeout=1) as server:
            reader, writer = await open_raw(*address(server))
            started = loop.time()
            try:
                writer.write(data)
                await assert_serving(server)
                received = await read_to_eof(reader)
                elapsed = loop.time() - started
                assert received == b"" or received.startswith(b"HTTP/1.1 "), received[:80]
                assert 0.5 < elapsed < 4, f"closed after {elapsed:.2f}s, open_timeout=1"
            finally:
                writer.close()
            await assert_serving(server)

    run(main)


def test_many_idle_connections_do_not_block_others(websockets: ModuleType) -> None:
    """Fifty half-open handshakes pending at once still leave room for a real client."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0, open_timeout=2) as server:
            idle = [await open_raw(*address(server)) for _ in range(50)]
            try:
                for _, writer in idle:
                    writer.write(b"GET / HTTP/1.1\r\n")
                await assert_serving(server)
            finally:
                for _, writer in idle:
                    writer.close()

    run(main)


# --- shutdown during a handshake ---


def test_close_during_handshake_is_503(websockets: ModuleType) -> None:
    """A handshake still in progress when the server closes is answered 503."""

    async def main() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()

        async def process_request(connection: Any, request: Any) -> None:
            entered.set()
            await release.wait()

        serving = websockets.serve(echo, "127.0.0.1", 0, process_request=process_request)
        server = await within(serving)
        reader, writer = await open_raw(*address(server))
        try:
            writer.write(upgrade_request())
            await within(entered.wait())
            server.close()
            await asyncio.sleep(0)  # let a close scheduled as a task start
            release.set()
            response = await read_response(reader)
            assert response.status == 503
            assert await read_to_eof(reader) == b""
        finally:
            writer.close()
        await within(server.wait_closed())

    run(main)


def test_close_while_request_half_sent_is_503(websockets: ModuleType) -> None:
    """A client still sending its request when the server closes gets 503 once it finishes."""

    async def main() -> None:
        server = await within(websockets.serve(echo, "127.0.0.1", 0))
        request = upgrade_request()
        reader, writer = await open_raw(*address(server))
        try:
            writer.write(request[:20])
            await within(writer.drain())
            # The kernel accepts in order: once a later client is served, this one was accepted.
            await assert_serving(server)
            server.close()
            await asyncio.sleep(0)  # let a close scheduled as a task start
            writer.write(request[20:])
            await within(writer.drain())
            response = await read_response(reader)
            assert response.status == 503
            assert await read_to_eof(reader) == b""
        finally:
            writer.close()
        await within(server.wait_closed())

    run(main)
