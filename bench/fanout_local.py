"""Fan-out on one process: the hub against a pub/sub server written the way the websockets FAQ
suggests, with 2,000 subscribers on one channel, measured side by side in one run.

Why this exists: ``ws_core.py`` measures the WebSocket core with the server calling
``broadcast()`` itself. This script measures the whole hub path instead. A client publishes over
a WebSocket (``{"op":"publish",...}``), the hub checks the command and fans it out through its
registry and sessions, and subscribers count what they receive. The baseline is the design the
``websockets`` FAQ recommends for channels. It keeps a module-level ``CHANNELS: dict[str, set]``
and calls ``websockets.broadcast(CHANNELS[channel], json.dumps(push))`` for each publish. Both
servers take the same commands and send byte-identical pushes
(``{"channel":"bench:room","data":{"seq":N,"ts":T,"pad":"..."},"from":{...}}``, 100 bytes
and the ``from`` of a client publication, which the baseline adds too), so the same
clients and the same publisher drive both.

Two modes, for each implementation:

- closed loop: the publisher keeps W publishes in flight (it waits for the replies). It also stays
  at most ``--max-lag`` messages ahead of the slowest subscriber, so no server buffers without
  bound. Result: delivered messages/s counted by the subscribers, and server CPU (user+sys, from
  ``getrusage`` in the server) per delivered message.
- fixed rate: 20 publishes/s to 2,000 subscribers (40,000 deliveries/s). Every subscriber computes
  ``time.time() - ts`` for every message. p50/p99/max are taken over all deliveries, with a
  warm-up left out.

Every subscriber checks that it got every sequence number exactly once and in order.

    .venv/bin/python bench/fanout_local.py                 # both implementations (~90 s)
    .venv/bin/python bench/fanout_local.py --quick         # smoke run (< 60 s)
    .venv/bin/python bench/fanout_local.py --impl hub --json out.json

Only 127.0.0.1 is contacted. Method and caveats: bench/README.md.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import gc
import json
import os
import platform
import resource
import select
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this file

from benchlib import (  # the shared client, process and report pieces
    HOST,
    ROLES,
    BenchError,
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
    git_rev,
    handshake_request,
    machine_busy_s,
    mask_frame,
    other_load,
    percentile,
    plot_latency,
    raise_nofile,
    role_parser,
    run_timed,
    split_frames,
    stdin_reader,
    usage,
    write_json,
)
from benchlib import Child as BaseChild

CHANNEL = "bench:room"
PUSH_SIZE = 100  # bytes of every push payload (the pad is sized to hit it exactly)
IMPLS = ("baseline", "hub")
# Dev mode (the bench clients connect with ?user=), and no per-connection command rate limit:
# the closed-loop publisher is one connection sending as fast as the hub answers.
HUB_TOML = "insecure = true\ncommand_rate = 0\n[namespaces.bench]\npublish = true\n"
MAX_SEQ = 10_000_000  # a parsed seq above this is treated as garbage, not as a huge gap

# The hub's JSON codec is compact (and ensure_ascii=False, identical for ASCII): the publisher
# sizes its pad with it, and the baseline encodes pushes with it so both put the same bytes out.
_dumps = json.JSONEncoder(separators=(",", ":")).encode


#: The ``from`` the hub adds to a client's publication, in its size (the client id is 32 hex
#: digits); the baseline adds one of the same shape, so both push the same bytes.
FROM_SHAPE: Json = {"user": "publisher", "client": "0" * 32, "info": None}
#: A client publication's push: PUSH_SIZE bytes of channel and data, plus its ``from``.
CLIENT_PUSH_SIZE = PUSH_SIZE + len(',"from":' + _dumps(FROM_SHAPE))


def publish_command(seq: int, size: int) -> str:
    """A publish whose resulting push is exactly ``size`` bytes; ``ts`` is taken at build time."""
    data: Json = {"seq": seq, "ts": time.time(), "pad": ""}
    push = {"channel": CHANNEL, "data": data, "from": FROM_SHAPE}
    data["pad"] = "x" * max(0, size - len(_dumps(push)))
    return _dumps({"op": "publish", "channel": CHANNEL, "data": data, "id": seq})


# --------------------------------------------------------------------------------------------
# Server role: the hub, or the FAQ-style baseline, plus a stdin control channel
# --------------------------------------------------------------------------------------------

CHANNELS: dict[str, set[Any]] = {}  # the baseline's registry, as in the websockets FAQ


def baseline_command(websocket: Any, message: str | bytes) -> str:
    """Handle one command the way the hub's protocol defines it; returns the reply."""
    from websockets.asyncio.server import broadcast

    try:
        command = json.loads(message)
        cid, op, channel = command["id"], command["op"], command["channel"]
    except (ValueError, KeyError, TypeError):
        return _dumps({"id": None, "error": {"code": 107, "message": "bad request"}})
    if op == "subscribe":
        CHANNELS.setdefault(channel, set()).add(websocket)
    elif op == "publish":
        sender = {"user": "publisher", "client": websocket.id.hex, "info": None}
        push = _dumps({"channel": channel, "data": command.get("data"), "from": sender})
        broadcast(CHANNELS.get(channel, ()), push)
    else:
        return _dumps({"id": cid, "error": {"code": 104, "message": "unknown op"}})
    return _dumps({"id": cid, "result": {}})


async def baseline_handler(websocket: Any) -> None:
    """The FAQ pattern: read commands, register subscribers, broadcast publishes."""
    try:
        async for message in websocket:
            await websocket.send(baseline_command(websocket, message))
    finally:
        for subscribers in CHANNELS.values():
            subscribers.discard(websocket)


class GcWatch:
    """Counts the server's garbage collections and their pauses, per generation.

    A full (generation 2) collection walks every object of 2,000 connections and stops the
    loop while it does. That can explain a latency tail that CPU per message does not.
    """

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.pause_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]  # since the last stats read
        self.t0 = 0.0
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.t0 = time.perf_counter()
            return
        gen = info["generation"]
        pause = time.perf_counter() - self.t0
        self.count[gen] += 1
        self.pause_s[gen] += pause
        self.max_s[gen] = max(self.max_s[gen], pause)

    def read(self) -> Json:
        out = {"gc_count": list(self.count), "gc_pause_s": list(self.pause_s)}
        out["gc_max_s"], self.max_s = self.max_s, [0.0, 0.0, 0.0]
        return out


