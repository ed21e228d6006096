"""Many idle connections on one box: ``hub serve --workers K`` + Redis against the websockets FAQ
pattern on K processes + Redis, run the same way, one after the other.

For each implementation:

1. a private ``redis-server`` and the server processes start (hub: ``hub serve --workers K
   --redis ...``; baseline: K processes of ``websockets.asyncio.server.serve(...,
   reuse_port=True)`` with the FAQ's ``CHANNELS`` registry, ``fanout_local.baseline_handler``,
   and a redis-py listener that ``broadcast()``s to ``server.connections``);
2. client processes open N connections (default 100,000) from several loopback source addresses
   (127.0.0.2, 127.0.0.3, ...: one source address runs out of ephemeral ports near 28k), each
   user ``u<i>`` subscribing to one of 100 channels. A connection writes one pre-encoded buffer
   (the upgrade request and its masked subscribe frame) and waits for the 101 and the reply:
   connects/s is N over the time from the first connect to the last reply;
3. RSS per connection: growth of the server tree's summed RSS (hub: supervisor + workers) over
   N, 2 s after the last reply; idle CPU: the tree's CPU over ``--idle-seconds`` (30), in cores
   and in cores per 100,000 connections (the keepalive pings, 25 s for the hub and 20 s for
   websockets by default, run meanwhile and the clients answer them);
4. one broadcast through Redis; the time from the PUBLISH to the last connection's receipt;
5. every client closes; the tree's RSS 3 s after the last socket is gone, against the RSS before.

    .venv/bin/python bench/scale.py                      # 100,000 connections, hub then FAQ
    .venv/bin/python bench/scale.py --quick              # 10,000 connections, 2 workers
    .venv/bin/python bench/scale.py -n 20000 --workers 2 --impl hub --json out.json

Progress goes to stderr; the table to stdout. Only loopback addresses are contacted. The client
is a raw asyncio protocol (no WebSocket library): its cost per connection is a fraction of the
server's, so the servers stay the bottleneck; its CPU is reported on its own row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this file

from benchlib import (
    HOST,
    REPO,
    BenchError,
    Json,
    command_line,
    commands,
    cpu_info,
    emit,
    format_table,
    free_port,
    git_rev,
    machine_busy_s,
    proc_cpu_s,
    raise_nofile,
    rss_kb,
    stdin_reader,
    write_json,
)

IMPLS = ("hub", "baseline")
CHANNELS = 100  # every connection subscribes to one of them
PER_SOURCE = 12_500  # connections per loopback source address (ports run out near 28k)
PER_CLIENT = 18_000  # connections per client process (its fd limit is 20,000 here)
IN_FLIGHT = 128  # connects in flight per client process
ALL_CHANNEL = "bench:all"  # the baseline's Redis channel for broadcasts
MARK = b"scale-broadcast"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
HUB_TOML = "drain_seconds = 0\ncommand_rate = 0\n[namespaces.bench]\n"
TARGETS = {"kib_per_conn": 6.0, "connects_per_s": 3000.0, "cores_per_100k": 0.1, "bcast_s": 1.0}


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Client role: raw connections on asyncio protocols
# --------------------------------------------------------------------------------------------


def upgrade_bytes(port: int, user: str, channel: str) -> bytes:
    """The upgrade request followed by the subscribe command as a masked text frame (zero mask
    key: masking is then the identity, and the frame is valid)."""
    request = (
        f"GET /ws?user={user} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: hub.v1.json\r\n\r\n"
    ).encode()
    command = json.dumps({"op": "subscribe", "channel": channel, "id": 1}).encode()
    return request + bytes((0x81, 0x80 | len(command))) + b"\0\0\0\0" + command


class Tally:
    """What one client process counts; its connections update it."""

    def __init__(self) -> None:
        self.subscribed = 0
        self.failed = 0
        self.closed_early = 0
        self.received = 0
        self.first_rx = 0.0
        self.last_rx = 0.0
        self.armed = False
        self.round = 0  # broadcast rounds armed so far: a connection counts one mark per round
        self.pings = 0
        self.done: asyncio.Future[None] | None = None  # set when every connection got the mark
        self.expected = 0
        self.wake: asyncio.Event = asyncio.Event()
        self.resolved = 0  # connections answered (subscribed or failed), connect errors too
        self.connect_errors = 0

    def opened_pending(self, opened: int) -> int:
        """Connections opened whose answer has not come yet."""
        return opened - (self.resolved - self.connect_errors)


class RawConn(asyncio.Protocol):
    """One idle subscribed connection: the handshake, the reply, pongs, the broadcast mark."""

    __slots__ = ("buf", "got", "state", "tally", "transport")

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.buf = b""
        self.state = 0  # 0: waiting for the 101, 1: for the reply, 2: subscribed
        self.got = 0  # the broadcast round whose mark this connection has
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.state == 2 and not self.buf and len(data) >= 2 and data[1] < 126:
            # The usual read once subscribed: whole small frames (a push, a ping), no header
            # parsing beyond the one length byte and no slicing when it is a single frame.
            end = 2 + data[1]
            if end == len(data):
                opcode = data[0] & 0x0F
                if opcode == 1:
                    self._text(data[2:])
                    return
                if opcode == 9:
                    self.tally.pings += 1
                    self.transport.write(bytes((0x8A, 0x80 | data[1])) + b"\0\0\0\0" + data[2:])  # type: ignore[union-attr]
                    return
        buf = self.buf + data if self.buf else data
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.tally.failed += 1
                self.tally.resolved += 1
                self.tally.wake.set()
                self.state = 3
                self.transport.close()  # type: ignore[union-attr]
                return
            self.state = 1
            buf = buf[end + 4 :]
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = struct.unpack_from("!H", buf, 2)[0]
                head = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = struct.unpack_from("!Q", buf, 2)[0]
                head = 10
            if len(buf) < head + n:
                break
            opcode = buf[0] & 0x0F
            payload = buf[head : head + n]
            buf = buf[head + n :]
            if opcode == 9:  # ping: the pong echoes the payload (zero mask key)
                self.tally.pings += 1
                self.transport.write(bytes((0x8A, 0x80 | n)) + b"\0\0\0\0" + payload)  # type: ignore[union-attr]
            elif opcode == 1:
                self._text(payload)
            elif opcode == 8:
                self.transport.close()  # type: ignore[union-attr]
        self.buf = buf

    def _text(self, payload: bytes) -> None:
        tally = self.tally
        if self.state == 1:
            if payload.startswith(b'{"id":1,"result"'):
                self.state = 2
                tally.subscribed += 1
            else:
                tally.failed += 1
                self.state = 3
            tally.resolved += 1
            tally.wake.set()
        elif MARK in payload and tally.armed and self.got != tally.round:
            self.got = tally.round
            now = time.time()
            if not tally.received:
                tally.first_rx = now
            tally.received += 1
            tally.last_rx = now
            if tally.received >= tally.expected and tally.done is not None:
                if not tally.done.done():
                    tally.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state in (0, 1):
            self.tally.failed += 1
            self.tally.resolved += 1
            self.tally.wake.set()
        elif self.state == 2:
            self.tally.closed_early += 1
        self.state = 4 if self.state != 3 else 3


async def client_main(port: int, sources: list[str], first: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    reader = await stdin_reader()
    tally = Tally()
    conns: list[RawConn] = []
    emit({"ready": os.getpid()})
    async for cmd in commands(reader, 1000):
        op = cmd["op"]
        if op == "connect":
            t0 = time.time()
            await open_all(loop, tally, conns, port, sources, first, count)
            emit(
                {"connected": tally.subscribed, "failed": tally.failed, "t0": t0, "t1": time.time()}
            )
        elif op == "status":
            emit(
                {
                    "status": True,
                    "subscribed": tally.subscribed,
                    "closed_early": tally.closed_early,
                    "pings": tally.pings,
                }
            )
        elif op == "arm":
            tally.armed, tally.received, tally.expected = True, 0, tally.subscribed
            tally.round += 1
            tally.done = loop.create_future()
            emit({"armed": True})
        elif op == "wait_mark":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tally.done), cmd.get("timeout", 30))  # type: ignore[arg-type]
            emit({"marks": tally.received, "first": tally.first_rx, "last": tally.last_rx})
        elif op == "close":
            for conn in conns:
                if conn.transport is not None:
                    conn.state = 4
                    conn.transport.close()
            await asyncio.sleep(0.5)
            conns.clear()
            emit({"closed": True})
        elif op == "quit":
            break


async def open_all(
    loop: asyncio.AbstractEventLoop,
    tally: Tally,
    conns: list[RawConn],
    port: int,
    sources: list[str],
    first: int,
    count: int,
) -> None:
    """Open ``count`` connections, ``IN_FLIGHT`` at a time; progress lines every second."""
    next_i = 0
    connecting = 0
    last_report = time.monotonic()

    async def one(i: int) -> None:
        nonlocal connecting
        user = first + i
        payload = upgrade_bytes(port, f"u{user}", f"bench:{user % CHANNELS}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # the port is picked at connect(), per destination
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        try:
            sock.bind((sources[user % len(sources)], 0))
            await loop.sock_connect(sock, (HOST, port))
            conn = RawConn(tally)
            await loop.create_connection(lambda: conn, sock=sock)
        except OSError:
            sock.close()
            tally.failed += 1
            tally.resolved += 1
            tally.connect_errors += 1
            return
        finally:
            connecting -= 1
            tally.wake.set()
        conns.append(conn)
        conn.transport.write(payload)  # type: ignore[union-attr]

    while True:
        while next_i < count and connecting + tally.opened_pending(len(conns)) < IN_FLIGHT:
            connecting += 1
            loop.create_task(one(next_i))
            next_i += 1
        if next_i >= count and connecting == 0 and tally.opened_pending(len(conns)) == 0:
            break
        tally.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.wake.wait(), 1.0)
        now = time.monotonic()
        if now - last_report >= 1.0:
            last_report = now
            emit({"progress": tally.subscribed, "failed": tally.failed})


# --------------------------------------------------------------------------------------------
# Baseline server role: the websockets FAQ on K processes, broadcasts through Redis
# --------------------------------------------------------------------------------------------


async def baseline_main(port: int, redis_url: str) -> None:
    """``serve(..., reuse_port=True)`` with the FAQ's channel handler; a message on
    ``bench:all`` goes to every connection with ``broadcast(server.connections, ...)``."""
    import fanout_local as fl
    import redis.asyncio as aioredis
    from websockets.asyncio.server import broadcast, serve

    reader = await stdin_reader()
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(ALL_CHANNEL)

    async def listen() -> None:
        for _ in range(10**10):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if msg is not None:
                broadcast(server.connections, msg["data"].decode())

    server = await serve(fl.baseline_handler, HOST, port, reuse_port=True, backlog=1024)
    listener = asyncio.create_task(listen())
    emit({"ready": port, "pid": os.getpid()})
    try:
        async for cmd in commands(reader, 100_000):
            if cmd["op"] == "quit":
                break
    finally:
        listener.cancel()
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 10)
        with contextlib.suppress(Exception):
            await pubsub.aclose()
            await client.aclose()


# --------------------------------------------------------------------------------------------
# Parent: processes, phases, report
# --------------------------------------------------------------------------------------------


class ClientChild:
    """A client subprocess: JSON lines on stdin/stdout, progress lines kept aside."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc, self.log = proc, log
        self.queue: asyncio.Queue[Json] = asyncio.Queue()
        self.subscribed = 0
        self.failed = 0
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        for _ in range(10_000_000):
            line = await self.proc.stdout.readline()
            if not line:
                break
            obj: Json = json.loads(line)
            if "progress" in obj:
                self.subscribed, self.failed = obj["progress"], obj["failed"]
            else:
                self.queue.put_nowait(obj)
        self.queue.put_nowait({"eof": True})

    async def send(self, obj: Json) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def recv(self, key: str, timeout: float) -> Json:
        try:
            obj = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise BenchError(f"client {self.proc.pid}: no {key!r} within {timeout:.0f}s")
        if key not in obj:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"client {self.proc.pid}: expected {key!r}, got {obj}\n{tail}")
        return obj

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send({"op": "quit"})
            for action in (None, self.proc.terminate, self.proc.kill):
                if action is not None:
                    with contextlib.suppress(ProcessLookupError):
                        action()
                try:
                    await asyncio.wait_for(self.proc.wait(), 10)
                    break
                except TimeoutError:
                    continue
        self.reader.cancel()


