"""Benchmark the hub.ws WebSocket core against the ``websockets`` library, side by side.

Why one script, one run: CPU-per-message numbers drift between machines and even between runs, so
a ratio is only meaningful when both implementations are measured on the same machine in the same
run, interleaved scenario by scenario. The server code is identical for both: it uses only the
public API both share (``serve(handler, host, port, compression=..., max_size=...)``,
``broadcast(connections, message)``, ``async for message in ws: await ws.send(message)``) and gets
the implementation passed in.

Each server runs in its own subprocess so its CPU time (user+sys, ``getrusage`` in the server,
queried over a stdin/stdout control channel) and RSS are its own. Load comes from 2-4 client
processes running a minimal raw-socket WebSocket client on a bare epoll loop (handshake, frame
reader, masking, permessage-deflate inflate): its Python cost is ~1-3 us per message, so the
clients are not what the numbers measure. During broadcast rounds the clients sleep 1 ms and then
read whatever is ready without blocking in epoll_wait, so the server's sends never pay for waking
a client up: on loopback that wake-up would otherwise be charged to the server (+3 us per send
here), which a server talking to remote clients never pays.

    .venv/bin/python bench/ws_core.py                      # everything, both implementations
    .venv/bin/python bench/ws_core.py --quick              # smoke run, well under a minute
    .venv/bin/python bench/ws_core.py --impl websockets --only broadcast --json out.json

Scenarios, targets and method: see bench/README.md. Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import os
import platform
import random
import resource
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
IMPLS = ("websockets", "hub")
IMPL_LABEL = {"websockets": "websockets", "hub": "hub.ws", "floor": "floor"}
MAX_SIZE = 2**20
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
DEFLATE_TAIL = b"\x00\x00\xff\xff"
BCAST_SIZE = 100  # bytes per broadcast message
ECHO_SIZE = 64  # bytes per echo message
MAX_CLIENT_PROCS = 4

Json = dict[str, Any]


class BenchError(RuntimeError):
    """A scenario could not be measured (a process died, a timeout, a wrong message count)."""


# --------------------------------------------------------------------------------------------
# Shared helpers (every process)
# --------------------------------------------------------------------------------------------


def raise_nofile() -> int:
    """Lift the soft fd limit to the hard one: 10,000 sockets do not fit the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run_loop(coro: Coroutine[Any, Any, Any], use_uvloop: bool) -> Any:
    """Run on the default asyncio loop unless --uvloop: the same loop for both implementations."""
    if use_uvloop:
        import uvloop  # type: ignore[import-not-found]

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


def emit(obj: Json) -> None:
    """Write one control-channel line (JSON) to stdout; the parent reads them in order."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    """Wrap stdin in a StreamReader so control commands arrive without blocking the loop."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def rss_kb(pid: int | str = "self") -> int:
    """VmRSS in KiB from /proc: what the kernel really holds for the process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(user, sys) seconds of a process from /proc/<pid>/stat (clock ticks; used for clients)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat.

    Compared with what our own processes used, it shows how much other load shared the cores.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def clients_cpu(clients: list[Child]) -> tuple[float, float]:
    """Summed (user, sys) seconds of the client processes."""
    pairs = [proc_cpu_s(c.pid) for c in clients]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def make_messages(count: int, size: int, seed: int = 1) -> list[str]:
    """Distinct chat-like JSON texts of exactly ``size`` bytes, so deflate sees realistic input.

    Repeating one message would let a context-takeover compressor shrink it to a back-reference
    and flatter the deflate numbers.
    """
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(300)
    ]
    out = []
    for seq in range(count):
        room, user = rng.randrange(64), rng.randrange(10**4)
        head = f'{{"seq":{seq},"room":"r{room:02d}","from":"u{user:04d}","text":"'
        text = ""
        while len(head) + len(text) + 2 < size:
            text += rng.choice(words) + " "
        msg = head + text[: size - len(head) - 2] + '"}'
        assert len(msg.encode()) == size, msg
        out.append(msg)
    return out


# --------------------------------------------------------------------------------------------
# Server role: a subprocess running either implementation behind the same handler
# --------------------------------------------------------------------------------------------


def load_impl(impl: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Import (serve, broadcast) lazily, so ``--impl websockets`` works before hub.ws exists."""
    if impl == "hub":
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from hub.ws import broadcast, serve

        return serve, broadcast
    if impl == "websockets":
        from websockets.asyncio.server import broadcast as ws_broadcast
        from websockets.asyncio.server import serve as ws_serve

        return ws_serve, ws_broadcast
    if impl == "floor":
        return floor_serve, floor_broadcast
    raise ValueError(f"unknown impl {impl!r}")


class FloorConn(asyncio.Protocol):
    """The ``--floor`` reference: the least an asyncio server can do per connection.

    It answers the handshake and then only ever writes pre-encoded frames with one
    ``transport.write`` per recipient: no parsing, no keepalive, no compression. Its broadcast
    cost is the floor for any asyncio design that issues one write per recipient per message on
    this machine; only coalescing several messages into one write goes below it.
    """

    def __init__(self, handler: Callable[[Any], Any], tasks: set[asyncio.Task[Any]]) -> None:
        self.handler, self.tasks = handler, tasks
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.open:
            return  # clients send nothing but pongs, and the floor never pings
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        key = b""
        for line in self.buf[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open = True
        task = asyncio.ensure_future(self.handler(self))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def __aiter__(self) -> FloorConn:
        return self

    async def __anext__(self) -> str:
        await self.closed  # the floor never delivers a message to the handler
        raise StopAsyncIteration

    async def send(self, message: str) -> None:
        raise NotImplementedError("the floor reference only broadcasts")


@contextlib.asynccontextmanager
async def floor_serve(handler: Callable[[Any], Any], host: str, port: int, **_: Any) -> Any:
    """``serve`` for the floor reference (compression and max_size are ignored: never used)."""
    tasks: set[asyncio.Task[Any]] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FloorConn(handler, tasks), host, port)
    try:
        yield server
    finally:
        server.close()


