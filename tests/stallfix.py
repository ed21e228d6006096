"""Helpers for the hostile-client tests that run a real ``hub serve`` process: the process itself
(config, log, memory), stalled raw TCP clients that never read, and the kernel's view of TCP
sockets (``/proc/net/sockstat`` and ``/proc/net/tcp``), which is what shows a socket the hub gave
up on still holding memory.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import tempfile
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hubproc import HubProcess

from hub.tokens import mint_token

__all__ = [
    "API_KEY",
    "SECRET",
    "client_frame",
    "hub_process",
    "memory_kb",
    "metric",
    "orphans_of",
    "sockstat",
    "stalled_client",
    "status",
    "tcp_state",
    "token",
]

# Long enough for the production rules (at least 32 bytes outside dev mode).
SECRET = "stall-secret-0123456789abcdef0123456789"
API_KEY = "stall-api-key-0123456789abcdef0123456789"

TCP_ESTABLISHED, TCP_TIME_WAIT, TCP_CLOSE, TCP_CLOSE_WAIT = 1, 6, 7, 8


def token(user: str) -> str:
    return mint_token(user, SECRET, ttl=3600)


def pids(hub: HubProcess) -> list[int]:
    """The hub's process and its children (the workers, with ``workers > 1``)."""
    assert hub.process is not None
    pid = hub.process.pid
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return [pid]
    return [pid] + [int(p) for p in children.split()]


def memory_kb(hub: HubProcess, field: str = "VmRSS") -> int:
    """``field`` of /proc/PID/status (VmRSS now, VmHWM the peak), summed over ``pids(hub)``."""
    total = 0
    for pid in pids(hub):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith(field + ":"):
                total += int(line.split()[1])
    return total


def status(hub: HubProcess, path: str) -> int:
    """The HTTP status of ``GET path``."""
    try:
        with urllib.request.urlopen(hub.base + path, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def metric(hub: HubProcess, name: str) -> float:
    """The sum of a metric's samples over all its label sets (and all workers)."""
    with urllib.request.urlopen(hub.base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextmanager
def hub_process(
    toml: str = "", workers: int = 1, redis_url: str | None = None
) -> Iterator[HubProcess]:
    """``hub serve`` with a token secret and an API key; stopped (SIGTERM) at the end."""
    with tempfile.TemporaryDirectory(prefix="hub-hostile-") as tmp:
        hub = HubProcess(
            Path(tmp),
            f'workers = {workers}\ntoken_secret = "{SECRET}"\napi_key = "{API_KEY}"\n'
            "drain_seconds = 1\n" + textwrap.dedent(toml),
            redis_url,
        )
        hub.start()
        try:
            yield hub
        finally:
            hub.stop()
            print(f"--- hub log ---\n{hub.log.read_text()[-3000:]}")


# --- raw clients --------------------------------------------------------------------------------


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + masked


def _read_frame(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """One whole server frame (unmasked) from a blocking socket."""

    def need(n: int) -> None:
        while len(buffer) < n:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("eof")
            buffer.extend(chunk)

    need(2)
    n = buffer[1] & 0x7F
    start = 2
    if n == 126:
        need(4)
        n, start = struct.unpack("!H", buffer[2:4])[0], 4
    elif n == 127:
        need(10)
        n, start = struct.unpack("!Q", buffer[2:10])[0], 10
    need(start + n)
    opcode, payload = buffer[0] & 0x0F, bytes(buffer[start : start + n])
    del buffer[: start + n]
    return opcode, payload


def stalled_client(
    port: int, user: str, channel: str, rcvbuf: int = 4096, mss: int = 0, path: str = "/ws"
) -> socket.socket:
    """A client that opens a WebSocket, subscribes to ``channel``, then is left unread.

    ``SO_RCVBUF`` is set before connecting, so the window it advertises stays tiny and the hub's
    side of the connection fills up as soon as the client stops reading. ``mss`` (``TCP_MAXSEG``,
    also before connecting) makes loopback look like an Ethernet path: with loopback's 64 KiB
    segments the kernel grows the hub's send buffer to ``tcp_wmem`` max (4 MB) per connection.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET {path}?token={token(user)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: hub.v1.json\r\n\r\n"
            ).encode()
        )
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed during the handshake")
            buffer.extend(chunk)
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        buffer = bytearray(rest)
        sock.sendall(
            client_frame(0x1, b'{"op":"subscribe","channel":"%s","id":1}' % channel.encode())
        )
        opcode, payload = _read_frame(sock, buffer)
        assert (opcode, payload) == (0x1, b'{"id":1,"result":{}}'), (opcode, payload)
        assert not buffer, "nothing may follow the reply yet"
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (``tcpi_state``), read without touching its data."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


# --- the kernel's view ---------------------------------------------------------------------------


def sockstat() -> dict[str, int]:
    """The TCP line of /proc/net/sockstat: inuse, orphan, tw, alloc, mem (pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            return {fields[i]: int(fields[i + 1]) for i in range(0, len(fields), 2)}
    raise AssertionError("no TCP line in /proc/net/sockstat")


@dataclass(frozen=True)
class KernelSocket:
    state: int
    remote_port: int
    tx_queue: int
    rx_queue: int
    inode: int


def sockets_of(port: int) -> list[KernelSocket]:
    """Every IPv4 TCP socket whose local port is ``port`` (listening ones excepted)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], int(fields[3], 16)
        if int(local.rsplit(":", 1)[1], 16) != port or state == 0x0A:
            continue
        tx, rx = (int(x, 16) for x in fields[4].split(":"))
        found.append(KernelSocket(state, int(remote.rsplit(":", 1)[1], 16), tx, rx, int(fields[9])))
    return found


def orphans_of(port: int) -> list[KernelSocket]:
    """Sockets of ``port`` that no process holds any more (inode 0) but the kernel still keeps in
    a state that holds memory (anything but TIME_WAIT, which keeps a small stub only)."""
    return [s for s in sockets_of(port) if s.inode == 0 and s.state != TCP_TIME_WAIT]
