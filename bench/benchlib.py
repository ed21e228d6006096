"""What ``ws_core.py`` and ``fanout_local.py`` share: processes, the raw-socket client, reports.

Why one module: both benchmarks load a server from client processes that run a minimal
WebSocket client on a bare epoll loop, drive every process over a JSON-lines stdin/stdout
channel, and account CPU the same way. A fix to the client or to the accounting must reach both,
or their numbers stop being comparable.

- every process: fd limit, the control channel, CPU and RSS readings
- client role: handshake, masking, ``split_frames`` (the hot path) and ``EpollClient``
- parent: ``Child`` (one subprocess) and ``Runner`` (spawning, stopping, logs, progress lines)
- report and CLI: table layout, run metadata, role-subprocess options

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
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
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
ROLES = ("_server", "_client")  # argv[0] of a role subprocess; the parent spawns them itself

Json = dict[str, Any]


class BenchError(RuntimeError):
    """A scenario could not be measured (a process died, a timeout, a wrong message count)."""


# --------------------------------------------------------------------------------------------
# Every process: fd limit, control channel, CPU and RSS
# --------------------------------------------------------------------------------------------


def raise_nofile() -> int:
    """Lift the soft fd limit to the hard one: 10,000 sockets do not fit the usual 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


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


async def commands(reader: asyncio.StreamReader, limit: int) -> AsyncIterator[Json]:
    """A server's control commands until stdin closes; bounded, as every loop here is."""
    for _ in range(limit):
        line = await reader.readline()
        if not line:
            return
        yield json.loads(line)


def rss_kb(pid: int | str = "self") -> int:
    """VmRSS in KiB from /proc: what the kernel really holds for the process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def usage() -> Json:
    """A server's ``stats`` reply: its own CPU (getrusage: us resolution, all threads) and RSS."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"stats": True, "user": ru.ru_utime, "sys": ru.ru_stime, "rss_kb": rss_kb()}


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(user, sys) seconds of a process from /proc/<pid>/stat (clock ticks; used for clients)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def clients_cpu(clients: Iterable[Child]) -> tuple[float, float]:
    """Summed (user, sys) seconds of the client processes."""
    pairs = [proc_cpu_s(c.pid) for c in clients]
    return sum(p[0] for p in pairs), sum(p[1] for p in pairs)


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat.

    Compared with what our own processes used, it shows how much other load shared the cores.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def other_load(busy_s: float, ours_s: float, wall_s: float) -> float:
    """Cores used by anything but the bench in a window: the machine is shared."""
    return max(0.0, busy_s - ours_s) / wall_s


# --------------------------------------------------------------------------------------------
# Client role: raw-socket WebSocket connections on one epoll loop (no asyncio)
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


def handshake_request(key: bytes, port: int, path: str = "/", deflate: bool = False) -> bytes:
    """The opening handshake; with ``deflate`` it offers permessage-deflate like browsers do."""
    ext = f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n" if deflate else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{ext}\r\n"
    ).encode()


def read_handshake(sock: socket.socket) -> tuple[str, bytes]:
    """Read a handshake response: (its head, the bytes after it that already belong to frames)."""
    buf = b""
    for _ in range(64):  # a 101 response is a few hundred bytes: a handful of reads
        chunk = sock.recv(16384)
        if not chunk:
            raise BenchError("connection closed during handshake")
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[:end].decode("latin-1"), buf[end + 4 :]
    raise BenchError("handshake response too long")


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


