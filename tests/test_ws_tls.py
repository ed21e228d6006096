"""TLS is part of opening and closing: ``open_timeout`` bounds the TLS handshake and
``close_timeout`` bounds the TLS shutdown, so a client that stalls in either cannot hold a
connection for asyncio's own defaults (60 s and 30 s).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import socket
import ssl
import struct
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from wshelp import address, run, within


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1: (server context, client context trusting it)."""
    folder: Path = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert_file)
    return server, client


async def echo(ws: Any) -> None:
    async for message in ws:
        await ws.send(message)


def test_wss_works(websockets: ModuleType, tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0, ssl=server_ctx) as server:
            host, port = address(server)
            async with connect(f"wss://{host}:{port}/", ssl=client_ctx) as client:
                await client.send("secure")
                assert await within(client.recv()) == "secure"

    run(main)


def test_open_timeout_covers_the_tls_handshake(
    websockets: ModuleType, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A client that connects and never starts TLS is dropped after ``open_timeout``."""
    server_ctx, _ = tls

    async def main() -> None:
        async with websockets.serve(
            echo, "127.0.0.1", 0, ssl=server_ctx, open_timeout=0.3
        ) as server:
            reader, writer = await asyncio.open_connection(*address(server))
            started = time.monotonic()
            assert await within(reader.read(), 10) == b""  # closed by the server
            assert time.monotonic() - started < 5
            writer.close()

    run(main)


def _stalling_tls_client(port: int, client_ctx: ssl.SSLContext) -> float:
    """Open a wss connection by hand, send a close frame, read the server's, then stop: never
    answer the TLS close_notify. Returns how long the server took to drop the TCP connection."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    tls = client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    tls.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = tls.recv(4096)
        assert chunk, response
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(struct.pack("!H", 1000)))
    tls.sendall(b"\x88\x82" + mask + payload)
    frame = response.partition(b"\r\n\r\n")[2]
    while len(frame) < 4:
        frame += tls.recv(4096)
    assert frame[:2] == b"\x88\x02", frame  # the server's close frame
    started = time.monotonic()
    # Stall: read nothing more at the TLS level; only watch the raw socket for the hang-up.
    raw_fd = socket.socket(fileno=os.dup(tls.fileno()))
    try:
        raw_fd.settimeout(20)
        while True:
            try:
                if not raw_fd.recv(4096, socket.MSG_PEEK):
                    break
            except (ConnectionResetError, TimeoutError):
                break
            time.sleep(0.05)  # close_notify is waiting unread; poll until the socket ends
            try:
                raw_fd.recv(4096, socket.MSG_DONTWAIT)  # consume without answering
            except BlockingIOError:
                pass
    finally:
        raw_fd.close()
        tls.close()
    return time.monotonic() - started


def test_close_timeout_bounds_the_tls_shutdown(
    websockets: ModuleType, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A client that finishes the closing handshake but never answers the TLS shutdown is dropped
    after ``close_timeout``, not after asyncio's 30 s."""
    server_ctx, client_ctx = tls

    async def main() -> None:
        async with websockets.serve(
            echo, "127.0.0.1", 0, ssl=server_ctx, close_timeout=0.5
        ) as server:
            _, port = address(server)
            took = await within(asyncio.to_thread(_stalling_tls_client, port, client_ctx), 30)
            assert took < 10

    run(main, timeout=40)