async def server_main(impl: str, config: str) -> None:
    """Serve until stdin closes or ``quit``; answer ``stats`` and ``count`` commands."""
    reader = await stdin_reader()
    watch = GcWatch()
    if impl == "hub":
        from hub.app import Hub
        from hub.config import load_settings

        hub = Hub(load_settings(config, env={}, overrides={"port": 0}))
        await hub.start()
        port = hub.port

        def count() -> int:
            return len(hub.node.registry.subscribers(CHANNEL))

        async def close() -> None:
            await hub.close()

    else:
        from websockets.asyncio.server import serve

        server = await serve(baseline_handler, HOST, 0)
        port = int(server.sockets[0].getsockname()[1])

        def count() -> int:
            return len(CHANNELS.get(CHANNEL, ()))

        async def close() -> None:
            server.close()
            await server.wait_closed()

    emit({"ready": port, "pid": os.getpid()})
    try:
        # Bounded: the parent sends a few dozen commands.
        async for cmd in commands(reader, 100_000):
            op = cmd["op"]
            if op == "stats":
                stats = usage()  # before the object count, which costs a few ms of CPU
                if cmd.get("objects"):  # what a full collection has to walk
                    stats["gc_objects"] = len(gc.get_objects())
                emit({**stats, **watch.read()})
            elif op == "count":
                emit({"count": count()})
            elif op == "gc":  # how long a full collection stops this server's loop
                t0 = time.perf_counter()
                freed = gc.collect()
                emit({"gc": time.perf_counter() - t0, "freed": freed})
            elif op == "quit":
                break
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close(), 10)


# --------------------------------------------------------------------------------------------
# Client role: many subscriber connections on one bare epoll loop (no asyncio: see ws_core)
# --------------------------------------------------------------------------------------------


class Sub(ClientConn):
    """One subscriber connection: receive buffer and sequence-check state."""

    __slots__ = ("last", "missing", "subscribed")

    def __init__(self, sock: socket.socket, buf: bytes) -> None:
        super().__init__(sock, buf)
        self.last = 0  # highest seq seen; pushes start at seq 1
        self.missing: set[int] | None = None  # seqs skipped over, until they arrive late
        self.subscribed = False