def floor_broadcast(connections: Iterable[FloorConn], message: str) -> None:
    """Encode once (unmasked text frame, payload < 126 bytes), write the same bytes to all."""
    data = message.encode()
    frame = bytes((0x81, len(data))) + data
    for conn in connections:
        if conn.transport is not None and not conn.closed.done():
            conn.transport.write(frame)


def free_port() -> int:
    """A port the kernel just handed out; a fresh one per server keeps TIME_WAIT tuples apart."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def server_main(impl: str, compression: str, messages: int) -> None:
    """Serve until stdin closes, obeying control commands: stats, count, broadcast, quit."""
    serve, broadcast = load_impl(impl)
    pool = make_messages(max(messages, 1), BCAST_SIZE)
    clients: set[Any] = set()

    async def handler(ws: Any) -> None:
        clients.add(ws)
        try:
            async for message in ws:
                await ws.send(message)
        finally:
            clients.discard(ws)

    reader = await stdin_reader()
    port = free_port()
    comp = None if compression == "off" else "deflate"
    async with serve(handler, HOST, port, compression=comp, max_size=MAX_SIZE):
        emit({"ready": port, "pid": os.getpid()})
        for _ in range(1_000_000):  # bounded: the parent sends a few dozen commands
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "stats":
                if cmd.get("gc"):
                    gc.collect()
                    await asyncio.sleep(0.2)
                    gc.collect()
                ru = resource.getrusage(resource.RUSAGE_SELF)
                emit({"stats": True, "user": ru.ru_utime, "sys": ru.ru_stime, "rss_kb": rss_kb()})
            elif op == "count":
                emit({"count": len(clients)})
            elif op == "broadcast":
                m, batch = int(cmd["m"]), int(cmd["batch"])
                msgs = [pool[i % len(pool)] for i in range(m)]
                recipients = len(clients)
                t0 = time.perf_counter()
                for i in range(0, len(msgs), batch):
                    for msg in msgs[i : i + batch]:
                        broadcast(clients, msg)
                    await asyncio.sleep(0)
                loop_s = time.perf_counter() - t0
                emit({"sent": len(msgs), "recipients": recipients, "loop_s": loop_s})
            elif op == "quit":
                break
            else:
                emit({"error": f"unknown op {op!r}"})


# --------------------------------------------------------------------------------------------
# Client role: many raw-socket WebSocket connections on one epoll loop (no asyncio)
# --------------------------------------------------------------------------------------------


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client->server frame (RFC 6455 5.3) with a fresh random key."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    keystream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")
    return head + key + masked


def handshake_request(key: bytes, port: int, deflate: bool) -> bytes:
    """The opening handshake; with ``deflate`` it offers permessage-deflate like browsers do."""
    ext = f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n" if deflate else ""
    return (
        f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    ).encode()


def check_handshake(key: bytes, head: str, deflate: bool) -> tuple[Any, str | None]:
    """Validate the 101 response; return (inflater or None, the extension header as sent)."""
    lines = head.split("\r\n")
    if not lines[0].startswith("HTTP/1.1 101"):
        raise BenchError(f"handshake refused: {lines[0]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != accept:
        raise BenchError("bad Sec-WebSocket-Accept")
    ext = headers.get("sec-websocket-extensions")
    if not ext:
        return None, None
    params = [p.strip() for p in ext.split(";")]
    if params[0] != "permessage-deflate" or not deflate:
        raise BenchError(f"unexpected extension {ext!r}")
    bits = 15
    for p in params[1:]:
        name, _, value = p.partition("=")
        if name.strip() == "server_max_window_bits" and value:
            bits = int(value.strip().strip('"'))
    return zlib.decompressobj(wbits=-max(9, bits)), ext


class Conn:
    """One client connection's receive state."""

    __slots__ = ("buf", "count", "echo_i", "fd", "frag", "frag_compressed", "inflater", "sock")

    def __init__(self, sock: socket.socket, inflater: Any, buf: bytes) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inflater = inflater
        self.buf = buf
        self.count = 0
        self.echo_i = 0
        self.frag: list[bytes] | None = None
        self.frag_compressed = False


