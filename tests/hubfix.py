"""Helpers for the hub's end-to-end tests: a hub on an ephemeral port, protocol clients built on
the real ``websockets`` client, HTTP via ``aiohttp``, a metrics scraper, and a raw-socket client
that can stop reading (a slow consumer).

Every wait is bounded (``within`` / ``eventually``); nothing here reaches into the hub except
``running`` (which owns the hub's lifetime) and what a test explicitly inspects.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import socket
import struct
import tempfile
import textwrap
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol
from wshelp import STEP, within

from hub.app import Hub
from hub.config import Settings, load_settings

SECRET = "test-secret-0123456789abcdef0123456789"
API_KEY = "test-api-key-0123456789abcdef0123456789"
JSON_PROTO = "hub.v1.json"
MSGPACK_PROTO = "hub.v1.msgpack"


class _AnyClient(str):
    """Equal to any client id (32 hex digits): the ``client`` of a publication's ``from``."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 32 and other.isalnum()

    __hash__ = str.__hash__


ANY_CLIENT = _AnyClient("<any client id>")


# --- settings and the hub ----------------------------------------------------------------------


def make_settings(
    toml: str | None = None, env: Mapping[str, str] | None = None, **overrides: Any
) -> Settings:
    """Settings from an optional TOML text, an explicit environment (never os.environ) and
    overrides; port 0 (ephemeral) unless told otherwise. No credentials anywhere: dev mode
    (``insecure``), chosen here as a deployer must choose it."""
    overrides.setdefault("port", 0)
    env = dict(env or {})
    credentials = ("token_secret", "token_public_key")
    if not any(
        overrides.get(k) or env.get(f"HUB_{k.upper()}") or (toml and k in toml) for k in credentials
    ):
        overrides.setdefault("insecure", True)
    if toml is None:
        return load_settings(None, env=env, overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hub.toml"
        path.write_text(textwrap.dedent(toml))
        return load_settings(path, env=env, overrides=overrides)


def secure_settings(toml: str | None = None, **overrides: Any) -> Settings:
    """Settings that require tokens (HS256 with ``SECRET``) unless a public key is given."""
    if "token_public_key" not in overrides:
        overrides.setdefault("token_secret", SECRET)
    return make_settings(toml, **overrides)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Hub]:
    """A started hub on 127.0.0.1 and an ephemeral port; closed (bounded) on exit."""
    hub = Hub(settings)
    await within(hub.start())
    try:
        yield hub
    finally:
        await within(hub.close(), 15)


def ws_url(hub: Hub, path: str = "/ws", **query: str) -> str:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"ws://127.0.0.1:{hub.port}{path}" + (f"?{qs}" if qs else "")


def http_url(hub: Hub, path: str) -> str:
    return f"http://127.0.0.1:{hub.port}{path}"


# --- protocol clients --------------------------------------------------------------------------


class HubClient:
    """One client connection speaking the hub protocol in JSON or msgpack.

    ``call`` sends a command and returns its reply; pushes that arrive meanwhile are kept, in
    order, for ``push``. ``raw`` is the underlying ``websockets`` connection.
    """

    def __init__(self, raw: ClientConnection, binary: bool) -> None:
        self.raw = raw
        self.binary = binary
        self.pushes: deque[Any] = deque()
        self._push_raw: deque[bytes] = deque()
        self.frame_types: list[type] = []
        self.raw_last: bytes = b""  # the last message received (or push taken), as on the wire
        self._ids = itertools.count(1)

    def encode(self, obj: Any) -> str | bytes:
        if self.binary:
            return msgpack.packb(obj, use_bin_type=True)
        return json.dumps(obj)

    def decode(self, message: str | bytes) -> Any:
        self.frame_types.append(type(message))
        self.raw_last = message.encode() if isinstance(message, str) else message
        if isinstance(message, bytes):
            return msgpack.unpackb(message, raw=False)
        return json.loads(message)

    async def send(self, obj: Any) -> None:
        await within(self.raw.send(self.encode(obj)))

    async def send_raw(self, message: str | bytes) -> None:
        await within(self.raw.send(message))

    async def recv(self, timeout: float = STEP) -> Any:
        return self.decode(await within(self.raw.recv(), timeout))

    async def reply(self, cid: Any = None) -> dict[str, Any]:
        """The next reply (a message with an ``id`` key), stashing pushes on the way."""
        while True:
            message = await self.recv()
            if isinstance(message, dict) and "id" in message:
                if cid is not None:
                    assert message["id"] == cid, message
                return message
            self.pushes.append(message)
            self._push_raw.append(self.raw_last)

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        cid = next(self._ids)
        await self.send({"op": op, "id": cid, **fields})
        return await self.reply(cid)

    async def ok(self, op: str, **fields: Any) -> None:
        reply = await self.call(op, **fields)
        assert reply.get("result") == {}, reply

    async def error(self, op: str, **fields: Any) -> int:
        """Send a command that must fail; return its error code."""
        reply = await self.call(op, **fields)
        assert "error" in reply and "result" not in reply, reply
        assert isinstance(reply["error"].get("message"), str), reply
        return int(reply["error"]["code"])

    async def push(self, timeout: float = STEP) -> Any:
        if self.pushes:
            self.raw_last = self._push_raw.popleft()
            return self.pushes.popleft()
        return await self.recv(timeout)

    async def closed_with(self, timeout: float = STEP) -> tuple[int | None, str | None]:
        """Read until the server closes; the close code and reason it sent."""
        try:
            while True:
                self.pushes.append(self.decode(await within(self.raw.recv(), timeout)))
                self._push_raw.append(self.raw_last)
        except ConnectionClosed as exc:
            if exc.rcvd is None:
                return None, None
            return exc.rcvd.code, exc.rcvd.reason


