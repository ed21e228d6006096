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
import os
import platform
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this file

from benchlib import (  # the shared client, process and report pieces
    HOST,
    REPO,
    ROLES,
    WS_GUID,
    BenchError,
    Child,
    ClientConn,
    EpollClient,
    Json,
    Runner,
    add_impl_json,
    clients_cpu,
    command_line,
    commands,
    cpu_info,
    emit,
    fmt_num,
    format_table,
    free_port,
    git_rev,
    machine_busy_s,
    mask_frame,
    other_load,
    raise_nofile,
    role_parser,
    run_timed,
    split_frames,
    stdin_reader,
    usage,
    write_json,
)

IMPLS = ("websockets", "hub")
IMPL_LABEL = {"websockets": "websockets", "hub": "hub.ws", "floor": "floor"}
MAX_SIZE = 2**20
DEFLATE_TAIL = b"\x00\x00\xff\xff"
BCAST_SIZE = 100  # bytes per broadcast message
ECHO_SIZE = 64  # bytes per echo message
MAX_CLIENT_PROCS = 4


# --------------------------------------------------------------------------------------------
# Helpers (every process)
# --------------------------------------------------------------------------------------------


def run_loop(coro: Coroutine[Any, Any, Any], use_uvloop: bool) -> Any:
    """Run on the default asyncio loop unless --uvloop: the same loop for both implementations."""
    if use_uvloop:
        import uvloop  # type: ignore[import-not-found]

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)


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
        # Bounded: the parent sends a few dozen commands.
        async for cmd in commands(reader, 1_000_000):
            op = cmd["op"]
            if op == "stats":
                if cmd.get("gc"):
                    gc.collect()
                    await asyncio.sleep(0.2)
                    gc.collect()
                emit(usage())
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


class Conn(ClientConn):
    """One client connection's receive state."""

    __slots__ = ("echo_i", "frag", "frag_compressed", "inflater")

    def __init__(self, sock: socket.socket, inflater: Any, buf: bytes) -> None:
        super().__init__(sock, buf)
        self.inflater = inflater
        self.echo_i = 0
        self.frag: list[bytes] | None = None
        self.frag_compressed = False


class ClientProc(EpollClient[Conn]):
    """All connections of one client process: broadcast receivers or echo loops, on command."""

    def __init__(self, port: int, deflate: bool) -> None:
        super().__init__(port, deflate)
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

    def new_conn(self, sock: socket.socket, inflater: Any, buf: bytes) -> Conn:
        return Conn(sock, inflater, buf)

    # -- receiving ---------------------------------------------------------------------------

    def feed(self, c: Conn, data: bytes) -> None:
        """Handle every complete frame in the buffer; keep the tail for the next read."""
        frames, c.buf = split_frames(c.buf + data if c.buf else data)
        for b0, payload in frames:
            if b0 == 0x81 or b0 == 0x82:  # the common case: one unfragmented, uncompressed frame
                self.message(c, payload)
            elif b0 == 0xC1 or b0 == 0xC2:  # FIN + RSV1: one compressed frame
                self.message(c, self.inflate(c, payload + DEFLATE_TAIL))
            else:
                self.other_frame(c, b0, payload)

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

    def command(self, cmd: Json) -> None:
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

    def pace(self) -> tuple[float, float]:
        if self.mode != "idle" and self.read_interval:
            return self.read_interval, 0.0
        return 0.0, (0.01 if self.mode == "echo" else 0.05)

    def server_closed(self, ep: select.epoll, c: Conn) -> None:
        self.drop(ep, c)
        self.lost += 1
        raise BenchError("a connection was closed by the server")


def client_main(port: int, conns: int, deflate: bool, batch: int) -> None:
    """Connect, report, then serve control commands until told to quit (or an hour passes)."""
    client = ClientProc(port, deflate)
    client.connect_and_report(conns, batch)
    try:
        client.run(max_seconds=3600)
    except BenchError as exc:
        emit({"error": str(exc)})
        raise


# --------------------------------------------------------------------------------------------
# Parent: orchestration
# --------------------------------------------------------------------------------------------


class Bench(Runner[Child]):
    """Runs scenarios, keeps results, reports progress with elapsed time."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(__file__, "ws_core_bench_", ["--uvloop"] if args.uvloop else [])
        self.args = args
        self.results: dict[str, list[Json]] = {"broadcast": [], "echo": [], "memory": []}

    def make_child(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> Child:
        return Child(name, proc, log)

    async def start_server(
        self, impl: str, compression: str, messages: int = 1
    ) -> tuple[Child, int]:
        role = ["_server", "--impl", impl, "--compression", compression]
        return await self.spawn_server(f"server-{impl}", [*role, "--messages", str(messages)])

    async def server_stats(self, server: Child, collect: bool = False) -> Json:
        await server.send({"op": "stats", "gc": collect})
        return await server.recv("stats", 60)

    async def start_clients(
        self, port: int, total: int, procs: int, deflate: bool, server: Child
    ) -> tuple[list[Child], Json]:
        """Spread ``total`` connections over ``procs`` client processes and wait for all of them."""
        t0 = time.monotonic()
        role = ["_client", "--port", str(port), *(["--deflate"] if deflate else [])]
        clients = await self.spawn_clients(total, procs, lambda n, _: [*role, "--conns", str(n)])
        infos = await self.await_connected(clients, total)
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
            "other_load_cores": other_load(busy1 - busy0, ours, window),
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
                    "other_load_cores": other_load(
                        busy1 - busy0, cpu + sum(ccpu1) - sum(ccpu0), wall
                    ),
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
            await self.finish()


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
    return format_table(table, right={2, 3, 4, 7})


def meta_info(args: argparse.Namespace) -> Json:
    import websockets

    return {
        "command": command_line(),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "hub": git_rev(),
        "loop": "uvloop" if args.uvloop else "asyncio (default)",
        "platform": platform.platform(),
        "cpu": cpu_info(),
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
    add_impl_json(ap, IMPLS)
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
    ap = role_parser("ws_core.py", argv)
    ap.add_argument("--uvloop", action="store_true")
    if argv[0] == "_server":
        ap.add_argument("--impl", choices=(*IMPLS, "floor"), required=True)
        ap.add_argument("--compression", choices=("off", "deflate"), required=True)
        ap.add_argument("--messages", type=int, default=1)
        a = ap.parse_args(argv[1:])
        raise_nofile()
        run_loop(server_main(a.impl, a.compression, a.messages), a.uvloop)
    else:
        ap.add_argument("--deflate", action="store_true")
        a = ap.parse_args(argv[1:])
        raise_nofile()
        client_main(a.port, a.conns, a.deflate, a.batch)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ROLES:
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
    elapsed = run_timed(lambda: run_loop(bench.run(), args.uvloop))
    if elapsed is None:
        return 130
    meta["elapsed_s"] = elapsed
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
        write_json(args.json, payload)
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