class SubscriberProc(EpollClient[Sub]):
    """All subscribers of one client process.

    Every push is JSON-parsed, but once per distinct payload: the 1,000 copies of one
    publication are byte-identical, so the rest are a dict hit on the payload bytes. That
    keeps the client cost per message near ws_core's 1-3 us. The server stays the bottleneck,
    and identical bytes cannot parse differently.
    """

    error_chars = 300
    tick_every = 0.005

    def __init__(self, port: int, first_user: int, size: int) -> None:
        super().__init__(port)
        self.first_user = first_user
        self.size = size
        self.all: list[Sub] = []
        self.cache: dict[bytes, tuple[int, float]] = {}
        self.messages = 0
        self.bad = 0
        self.dup = 0
        self.reordered = 0
        self.closed = 0
        self.subscribed = 0
        self.sub_reported = False
        self.sub_t0 = 0.0
        self.active = False
        self.reported = -1
        self.lo, self.hi = 1, 0  # record latencies for lo <= seq <= hi
        self.lat = array.array("d")
        self.lat_t = array.array("d")  # and each one's publish time (--plot)
        self.sync: Json | None = None

    # -- connecting --------------------------------------------------------------------------

    def request(self, key: bytes, index: int) -> bytes:
        return handshake_request(key, self.port, path=f"/ws?user=u{self.first_user + index}")

    def new_conn(self, sock: socket.socket, inflater: Any, buf: bytes) -> Sub:
        sub = Sub(sock, buf)
        self.all.append(sub)
        return sub

    def subscribe_all(self) -> None:
        """Send the subscribe command on every connection; replies arrive in the run loop."""
        self.sub_t0 = time.monotonic()
        payload = _dumps({"op": "subscribe", "channel": CHANNEL, "id": 1}).encode()
        for sub in self.all:
            sub.sock.send(mask_frame(0x1, payload))  # tiny frame, empty socket buffer

    # -- receiving ---------------------------------------------------------------------------

    def feed(self, c: Sub, data: bytes) -> None:
        """Check and time every push in the buffer. The hot path of the client."""
        now = time.time()
        frames, c.buf = split_frames(c.buf + data if c.buf else data)
        cache_get = self.cache.get
        lo, hi = self.lo, self.hi
        got = 0
        for b0, payload in frames:
            if b0 != 0x81:  # pings, closes, anything but one whole text frame
                self.other_frame(c, b0, payload)
                continue
            hit = cache_get(payload)
            if hit is None:
                hit = self.parse(c, payload)
                if hit is None:
                    continue
            seq = hit[0]
            got += 1
            if seq == c.last + 1:
                c.last = seq
            else:
                self.irregular(c, seq)
            if lo <= seq <= hi:
                self.lat.append(now - hit[1])
                self.lat_t.append(hit[1])
        c.count += got
        self.messages += got

    def parse(self, c: Sub, payload: bytes) -> tuple[int, float] | None:
        """Full JSON parse of a payload not seen before: a push (cached), or a command reply."""
        try:
            obj = json.loads(payload)
        except ValueError:
            self.bad += 1
            self.note_error(f"not JSON: {payload[:80]!r}")
            return None
        if not isinstance(obj, dict):
            self.bad += 1
            return None
        if "channel" not in obj and "id" in obj:
            if obj.get("id") == 1 and obj.get("result") == {} and not c.subscribed:
                c.subscribed = True
                self.subscribed += 1
            else:
                self.bad += 1
                self.note_error(f"unexpected reply: {obj}")
            return None
        data = obj.get("data")
        seq = data.get("seq") if isinstance(data, dict) else None
        ts = data.get("ts") if isinstance(data, dict) else None
        if (
            obj.get("channel") != CHANNEL
            or not isinstance(seq, int)
            or not 1 <= seq <= MAX_SEQ
            or not isinstance(ts, float)
            or len(payload) != self.size
        ):
            self.bad += 1
            self.note_error(f"bad push ({len(payload)} bytes): {payload[:120]!r}")
            return None
        if len(self.cache) >= 4096:  # bounded; a cleared entry is just parsed again
            self.cache.clear()
        hit = self.cache[payload] = (seq, ts)
        return hit

    def irregular(self, c: Sub, seq: int) -> None:
        """A seq other than last + 1: a gap (maybe filled later), a late arrival, or a dup."""
        if seq > c.last:
            if c.missing is None:
                c.missing = set()
            c.missing.update(range(c.last + 1, seq))
            c.last = seq
        elif c.missing and seq in c.missing:
            c.missing.discard(seq)
            self.reordered += 1
        else:
            self.dup += 1

    def other_frame(self, c: Sub, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == 0x9:
            c.sock.send(mask_frame(0xA, payload))  # keepalive: both servers ping
        elif opcode == 0xA:
            return
        elif opcode == 0x8:
            self.note_error(f"server sent close {payload[:2].hex()} {payload[2:80]!r}")
        else:
            self.bad += 1  # binary or fragmented pushes never happen for these messages
            self.note_error(f"unexpected frame 0x{b0:02x}")

    # -- control and the loop ----------------------------------------------------------------

    def command(self, cmd: Json) -> None:
        op = cmd["op"]
        if op == "run":
            self.active = True
            self.read_interval = float(cmd["read_interval"])
        elif op == "record":
            self.lo, self.hi = int(cmd["lo"]), int(cmd["hi"])
            self.lat = array.array("d")
            self.lat_t = array.array("d")
        elif op == "mark":
            emit({"mark": self.messages, "t": time.monotonic()})
        elif op == "sync":
            cmd["deadline"] = time.monotonic() + float(cmd["timeout"])
            self.sync = cmd

    def min_last(self) -> int:
        return min((c.last for c in self.conns.values()), default=0)

    def tick(self, now: float) -> None:
        """Every ~5 ms: subscription done? progress for the publisher's lag bound, syncs."""
        if not self.sub_reported and (self.subscribed >= len(self.all) or now > self.sub_t0 + 60):
            self.sub_reported = True
            emit({"subscribed": self.subscribed, "subscribe_s": now - self.sub_t0})
        if self.active:
            low = self.min_last()
            if low != self.reported:
                self.reported = low
                emit({"p": low})
        sync = self.sync
        if sync is not None:
            target = int(sync["seq"])
            ok = self.min_last() >= target
            if ok or now > sync["deadline"]:
                self.sync = None
                self.report(target, ok, sync.get("dump") or "")

    def report(self, target: int, ok: bool, dump: str) -> None:
        """Integrity totals against ``target`` (the last seq published), and the latencies."""
        lost = sum(len(c.missing or ()) + max(0, target - c.last) for c in self.all)
        lat = len(self.lat)
        if dump:
            with open(dump, "wb") as f:
                self.lat.tofile(f)
            with open(dump + ".t", "wb") as f:
                self.lat_t.tofile(f)
            self.lo, self.hi = 1, 0
            self.lat = array.array("d")
            self.lat_t = array.array("d")
        emit(
            {
                "synced": ok,
                "seq": target,
                "messages": self.messages,
                "conns": len(self.all),
                "lost": lost,
                "dup": self.dup,
                "reordered": self.reordered,
                "bad": self.bad,
                "closed": self.closed,
                "lat": lat,
                "errors": self.errors,
            }
        )

    def pace(self) -> tuple[float, float]:
        """While active: sleep ``read_interval``, then read whatever is ready without blocking."""
        return (self.read_interval if self.active else 0.0), 0.005

    def server_closed(self, ep: select.epoll, c: Sub) -> None:
        """Keep its state for the loss count, stop polling it."""
        self.drop(ep, c)
        self.closed += 1
        self.note_error("a connection was closed by the server")


def client_main(port: int, conns: int, first_user: int, size: int, batch: int) -> None:
    """Connect, subscribe, then serve control commands until told to quit (or an hour)."""
    proc = SubscriberProc(port, first_user, size)
    proc.connect_and_report(conns, batch)
    proc.subscribe_all()
    proc.run(max_seconds=3600)


# --------------------------------------------------------------------------------------------
# Parent: child processes, the publisher, the phases
# --------------------------------------------------------------------------------------------


class Child(BaseChild):
    """A role subprocess whose ``{"p": seq}`` lines (the slowest subscriber's last seq) go to
    ``progress`` at once, for the publisher's lag bound, instead of the queue."""

    stop_wait = 10.0

    def __init__(
        self, name: str, proc: asyncio.subprocess.Process, log: Path, wake: asyncio.Event
    ) -> None:
        self.wake = wake
        self.progress = 0
        super().__init__(name, proc, log)

    def route(self, obj: Json) -> bool:
        if "p" not in obj:
            return False
        self.progress = int(obj["p"])
        self.wake.set()
        return True


class Publisher:
    """One WebSocket client (the ``websockets`` client) that publishes and counts replies."""

    def __init__(self, ws: Any, wake: asyncio.Event, size: int) -> None:
        self.ws, self.wake, self.size = ws, wake, size
        self.seq = 0
        self.inflight = 0
        self.acked = 0
        self.errors: list[str] = []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, port: int, wake: asyncio.Event, size: int) -> Publisher:
        from websockets.asyncio.client import connect

        uri = f"ws://{HOST}:{port}/ws?user=publisher"
        ws = await connect(uri, compression=None, ping_interval=None, open_timeout=30)
        return cls(ws, wake, size)

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                obj = json.loads(message)
                self.inflight -= 1
                if obj.get("result") == {}:
                    self.acked += 1
                elif len(self.errors) < 5:
                    self.errors.append(str(obj)[:200])
                self.wake.set()

    async def publish(self) -> None:
        self.seq += 1
        self.inflight += 1
        await self.ws.send(publish_command(self.seq, self.size))

    async def drain(self, timeout: float) -> bool:
        """Wait until every publish is answered."""
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.05)
        return self.inflight == 0

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


def gc_text(r: Json) -> str:
    """The server's collections in a window, and the longest pause of each generation."""
    g = r["server_gc"]
    parts = [f"gen{i} {g['count'][i]}x max {g['max_pause_ms'][i]:.1f} ms" for i in range(3)]
    return "server gc " + ", ".join(parts)


