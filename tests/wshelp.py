"""Helpers shared by the hub.ws black-box tests: addresses, raw HTTP, bounded waits.

Everything here talks to a server from the outside (sockets, real clients), never to its internals,
so the same tests can run against hub.ws and against the ``websockets`` library.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

#: Upper bound for any single wait in these tests; a healthy server answers in milliseconds.
STEP = 5.0
#: Upper bound for one whole test coroutine.
TEST_TIMEOUT = 20.0


def run(main: Callable[[], Coroutine[Any, Any, T]], timeout: float = TEST_TIMEOUT) -> T:
    """Run one async test body in a fresh loop, bounded so a hang fails instead of stalling."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await main()

    if os.environ.get("HUB_TEST_LOOP") == "uvloop":  # set by tests/test_uvloop.py
        import uvloop

        return uvloop.run(bounded())
    return asyncio.run(bounded())


async def within(aw: Awaitable[T], timeout: float = STEP) -> T:
    """Await ``aw`` for at most ``timeout`` seconds: every wait in a test must be bounded."""
    return await asyncio.wait_for(aw, timeout)


def address(server: Any) -> tuple[str, int]:
    """Host and port of the server's first listening socket (servers here bind port 0)."""
    name = server.sockets[0].getsockname()
    return name[0], name[1]


def uri(server: Any, path: str = "/") -> str:
    """``ws://`` URI of the server's first listening socket, IPv6 literals bracketed."""
    host, port = address(server)
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{port}{path}"


def new_key() -> str:
    """A fresh, valid ``Sec-WebSocket-Key``: base64 of 16 random bytes."""
    return base64.b64encode(os.urandom(16)).decode()


def upgrade_request(
    path: str = "/",
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    drop: Iterable[str] = (),
    extra: Iterable[tuple[str, str]] = (),
    **override: str,
) -> bytes:
    """A WebSocket opening handshake request, valid unless told otherwise.

    ``drop`` removes headers by name, keyword arguments replace a header's value (underscores
    stand for dashes: ``Sec_WebSocket_Version="8"``), ``extra`` appends raw header lines.
    """
    headers = {
        "Host": "127.0.0.1",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": new_key(),
        "Sec-WebSocket-Version": "13",
    }
    for name, value in override.items():
        headers[name.replace("_", "-")] = value
    dropped = {name.lower() for name in drop}
    lines = [f"{method} {path} {version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in dropped]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class RawResponse:
    """An HTTP response read off a raw socket."""

    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive)."""
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """Read one response head and its body (by Content-Length, else up to EOF)."""
    head = await within(reader.readuntil(b"\r\n\r\n"))
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers.append((key.strip(), value.strip()))
    response = RawResponse(int(status), reason[0] if reason else "", headers)
    length = response.header("Content-Length")
    if int(status) == 101:
        return response
    if length is not None:
        response.body = await within(reader.readexactly(int(length)))
    else:
        response.body = await within(reader.read())
    return response


async def open_raw(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a plain TCP connection, bounded in time."""
    return await within(asyncio.open_connection(host, port))


async def raw_exchange(server: Any, data: bytes) -> RawResponse:
    """Send ``data`` on a fresh TCP connection, read one HTTP response, close."""
    reader, writer = await open_raw(*address(server))
    try:
        writer.write(data)
        await within(writer.drain())
        return await read_response(reader)
    finally:
        writer.close()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded).

    A reset counts as closed too: an aborted connection is a closed one, just less polite.
    """
    try:
        return await within(reader.read())
    except ConnectionResetError:
        return b""