class ClientProc:
    """All connections of one client process, driven by a single epoll loop.

    Why not asyncio: its per-read overhead (~15-20 us in CPython 3.11) made the clients cost more
    CPU per message than the server under test, so they became the bottleneck. A bare epoll loop
    with one ``recv`` per ready socket costs a few microseconds per read and parses every frame
    that arrived together in one pass.
    """

    def __init__(self, port: int, deflate: bool) -> None:
        self.port = port
        self.deflate = deflate
        self.conns: dict[int, Conn] = {}
        self.ext: str | None = None
        self.errors: list[str] = []
        self.mode = "idle"  # idle | bcast | echo
        self.target = 0
        self.size = BCAST_SIZE
        self.remaining = 0
        self.round_deadline = 0.0
        self.messages = 0
        self.bad = 0
        self.lost = 0
        self.echo_payload = b""
        self.echo_frames: list[bytes] = []
        self.running = False
        self.inflight = 0
        self.echo_t0 = 0.0
        self.echo_stop = 0.0
        self.stopped = 0.0
        self.quit = False
        self.control_buf = b""
        self.read_interval = 0.0  # 0 means block in epoll_wait

    def note_error(self, text: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(text)

    # -- connecting --------------------------------------------------------------------------

    def connect_all(self, total: int, batch: int) -> None:
        """Open ``total`` connections, ``batch`` handshakes in flight at a time (pipelined)."""
        for first in range(0, total, batch):
            pending: list[tuple[socket.socket, bytes]] = []
            for _ in range(min(batch, total - first)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.settimeout(30)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.connect((HOST, self.port))
                    key = base64.b64encode(os.urandom(16))
                    sock.sendall(handshake_request(key, self.port, self.deflate))
                    pending.append((sock, key))
                except OSError as exc:
                    self.note_error(repr(exc))
                    sock.close()
            for sock, key in pending:
                try:
                    self.finish_handshake(sock, key)
                except (OSError, BenchError, ValueError) as exc:
                    self.note_error(repr(exc))
                    sock.close()

    def finish_handshake(self, sock: socket.socket, key: bytes) -> None:
        buf = b""
        for _ in range(64):  # a 101 response is a few hundred bytes: a handful of reads
            chunk = sock.recv(16384)
            if not chunk:
                raise BenchError("connection closed during handshake")
            buf += chunk
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
        else:
            raise BenchError("handshake response too long")
        inflater, ext = check_handshake(key, buf[:end].decode("latin-1"), self.deflate)
        if ext and self.ext is None:
            self.ext = ext
        sock.setblocking(False)
        conn = Conn(sock, inflater, buf[end + 4 :])
        self.conns[conn.fd] = conn

    # -- receiving ---------------------------------------------------------------------------

    def feed(self, c: Conn, data: bytes) -> None:
        """Parse every complete frame in the buffer; keep the tail for the next read."""
        buf = c.buf + data if c.buf else data
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            ln = buf[pos + 1]
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            else:
                raise BenchError("server frame is masked")
            end = start + ln
            if end > n:
                break
            if b0 == 0x81 or b0 == 0x82:  # the common case: one unfragmented, uncompressed frame
                self.message(c, buf[start:end])
            elif b0 == 0xC1 or b0 == 0xC2:  # FIN + RSV1: one compressed frame
                self.message(c, self.inflate(c, buf[start:end] + DEFLATE_TAIL))
            else:
                self.other_frame(c, b0, buf[start:end])
            pos = end
        c.buf = buf[pos:] if pos < n else b""

    def inflate(self, c: Conn, data: bytes) -> bytes:
        if c.inflater is None:
            raise BenchError("compressed frame without negotiated deflate")
        return bytes(c.inflater.decompress(data))

    def other_frame(self, c: Conn, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode in (1, 2):
            c.frag = [payload]
            c.frag_compressed = bool(b0 & 0x40)
        elif opcode == 0:
            if c.frag is None:
                raise BenchError("unexpected continuation frame")
            c.frag.append(payload)
        elif opcode == 9:
            self.send(c, mask_frame(0xA, payload))
            return
        elif opcode == 8:
            self.send(c, mask_frame(0x8, payload[:2]))
            raise BenchError(f"server closed a connection: {payload[:2].hex()}")
        elif opcode == 0xA:
            return
        else:
            raise BenchError(f"unknown opcode {opcode}")
        if fin:
            data = b"".join(c.frag)
            c.frag = None
            self.message(c, self.inflate(c, data + DEFLATE_TAIL) if c.frag_compressed else data)

    def message(self, c: Conn, payload: bytes) -> None:
        self.messages += 1
        c.count += 1
        if self.mode == "bcast":
            if len(payload) != self.size:
                self.bad += 1
            if c.count == self.target:
                self.remaining -= 1
                if self.remaining == 0:
                    emit({"done": time.monotonic(), "messages": self.messages, "bad": self.bad})
                    self.mode = "idle"
        elif self.mode == "echo":
            self.inflight -= 1
            if payload != self.echo_payload:
                self.bad += 1
            if self.running:
                self.send_echo(c)

    def send(self, c: Conn, frame: bytes) -> None:
        sent = c.sock.send(frame)  # small frames into a socket buffer that is never full here
        if sent != len(frame):
            raise BenchError("short send on a client socket")

    def send_echo(self, c: Conn) -> None:
        """Send the next pre-masked echo frame (masks vary; masking cost is paid once up front)."""
        c.echo_i = (c.echo_i + 1) % len(self.echo_frames)
        self.inflight += 1
        self.send(c, self.echo_frames[c.echo_i])

    # -- control -----------------------------------------------------------------------------

    def control(self) -> None:
        chunk = os.read(0, 65536)
        if not chunk:
            self.quit = True
            return
        self.control_buf += chunk
        while b"\n" in self.control_buf:
            line, self.control_buf = self.control_buf.split(b"\n", 1)
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "expect":
                self.mode, self.target, self.size = "bcast", int(cmd["m"]), int(cmd["size"])
                self.remaining, self.messages, self.bad = len(self.conns), 0, 0
                self.round_deadline = time.monotonic() + float(cmd["timeout"])
                self.read_interval = float(cmd.get("read_interval", 0.0))
                for c in self.conns.values():
                    c.count = 0
                emit({"expecting": self.target})
            elif op == "echo":
                self.echo_payload = make_messages(1, ECHO_SIZE, seed=7)[0].encode()
                self.echo_frames = [mask_frame(0x1, self.echo_payload) for _ in range(64)]
                self.mode, self.running = "echo", True
                self.messages, self.bad, self.inflight = 0, 0, 0
                self.echo_t0 = time.monotonic()
                self.echo_stop = self.echo_t0 + float(cmd["duration"])
                self.read_interval = float(cmd.get("read_interval", 0.0))
                for c in self.conns.values():
                    c.count = 0
                    self.send_echo(c)
            elif op == "quit":
                self.quit = True

    def tick(self, now: float) -> None:
        """Time-based transitions: stop echoing, report a drained echo, give up on a round."""
        if self.mode == "echo":
            if self.running and now >= self.echo_stop:
                self.running = False
                self.stopped = now
            if not self.running and (self.inflight == 0 or now > self.stopped + 10):
                emit(
                    {
                        "echoed": self.messages,
                        "ok": self.inflight == 0,
                        "bad": self.bad,
                        "elapsed": self.stopped - self.echo_t0,
                    }
                )
                self.mode = "idle"
        elif self.mode == "bcast" and now > self.round_deadline:
            emit({"done": None, "why": "timeout", "messages": self.messages, "lost": self.lost})
            self.mode = "idle"

    def run(self, max_seconds: float) -> None:
        """The event loop, bounded in time; every socket is read as soon as it is readable."""
        ep = select.epoll()
        ep.register(0, select.EPOLLIN)
        for fd in self.conns:
            ep.register(fd, select.EPOLLIN)
        conns = self.conns
        give_up = time.monotonic() + max_seconds
        while not self.quit:
            now = time.monotonic()
            if now > give_up:
                break
            self.tick(now)
            if self.mode != "idle" and self.read_interval:
                # Sleep, then take whatever is ready without blocking: a client that never waits
                # inside epoll_wait costs the server no wake-up per send, like a remote client.
                time.sleep(self.read_interval)
                events = ep.poll(0, len(conns) + 1)
            else:
                events = ep.poll(0.01 if self.mode == "echo" else 0.05)
            for fd, _ in events:
                if fd == 0:
                    self.control()
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                try:
                    data = c.sock.recv(65536)  # below the mmap threshold: no mmap+fault per read
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    ep.unregister(fd)
                    del conns[fd]
                    c.sock.close()
                    self.lost += 1
                    raise BenchError("a connection was closed by the server")
                self.feed(c, data)
        for c in conns.values():
            c.sock.close()


def client_main(port: int, conns: int, deflate: bool, batch: int) -> None:
    """Connect, report, then serve control commands until told to quit (or an hour passes)."""
    client = ClientProc(port, deflate)
    t0 = time.monotonic()
    client.connect_all(conns, batch)
    emit(
        {
            "connected": len(client.conns),
            "failed": conns - len(client.conns),
            "ext": client.ext,
            "errors": client.errors,
            "connect_s": time.monotonic() - t0,
        }
    )
    try:
        client.run(max_seconds=3600)
    except BenchError as exc:
        emit({"error": str(exc)})
        raise


# --------------------------------------------------------------------------------------------
# Parent: orchestration
# --------------------------------------------------------------------------------------------


class Child:
    """A role subprocess with a JSON-lines control channel and a stderr log for post-mortems."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def send(self, obj: Json) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def recv(self, key: str, timeout: float) -> Json:
        """The next control line holding ``key`` (others are errors worth seeing)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                break
            if not line:
                raise BenchError(f"{self.name} exited early:\n{self.stderr_tail()}")
            obj: Json = json.loads(line)
            if key in obj:
                return obj
            if "error" in obj:
                raise BenchError(f"{self.name}: {obj['error']}")
        raise BenchError(f"{self.name}: no {key!r} within {timeout:.0f}s\n{self.stderr_tail()}")

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + t for t in text[-lines:])

    async def stop(self) -> None:
        """Close stdin (the polite quit), then terminate, then kill; never waits unbounded."""
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await self.send({"op": "quit"})
        for action in (None, self.proc.terminate, self.proc.kill):
            if action is not None:
                with contextlib.suppress(ProcessLookupError):
                    action()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
                return
            except TimeoutError:
                continue


class Bench:
    """Runs scenarios, keeps results, reports progress with elapsed time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix="ws_core_bench_"))
        self.children: list[Child] = []
        self.seq = 0
        self.results: dict[str, list[Json]] = {"broadcast": [], "echo": [], "memory": []}
        self.errors: list[str] = []

    def progress(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    async def spawn(self, name: str, role_args: list[str]) -> Child:
        self.seq += 1
        log = self.tmp / f"{self.seq:03d}-{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(Path(__file__).resolve()), *role_args]
        if self.args.uvloop:
            cmd.append("--uvloop")
        with open(log, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                limit=1 << 20,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    async def stop_all(self) -> None:
        children, self.children = self.children, []
        await asyncio.gather(*(c.stop() for c in children))

    async def start_server(
        self, impl: str, compression: str, messages: int = 1
    ) -> tuple[Child, int]:
        server = await self.spawn(
            f"server-{impl}",
            ["_server", "--impl", impl, "--compression", compression, "--messages", str(messages)],
        )
        ready = await server.recv("ready", 60)
        return server, int(ready["ready"])

    async def server_stats(self, server: Child, collect: bool = False) -> Json:
        await server.send({"op": "stats", "gc": collect})
        return await server.recv("stats", 60)

    async def start_clients(
        self, port: int, total: int, procs: int, deflate: bool, server: Child
    ) -> tuple[list[Child], Json]:
        """Spread ``total`` connections over ``procs`` client processes and wait for all of them."""
        procs = max(1, min(procs, total))
        sizes = [total // procs + (1 if i < total % procs else 0) for i in range(procs)]
        batch = max(8, 96 // procs)  # handshakes in flight stay under the listen backlog of 100
        t0 = time.monotonic()
        clients = [
            await self.spawn(
                f"client{i}",
                [
                    "_client",
                    "--port",
                    str(port),
                    "--conns",
                    str(n),
                    "--batch",
                    str(batch),
                    *(["--deflate"] if deflate else []),
                ],
            )
            for i, n in enumerate(sizes)
        ]
        timeout = 60 + total * 0.01
        infos = await asyncio.gather(*(c.recv("connected", timeout) for c in clients))
        failed = sum(i["failed"] for i in infos)
        if failed:
            errs = sorted({e for i in infos for e in i["errors"]})
            raise BenchError(f"{failed} of {total} connections failed: {errs[:3]}")
        ext = next((i["ext"] for i in infos if i["ext"]), None)
        if deflate and not ext:
            raise BenchError("the server did not accept permessage-deflate")
        # The server may register a connection a moment after the client saw the 101 response.
        count = 0
        for _ in range(200):
            await server.send({"op": "count"})
            count = int((await server.recv("count", 30))["count"])
            if count >= total:
                break
            await asyncio.sleep(0.05)
        return clients, {"ext": ext, "connect_s": time.monotonic() - t0, "server_count": count}

    # -- broadcast ---------------------------------------------------------------------------

    async def broadcast_round(
        self, server: Child, clients: list[Child], n: int, m: int, batch: int
    ) -> Json:
        """One measured round: M messages to N clients, CPU from go until the last delivery."""
        timeout = 60 + n * m * 2e-4
        for c in clients:
            await c.send(
                {
                    "op": "expect",
                    "m": m,
                    "size": BCAST_SIZE,
                    "timeout": timeout,
                    "read_interval": self.args.read_interval_ms / 1000,
                }
            )
        await asyncio.gather(*(c.recv("expecting", 30) for c in clients))
        before = await self.server_stats(server)
        ccpu0 = clients_cpu(clients)
        busy0 = machine_busy_s()
        t_go = time.monotonic()
        await server.send({"op": "broadcast", "m": m, "batch": batch})
        sent = await server.recv("sent", timeout)
        dones = await asyncio.gather(*(c.recv("done", timeout) for c in clients))
        after = await self.server_stats(server)
        ccpu1 = clients_cpu(clients)
        busy1 = machine_busy_s()
        window = time.monotonic() - t_go
        for d in dones:
            if d["done"] is None:
                raise BenchError(f"clients did not get every message: {d}")
            if d.get("bad"):
                raise BenchError(f"{d['bad']} messages had the wrong size")
        received = sum(int(d["messages"]) for d in dones)
        deliveries = n * m
        if received != deliveries or int(sent["recipients"]) != n:
            raise BenchError(f"expected {deliveries} deliveries to {n}, got {received} / {sent}")
        wall = max(float(d["done"]) for d in dones) - t_go
        user = after["user"] - before["user"]
        sys_ = after["sys"] - before["sys"]
        cpu = user + sys_
        ours = cpu + sum(ccpu1) - sum(ccpu0)
        return {
            "deliveries": deliveries,
            "server_cpu_s": cpu,
            "server_user_s": user,
            "server_sys_s": sys_,
            "wall_s": wall,
            "broadcast_loop_s": sent["loop_s"],
            "client_user_s": ccpu1[0] - ccpu0[0],
            "client_sys_s": ccpu1[1] - ccpu0[1],
            "us_per_delivery": cpu / deliveries * 1e6,
            "deliveries_per_s": deliveries / wall,
            "server_util": cpu / wall,
            "client_us_per_delivery": (sum(ccpu1) - sum(ccpu0)) / deliveries * 1e6,
            "other_load_cores": max(0.0, busy1 - busy0 - ours) / window,
        }

    async def run_broadcast(self, impl: str, n: int, compression: str, m: int) -> None:
        label = f"broadcast {IMPL_LABEL[impl]} N={n} {compression}"
        self.progress(f"{label}: starting server and {n} connections")
        try:
            server, port = await self.start_server(impl, compression, messages=m)
            clients, info = await self.start_clients(
                port, n, self.args.client_procs, compression == "deflate", server
            )
            self.progress(
                f"{label}: connected in {info['connect_s']:.1f}s"
                + (f" ({info['ext']})" if info["ext"] else "")
            )
            await self.broadcast_round(server, clients, n, min(10, m), 10)  # warm-up, not kept
            for pattern, batch in (("burst10", 10), ("single", 1)):
                r = await self.broadcast_round(server, clients, n, m, batch)
                r.update(impl=impl, n=n, compression=compression, pattern=pattern, m=m)
                r["ext"] = info["ext"]
                self.results["broadcast"].append(r)
                self.progress(
                    f"{label} {pattern}: {r['us_per_delivery']:.2f} us CPU/recipient, "
                    f"{r['deliveries_per_s']:,.0f} deliveries/s, server busy "
                    f"{r['server_util']:.0%} (user {r['server_user_s']:.2f}s "
                    f"sys {r['server_sys_s']:.2f}s), "
                    f"clients {r['client_us_per_delivery']:.2f} us/msg "
                    f"(user {r['client_user_s']:.2f}s sys {r['client_sys_s']:.2f}s), "
                    f"other load {r['other_load_cores']:.2f} cores"
                )
        except BenchError as exc:
            self.fail(label, exc)
        finally:
            await self.stop_all()

    # -- echo --------------------------------------------------------------------------------

    async def run_echo(self, impl: str, conns: int, duration: float) -> None:
        label = f"echo {IMPL_LABEL[impl]} {conns} conns"
        self.progress(f"{label}: starting")
        try:
            server, port = await self.start_server(impl, "off")
            procs = min(self.args.client_procs, 2)
            clients, _ = await self.start_clients(port, conns, procs, False, server)
            results: Json = {}
            for phase, secs in (("warmup", min(1.0, duration / 2)), ("measure", duration)):
                before = await self.server_stats(server)
                ccpu0 = clients_cpu(clients)
                busy0 = machine_busy_s()
                t0 = time.monotonic()
                for c in clients:
                    await c.send(
                        {
                            "op": "echo",
                            "duration": secs,
                            "read_interval": self.args.echo_read_interval_ms / 1000,
                        }
                    )
                outs = await asyncio.gather(*(c.recv("echoed", secs + 30) for c in clients))
                after = await self.server_stats(server)
                ccpu1 = clients_cpu(clients)
                busy1 = machine_busy_s()
                wall = time.monotonic() - t0
                for o in outs:
                    if not o["ok"] or o["bad"]:
                        raise BenchError(f"echo failed: {o}")
                if phase == "warmup":
                    continue
                rts = sum(int(o["echoed"]) for o in outs)
                elapsed = max(float(o["elapsed"]) for o in outs)
                cpu = (after["user"] - before["user"]) + (after["sys"] - before["sys"])
                results = {
                    "impl": impl,
                    "conns": conns,
                    "duration_s": elapsed,
                    "round_trips": rts,
                    "rt_per_s": rts / elapsed,
                    "server_cpu_s": cpu,
                    "us_per_rt": cpu / rts * 1e6,
                    "server_util": cpu / wall,
                    "client_user_s": ccpu1[0] - ccpu0[0],
                    "client_sys_s": ccpu1[1] - ccpu0[1],
                    "client_us_per_rt": (sum(ccpu1) - sum(ccpu0)) / rts * 1e6,
                    "other_load_cores": max(0.0, busy1 - busy0 - cpu - sum(ccpu1) + sum(ccpu0))
                    / wall,
                }
            self.results["echo"].append(results)
            self.progress(
                f"{label}: {results['rt_per_s']:,.0f} round trips/s, "
                f"{results['us_per_rt']:.2f} us server CPU/rt, server busy "
                f"{results['server_util']:.0%}, clients {results['client_us_per_rt']:.2f} us/rt, "
                f"other load {results['other_load_cores']:.2f} cores"
            )
        except BenchError as exc:
            self.fail(label, exc)
        finally:
            await self.stop_all()

    # -- memory ------------------------------------------------------------------------------

    async def run_memory(self, impl: str, conns: int, compression: str) -> None:
        label = f"memory {IMPL_LABEL[impl]} {conns} idle conns {compression}"
        self.progress(f"{label}: starting")
        deflate = compression == "deflate"
        warm = 100
        try:
            server, port = await self.start_server(impl, compression)
            # A first batch pays one-off costs (imports, caches, code paths), so the baseline
            # is taken with it open and only the marginal cost per connection is reported.
            _, winfo = await self.start_clients(port, warm, 1, deflate, server)
            before = await self.server_stats(server, collect=True)
            _, info = await self.start_clients(port, conns, self.args.client_procs, deflate, server)
            if info["server_count"] < conns + warm:
                raise BenchError(f"server sees {info['server_count']} of {conns + warm}")
            await asyncio.sleep(1.0)
            after = await self.server_stats(server, collect=True)
            per = (after["rss_kb"] - before["rss_kb"]) / conns
            r = {
                "impl": impl,
                "compression": compression,
                "conns": conns,
                "rss_before_kb": before["rss_kb"],
                "rss_after_kb": after["rss_kb"],
                "kb_per_conn": per,
                "connect_s": info["connect_s"],
                "handshakes_per_s": conns / info["connect_s"],
                "ext": info["ext"] or winfo["ext"],
            }
            self.results["memory"].append(r)
            self.progress(
                f"{label}: {per:.1f} KiB/conn (RSS {before['rss_kb'] / 1024:.1f} -> "
                f"{after['rss_kb'] / 1024:.1f} MiB), {r['handshakes_per_s']:,.0f} handshakes/s"
            )
        except BenchError as exc:
            self.fail(label, exc)
        finally:
            await self.stop_all()

    def fail(self, label: str, exc: BaseException) -> None:
        self.errors.append(f"{label}: {exc}")
        self.progress(f"{label}: FAILED: {exc}")

    async def run(self) -> None:
        a = self.args
        impls = IMPLS if a.impl == "both" else (a.impl,)
        quick = a.quick
        try:
            if a.only in (None, "broadcast"):
                sizes = [(1000, 20)] if quick else [(2000, 150), (10000, 30)]
                for n, m in sizes:
                    m = a.messages or m
                    for compression in ("off", "deflate"):
                        floor = ("floor",) if a.floor and compression == "off" else ()
                        for impl in (*impls, *floor):
                            await self.run_broadcast(impl, n, compression, m)
            if a.only in (None, "echo"):
                for impl in impls:
                    await self.run_echo(impl, 100, a.echo_seconds or (1.5 if quick else 5.0))
            if a.only in (None, "memory"):
                conns = 2000 if quick else 10000
                for compression in ("off", "deflate"):
                    floor = ("floor",) if a.floor and compression == "off" else ()
                    for impl in (*impls, *floor):
                        await self.run_memory(impl, conns, compression)
        finally:
            await self.stop_all()
            if not self.errors:
                shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table line: a metric for both implementations and whether hub.ws met its target."""

    scenario: str
    metric: str
    websockets: float | None
    hub: float | None
    ratio: float | None
    target: str = ""
    verdict: str = ""
    floor: float | None = None


def make_rows(results: dict[str, list[Json]]) -> list[Row]:
    """Pair websockets and hub results; ratio > 1 always means hub.ws is better."""
    rows: list[Row] = []

    def pick(kind: str, **where: Any) -> dict[str, Json]:
        return {r["impl"]: r for r in results[kind] if all(r.get(k) == v for k, v in where.items())}

    def add(
        scenario: str,
        metric: str,
        pair: dict[str, Json],
        key: str,
        lower_better: bool,
        ratio_target: float | None = None,
        abs_max: float | None = None,
    ) -> None:
        w = pair.get("websockets", {}).get(key)
        h = pair.get("hub", {}).get(key)
        ratio = None
        if w is not None and h is not None and w > 0 and h > 0:
            ratio = w / h if lower_better else h / w
        target = verdict = ""
        if ratio_target is not None:
            target = f">= {ratio_target:g}x"
            if ratio is not None:
                verdict = "PASS" if ratio >= ratio_target else "FAIL"
        if abs_max is not None:
            target = f"hub <= {abs_max:g}"
            if h is not None:
                verdict = "PASS" if h <= abs_max else "FAIL"
        f = pair.get("floor", {}).get(key)
        rows.append(Row(scenario, metric, w, h, ratio, target, verdict, f))

    seen: list[tuple[int, str, str]] = []
    for r in results["broadcast"]:
        k = (r["n"], r["compression"], r["pattern"])
        if k not in seen:
            seen.append(k)
    for n, comp, pattern in seen:
        pair = pick("broadcast", n=n, compression=comp, pattern=pattern)
        scen = f"broadcast N={n:,} {comp} {pattern}"
        goal = 1.8 if comp == "off" else 3.0
        add(scen, "us server CPU/recipient", pair, "us_per_delivery", True, ratio_target=goal)
        add("", "deliveries/s (wall)", pair, "deliveries_per_s", False)
    if results["echo"]:
        pair = pick("echo")
        scen = f"echo {results['echo'][0]['conns']} conns x {ECHO_SIZE} B"
        add(scen, "round trips/s", pair, "rt_per_s", False, ratio_target=1.2)
        add("", "us server CPU/round trip", pair, "us_per_rt", True)
    for comp in ("off", "deflate"):
        pair = pick("memory", compression=comp)
        if pair:
            conns = next(iter(pair.values()))["conns"]
            add(
                f"idle memory {conns:,} conns {comp}",
                "KiB RSS/connection",
                pair,
                "kb_per_conn",
                True,
                abs_max=8 if comp == "off" else 20,
            )
    return rows


def fmt_num(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render(rows: list[Row]) -> str:
    """A plain-text table; the floor column appears only when --floor ran."""
    with_floor = any(r.floor is not None for r in rows)
    head: tuple[str, ...] = ("scenario", "metric", "websockets", "hub.ws", "ratio", "target", "")
    table = [head] + [
        (
            r.scenario,
            r.metric,
            fmt_num(r.websockets),
            fmt_num(r.hub),
            f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    if with_floor:
        table = [
            (*t, "floor" if i == 0 else fmt_num(rows[i - 1].floor)) for i, t in enumerate(table)
        ]
        head = table[0]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    right = {2, 3, 4, 7}
    lines = []
    for i, t in enumerate(table):
        cells = [c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(t)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def git_rev() -> str:
    """Which hub.ws was measured: the commit, and whether the tree had local changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "hub"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + (" + uncommitted hub/ changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def meta_info(args: argparse.Namespace) -> Json:
    import websockets

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "hub": git_rev(),
        "loop": "uvloop" if args.uvloop else "asyncio (default)",
        "platform": platform.platform(),
        "cpu": f"{cpu} x {os.cpu_count()}",
        "client_procs": args.client_procs,
        "read_interval_ms": args.read_interval_ms,
        "echo_read_interval_ms": args.echo_read_interval_ms,
        "quick": args.quick,
    }


def hub_importable() -> str | None:
    """None if ``from hub.ws import serve, broadcast`` works in a fresh interpreter, else why."""
    code = "from hub.ws import serve, broadcast"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
        )
    except subprocess.TimeoutExpired:
        return "import timed out"
    return None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["failed"])[-1]


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="ws_core.py", description="Benchmark hub.ws against websockets, side by side."
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: small N, few messages")
    ap.add_argument("--only", choices=("broadcast", "echo", "memory"), help="one scenario group")
    ap.add_argument("--impl", choices=(*IMPLS, "both"), default="both")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write meta, results, table")
    ap.add_argument("--uvloop", action="store_true", help="uvloop in every server (if installed)")
    ap.add_argument(
        "--floor",
        action="store_true",
        help="add a reference column for uncompressed broadcast and idle memory: a bare asyncio "
        "protocol doing one transport.write of a pre-encoded frame per recipient and message",
    )
    ap.add_argument(
        "--client-procs",
        type=int,
        default=2,
        choices=range(2, MAX_CLIENT_PROCS + 1),
        metavar="2..4",
        help="client processes generating load (default 2)",
    )
    ap.add_argument(
        "--read-interval-ms",
        type=float,
        default=1.0,
        help="broadcast clients read every this many ms without blocking; 0 = block in epoll "
        "(then the server also pays a wake-up per send) (default 1)",
    )
    ap.add_argument(
        "--echo-read-interval-ms",
        type=float,
        default=0.0,
        help="the same for the echo clients (default 0: answer each echo at once)",
    )
    ap.add_argument("--messages", type=int, help="override M, the messages per broadcast round")
    ap.add_argument("--echo-seconds", type=float, help="override the echo duration")
    args = ap.parse_args(argv)
    if args.uvloop:
        try:
            import uvloop  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            ap.error("--uvloop: uvloop is not installed")
    if args.messages is not None and not 1 <= args.messages <= 100_000:
        ap.error("--messages must be in 1..100000")
    if not 0 <= args.read_interval_ms <= 50 or not 0 <= args.echo_read_interval_ms <= 50:
        ap.error("--read-interval-ms / --echo-read-interval-ms must be in 0..50")
    if args.echo_seconds is not None and not 0.2 <= args.echo_seconds <= 120:
        ap.error("--echo-seconds must be in 0.2..120")
    return args


def role_main(argv: list[str]) -> int:
    """The subprocess side: ``_server`` or ``_client``, spawned by the parent only."""
    ap = argparse.ArgumentParser(prog=f"ws_core.py {argv[0]}")
    ap.add_argument("--uvloop", action="store_true")
    if argv[0] == "_server":
        ap.add_argument("--impl", choices=(*IMPLS, "floor"), required=True)
        ap.add_argument("--compression", choices=("off", "deflate"), required=True)
        ap.add_argument("--messages", type=int, default=1)
        a = ap.parse_args(argv[1:])
        raise_nofile()
        run_loop(server_main(a.impl, a.compression, a.messages), a.uvloop)
    else:
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--conns", type=int, required=True)
        ap.add_argument("--batch", type=int, default=32)
        ap.add_argument("--deflate", action="store_true")
        a = ap.parse_args(argv[1:])
        raise_nofile()
        client_main(a.port, a.conns, a.deflate, a.batch)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_server", "_client"):
        return role_main(argv)
    args = parse_args(argv)
    nofile = raise_nofile()
    if nofile < 12_000 and not args.quick:
        print(f"warning: RLIMIT_NOFILE hard limit is {nofile}; 10,000 connections may fail")
    if args.impl in ("hub", "both"):
        why = hub_importable()
        if why:
            print(f"hub.ws is not importable ({why}); try --impl websockets", file=sys.stderr)
            return 2
    meta = meta_info(args)
    print(f"command:    {meta['command']}")
    print(f"python:     {meta['python']}   websockets: {meta['websockets']}   hub: {meta['hub']}")
    print(f"loop:       {meta['loop']}   cpu: {meta['cpu']}   clients: {args.client_procs} procs")
    sys.stdout.flush()
    bench = Bench(args)
    started = time.monotonic()
    try:
        run_loop(bench.run(), args.uvloop)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    rows = make_rows(bench.results)
    print()
    print(render(rows))
    print()
    print(
        "ratio > 1 means hub.ws is better (cost: websockets/hub; throughput: hub/websockets). "
        "Targets: broadcast >= 1.8x off, >= 3x deflate; echo >= 1.2x; "
        "idle memory <= 8 KiB off, <= 20 KiB deflate."
    )
    exts = {
        (IMPL_LABEL[r["impl"]], r["ext"])
        for k in ("broadcast", "memory")
        for r in bench.results[k]
        if r.get("ext")
    }
    for label, ext in sorted(exts):
        print(f"negotiated by {label}: {ext}")
    print(f"elapsed: {meta['elapsed_s']}s")
    if bench.errors:
        print(f"\n{len(bench.errors)} scenario(s) failed (logs kept in {bench.tmp}):")
        for e in bench.errors:
            print(f"  - {e}")
    if args.json:
        payload = {"meta": meta, "results": bench.results, "table": [asdict(r) for r in rows]}
        payload["errors"] = bench.errors
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