def aggregate_pyspy(path: Path, top: int = 15) -> Json:
    """Fold py-spy's raw stacks (``frame;frame;... count``) into self and inclusive shares.

    Self time of a Python frame includes the C code and syscalls it calls (``transport.write``'s
    ``send`` shows up under the caller), which is what a per-delivery cost breakdown needs.
    """
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    files: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        names = []
        for frame in stack.split(";"):
            func, _, where = frame.partition(" (")
            file = where.rsplit(":", 1)[0].rstrip(")")
            parts = Path(file).parts
            short = "/".join(parts[-3:] if "hub" in parts[-3:-1] else parts[-2:])
            names.append((f"{func} ({short})", short))
        leaf, leaf_file = names[-1]
        own[leaf] = own.get(leaf, 0) + n
        files[leaf_file] = files.get(leaf_file, 0) + n
        for name in {nm for nm, _ in names}:
            incl[name] = incl.get(name, 0) + n

    def share(d: dict[str, int]) -> list[tuple[str, float]]:
        # Frames on every stack (the loop, runners, this script's main) say nothing: skipped.
        ranked = sorted(((k, v) for k, v in d.items() if v < 0.98 * total), key=lambda kv: -kv[1])
        return [(k, v / max(total, 1)) for k, v in ranked[:top]]

    return {"samples": total, "self": share(own), "inclusive": share(incl), "files": share(files)}


def render_profile(prof: Json) -> str:
    """Three short rankings: self time by function, by file, and inclusive time."""
    lines = [f"py-spy, hub server, closed loop W={prof['window']}: {prof['samples']} samples"]
    for key, title in (
        ("self", "self time (incl. C calls and syscalls)"),
        ("files", "self time by file"),
        ("inclusive", "inclusive time"),
    ):
        lines.append(f"  {title}:")
        lines += [f"    {v:6.1%}  {k}" for k, v in prof[key][:12]]
    return "\n".join(lines)