def split_frames(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Every complete server frame in ``buf`` as (first byte, payload), and the incomplete tail.

    The clients' hot path, called once per read: a per-frame call or a generator costs ~50 ns
    more per frame, and a coalesced read holds hundreds of frames. A read that is exactly one
    small frame (uncoalesced sends) skips the loop.
    """
    n = len(buf)
    if n >= 2 and buf[1] < 126 and buf[1] + 2 == n:
        return [(buf[0], buf[2:])], b""
    frames: list[tuple[int, bytes]] = []
    append = frames.append
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
        append((b0, buf[start:end]))
        pos = end
    return frames, (buf[pos:] if pos < n else b"")


class ClientConn:
    """One client connection: its socket and the received bytes not yet parsed into frames."""

    __slots__ = ("buf", "count", "fd", "sock")

    def __init__(self, sock: socket.socket, buf: bytes) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = buf
        self.count = 0


ConnT = TypeVar("ConnT", bound=ClientConn)


class EpollClient(Generic[ConnT]):
    """All connections of one client process, driven by a single epoll loop.

    Why not asyncio: its per-read overhead (~15-20 us in CPython 3.11) made the clients cost more
    CPU per message than the server under test, so they became the bottleneck. A bare epoll loop
    with one ``recv`` per ready socket costs a few microseconds per read and parses every frame
    that arrived together in one pass. Subclasses say what a frame means (``feed``), what the
    parent's commands do (``command``), and how to wait (``pace``, ``tick``).
    """

    error_chars: int | None = None  # keep at most this much of each error text
    tick_every = 0.0  # seconds between tick() calls; 0 = every loop turn

    def __init__(self, port: int, deflate: bool = False) -> None:
        self.port = port
        self.deflate = deflate
        self.conns: dict[int, ConnT] = {}
        self.ext: str | None = None
        self.errors: list[str] = []
        self.quit = False
        self.control_buf = b""
        self.read_interval = 0.0  # 0 means block in epoll_wait

    def note_error(self, text: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(text[: self.error_chars])

    # -- connecting --------------------------------------------------------------------------

    def request(self, key: bytes, index: int) -> bytes:
        """The handshake of the ``index``-th connection of this process."""
        return handshake_request(key, self.port, deflate=self.deflate)

    def new_conn(self, sock: socket.socket, inflater: Any, buf: bytes) -> ConnT:
        raise NotImplementedError

    def connect_all(self, total: int, batch: int) -> None:
        """Open ``total`` connections, ``batch`` handshakes in flight at a time (pipelined)."""
        for first in range(0, total, batch):
            pending: list[tuple[socket.socket, bytes]] = []
            for i in range(first, min(first + batch, total)):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    sock.settimeout(30)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.connect((HOST, self.port))
                    key = base64.b64encode(os.urandom(16))
                    sock.sendall(self.request(key, i))
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
        head, rest = read_handshake(sock)
        inflater, ext = check_handshake(key, head, self.deflate)
        if ext and self.ext is None:
            self.ext = ext
        sock.setblocking(False)
        conn = self.new_conn(sock, inflater, rest)
        self.conns[conn.fd] = conn

    def connect_and_report(self, total: int, batch: int) -> None:
        """Connect, then tell the parent how it went (its ``connected`` line)."""
        t0 = time.monotonic()
        self.connect_all(total, batch)
        emit(
            {
                "connected": len(self.conns),
                "failed": total - len(self.conns),
                "ext": self.ext,
                "errors": self.errors,
                "connect_s": time.monotonic() - t0,
            }
        )

    # -- control and the loop ----------------------------------------------------------------

    def command(self, cmd: Json) -> None:
        """One control command from the parent (``quit`` is handled here already)."""
        raise NotImplementedError

    def control(self) -> None:
        chunk = os.read(0, 65536)
        if not chunk:
            self.quit = True
            return
        self.control_buf += chunk
        while b"\n" in self.control_buf:
            line, self.control_buf = self.control_buf.split(b"\n", 1)
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                self.quit = True
            else:
                self.command(cmd)

    def tick(self, now: float) -> None:
        """Time-based work, every ``tick_every`` seconds."""

    def pace(self) -> tuple[float, float]:
        """(seconds to sleep before a non-blocking poll, or 0 to block; the blocking timeout)."""
        return 0.0, 0.05

    def feed(self, c: ConnT, data: bytes) -> None:
        """Bytes received on ``c``: parse and handle every complete frame."""
        raise NotImplementedError

    def drop(self, ep: select.epoll, c: ConnT) -> None:
        """Stop polling a connection the server closed and close our end."""
        with contextlib.suppress(OSError):
            ep.unregister(c.fd)
        self.conns.pop(c.fd, None)
        c.sock.close()

    def server_closed(self, ep: select.epoll, c: ConnT) -> None:
        """The server closed ``c``: subclasses count it, or fail the run."""
        self.drop(ep, c)

    def run(self, max_seconds: float) -> None:
        """The event loop, bounded in time.

        With a read interval it sleeps, then takes whatever is ready without blocking: a client
        that never waits inside epoll_wait costs the server no wake-up per send, like a remote
        client.
        """
        ep = select.epoll()
        ep.register(0, select.EPOLLIN)
        for fd in self.conns:
            ep.register(fd, select.EPOLLIN)
        conns = self.conns
        feed = self.feed
        give_up = time.monotonic() + max_seconds
        next_tick = 0.0
        while not self.quit:
            now = time.monotonic()
            if now > give_up:
                break
            if now >= next_tick:
                self.tick(now)
                next_tick = now + self.tick_every
            nap, timeout = self.pace()
            if nap:
                time.sleep(nap)
                events = ep.poll(0, len(conns) + 1)
            else:
                events = ep.poll(timeout)
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
                    self.server_closed(ep, c)
                    continue
                feed(c, data)
        for c in conns.values():
            c.sock.close()


# --------------------------------------------------------------------------------------------
# Parent: role subprocesses
# --------------------------------------------------------------------------------------------


class Child:
    """A role subprocess with a JSON-lines control channel and a stderr log for post-mortems.

    A reader task queues its lines as they come, so ``recv`` waits with a deadline and a
    subclass can take some lines (progress reports) out of band in ``route``.
    """

    stop_wait = 5.0  # seconds for each of quit, terminate, kill

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log
        self.queue: asyncio.Queue[Json] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def route(self, obj: Json) -> bool:
        """True if the line was handled here and must not be queued."""
        return False

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        for _ in range(10_000_000):  # bounded: at most a few hundred lines/s for minutes
            line = await self.proc.stdout.readline()
            if not line:
                break
            obj: Json = json.loads(line)
            if not self.route(obj):
                self.queue.put_nowait(obj)
        self.queue.put_nowait({"eof": True})

    async def send(self, obj: Json) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def recv(self, key: str, timeout: float) -> Json:
        """The next control line holding ``key`` (``error`` lines and an exit are raised)."""
        deadline = time.monotonic() + timeout
        for _ in range(10_000):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                obj = await asyncio.wait_for(self.queue.get(), left)
            except TimeoutError:
                break
            if key in obj:
                return obj
            if "error" in obj:
                raise BenchError(f"{self.name}: {obj['error']}")
            if "eof" in obj:
                self.queue.put_nowait(obj)
                raise BenchError(f"{self.name} exited early:\n{self.stderr_tail()}")
        raise BenchError(f"{self.name}: no {key!r} within {timeout:.0f}s\n{self.stderr_tail()}")

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + t for t in text[-lines:])

    async def stop(self) -> None:
        """Ask politely (quit), then terminate, then kill; never waits unbounded."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send({"op": "quit"})
            for action in (None, self.proc.terminate, self.proc.kill):
                if action is not None:
                    with contextlib.suppress(ProcessLookupError):
                        action()
                try:
                    await asyncio.wait_for(self.proc.wait(), self.stop_wait)
                    break
                except TimeoutError:
                    continue
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


ChildT = TypeVar("ChildT", bound=Child)


class Runner(Generic[ChildT]):
    """Spawns and stops the role subprocesses, keeps their logs, prints progress and failures.

    Every child re-runs the benchmark script itself with a role as argv[0], so a role sees
    exactly the code the parent does. Logs stay in the temp dir when something failed.
    """

    servers_last = False  # stop the clients before the servers (names starting "server")

    def __init__(self, script: str, prefix: str, role_extra: list[str] | None = None) -> None:
        self.script = Path(script).resolve()
        self.role_extra = role_extra or []
        self.t0 = time.monotonic()
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.children: list[ChildT] = []
        self.seq = 0
        self.keep_tmp = False
        self.errors: list[str] = []
        #: Phases planned for the whole run and done so far: the progress lines' bar.
        self.steps_total = 0
        self.steps_done = 0

    def progress(self, text: str) -> None:
        bar = progress_bar(self.steps_done, self.steps_total)
        print(f"[{time.monotonic() - self.t0:6.1f}s]{bar} {text}", file=sys.stderr, flush=True)

    def step(self) -> None:
        """One planned phase is over (the bar moves on the next progress line)."""
        self.steps_done = min(self.steps_done + 1, self.steps_total)

    def fail(self, label: str, exc: BaseException) -> None:
        self.errors.append(f"{label}: {exc}")
        self.progress(f"{label}: FAILED: {exc}")

    def make_child(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> ChildT:
        raise NotImplementedError

    async def spawn(self, name: str, role_args: list[str]) -> ChildT:
        self.seq += 1
        log = self.tmp / f"{self.seq:03d}-{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(self.script), *role_args, *self.role_extra]
        with open(log, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=env,
                limit=1 << 20,
            )
        child = self.make_child(name, proc, log)
        self.children.append(child)
        return child

    async def spawn_server(self, name: str, role_args: list[str]) -> tuple[ChildT, int]:
        """Spawn a server role and wait for the port it listens on."""
        server = await self.spawn(name, role_args)
        ready = await server.recv("ready", 60)
        return server, int(ready["ready"])

    async def spawn_clients(
        self, total: int, procs: int, role_args: Callable[[int, int], list[str]]
    ) -> list[ChildT]:
        """Spread ``total`` connections over ``procs`` client processes.

        ``role_args(conns, first)`` gives one process's options: it opens ``conns`` connections,
        the first of which is number ``first`` overall.
        """
        procs = max(1, min(procs, total))
        sizes = [total // procs + (1 if i < total % procs else 0) for i in range(procs)]
        batch = max(8, 96 // procs)  # handshakes in flight stay under the listen backlog of 100
        clients = []
        first = 0
        for i, n in enumerate(sizes):
            role = [*role_args(n, first), "--batch", str(batch)]
            clients.append(await self.spawn(f"client{i}", role))
            first += n
        return clients

    @staticmethod
    async def await_connected(clients: list[ChildT], total: int) -> list[Json]:
        """Every client process's ``connected`` report; any failed connection fails the run."""
        timeout = 60 + total * 0.01
        infos = await asyncio.gather(*(c.recv("connected", timeout) for c in clients))
        failed = sum(int(i["failed"]) for i in infos)
        if failed:
            errs = sorted({e for i in infos for e in i["errors"]})
            raise BenchError(f"{failed} of {total} connections failed: {errs[:3]}")
        return infos

    async def stop_all(self) -> None:
        children, self.children = self.children, []
        if self.servers_last:
            # Clients first: a server shutting down would close thousands of connections.
            await asyncio.gather(*(c.stop() for c in children if not c.name.startswith("server")))
            children = [c for c in children if c.name.startswith("server")]
        await asyncio.gather(*(c.stop() for c in children))

    async def finish(self) -> None:
        """Stop every child; drop the logs unless something failed or asked to keep them."""
        await self.stop_all()
        if not self.errors and not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of a sorted sequence."""
    if not ordered:
        return None
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """`` [######--------------]  30%``, or nothing when no phases were planned."""
    if total <= 0:
        return ""
    filled = round(width * done / total)
    return f" [{'#' * filled}{'-' * (width - filled)}] {100 * done // total:3d}%"


def plot_latency(series: dict[str, tuple[Sequence[float], Sequence[float]]], out: str) -> None:
    """A PNG of delivery latency over the timed fixed-rate phase, one panel line per server.

    ``series`` maps a label to (publish times in seconds, latencies in ms), one pair per
    delivery; each 100 ms of publish time is drawn as its median and its 99th percentile.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install -e '.[bench]'") from None
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for label, (times, lats) in series.items():
        if not times:
            continue
        start = min(times)
        bins: dict[int, list[float]] = {}
        for t, lat in zip(times, lats, strict=True):
            bins.setdefault(int((t - start) * 10), []).append(lat)
        xs = sorted(bins)
        p50 = [percentile(sorted(bins[x]), 0.50) for x in xs]
        p99 = [percentile(sorted(bins[x]), 0.99) for x in xs]
        seconds = [x / 10 for x in xs]
        (line,) = ax.plot(seconds, p99, label=f"{label} p99")
        ax.plot(seconds, p50, linestyle="--", color=line.get_color(), label=f"{label} p50")
    ax.set_xlabel("seconds into the timed fixed-rate phase (publish time, 100 ms bins)")
    ax.set_ylabel("delivery latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def run_timed(run: Callable[[], object]) -> float | None:
    """Run the parent's whole bench; its elapsed seconds, or None after Ctrl-C (said on stderr)."""
    started = time.monotonic()
    try:
        run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return None
    return round(time.monotonic() - started, 1)


# --------------------------------------------------------------------------------------------
# Report and CLI
# --------------------------------------------------------------------------------------------


def fmt_num(v: float | None) -> str:
    """Three significant-ish digits, thousands separated: the table's only number format."""
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_table(table: Sequence[tuple[str, ...]], right: Collection[int]) -> str:
    """Plain-text columns, the first row a header underlined with dashes; ``right`` aligns."""
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = []
    for i, t in enumerate(table):
        cells = [c.rjust(widths[j]) if j in right else c.ljust(widths[j]) for j, c in enumerate(t)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def free_port() -> int:
    """A port the kernel just handed out; a fresh one per server keeps TIME_WAIT tuples apart."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def git_rev() -> str:
    """Which hub was measured: the commit, and whether the tree had local changes."""
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


def command_line() -> str:
    """This run's command, quoted so it can be pasted back into a shell."""
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def cpu_info() -> str:
    """The CPU model and count: numbers are only comparable on the same machine."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return f"{cpu} x {os.cpu_count()}"


def role_parser(prog: str, argv: list[str]) -> argparse.ArgumentParser:
    """Options of a role subprocess (``argv[0]`` is the role); the parent fills them in.

    Every client role takes ``--port``, ``--conns`` and ``--batch``; the caller adds the rest.
    """
    ap = argparse.ArgumentParser(prog=f"{prog} {argv[0]}")
    if argv[0] == "_client":
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--conns", type=int, required=True)
        ap.add_argument("--batch", type=int, default=32)
    return ap


def add_impl_json(ap: argparse.ArgumentParser, impls: tuple[str, ...]) -> None:
    """``--impl`` (one implementation or both, default both) and ``--json OUT``."""
    ap.add_argument("--impl", choices=(*impls, "both"), default="both")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write meta, results, table")


def write_json(path: Path, payload: Json) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