class Run:
    """One implementation's run: Redis, servers, clients, the phases."""

    def __init__(self, impl: str, args: argparse.Namespace, tmp: Path) -> None:
        self.impl, self.args, self.tmp = impl, args, tmp
        self.procs: list[asyncio.subprocess.Process] = []  # stopped at the end, in reverse
        self.server_pids: list[int] = []
        self.worker_pids: list[int] = []
        self.clients: list[ClientChild] = []
        self.redis_url = ""
        self.result: Json = {"impl": impl}

    def say(self, text: str) -> None:
        progress(f"{self.impl}: {text}")

    # -- processes -----------------------------------------------------------------------------

    async def spawn(self, name: str, argv: list[str], **kw: Any) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "PROMETHEUS_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.tmp / f"{self.impl}-{name}.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=kw.pop("stdout", log), stderr=log, env=env, cwd=REPO, **kw
            )
        self.procs.append(proc)
        return proc

    async def start_redis(self) -> None:
        import redis

        port = free_port()
        exe = shutil.which("redis-server") or "redis-server"
        await self.spawn(
            "redis",
            [
                exe,
                "--port",
                str(port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
                "--maxclients",
                "1000",
            ],
            stdin=asyncio.subprocess.DEVNULL,
        )
        self.redis_url = f"redis://{HOST}:{port}"
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1)
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    client.close()
                    return
            await asyncio.sleep(0.1)
        raise BenchError("redis-server did not answer PING within 10s")

    async def start_hub(self, port: int) -> None:
        from fanout import children_of, readyz

        config = self.tmp / "hub.toml"
        config.write_text(HUB_TOML)
        k = self.args.workers
        cmd = [sys.executable, "-m", "hub.cli", "serve", "--insecure", "--workers", str(k)]
        cmd += ["--host", HOST, "--port", str(port), "--redis", self.redis_url]
        cmd += ["--config", str(config)]
        proc = await self.spawn("serve", cmd, stdin=asyncio.subprocess.DEVNULL)
        seen: set[str] = set()
        for _ in range(1200):
            if proc.returncode is not None:
                raise BenchError(f"hub serve exited {proc.returncode}: see {self.tmp}")
            worker = await asyncio.to_thread(readyz, port)
            if worker:
                seen.add(worker)
            if len(seen) >= k:
                break
            await asyncio.sleep(0.02)
        else:
            raise BenchError(f"hub workers not all ready within 60s (ready: {sorted(seen)})")
        self.worker_pids = children_of(proc.pid)
        self.server_pids = [proc.pid, *self.worker_pids]
        log = (self.tmp / "hub-serve.log").read_text(errors="replace")
        room = [line for line in log.splitlines() if "room for" in line and "in all" in line]
        if room:
            self.say(room[-1].split("hub.supervisor: ", 1)[-1])

    async def start_baseline(self, port: int) -> None:
        for i in range(self.args.workers):
            argv = [sys.executable, str(Path(__file__).resolve()), "_server"]
            argv += ["--port", str(port), "--redis", self.redis_url]
            proc = await self.spawn(
                f"server{i}", argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if not line:
                raise BenchError(f"baseline server {i} exited at start: see {self.tmp}")
            self.server_pids.append(proc.pid)
        self.worker_pids = list(self.server_pids)

    async def start_clients(self, port: int) -> None:
        n, procs = self.args.connections, self.args.client_procs
        sources = [f"127.0.0.{2 + i}" for i in range(self.args.sources)]
        share = -(-n // procs)
        for i in range(procs):
            first, count = i * share, min(share, n - i * share)
            argv = [sys.executable, str(Path(__file__).resolve()), "_client", "--port", str(port)]
            argv += ["--sources", ",".join(sources), "--first", str(first), "--count", str(count)]
            proc = await self.spawn(
                f"client{i}", argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            self.clients.append(ClientChild(proc, self.tmp / f"{self.impl}-client{i}.log"))
        await asyncio.gather(*(c.recv("ready", 30) for c in self.clients))

    async def stop(self) -> None:
        for client in self.clients:
            await client.stop()
        for proc in reversed(self.procs):
            if proc.returncode is None:
                for action in (proc.terminate, proc.kill):
                    with contextlib.suppress(ProcessLookupError):
                        action()
                    try:
                        await asyncio.wait_for(proc.wait(), 15)
                        break
                    except TimeoutError:
                        continue

    # -- readings ------------------------------------------------------------------------------

    def tree_rss_kb(self) -> int:
        total = 0
        for pid in self.server_pids:
            with contextlib.suppress(OSError, BenchError):
                total += rss_kb(pid)
        return total

    def tree_cpu_s(self) -> float:
        return sum(sum(proc_cpu_s(pid)) for pid in self.server_pids)

    def clients_cpu_s(self) -> float:
        return sum(sum(proc_cpu_s(c.proc.pid)) for c in self.clients)

    def tree_sockets(self) -> int:
        from fanout import sockets_of

        return sum(sockets_of(pid) for pid in self.worker_pids)

    # -- phases --------------------------------------------------------------------------------

    async def run(self) -> Json:
        args, r = self.args, self.result
        n = args.connections
        await self.start_redis()
        port = free_port()
        if self.impl == "hub":
            await self.start_hub(port)
        else:
            await self.start_baseline(port)
        await asyncio.sleep(1.0)
        rss0 = self.tree_rss_kb()
        idle_sockets = self.tree_sockets()
        self.say(
            f"{len(self.server_pids)} server processes up, RSS {rss0 / 1024:.0f} MiB; "
            f"{args.client_procs} client processes from {args.sources} source addresses"
        )
        await self.start_clients(port)

        # connect
        cpu0, ccpu0 = self.tree_cpu_s(), self.clients_cpu_s()
        for c in self.clients:
            await c.send({"op": "connect"})
        waiters = [
            asyncio.ensure_future(c.recv("connected", args.connect_timeout)) for c in self.clients
        ]
        last, last_t = 0, time.monotonic()
        while not all(w.done() for w in waiters):
            await asyncio.wait(waiters, timeout=2.0)
            done = sum(c.subscribed for c in self.clients)
            now = time.monotonic()
            rate = (done - last) / (now - last_t)
            last, last_t = done, now
            bar = progress_bar(done, n)
            self.say(
                f"connect {bar} {done:,}/{n:,} at {rate:,.0f}/s, "
                f"failed {sum(c.failed for c in self.clients)}, "
                f"server RSS {self.tree_rss_kb() / 1024:,.0f} MiB"
            )
        got = [w.result() for w in waiters]
        subscribed = sum(g["connected"] for g in got)
        failed = sum(g["failed"] for g in got)
        wall = max(g["t1"] for g in got) - min(g["t0"] for g in got)
        r["connected"], r["failed"] = subscribed, failed
        r["connects_per_s"] = subscribed / wall if wall > 0 else None
        r["connect_server_cpu_s"] = self.tree_cpu_s() - cpu0
        r["connect_client_cpu_s"] = self.clients_cpu_s() - ccpu0
        r["server_cpu_ms_per_connect"] = 1000 * r["connect_server_cpu_s"] / max(1, subscribed)
        self.say(
            f"{subscribed:,} subscribed in {wall:.1f}s: {r['connects_per_s']:,.0f}/s "
            f"({failed} failed); server CPU {r['server_cpu_ms_per_connect']:.2f} ms/connect"
        )
        if subscribed < n * 0.999:
            raise BenchError(f"only {subscribed} of {n} connections subscribed ({failed} failed)")

        # memory
        await asyncio.sleep(2.0)
        rss1 = self.tree_rss_kb()
        r["rss_before_kb"], r["rss_connected_kb"] = rss0, rss1
        r["kib_per_conn"] = (rss1 - rss0) / subscribed
        r["spread"] = [
            max(0, self.per_worker_sockets(pid) - idle_sockets // len(self.worker_pids))
            for pid in self.worker_pids
        ]
        self.say(
            f"RSS {rss0 / 1024:,.0f} -> {rss1 / 1024:,.0f} MiB: "
            f"{r['kib_per_conn']:.2f} KiB per connection; per process {r['spread']}"
        )

        # idle
        cpu0, ccpu0, busy0, t0 = (
            self.tree_cpu_s(),
            self.clients_cpu_s(),
            machine_busy_s(),
            time.monotonic(),
        )
        step = max(1.0, args.idle_seconds / 6)
        while time.monotonic() - t0 < args.idle_seconds:
            await asyncio.sleep(min(step, args.idle_seconds - (time.monotonic() - t0)))
            elapsed = time.monotonic() - t0
            cores = (self.tree_cpu_s() - cpu0) / elapsed
            self.say(f"idle {elapsed:4.0f}/{args.idle_seconds:.0f}s: server {cores:.3f} cores")
        wall = time.monotonic() - t0
        server_s, client_s = self.tree_cpu_s() - cpu0, self.clients_cpu_s() - ccpu0
        r["idle_cores"] = server_s / wall
        r["idle_cores_per_100k"] = r["idle_cores"] * 100_000 / subscribed
        r["idle_client_cores"] = client_s / wall
        r["idle_other_load"] = max(0.0, machine_busy_s() - busy0 - server_s - client_s) / wall
        for c in self.clients:
            await c.send({"op": "status"})
        status = [await c.recv("status", 30) for c in self.clients]
        r["closed_during_idle"] = sum(s["closed_early"] for s in status)
        r["pings_answered"] = sum(s["pings"] for s in status)
        self.say(
            f"idle: {r['idle_cores']:.3f} cores = {r['idle_cores_per_100k']:.3f} per 100k "
            f"(other load {r['idle_other_load']:.2f}); {r['pings_answered']:,} pings "
            f"answered, {r['closed_during_idle']} connections closed by the server"
        )

        # broadcast
        for c in self.clients:
            await c.send({"op": "arm"})
        for c in self.clients:
            await c.recv("armed", 30)
        publish, close = await asyncio.to_thread(self.publisher)
        cpu0, ccpu0 = self.tree_cpu_s(), self.clients_cpu_s()
        t_pub = time.time()
        await asyncio.to_thread(publish, {"m": MARK.decode()})
        close()
        for c in self.clients:
            await c.send({"op": "wait_mark", "timeout": 30})
        marks = [await c.recv("marks", 60) for c in self.clients]
        received = sum(m["marks"] for m in marks)
        r["broadcast_received"] = received
        # CPU, which a shared machine stretches less than the wall clock (clock ticks: 10 ms).
        r["broadcast_server_cpu_s"] = self.tree_cpu_s() - cpu0
        r["broadcast_client_cpu_s"] = self.clients_cpu_s() - ccpu0
        r["broadcast_s"] = max(m["last"] for m in marks) - t_pub if received else None
        r["broadcast_first_s"] = (
            min(m["first"] for m in marks if m["marks"]) - t_pub if received else None
        )
        self.say(
            f"broadcast: {received:,}/{subscribed:,} connections in "
            f"{r['broadcast_s'] or float('nan'):.3f}s (first after "
            f"{r['broadcast_first_s'] or float('nan'):.3f}s); server CPU "
            f"{r['broadcast_server_cpu_s']:.2f}s, clients {r['broadcast_client_cpu_s']:.2f}s"
        )

        # disconnect
        for c in self.clients:
            await c.send({"op": "close"})
        for c in self.clients:
            await c.recv("closed", 120)
        t0 = time.monotonic()
        while self.tree_sockets() > idle_sockets + 10 and time.monotonic() - t0 < 120:
            await asyncio.sleep(0.5)
        await asyncio.sleep(3.0)
        rss2 = self.tree_rss_kb()
        r["rss_after_kb"] = rss2
        growth = max(1, rss1 - rss0)
        r["retained_share"] = (rss2 - rss0) / growth
        self.say(
            f"all closed: RSS {rss2 / 1024:,.0f} MiB, {100 * r['retained_share']:.0f}% of "
            f"the growth retained ({(rss2 - rss0) / 1024:,.0f} MiB)"
        )
        return r

    def per_worker_sockets(self, pid: int) -> int:
        from fanout import sockets_of

        return sockets_of(pid)

    def publisher(self) -> tuple[Any, Any]:
        """A connected publish function for a broadcast of ``data``, and its closer: made before
        the clock starts."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        client.ping()
        if self.impl == "hub":
            from hub.publisher import Publisher

            publisher = Publisher(client=client)
            return publisher.broadcast, client.close
        return lambda data: client.publish(ALL_CHANNEL, json.dumps({"data": data})), client.close


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = min(width, int(width * done / max(1, total)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def make_table(results: dict[str, Json]) -> tuple[list[tuple[str, ...]], bool]:
    """Rows of the report, and whether the runs were whole: every connection subscribed, none
    closed while idle, every one reached by the broadcast (the targets are verdicts only)."""
    h, b = results.get("hub", {}), results.get("baseline", {})
    rows: list[tuple[str, ...]] = [("", "hub", "websockets FAQ", "ratio", "target", "")]
    ok = all(
        r.get("failed") == 0
        and r.get("closed_during_idle") == 0
        and r.get("broadcast_received") == r.get("connected")
        for r in results.values()
        if "error" not in r
    )

    def row(
        name: str,
        key: str,
        lower_better: bool,
        target: str = "",
        check: Any = None,
        digits: int = 2,
    ) -> None:
        nonlocal ok
        hv, bv = h.get(key), b.get(key)
        ratio = "-"
        if isinstance(hv, (int, float)) and isinstance(bv, (int, float)) and hv > 0 and bv > 0:
            ratio = f"{(bv / hv if lower_better else hv / bv):.2f}x"
        verdict = ""
        if check is not None and hv is not None:
            verdict = "PASS" if check(hv) else "FAIL"
        rows.append((name, fmt(hv, digits), fmt(bv, digits), ratio, target, verdict))

    t = TARGETS
    row("connections subscribed", "connected", False)
    row("failed connects", "failed", True, "0", lambda v: v == 0)
    row(
        "connects/s (handshake + subscribe)",
        "connects_per_s",
        False,
        f">= {t['connects_per_s']:,.0f}",
        lambda v: v >= t["connects_per_s"],
        0,
    )
    row("server CPU ms per connect", "server_cpu_ms_per_connect", True)
    row("client CPU s while connecting", "connect_client_cpu_s", True)
    row(
        "RSS growth KiB per connection",
        "kib_per_conn",
        True,
        f"<= {t['kib_per_conn']:g}",
        lambda v: v <= t["kib_per_conn"],
    )
    row("idle server CPU, cores", "idle_cores", True, digits=3)
    row(
        "idle server CPU, cores per 100k",
        "idle_cores_per_100k",
        True,
        f"<= {t['cores_per_100k']:g}",
        lambda v: v <= t["cores_per_100k"],
        3,
    )
    row("idle: other load on the box, cores", "idle_other_load", True)
    row("closed by the server while idle", "closed_during_idle", True, "0", lambda v: v == 0)
    row("broadcast: connections reached", "broadcast_received", False)
    row(
        "broadcast: s until the last has it",
        "broadcast_s",
        True,
        f"<= {t['bcast_s']:g}",
        lambda v: v <= t["bcast_s"],
        3,
    )
    row("broadcast: s until the first has it", "broadcast_first_s", True, digits=3)
    row("broadcast: server CPU s (all processes)", "broadcast_server_cpu_s", True)
    row("broadcast: client CPU s", "broadcast_client_cpu_s", True)
    row("RSS growth retained after disconnect", "retained_share", True)
    return rows, ok


# --------------------------------------------------------------------------------------------
# Breakdown: where the bytes of an idle connection go (tracemalloc, one in-process hub)
# --------------------------------------------------------------------------------------------

#: Allocation sites, by file, grouped into what a connection is made of.
PARTS = (
    (
        "protocol: state, parser, request and response",
        (
            "hub/ws/protocol.py",
            "hub/ws/frames.py",
            "hub/ws/http11.py",
            "hub/ws/headers.py",
            "hub/ws/streams.py",
        ),
    ),
    ("connection object (hub.ws)", ("hub/ws/connection.py", "hub/ws/keepalive.py")),
    (
        "handler task and its coroutines",
        (
            "hub/ws/server.py",
            "asyncio/tasks.py",
            "hub/app.py",
            "asyncio/base_events.py",
            "asyncio/futures.py",
            "asyncio/events.py",
        ),
    ),
    (
        "transport, socket, selector",
        (
            "asyncio/selector_events.py",
            "selectors.py",
            "socket.py",
            "asyncio/trsock.py",
            "asyncio/transports.py",
            "asyncio/protocols.py",
            # uvloop's transports are made inside the loop's run: they show at the runner's line
            "asyncio/runners.py",
        ),
    ),
    (
        "session",
        ("hub/session.py", "hub/expiry.py", "hub/limits.py", "hub/tokens.py", "hub/codec.py"),
    ),
    ("registry entries", ("hub/registry.py", "hub/node.py", "hub/presence.py")),
    ("redis bridge: the user's subscription", ("hub/bridge.py", "hub/resp.py", "redis/")),
)


def part_of(filename: str) -> str:
    name = filename.replace(os.sep, "/")
    for part, files in PARTS:
        if any(f in name for f in files):
            return part
    return "other"


async def breakdown(n: int, tmp: Path) -> Json:
    """One hub process (this one, asyncio) on a private Redis, ``n`` connections from a client
    subprocess; tracemalloc's growth by allocation site, grouped into ``PARTS``."""
    import gc
    import tracemalloc

    from hub.app import Hub
    from hub.config import load_settings
    from hub.fdlimit import plan

    run = Run("hub", argparse.Namespace(connections=n, client_procs=1, sources=2, workers=1), tmp)
    await run.start_redis()
    port = free_port()
    settings = load_settings(
        None,
        env={},
        overrides={
            "insecure": True,
            "redis_url": run.redis_url,
            "host": HOST,
            "port": port,
            "command_rate": 0,
        },
    )
    hub = Hub(settings)
    await hub.start(plan())
    try:
        await run.start_clients(port)
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        rss0 = rss_kb()
        await run.clients[0].send({"op": "connect"})
        got = await run.clients[0].recv("connected", 600)
        await asyncio.sleep(1.0)
        gc.collect()
        after = tracemalloc.take_snapshot()
        rss1 = rss_kb()
        tracemalloc.stop()
        connected = got["connected"]
        parts: dict[str, int] = {}
        lines: list[tuple[int, str]] = []
        for stat in after.compare_to(before, "lineno"):
            frame = stat.traceback[0]
            parts[part_of(frame.filename)] = parts.get(part_of(frame.filename), 0) + stat.size_diff
            lines.append(
                (stat.size_diff, f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}")
            )
        lines.sort(reverse=True)
        return {
            "connections": connected,
            "rss_kib_per_conn": (rss1 - rss0) / connected,
            "traced_bytes_per_conn": sum(parts.values()) / connected,
            "parts": {k: v / connected for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
            "top": [(size / connected, where) for size, where in lines[:40]],
            "loop": "uvloop"
            if "uvloop" in type(asyncio.get_running_loop()).__module__
            else "asyncio",
        }
    finally:
        await run.stop()
        await hub.close()


def print_breakdown(b: Json) -> None:
    print(f"\n{b['connections']:,} idle subscribed connections in one hub process (asyncio):")
    print(
        f"  RSS growth {b['rss_kib_per_conn'] * 1024:,.0f} B per connection; traced by "
        f"tracemalloc {b['traced_bytes_per_conn']:,.0f} B"
    )
    rows = [("part", "bytes per connection")]
    rows += [(part, f"{size:,.0f}") for part, size in b["parts"].items()]
    print(format_table(rows, right={1}))
    print("\ntop allocation sites (bytes per connection):")
    for size, where in b["top"]:
        print(f"  {size:8,.0f}  {where}")


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scale.py", description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--connections", type=int, help="connections (100000; --quick 10000)")
    ap.add_argument("--workers", type=int, help="server processes K (6; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="10,000 connections, 2 workers")
    ap.add_argument("--impl", choices=(*IMPLS, "both"), default="both")
    ap.add_argument(
        "--idle-seconds", type=float, default=30.0, help="idle CPU window (30: a ping cycle)"
    )
    ap.add_argument("--client-procs", type=int, help=f"client processes (N / {PER_CLIENT:,}, >= 2)")
    ap.add_argument(
        "--sources", type=int, help=f"loopback source addresses (N / {PER_SOURCE:,}, >= 2)"
    )
    ap.add_argument("--connect-timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="instead: where the bytes of N connections go in one in-process hub (tracemalloc)",
    )
    args = ap.parse_args(argv)
    args.connections = args.connections or (10_000 if args.quick else 100_000)
    args.workers = args.workers or (2 if args.quick else 6)
    n = args.connections
    args.client_procs = args.client_procs or max(2, math.ceil(n / PER_CLIENT))
    args.sources = args.sources or max(2, math.ceil(n / PER_SOURCE))
    if not 1 <= n <= 1_000_000 or not 1 <= args.workers <= 64 or not 1 <= args.sources <= 250:
        ap.error("-n must be in 1..1000000, --workers in 1..64, --sources in 1..250")
    return args


def role_main(argv: list[str]) -> int:
    raise_nofile()
    ap = argparse.ArgumentParser(prog=f"scale.py {argv[0]}")
    ap.add_argument("--port", type=int, required=True)
    if argv[0] == "_server":
        ap.add_argument("--redis", required=True)
        a = ap.parse_args(argv[1:])
        asyncio.run(baseline_main(a.port, a.redis))
    else:
        ap.add_argument("--sources", required=True)
        ap.add_argument("--first", type=int, required=True)
        ap.add_argument("--count", type=int, required=True)
        a = ap.parse_args(argv[1:])
        from workers.worker import loop_factory

        # uvloop when installed: the load generator's cost per receipt is then a fraction of
        # the servers' (its CPU is reported on its own row), for the hub and the baseline alike.
        factory, _ = loop_factory()
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(client_main(a.port, a.sources.split(","), a.first, a.count))
    return 0


async def run_all(args: argparse.Namespace, tmp: Path) -> dict[str, Json]:
    results: dict[str, Json] = {}
    impls = IMPLS if args.impl == "both" else (args.impl,)
    for impl in impls:
        run = Run(impl, args, tmp)
        try:
            results[impl] = await run.run()
        except BenchError as exc:
            progress(f"{impl}: FAILED: {exc}")
            results[impl] = {**run.result, "error": str(exc)}
        finally:
            await run.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_server", "_client"):
        return role_main(argv)
    args = parse_args(argv)
    raise_nofile()
    if args.breakdown:
        with tempfile.TemporaryDirectory(prefix="hub-scale-") as tmp:
            from workers.worker import loop_factory

            factory, loop_name = loop_factory()  # what the workers run on
            with asyncio.Runner(loop_factory=factory) as runner:
                b = runner.run(breakdown(min(args.connections, 18_000), Path(tmp)))
            b["loop"] = loop_name
        print_breakdown(b)
        if args.json:
            write_json(args.json, {"breakdown": b})
        return 0
    import hub

    meta: Json = {
        "command": command_line(),
        "python": platform.python_version(),
        "hub": f"{hub.__version__} ({git_rev()})",
        "cpu": cpu_info(),
        "cores": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    print(f"command: {meta['command']}")
    print(f"hub: {meta['hub']}   python: {meta['python']}   cpu: {meta['cpu']} x{meta['cores']}")
    print(
        f"setup: {args.connections:,} idle connections subscribed to one of {CHANNELS} channels, "
        f"{args.workers} server processes + private Redis, {args.client_procs} client processes "
        f"from {args.sources} source addresses, idle window {args.idle_seconds:g}s"
    )
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="hub-scale-") as tmp:
        results = asyncio.run(run_all(args, Path(tmp)))
    rows, ok = make_table(results)
    print()
    print(format_table(rows, right={1, 2, 3}))
    for impl, r in results.items():
        if "error" in r:
            print(f"{impl}: failed: {r['error']}")
            ok = False
    print("\nratio > 1: the hub is better. The machine is shared: see the other-load row.")
    if args.json:
        write_json(args.json, {"meta": meta, "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