class Bench(Runner[Child]):
    """Runs both implementations, keeps results, prints progress with elapsed time."""

    servers_last = True

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(__file__, "fanout_bench_")
        self.args = args
        self.syncs = 0
        self.results: dict[str, Json] = {}
        #: Per server: (publish time s, latency ms) of every timed delivery, for --plot.
        self.series: dict[str, tuple[array.array[float], array.array[float]]] = {}
        self.wake = asyncio.Event()
        self.config = self.tmp / "hub.toml"
        delay = getattr(args, "write_delay", 0.0)
        self.config.write_text((f"write_delay = {delay}\n" if delay else "") + HUB_TOML)

    def make_child(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> Child:
        return Child(name, proc, log, self.wake)

    async def snapshot(self, server: Child, clients: list[Child], pub: Publisher) -> Json:
        """Server CPU (getrusage), per-client message counts, client/parent CPU, machine load."""
        for c in (server, *clients):
            await c.send({"op": "stats"} if c is server else {"op": "mark"})
        stats, *marks = await asyncio.gather(
            server.recv("stats", 30), *(c.recv("mark", 30) for c in clients)
        )
        client_user, client_sys = clients_cpu(clients)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "t": time.monotonic(),
            "server_user": stats["user"],
            "server_sys": stats["sys"],
            "rss_kb": stats["rss_kb"],
            "gc": stats,
            "marks": [(int(m["mark"]), float(m["t"])) for m in marks],
            "client_user": client_user,
            "client_sys": client_sys,
            "parent": ru.ru_utime + ru.ru_stime,
            "busy": machine_busy_s(),
            "seq": pub.seq,
        }

    @staticmethod
    def window(s0: Json, s1: Json, deliveries: int) -> Json:
        """CPU and load between two snapshots, per delivery."""
        wall = s1["t"] - s0["t"]
        user = s1["server_user"] - s0["server_user"]
        sys_ = s1["server_sys"] - s0["server_sys"]
        cpu = user + sys_
        ccpu = (s1["client_user"] + s1["client_sys"]) - (s0["client_user"] + s0["client_sys"])
        parent = s1["parent"] - s0["parent"]
        busy = s1["busy"] - s0["busy"]
        per = max(deliveries, 1)
        g0, g1 = s0["gc"], s1["gc"]
        return {
            "wall_s": wall,
            "server_user_s": user,
            "server_sys_s": sys_,
            "server_us_per_delivery": cpu / per * 1e6,
            "server_util": cpu / wall,
            "client_cpu_s": ccpu,
            "client_us_per_delivery": ccpu / per * 1e6,
            "client_util": ccpu / wall,
            "publisher_cpu_s": parent,
            "other_load_cores": other_load(busy, cpu + ccpu + parent, wall),
            "server_gc": {
                "count": [b - a for a, b in zip(g0["gc_count"], g1["gc_count"], strict=True)],
                "pause_ms": [
                    (b - a) * 1e3 for a, b in zip(g0["gc_pause_s"], g1["gc_pause_s"], strict=True)
                ],
                "max_pause_ms": [m * 1e3 for m in g1["gc_max_s"]],
            },
        }

    async def sync(self, clients: list[Child], seq: int, dump: bool = False) -> list[Json]:
        """Wait until every subscriber has seq (or a timeout); collect integrity counts."""
        outs: list[Json] = []
        self.syncs += 1
        for i, c in enumerate(clients):
            path = str(self.tmp / f"lat-{self.syncs}-{i}.f64") if dump else ""
            await c.send({"op": "sync", "seq": seq, "timeout": 60, "dump": path})
            outs.append({"path": path})
        replies = await asyncio.gather(*(c.recv("synced", 90) for c in clients))
        for out, reply in zip(outs, replies, strict=True):
            out.update(reply)
        return outs

    # -- phases ------------------------------------------------------------------------------

    async def latency_phase(
        self, label: str, server: Child, clients: list[Child], pub: Publisher, n: int
    ) -> Json:
        """Publish at a fixed rate; subscribers time every delivery after the warm-up."""
        a = self.args
        rate = a.rate
        warm_n = max(1, round(rate * a.lat_warmup))
        meas_n = max(1, round(rate * a.lat_seconds))
        lo, hi = pub.seq + warm_n + 1, pub.seq + warm_n + meas_n
        for c in clients:
            await c.send({"op": "record", "lo": lo, "hi": hi})
        self.progress(
            f"{label}: fixed rate {rate:g} msg/s x {n:,} = {rate * n:,.0f} deliveries/s, "
            f"{warm_n} warm-up + {meas_n} timed messages"
        )
        t0 = time.monotonic()
        snap0: asyncio.Task[Json] | None = None
        for i in range(warm_n + meas_n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if i == warm_n:
                snap0 = asyncio.create_task(self.snapshot(server, clients, pub))
            await pub.publish()
        late = time.monotonic() - (t0 + (warm_n + meas_n - 1) / rate)
        outs = await self.sync(clients, hi, dump=True)
        snap1 = await self.snapshot(server, clients, pub)
        assert snap0 is not None
        s0 = await snap0
        if not all(o["synced"] for o in outs):
            raise BenchError(f"subscribers did not get seq {hi}: {outs}")
        lat = array.array("d")
        lat_t = array.array("d")
        for o in outs:
            lat.frombytes(Path(o["path"]).read_bytes())
            lat_t.frombytes(Path(o["path"] + ".t").read_bytes())
        if a.plot:
            self.series[label] = (lat_t, array.array("d", (x * 1000 for x in lat)))
        expected = meas_n * n
        ordered = sorted(x * 1000 for x in lat)
        r: Json = {
            "rate": rate,
            "target_deliveries_per_s": rate * n,
            "timed_messages": meas_n,
            "samples": len(ordered),
            "expected_samples": expected,
            "publisher_late_s": late,
            "p50_ms": percentile(ordered, 0.50),
            "p90_ms": percentile(ordered, 0.90),
            "p99_ms": percentile(ordered, 0.99),
            "p999_ms": percentile(ordered, 0.999),
            "max_ms": ordered[-1] if ordered else None,
            "mean_ms": sum(ordered) / len(ordered) if ordered else None,
        }
        r.update(self.window(s0, snap1, expected))
        if len(ordered) != expected:
            raise BenchError(f"{len(ordered)} latency samples, expected {expected}")
        self.progress(
            f"{label}: latency p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max "
            f"{r['max_ms']:.2f} ms over {len(ordered):,} deliveries; server "
            f"{r['server_us_per_delivery']:.2f} us/delivery, busy {r['server_util']:.0%}; "
            f"clients {r['client_us_per_delivery']:.2f} us/msg; "
            f"other load {r['other_load_cores']:.2f} cores; {gc_text(r)}"
        )
        return r

    async def closed_loop(
        self, pub: Publisher, clients: list[Child], window: int, stop_at: float
    ) -> None:
        """Keep ``window`` publishes in flight, at most ``max_lag`` ahead of the slowest
        subscriber, until ``stop_at``."""
        max_lag = max(self.args.max_lag, window)
        for _ in range(100_000_000):
            if time.monotonic() >= stop_at:
                return
            slowest = min(c.progress for c in clients)
            if pub.inflight < window and pub.seq - slowest < max_lag:
                await pub.publish()
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.05)

    async def throughput_phase(
        self,
        label: str,
        server: Child,
        clients: list[Child],
        pub: Publisher,
        n: int,
        window: int,
    ) -> Json:
        """Closed loop: warm up, then count deliveries and server CPU over a fixed window."""
        a = self.args
        self.progress(
            f"{label}: closed loop, {window} publishes in flight, at most "
            f"{max(a.max_lag, window)} ahead of the slowest subscriber, "
            f"{a.tp_warmup:g}s warm-up + {a.tp_seconds:g}s measured"
        )
        stop_at = time.monotonic() + a.tp_warmup + a.tp_seconds + 5
        loop = asyncio.create_task(self.closed_loop(pub, clients, window, stop_at))
        try:
            await asyncio.sleep(a.tp_warmup)
            s0 = await self.snapshot(server, clients, pub)
            step = 2.5
            left = a.tp_seconds
            for _ in range(1000):
                if left <= 1e-6:
                    break
                nap = min(step, left)
                seq0 = pub.seq
                await asyncio.sleep(nap)
                left -= nap
                if left > 1e-6:
                    slowest = min(c.progress for c in clients)
                    self.progress(
                        f"{label}: W={window}: {(pub.seq - seq0) / nap:,.0f} publishes/s "
                        f"(~{(pub.seq - seq0) * n / nap:,.0f} deliveries/s), seq {pub.seq}, "
                        f"slowest subscriber at {slowest}"
                    )
            s1 = await self.snapshot(server, clients, pub)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        if not await pub.drain(30):
            raise BenchError(f"{pub.inflight} publishes unanswered")
        deliveries = sum(m1[0] - m0[0] for m0, m1 in zip(s0["marks"], s1["marks"], strict=True))
        rate = sum(
            (m1[0] - m0[0]) / (m1[1] - m0[1])
            for m0, m1 in zip(s0["marks"], s1["marks"], strict=True)
        )
        r: Json = {
            "window": window,
            "max_lag": max(a.max_lag, window),
            "deliveries": deliveries,
            "deliveries_per_s": rate,
            "publishes_per_s": (s1["seq"] - s0["seq"]) / (s1["t"] - s0["t"]),
        }
        r.update(self.window(s0, s1, deliveries))
        outs = await self.sync(clients, pub.seq)
        if not all(o["synced"] for o in outs):
            raise BenchError(f"subscribers did not catch up to seq {pub.seq}: {outs}")
        self.progress(
            f"{label}: W={window}: {rate:,.0f} deliveries/s, "
            f"{r['server_us_per_delivery']:.2f} us server CPU/delivery, server busy "
            f"{r['server_util']:.0%} (user {r['server_user_s']:.2f}s sys "
            f"{r['server_sys_s']:.2f}s), clients {r['client_us_per_delivery']:.2f} us/msg "
            f"({r['client_util']:.2f} cores), publisher {r['publisher_cpu_s']:.2f}s CPU, "
            f"other load {r['other_load_cores']:.2f} cores; {gc_text(r)}"
        )
        return r

    async def profile(
        self,
        label: str,
        server: Child,
        clients: list[Child],
        pub: Publisher,
        window: int,
        secs: float,
    ) -> Json | None:
        """An extra, unmeasured closed-loop window with py-spy sampling the server.

        py-spy pauses the process for each sample, so this runs after the measured phases and its
        numbers are not in the table; only where the time goes is reported.
        """
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            self.progress(f"{label}: py-spy not found (.venv/bin/pip install py-spy); no profile")
            return None
        out = self.tmp / f"pyspy-{label}-W{window}.txt"
        log = self.tmp / f"pyspy-{label}-W{window}.log"
        self.keep_tmp = True
        self.progress(f"{label}: W={window}: py-spy on the server for {secs:g}s (not measured)")
        stop_at = time.monotonic() + secs + 10
        loop = asyncio.create_task(self.closed_loop(pub, clients, window, stop_at))
        try:
            with open(log, "wb") as err:
                spy = await asyncio.create_subprocess_exec(
                    exe,
                    *("record", "-p", str(server.pid), "-d", str(max(1, round(secs)))),
                    *("-r", "250", "-f", "raw", "-o", str(out)),
                    stdout=err,
                    stderr=err,
                )
            try:
                await asyncio.wait_for(spy.wait(), secs + 30)
            except TimeoutError:
                spy.kill()
                await spy.wait()
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        await pub.drain(30)
        await self.sync(clients, pub.seq)
        if not out.exists():
            self.progress(f"{label}: py-spy wrote nothing; see {log}")
            return None
        prof = aggregate_pyspy(out)
        prof.update(window=window, raw=str(out))
        self.progress(f"{label}: W={window}: {prof['samples']} samples in {out}")
        return prof

    async def run_impl(self, impl: str) -> None:
        a = self.args
        n = a.subscribers
        label = impl
        self.progress(f"{label}: starting server and {n:,} subscribers")
        try:
            role = ["_server", "--impl", impl, "--config", str(self.config)]
            server, port = await self.spawn_server("server", role)

            def client_role(conns: int, first: int) -> list[str]:
                role = ["_client", "--port", str(port), "--conns", str(conns)]
                return [*role, "--first-user", str(first), "--size", str(CLIENT_PUSH_SIZE)]

            clients = await self.spawn_clients(n, a.client_procs, client_role)
            t0 = time.monotonic()
            await self.await_connected(clients, n)
            subs = await asyncio.gather(*(c.recv("subscribed", 90) for c in clients))
            if sum(int(s["subscribed"]) for s in subs) != n:
                raise BenchError(f"only {sum(int(s['subscribed']) for s in subs)} subscribed")
            await server.send({"op": "count"})
            count = int((await server.recv("count", 30))["count"])
            if count != n:
                raise BenchError(f"the server sees {count} subscribers of {n}")
            connect_s = time.monotonic() - t0
            self.step()
            self.progress(
                f"{label}: {n:,} subscribed in {connect_s:.1f}s (server pid {server.pid})"
            )
            pub = await Publisher.connect(port, self.wake, CLIENT_PUSH_SIZE)
            try:
                for c in clients:
                    await c.send({"op": "run", "read_interval": a.read_interval_ms / 1000})
                lat = await self.latency_phase(label, server, clients, pub, n)
                self.step()
                tps = []
                for w in a.windows:
                    tps.append(await self.throughput_phase(label, server, clients, pub, n, w))
                    self.step()
                profiles = []
                if a.py_spy and impl in a.py_spy_impls:
                    for w in a.windows:
                        prof = await self.profile(label, server, clients, pub, w, a.py_spy)
                        if prof is not None:
                            profiles.append(prof)
                final = await self.sync(clients, pub.seq)
                self.step()
                await server.send({"op": "stats", "objects": True})
                stats = await server.recv("stats", 30)
                await server.send({"op": "gc"})
                forced = await server.recv("gc", 60)
            finally:
                await pub.close()
            integrity = {
                k: sum(int(o[k]) for o in final)
                for k in ("lost", "dup", "reordered", "bad", "closed")
            }
            integrity["messages"] = sum(int(o["messages"]) for o in final)
            integrity["expected"] = pub.seq * n
            integrity["published"] = pub.seq
            integrity["acked"] = pub.acked
            integrity["publish_errors"] = len(pub.errors)
            errors = sorted({e for o in final for e in o["errors"]})[:5] + pub.errors[:5]
            self.results[impl] = {
                "impl": impl,
                "subscribers": n,
                "connect_s": connect_s,
                "latency": lat,
                "throughput": tps,
                "integrity": integrity,
                "client_errors": errors,
                "server_rss_kb": stats["rss_kb"],
                "server_cpu_s": stats["user"] + stats["sys"],
                "server_gc_objects": stats["gc_objects"],
                "server_gc_count": stats["gc_count"],
                "server_full_gc_ms": forced["gc"] * 1e3,
                "profiles": profiles,
            }
            self.progress(
                f"{label}: integrity over {pub.seq:,} publishes x {n:,}: "
                f"{integrity['messages']:,} received of {integrity['expected']:,}, "
                f"lost {integrity['lost']}, duplicated {integrity['dup']}, reordered "
                f"{integrity['reordered']}, bad {integrity['bad']}, closed {integrity['closed']}"
                + (f"; errors: {errors}" if errors else "")
            )
            self.progress(
                f"{label}: server at the end: RSS {stats['rss_kb'] / 1024:.1f} MiB, "
                f"{stats['gc_objects']:,} GC-tracked objects, collections per generation "
                f"{stats['gc_count']} over the run; a forced full collection took "
                f"{forced['gc'] * 1e3:.1f} ms ({forced['freed']} freed)"
            )
        except BenchError as exc:
            self.fail(label, exc)
        finally:
            await self.stop_all()

    async def run(self) -> None:
        impls = IMPLS if self.args.impl == "both" else (self.args.impl,)
        self.steps_total = len(impls) * (3 + len(self.args.windows))
        try:
            for impl in impls:
                await self.run_impl(impl)
        finally:
            await self.finish()


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table line: a metric for both implementations, the ratio, and a verdict."""

    metric: str
    baseline: float | None
    hub: float | None
    ratio: float | None = None
    target: str = ""
    verdict: str = ""
    integer: bool = False


def make_rows(results: dict[str, Json], targets: Json) -> list[Row]:
    """Ratio > 1 always means the hub is better (throughput hub/baseline, cost baseline/hub)."""
    rows: list[Row] = []
    b, h = results.get("baseline"), results.get("hub")

    def get(r: Json | None, *path: Any) -> float | None:
        v: Any = r
        for p in path:
            if v is None:
                return None
            v = v[p] if isinstance(p, int) else v.get(p)
        return None if v is None else float(v)

    def ratio(bv: float | None, hv: float | None, lower_better: bool) -> float | None:
        if bv is None or hv is None or bv <= 0 or hv <= 0:
            return None
        return bv / hv if lower_better else hv / bv

    windows = [t["window"] for t in (h or b or {}).get("throughput", [])]
    for i, w in enumerate(windows):
        first = i == 0
        bv, hv = (
            get(b, "throughput", i, "deliveries_per_s"),
            get(h, "throughput", i, "deliveries_per_s"),
        )
        rt = ratio(bv, hv, False)
        row = Row(f"closed loop W={w}: delivered msgs/s", bv, hv, rt)
        if first:
            row.target = f"hub >= {targets['throughput_x']:g}x"
            row.verdict = (
                "" if rt is None else ("PASS" if rt >= targets["throughput_x"] else "FAIL")
            )
        rows.append(row)
        bv = get(b, "throughput", i, "server_us_per_delivery")
        hv = get(h, "throughput", i, "server_us_per_delivery")
        rc = ratio(bv, hv, True)
        row = Row("  server CPU us/delivery", bv, hv, rc)
        if first:
            row.target = f"hub <= 1/{targets['cpu_x']:g}"
            row.verdict = "" if rc is None else ("PASS" if rc >= targets["cpu_x"] else "FAIL")
        rows.append(row)
        for key, name in (
            ("server_util", "  server busy (cores)"),
            ("publishes_per_s", "  publishes/s"),
            ("client_us_per_delivery", "  client CPU us/delivery"),
            ("client_util", "  client busy (cores)"),
            ("other_load_cores", "  other load (cores)"),
        ):
            rows.append(Row(name, get(b, "throughput", i, key), get(h, "throughput", i, key)))
    lat = (h or b or {}).get("latency")
    if lat:
        head = f"fixed {lat['rate']:g} msg/s = {lat['target_deliveries_per_s']:,.0f} deliveries/s:"
        rows.append(Row(head, None, None))
        for key, name in (("p50_ms", "  latency p50 ms"), ("p99_ms", "  latency p99 ms")):
            bv, hv = get(b, "latency", key), get(h, "latency", key)
            row = Row(name, bv, hv, ratio(bv, hv, True))
            if key == "p99_ms":
                row.target = f"hub < {targets['p99_ms']:g} ms"
                row.verdict = "" if hv is None else ("PASS" if hv < targets["p99_ms"] else "FAIL")
            rows.append(row)
        for key, name, lower in (
            ("max_ms", "  latency max ms", True),
            ("server_us_per_delivery", "  server CPU us/delivery", True),
            ("server_util", "  server busy (cores)", True),
        ):
            bv, hv = get(b, "latency", key), get(h, "latency", key)
            rows.append(Row(name, bv, hv, ratio(bv, hv, lower)))
        bv = get(b, "latency", "server_gc", "max_pause_ms", 2)
        hv = get(h, "latency", "server_gc", "max_pause_ms", 2)
        rows.append(Row("  server longest full GC ms", bv, hv))
    rows.append(Row("integrity (whole run):", None, None))
    for key, name in (
        ("lost", "  lost"),
        ("dup", "  duplicated"),
        ("reordered", "  reordered"),
        ("bad", "  bad/unparseable"),
        ("closed", "  connections closed"),
    ):
        bv, hv = get(b, "integrity", key), get(h, "integrity", key)
        vals = [v for v in (bv, hv) if v is not None]
        ok = bool(vals) and all(v == 0 for v in vals)
        rows.append(Row(name, bv, hv, None, "0", "PASS" if ok else "FAIL", integer=True))
    return rows


def render(rows: list[Row]) -> str:
    """A plain-text table; section headers are rows without values."""

    def cell(r: Row, v: float | None) -> str:
        if r.baseline is None and r.hub is None:
            return ""
        if r.integer and v is not None:
            return f"{v:,.0f}"
        return fmt_num(v)

    head = ("metric", "baseline", "hub", "ratio", "target", "")
    table = [head] + [
        (
            r.metric,
            cell(r, r.baseline),
            cell(r, r.hub),
            f"{r.ratio:.2f}x" if r.ratio is not None else "",
            r.target,
            r.verdict,
        )
        for r in rows
    ]
    return format_table(table, right={1, 2, 3})


def meta_info(args: argparse.Namespace) -> Json:
    import msgpack
    import websockets

    import hub

    return {
        "command": command_line(),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "hub": f"{hub.__version__} ({git_rev()})",
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "subscribers": args.subscribers,
        "client_procs": args.client_procs,
        "windows": args.windows,
        "max_lag": args.max_lag,
        "rate": args.rate,
        "read_interval_ms": args.read_interval_ms,
        "quick": args.quick,
    }


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="fanout_local.py",
        description="Fan-out through the hub vs a websockets FAQ-style pub/sub server.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run (< 60 s): 1,000 subscribers")
    add_impl_json(ap, IMPLS)
    ap.add_argument("--subscribers", type=int, help="subscribers (default 2000; --quick 1000)")
    ap.add_argument("--rate", type=float, default=20.0, help="fixed-rate publishes/s (20)")
    ap.add_argument(
        "--windows",
        default=None,
        help="comma-separated closed-loop windows (publishes in flight); the first is the one "
        "the targets use (default 16,1; --quick 16)",
    )
    ap.add_argument(
        "--max-lag",
        type=int,
        default=64,
        help="closed loop: the publisher stays at most this many messages ahead of the slowest "
        "subscriber (default 64)",
    )
    ap.add_argument("--tp-seconds", type=float, help="measured closed-loop seconds (10; quick 3)")
    ap.add_argument("--plot", metavar="PNG", help="also draw latency over time (needs matplotlib)")
    ap.add_argument("--lat-seconds", type=float, help="timed fixed-rate seconds (15; quick 4)")
    ap.add_argument(
        "--write-delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="the hub's write_delay (ms, 0..1000): pushes held and sent together (default 0)",
    )
    ap.add_argument("--client-procs", type=int, default=2, choices=range(1, 5), metavar="1..4")
    ap.add_argument(
        "--read-interval-ms",
        type=float,
        default=1.0,
        help="subscribers sleep this long, then read all that is ready; 0 = block in epoll "
        "(default 1, as in ws_core.py)",
    )
    ap.add_argument(
        "--py-spy",
        type=float,
        metavar="SECONDS",
        help="after the measured phases, sample the server with py-spy for SECONDS in an extra "
        "closed-loop window per W, and print where its time goes (default: off)",
    )
    ap.add_argument(
        "--py-spy-impl",
        choices=(*IMPLS, "both"),
        default="hub",
        help="which server --py-spy samples (default hub)",
    )
    args = ap.parse_args(argv)
    args.py_spy_impls = IMPLS if args.py_spy_impl == "both" else (args.py_spy_impl,)
    if args.py_spy is not None and not 1 <= args.py_spy <= 120:
        ap.error("--py-spy must be in 1..120 seconds")
    args.subscribers = args.subscribers or (1000 if args.quick else 2000)
    if not 1 <= args.subscribers <= 20_000:
        ap.error("--subscribers must be in 1..20000")
    if not 0 <= args.write_delay <= 1000:
        ap.error("--write-delay must be in 0..1000 ms")
    return phase_args(ap, args)


def phase_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Defaults (shorter with --quick) and bounds of the phase options, shared with fanout.py."""
    q = args.quick
    args.windows = [int(w) for w in (args.windows or ("16" if q else "16,1")).split(",")]
    args.tp_seconds = args.tp_seconds or (3.0 if q else 10.0)
    args.tp_warmup = 1.0 if q else 2.0
    args.lat_seconds = args.lat_seconds or (4.0 if q else 15.0)
    args.lat_warmup = 1.0 if q else 3.0
    if not all(1 <= w <= 1024 for w in args.windows) or not 1 <= args.max_lag <= 100_000:
        ap.error("--windows must be in 1..1024 and --max-lag in 1..100000")
    if not 0.5 <= args.rate <= 1000 or not 0.5 <= args.tp_seconds <= 300:
        ap.error("--rate must be in 0.5..1000 and --tp-seconds in 0.5..300")
    if not 1 <= args.lat_seconds <= 300 or not 0 <= args.read_interval_ms <= 50:
        ap.error("--lat-seconds must be in 1..300 and --read-interval-ms in 0..50")
    return args


