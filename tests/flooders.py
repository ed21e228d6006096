"""Hostile clients for the soak (tests/test_hostile_soak.py), run as their own process so that
their CPU use does not slow the well-behaved clients' reading in the test process.

``python flooders.py PORT SECONDS`` runs every kind for SECONDS against the hub on PORT and prints
one JSON object: per kind, how many connections it opened, what it did and how each connection
ended (close code, ``reset`` or ``refused`` handshake). Each kind reconnects whenever the hub
closes it, so the pressure lasts the whole run. Paced with short sleeps so that the run stays a
load on the hub, not a denial of service on a shared machine; loopback only.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from stallfix import TCP_ESTABLISHED, client_frame, tcp_state, token

KINDS = {  # kind -> how many run side by side
    "pinger": 2,  # pings in bursts, reads the pongs
    "silent_pinger": 2,  # pings and never reads: the hub must push back, not buffer pongs
    "refused": 2,  # commands the hub refuses: publish without permission, forbidden subscribe
    "history": 2,  # history of random channels
    "oversized": 2,  # messages over max_message_size, and a frame header claiming 2**62 bytes
    "stalled": 4,  # subscribes to the soak's channel and never reads
    "garbage": 1,  # malformed commands (abuse) and a frame with reserved bits
}


class Closed(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class Stats:
    def __init__(self) -> None:
        self.connections = Counter[str]()
        self.actions = Counter[str]()
        self.endings: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}

    def summary(self) -> dict[str, Any]:
        return {
            kind: {
                "connections": self.connections[kind],
                "actions": self.actions[kind],
                "endings": dict(self.endings[kind]),
            }
            for kind in KINDS
        }


def _request(port: int, user: str) -> bytes:
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    return (
        f"GET /ws?token={token(user)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: hub.v1.json\r\n\r\n"
    ).encode()


async def _socket(port: int, *, rcvbuf: int = 0, sndbuf: int = 0, mss: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if mss:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


class Stream:
    """A client connection read and written through asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, user: str) -> Stream:
        sock = await _socket(port)
        reader, writer = await asyncio.open_connection(sock=sock)
        self = cls(reader, writer)
        writer.write(_request(port, user))
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise Closed("refused")
        return self

    def send(self, opcode: int, payload: bytes) -> None:
        self.writer.write(client_frame(opcode, payload))

    async def frame(self) -> tuple[int, bytes]:
        """The next frame (pings answered); :class:`Closed` with the code at a close frame."""
        reader = self.reader
        head = await reader.readexactly(2)
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(n)
        opcode = head[0] & 0x0F
        if opcode == 0x9:  # the hub's keepalive: answer it, stay connected, keep flooding
            self.send(0xA, payload)
        if opcode == 0x8:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            raise Closed(str(code))
        return opcode, payload

    async def reply(self) -> dict[str, Any]:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                message = json.loads(payload)
                if "id" in message:
                    return message

    def close(self) -> None:
        self.writer.transport.abort()


async def _forever(
    kind: str, stats: Stats, until: float, run: Callable[[int], Awaitable[None]]
) -> None:
    """Run one connection after another until ``until``, counting how each ended."""
    n = 0
    while time.monotonic() < until:
        n += 1
        stats.connections[kind] += 1
        try:
            await asyncio.wait_for(run(n), max(until - time.monotonic(), 0.01))
            how = "done"
        except Closed as exc:
            how = exc.how
        except (ConnectionError, asyncio.IncompleteReadError):
            how = "reset"
        except TimeoutError:
            how = "open at the end"
        stats.endings[kind][how] += 1
        await asyncio.sleep(0.05)