@asynccontextmanager
async def client(
    hub: Hub,
    proto: str | None = JSON_PROTO,
    *,
    path: str = "/ws",
    headers: Mapping[str, str] | None = None,
    origin: str | None = None,
    **query: str,
) -> AsyncIterator[HubClient]:
    """A connected protocol client (no compression, no keepalive, short timeouts)."""
    raw = await within(
        connect(
            ws_url(hub, path, **query),
            subprotocols=[Subprotocol(proto)] if proto else None,
            additional_headers=dict(headers) if headers else None,
            origin=Origin(origin) if origin else None,
            compression=None,
            open_timeout=STEP,
            close_timeout=2,
            ping_interval=None,
            proxy=None,
        )
    )
    try:
        assert raw.subprotocol == proto
        yield HubClient(raw, binary=proto == MSGPACK_PROTO)
    finally:
        await within(raw.close())


# --- HTTP and metrics --------------------------------------------------------------------------


async def http(
    hub: Hub,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, Mapping[str, str], bytes]:
    """One HTTP request with aiohttp: (status, headers, body)."""
    timeout = aiohttp.ClientTimeout(total=STEP)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.request(
            method, http_url(hub, path), json=json_body, data=data, headers=headers
        ) as response:
            body = await response.read()
            return response.status, response.headers, body


async def api(hub: Hub, path: str, body: Any, key: str | None = API_KEY) -> tuple[int, Any]:
    """POST a JSON body to the HTTP API; (status, parsed JSON answer)."""
    headers = {"X-API-Key": key} if key is not None else None
    status, response_headers, raw = await http(hub, "POST", path, json_body=body, headers=headers)
    assert response_headers.get("Content-Type", "").startswith("application/json"), raw
    return status, json.loads(raw)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(hub: Hub) -> Samples:
    """``GET /metrics`` parsed with the Prometheus text parser."""
    status, _, body = await http(hub, "GET", "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent (a labelled counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(
    predicate: Callable[[], Any], timeout: float = STEP, interval: float = 0.01
) -> None:
    """Wait until ``predicate()`` is true (it may be async); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


# --- keys --------------------------------------------------------------------------------------


def keypair(kind: str) -> tuple[bytes, str]:
    """A fresh private key (PEM bytes, for signing) and its public key (PEM text)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if kind == "RS256":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(kind)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem.decode()


# --- a raw client that can stop reading ----------------------------------------------------------


class RawClient:
    """A WebSocket client on a bare non-blocking socket: nothing is read unless asked.

    The kernel's receive buffer is made small so that a client that stops reading pushes back on
    the server quickly.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buffer = b""

    @classmethod
    async def open(cls, hub: Hub, path: str, rcvbuf: int = 4096) -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        self = cls(sock)
        try:
            await within(self.loop.sock_connect(sock, ("127.0.0.1", hub.port)))
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{hub.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            )
            await within(self.loop.sock_sendall(sock, request.encode()))
            while b"\r\n\r\n" not in self.buffer:
                chunk = await within(self.loop.sock_recv(sock, 4096))
                assert chunk, "connection closed during the handshake"
                self.buffer += chunk
            head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
        except BaseException:
            sock.close()
            raise
        return self

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked
        await within(self.loop.sock_sendall(self.sock, frame))

    async def send_text(self, text: str) -> None:
        await self.send_frame(0x1, text.encode())

    async def _fill(self, n: int, timeout: float) -> bool:
        while len(self.buffer) < n:
            try:
                chunk = await within(self.loop.sock_recv(self.sock, 1 << 16), timeout)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return False
            self.buffer += chunk
        return True

    async def frame(self, timeout: float = STEP) -> tuple[int, bytes] | None:
        """The next (unmasked, unfragmented) frame from the server, or None at EOF."""
        if not await self._fill(2, timeout):
            return None
        b0, b1 = self.buffer[0], self.buffer[1]
        assert b0 & 0x80, "fragmented frame"
        assert not b1 & 0x80, "server frames must not be masked"
        length, offset = b1 & 0x7F, 2
        if length == 126:
            assert await self._fill(4, timeout)
            length, offset = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif length == 127:
            assert await self._fill(10, timeout)
            length, offset = struct.unpack("!Q", self.buffer[2:10])[0], 10
        assert await self._fill(offset + length, timeout), "EOF inside a frame"
        payload = self.buffer[offset : offset + length]
        self.buffer = self.buffer[offset + length :]
        return b0 & 0x0F, payload

    async def frames_until_close(self, timeout: float = STEP) -> list[tuple[int, bytes]]:
        """Frames up to and including the server's close frame (fails at EOF before it)."""
        frames = []
        while True:
            frame = await self.frame(timeout)
            assert frame is not None, "EOF without a close frame"
            frames.append(frame)
            if frame[0] == 0x8:
                return frames

    def close(self) -> None:
        self.sock.close()