def role_main(argv: list[str]) -> int:
    """The subprocess side: ``_server`` or ``_client``, spawned by the parent only."""
    ap = role_parser("fanout_local.py", argv)
    raise_nofile()
    if argv[0] == "_server":
        ap.add_argument("--impl", choices=IMPLS, required=True)
        ap.add_argument("--config", required=True)
        a = ap.parse_args(argv[1:])
        asyncio.run(server_main(a.impl, a.config))
    else:
        ap.add_argument("--first-user", type=int, required=True)
        ap.add_argument("--size", type=int, required=True)
        a = ap.parse_args(argv[1:])
        client_main(a.port, a.conns, a.first_user, a.size, a.batch)
    return 0


TARGETS = {"throughput_x": 2.0, "cpu_x": 3.0, "p99_ms": 50.0}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ROLES:
        return role_main(argv)
    args = parse_args(argv)
    raise_nofile()
    meta = meta_info(args)
    print(f"command:     {meta['command']}")
    print(f"python:      {meta['python']}   websockets: {meta['websockets']}   ", end="")
    print(f"msgpack: {meta['msgpack']}   hub: {meta['hub']}")
    print(f"cpu:         {meta['cpu']}   platform: {meta['platform']}")
    print(
        f"setup:       {args.subscribers:,} subscribers on {CHANNEL!r} in {args.client_procs} "
        f"client procs, {PUSH_SIZE}-byte pushes, closed-loop windows {args.windows}, max lag "
        f"{args.max_lag}, fixed rate {args.rate:g}/s, read interval {args.read_interval_ms:g} ms"
    )
    sys.stdout.flush()
    bench = Bench(args)
    elapsed = run_timed(lambda: asyncio.run(bench.run()))
    if elapsed is None:
        return 130
    meta["elapsed_s"] = elapsed
    rows = make_rows(bench.results, TARGETS)
    print()
    print(render(rows))
    print()
    print(
        "ratio > 1 means the hub is better (throughput: hub/baseline; costs and latency: "
        f"baseline/hub). Targets on the first window (W={args.windows[0]}): hub >= "
        f"{TARGETS['throughput_x']:g}x delivered msgs/s, server CPU/delivery <= "
        f"1/{TARGETS['cpu_x']:g} of the baseline's; hub p99 < {TARGETS['p99_ms']:g} ms at the "
        "fixed rate; integrity counts 0."
    )
    for impl, res in bench.results.items():
        for prof in res.get("profiles", []):
            print()
            print(render_profile(prof).replace("hub server", f"{impl} server"))
            print(f"  raw stacks: {prof['raw']}")
    print(f"elapsed: {meta['elapsed_s']}s")
    return finish(args, meta, TARGETS, rows, bench)


def finish(args: argparse.Namespace, meta: Json, targets: Json, rows: list[Any], bench: Any) -> int:
    """Report failed runs, write --json, and exit 1 on a failed run or any integrity miss."""
    if bench.errors:
        print(f"\n{len(bench.errors)} run(s) failed (logs kept in {bench.tmp}):")
        for e in bench.errors:
            print(f"  - {e}")
    integrity_ok = all(r.verdict == "PASS" for r in rows if r.target == "0") and bool(bench.results)
    if args.plot and bench.series:
        plot_latency(bench.series, args.plot)
    if args.json:
        payload = {
            "meta": meta,
            "targets": targets,
            "results": bench.results,
            "table": [asdict(r) for r in rows],
            "errors": bench.errors,
        }
        write_json(args.json, payload)
    return 1 if bench.errors or not integrity_ok else 0


if __name__ == "__main__":
    sys.exit(main())