async def main(port: int, seconds: float) -> dict[str, Any]:
    stats = Stats()
    until = time.monotonic() + seconds
    pid = os.getpid()

    async def pinger(i: int, n: int) -> None:
        stream = await Stream.open(port, f"flood-ping-{pid}-{i}")
        try:
            while True:
                for k in range(50):
                    stream.send(0x9, b"%d" % k * 20)
                await stream.writer.drain()
                for _ in range(50):
                    while (await stream.frame())[0] != 0xA:
                        pass
                stats.actions["pinger"] += 50
                await asyncio.sleep(0.01)
        finally:
            stream.close()

    async def silent_pinger(i: int, n: int) -> None:
        # A tiny receive buffer, never read; Ethernet-sized segments and a small send buffer so
        # that the queues on the way fill up in seconds.
        loop = asyncio.get_running_loop()
        sock = await _socket(port, rcvbuf=4096, sndbuf=16384, mss=1400)
        try:
            await loop.sock_sendall(sock, _request(port, f"flood-silent-{pid}-{i}"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 1)
                if not chunk:
                    raise Closed("refused")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise Closed("refused")
            pings = client_frame(0x9, b"p" * 125) * 32
            pending = bytearray(pings)
            while tcp_state(sock) == TCP_ESTABLISHED:
                try:
                    sent = sock.send(pending)
                except BlockingIOError:
                    await asyncio.sleep(0.1)  # pushed back: what the hub must do
                    continue
                stats.actions["silent_pinger"] += sent
                del pending[:sent]
                if not pending:
                    pending = bytearray(pings)
                await asyncio.sleep(0.002)
            raise Closed("reset" if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else "fin")
        finally:
            sock.close()

    async def refused(i: int, n: int) -> None:
        stream = await Stream.open(port, f"flood-refused-{pid}-{i}")
        try:
            cid = 0
            while True:
                for _ in range(10):
                    cid += 1
                    command = {"op": "publish", "channel": "feed", "data": {"seq": -1}, "id": cid}
                    stream.send(0x1, json.dumps(command).encode())
                    cid += 1
                    command = {"op": "subscribe", "channel": f"secret:{cid}", "id": cid}
                    stream.send(0x1, json.dumps(command).encode())
                for _ in range(20):
                    reply = await stream.reply()
                    assert "error" in reply, reply
                    stats.actions["refused"] += 1
                await asyncio.sleep(0.01)
        finally:
            stream.close()

    async def history(i: int, n: int) -> None:
        stream = await Stream.open(port, f"flood-history-{pid}-{i}")
        try:
            cid = 0
            while True:
                for _ in range(10):
                    cid += 1
                    channel = f"hist:{os.urandom(8).hex()}"
                    command = {"op": "history", "channel": channel, "id": cid}
                    stream.send(0x1, json.dumps(command).encode())
                for _ in range(10):
                    await stream.reply()
                    stats.actions["history"] += 1
                await asyncio.sleep(0.01)
        finally:
            stream.close()

    async def oversized(i: int, n: int) -> None:
        stream = await Stream.open(port, f"flood-big-{pid}-{i}")
        try:
            if n % 2:
                stream.send(0x1, b'"' + b"x" * 70_000 + b'"')  # over max_message_size
            else:  # a header claiming 2**62 bytes, then a trickle of them
                stream.writer.write(bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 62) + b"mask")
            await stream.writer.drain()
            stats.actions["oversized"] += 1
            while True:
                await stream.frame()
        finally:
            stream.close()

    async def stalled(i: int, n: int) -> None:
        loop = asyncio.get_running_loop()
        sock = await _socket(port, rcvbuf=4096, mss=1400)
        try:
            await loop.sock_sendall(sock, _request(port, f"flood-stalled-{pid}-{i}"))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await loop.sock_recv(sock, 1)
                if not chunk:
                    raise Closed("refused")
                head += chunk
            if not head.startswith(b"HTTP/1.1 101"):
                raise Closed("refused")
            command = {"op": "subscribe", "channel": "feed", "id": 1}
            await loop.sock_sendall(sock, client_frame(0x1, json.dumps(command).encode()))
            stats.actions["stalled"] += 1
            while tcp_state(sock) == TCP_ESTABLISHED:  # never read a byte
                await asyncio.sleep(0.1)
            raise Closed("reset" if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) else "fin")
        finally:
            sock.close()

    async def garbage(i: int, n: int) -> None:
        stream = await Stream.open(port, f"flood-garbage-{pid}-{i}")
        try:
            if n % 3 == 0:  # reserved bits set: a protocol error
                stream.writer.write(bytes([0xF1, 0x80]) + b"mask")
            else:
                for k in range(20):
                    junk = [b"{", b"[]", b'{"op":1,"id":1}', b'{"op":"nope","id":2}', b"\xff"]
                    stream.send(0x1 if k % 5 != 4 else 0x2, junk[k % 5])
            await stream.writer.drain()
            stats.actions["garbage"] += 1
            while True:
                await stream.frame()
        finally:
            stream.close()

    behaviours: dict[str, Callable[[int, int], Awaitable[None]]] = {
        "pinger": pinger,
        "silent_pinger": silent_pinger,
        "refused": refused,
        "history": history,
        "oversized": oversized,
        "stalled": stalled,
        "garbage": garbage,
    }
    tasks = []
    for kind, count in KINDS.items():
        for i in range(count):

            def run(n: int, behaviour: Any = behaviours[kind], i: int = i) -> Awaitable[None]:
                return behaviour(i, n)

            tasks.append(asyncio.create_task(_forever(kind, stats, until, run)))
    await asyncio.gather(*tasks)
    return stats.summary()


if __name__ == "__main__":
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    print(json.dumps(asyncio.run(main(port, seconds))))
