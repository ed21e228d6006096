"""Fan-out across processes: ``hub serve --workers 2`` joined through Redis, against the websockets
FAQ's pub/sub server extended to Redis the way its FAQ suggests, measured side by side in one run.

This is ``fanout_local.py`` (whose subscriber clients, phases and table it reuses) with the
"backend publishes" story: a publisher in this process writes to a private Redis, never to a
WebSocket, and every server process fans out what Redis hands it.

- hub: a subprocess ``hub serve --workers 2 --redis redis://127.0.0.1:<private> --port P``
  (supervisor + 2 workers on one port with SO_REUSEPORT). The publisher is
  ``hub.redis.publisher.AsyncPublisher``: ``publish("bench:room", data)`` (Redis channel
  ``hub:ch:bench:room``, msgpack ``{"data": ...}``) and ``send_to_users([("u<i>", data), ...])``
  (``hub:user:u<i>``).
- baseline: 2 processes, each a ``websockets.asyncio.server.serve(..., reuse_port=True)`` on the
  same port, with the FAQ's ``CHANNELS`` registry (``fanout_local.baseline_handler``), a
  ``USERS`` dict (user -> connection) and one redis-py asyncio pubsub listener. A channel push
  arrives from Redis as the finished JSON push and goes out with ``websockets.broadcast``; a
  per-user message arrives on one Redis channel (``bench:users``) that both processes listen to,
  and each looks the user up in its dict (the FAQ's ``message_user``). The publisher writes those
  messages with the same pipelined Redis connection as the hub's (``AsyncPublisher._publish``;
  per-user messages in batches of 100 through the pipeline's ``execute_many``, like the hub's
  ``send_to_users``).

Server CPU is the sum over the server processes (for the hub: the supervisor too), read from
/proc. Redis's CPU is reported on its own row.

Each implementation runs its own phases (memory, latency, closed loop, integrity) and stays up;
then the per-user phases alternate between the two (baseline, hub, hub, baseline, baseline, hub
by default), so a drift in the machine's speed over the run weighs on both alike. Each per-user
row sums that implementation's phases.

    .venv/bin/python bench/fanout.py                 # both implementations (~3 min)
    .venv/bin/python bench/fanout.py --quick         # smoke run (~1.5 min)
    .venv/bin/python bench/fanout.py --impl hub --json out.json

Only 127.0.0.1 is contacted; Redis is a private ``redis-server`` started and stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import re
import resource
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this file

import fanout_local as fl
from benchlib import (
    HOST,
    REPO,
    ROLES,
    BenchError,
    Json,
    add_impl_json,
    clients_cpu,
    command_line,
    commands,
    cpu_info,
    emit,
    free_port,
    git_rev,
    machine_busy_s,
    proc_cpu_s,
    raise_nofile,
    role_parser,
    rss_kb,
    run_timed,
    stdin_reader,
    usage,
)

CHANNEL = fl.CHANNEL
USERS_CHANNEL = "bench:users"  # the baseline's one Redis channel for per-user messages
HUB_TOML = "drain_seconds = 0\n" + fl.HUB_TOML
#: A per-user push exactly as both servers write it (compact JSON, integers without leading
#: zeros): the clients check it without a JSON parse, the per-message cost of a load generator.
USER_PUSH = re.compile(rb'\{"data":\{"u":(0|[1-9][0-9]*),"r":(0|[1-9][0-9]*)\}\}').fullmatch
USER_BATCH = 100  # per-user phase: messages per pipelined batch (send_to_users)
_dumps = fl._dumps


def gc_text(r: Json) -> str:
    """Replaces fanout_local's GC summary in progress lines: hub workers do not report theirs."""
    return "server GC not measured across processes"


fl.gc_text = gc_text  # fanout_local's phases look it up at call time


def push_data(seq: int, size: int) -> Json:
    """The data of a channel push ``{"channel":..,"data":..}`` of exactly ``size`` bytes."""
    data: Json = {"seq": seq, "ts": time.time(), "pad": ""}
    data["pad"] = "x" * max(0, size - len(_dumps({"channel": CHANNEL, "data": data})))
    return data


# --------------------------------------------------------------------------------------------
# Baseline server role: the websockets FAQ, extended to Redis as the FAQ suggests
# --------------------------------------------------------------------------------------------

USERS: dict[str, Any] = {}  # user id -> connection, one dict per process (the FAQ)


async def baseline_conn(websocket: Any) -> None:
    """Register the user, then the FAQ channel handler of ``fanout_local``."""
    query = urllib.parse.urlsplit(websocket.request.path).query
    user = urllib.parse.parse_qs(query).get("user", [""])[0]
    if user:
        USERS[user] = websocket
    try:
        await fl.baseline_handler(websocket)
    finally:
        if USERS.get(user) is websocket:
            del USERS[user]


async def message_user(user: str, message: str) -> None:
    """The FAQ's ``message_user``: the process holding the user sends, the others skip."""
    from websockets.exceptions import ConnectionClosed

    websocket = USERS.get(user)
    if websocket is not None:
        with contextlib.suppress(ConnectionClosed):
            await websocket.send(message)


async def redis_listener(pubsub: Any) -> None:
    """Channel pushes go to ``broadcast``; per-user messages to ``message_user``."""
    from websockets.asyncio.server import broadcast

    room = CHANNEL.encode()
    for _ in range(10**10):  # until cancelled at quit
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
        if msg is None:
            continue
        if msg["channel"] == room:
            broadcast(fl.CHANNELS.get(CHANNEL, ()), msg["data"].decode())
        else:
            obj = json.loads(msg["data"])
            await message_user(obj["user"], _dumps({"data": obj["data"]}))


async def baseline_main(port: int, redis_url: str) -> None:
    """Serve until stdin closes or ``quit``; answer ``count`` and ``stats``."""
    import redis.asyncio as aioredis
    from websockets.asyncio.server import serve

    reader = await stdin_reader()
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(CHANNEL, USERS_CHANNEL)
    listener = asyncio.create_task(redis_listener(pubsub))
    server = await serve(baseline_conn, HOST, port, reuse_port=True)
    emit({"ready": port, "pid": os.getpid()})
    try:
        async for cmd in commands(reader, 100_000):
            if cmd["op"] == "count":
                emit({"count": len(fl.CHANNELS.get(CHANNEL, ())), "users": len(USERS)})
            elif cmd["op"] == "stats":
                emit(usage())
            elif cmd["op"] == "quit":
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
# Client role: fanout_local's subscribers, which also check per-user messages
# --------------------------------------------------------------------------------------------


class UserSubscriberProc(fl.SubscriberProc):
    """Subscribers that also take per-user pushes ``{"data":{"u":i,"r":round}}``.

    Each connection is user ``u<first_user + index>``; it must get round 1, 2, ... exactly once,
    in order, and nothing meant for another user.
    """

    def __init__(self, port: int, first_user: int, size: int) -> None:
        super().__init__(port, first_user, size)
        self.user_of: dict[int, int] = {}
        self.round_of: dict[int, int] = {}
        self.user_msgs = 0
        self.user_bad = 0
        self.user_last_t = 0.0

    def new_conn(self, sock: socket.socket, inflater: Any, buf: bytes) -> fl.Sub:
        sub = super().new_conn(sock, inflater, buf)
        self.user_of[sub.fd] = self.first_user + len(self.all) - 1
        self.round_of[sub.fd] = 0
        return sub

    def parse(self, c: fl.Sub, payload: bytes) -> tuple[int, float] | None:
        match = USER_PUSH(payload)
        if match is not None:  # the exact compact form both servers send: no JSON parse
            self.user_push(c, payload, int(match[1]), int(match[2]))
            return None
        if payload.startswith(b'{"data":'):  # anything else is parsed in full (and checked)
            try:
                data = json.loads(payload)["data"]
                user, rnd = data["u"], data["r"]
            except (ValueError, KeyError, TypeError):
                user, rnd = None, None
            self.user_push(c, payload, user, rnd)
            return None
        return super().parse(c, payload)

    def user_push(self, c: fl.Sub, payload: bytes, user: Any, rnd: Any) -> None:
        self.user_last_t = time.monotonic()
        self.user_msgs += 1
        if user != self.user_of[c.fd] or rnd != self.round_of[c.fd] + 1:
            self.user_bad += 1
            self.note_error(f"user push {payload[:80]!r} on user {self.user_of[c.fd]}")
        if isinstance(rnd, int):
            self.round_of[c.fd] = max(self.round_of[c.fd], rnd)

    def command(self, cmd: Json) -> None:
        if cmd["op"] == "usync":
            rounds = int(cmd["rounds"])
            lost = sum(max(0, rounds - r) for r in self.round_of.values())
            emit(
                {
                    "usync": self.user_msgs,
                    "t": self.user_last_t,
                    "bad": self.user_bad,
                    "lost": lost,
                    "errors": self.errors,
                }
            )
        else:
            super().command(cmd)


def client_main(port: int, conns: int, first_user: int, size: int, batch: int) -> None:
    """Connect, subscribe, then serve control commands until told to quit (or an hour)."""
    proc = UserSubscriberProc(port, first_user, size)
    proc.connect_and_report(conns, batch)
    proc.subscribe_all()
    proc.run(max_seconds=3600)


# --------------------------------------------------------------------------------------------
# Parent: Redis, the server processes, the Redis publisher
# --------------------------------------------------------------------------------------------


def sockets_of(pid: int) -> int:
    """Open sockets of a process (for how the connections spread over the workers)."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def children_of(pid: int) -> list[int]:
    """Direct children of a process, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return sorted(out)


class Servers:
    """The processes that count as the server: hub supervisor + workers, or 2 baseline ones."""

    def __init__(self, pids: list[int], workers: list[int]) -> None:
        self.pids = pids  # everything whose CPU and RSS count
        self.workers = workers  # the processes holding connections

    def cpu(self) -> tuple[float, float]:
        pairs = [proc_cpu_s(p) for p in self.pids]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in self.pids)

    def sockets(self) -> list[int]:
        return [sockets_of(p) for p in self.workers]


class RedisPub:
    """The backend: publishes to Redis (pipelined, in order) with fanout_local.Publisher's
    interface (``seq``, ``inflight``, ``acked``, ``errors``), so its phases drive it as is."""

    def __init__(self, impl: str, url: str, wake: asyncio.Event, size: int) -> None:
        from hub.redis.publisher import AsyncPublisher

        self.impl, self.wake, self.size = impl, wake, size
        self.pub = AsyncPublisher(url)
        self.receivers = 2  # both server processes listen to every channel push
        self.seq = 0
        self.inflight = 0
        self.acked = 0
        self.errors: list[str] = []
        self.tasks: set[asyncio.Future[int]] = set()

    def _start(self, coro: Any, receivers: int) -> None:
        self.inflight += 1
        task = asyncio.ensure_future(coro)  # tasks start in order: publishes stay in order
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, receivers))

    def _done(self, task: asyncio.Future[int], receivers: int) -> None:
        self.tasks.discard(task)
        self.inflight -= 1
        err = None if task.cancelled() else task.exception()
        if err is None and not task.cancelled() and task.result() == receivers:
            self.acked += 1
        elif len(self.errors) < 5:
            got = err or ("cancelled" if task.cancelled() else f"{task.result()} receivers")
            self.errors.append(f"publish: {got}"[:200])
        self.wake.set()

    async def publish(self) -> None:
        self.seq += 1
        data = push_data(self.seq, self.size)
        if self.impl == "hub":
            self._start(self.pub.publish(CHANNEL, data), 2)
        else:
            push = _dumps({"channel": CHANNEL, "data": data}).encode()
            self._start(self.pub._publish(CHANNEL, push), 2)

    def send_to_users(self, indexes: range, rnd: int) -> None:
        """One pipelined batch of per-user messages, as a backend notifying many users sends
        them: ``AsyncPublisher.send_to_users`` for the hub, the same pipeline for the baseline."""
        if self.impl == "hub":
            batch = [(f"u{i}", {"u": i, "r": rnd}) for i in indexes]
            self._start_batch(self.pub.send_to_users(batch), len(batch), 1)  # one worker listens
        else:
            msgs = [_dumps({"user": f"u{i}", "data": {"u": i, "r": rnd}}).encode() for i in indexes]
            commands = [("PUBLISH", USERS_CHANNEL, msg) for msg in msgs]
            self._start_batch(self.pub._router.execute_many(commands), len(msgs), 2)

    def _start_batch(self, coro: Any, size: int, receivers: int) -> None:
        self.inflight += size
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._batch_done(t, size, receivers))

    def _batch_done(self, task: asyncio.Future[list[int]], size: int, receivers: int) -> None:
        self.tasks.discard(task)
        self.inflight -= size
        err = None if task.cancelled() else task.exception()
        if err is None and not task.cancelled():
            counts = task.result()
            self.acked += sum(1 for n in counts if n == receivers)
            wrong = [n for n in counts if n != receivers]
            if wrong and len(self.errors) < 5:
                self.errors.append(f"send_to_users: {len(wrong)} with {wrong[0]} receivers")
        elif len(self.errors) < 5:
            self.errors.append(f"send_to_users: {err or 'cancelled'}"[:200])
        self.wake.set()

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.05)
        return self.inflight == 0

    async def close(self) -> None:
        await self.drain(10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pub.aclose(), 5)


@dataclasses.dataclass
class Live:
    """An implementation kept running after its own phases, for the alternating per-user
    phases: its servers, clients and publisher, and the per-user rounds and messages so far."""

    servers: Servers
    clients: list[fl.Child]
    pub: RedisPub
    rounds: int = 0
    received: int = 0


def combine(phases: list[Json]) -> Json:
    """One implementation's per-user phases as one: totals, and rates over the summed time."""
    received = sum(int(p["received"]) for p in phases)
    wall = sum(float(p["wall_s"]) for p in phases)
    cpu = sum(float(p["server_cpu_s"]) for p in phases)
    return {
        "rounds": sum(int(p["rounds"]) for p in phases),
        "messages": sum(int(p["messages"]) for p in phases),
        "received": received,
        "lost": int(phases[-1]["lost"]),  # the clients check every round so far, each time
        "bad": int(phases[-1]["bad"]),
        "wall_s": wall,
        "publish_s": sum(float(p["publish_s"]) for p in phases),
        "msgs_per_s": received / max(wall, 1e-9),
        "server_cpu_s": cpu,
        "server_us_per_msg": cpu / max(received, 1) * 1e6,
        "server_util": cpu / max(wall, 1e-9),
        "redis_us_per_msg": sum(float(p["redis_cpu_s"]) for p in phases) / max(received, 1) * 1e6,
        "publisher_cpu_s": sum(float(p["publisher_cpu_s"]) for p in phases),
        "errors": sorted({e for p in phases for e in p["errors"]})[:5],
        "phase_msgs_per_s": [float(p["msgs_per_s"]) for p in phases],
    }


class Bench(fl.Bench):
    """fanout_local's phases, with Redis, multi-process servers and a per-user phase."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.script = Path(__file__).resolve()  # role subprocesses run this file
        self.config.write_text(HUB_TOML)
        self.redis: asyncio.subprocess.Process | None = None
        self.redis_url = ""
        self.hub_proc: asyncio.subprocess.Process | None = None
        self.live: dict[str, Live] = {}

    # -- processes -----------------------------------------------------------------------------

    async def start_redis(self) -> None:
        import redis

        port = free_port()
        args = ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        exe = shutil.which("redis-server") or "redis-server"
        with open(self.tmp / "redis.log", "wb") as log:
            self.redis = await asyncio.create_subprocess_exec(
                exe, *args, "--dir", str(self.tmp), stdout=log, stderr=log
            )
        self.redis_url = f"redis://{HOST}:{port}"
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1)
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    client.close()
                    self.progress(f"private redis-server on {HOST}:{port} (pid {self.redis.pid})")
                    return
            await asyncio.sleep(0.1)
        raise BenchError("redis-server did not answer PING within 10s")

    async def stop_redis(self) -> None:
        proc, self.redis = self.redis, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def start_hub(self, port: int) -> Servers:
        """``hub serve --workers 2``; ready when both workers answer /readyz 200."""
        log = self.tmp / "hub-serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "hub.cli", "serve", "--workers", "2", "--host", HOST]
        cmd += ["--port", str(port), "--redis", self.redis_url, "--config", str(self.config)]
        with open(log, "wb") as out:
            self.hub_proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=REPO
            )
        seen: set[str] = set()
        for _ in range(600):
            if self.hub_proc.returncode is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise BenchError(f"hub serve exited {self.hub_proc.returncode}:\n{tail}")
            worker = await asyncio.to_thread(readyz, port)
            if worker:
                seen.add(worker)
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise BenchError(f"hub workers not both ready within 30s (ready: {sorted(seen)})")
        workers = children_of(self.hub_proc.pid)
        if sorted(workers) != sorted(int(w) for w in seen):
            raise BenchError(f"worker pids {workers} != the ones answering /readyz {seen}")
        return Servers([self.hub_proc.pid, *workers], workers)

    async def stop_hub(self) -> None:
        proc, self.hub_proc = self.hub_proc, None
        if proc is None or proc.returncode is not None:
            return
        for action in (proc.terminate, proc.terminate, proc.kill):
            with contextlib.suppress(ProcessLookupError):
                action()
            try:
                await asyncio.wait_for(proc.wait(), 10)
                return
            except TimeoutError:
                continue

    async def start_baseline(self, port: int) -> tuple[Servers, list[fl.Child]]:
        procs = []
        for i in range(2):
            role = ["_server", "--port", str(port), "--redis", self.redis_url]
            server, _ = await self.spawn_server(f"server{i}", role)
            procs.append(server)
        pids = [s.pid for s in procs]
        return Servers(pids, pids), procs

    # -- measuring -----------------------------------------------------------------------------

    async def snapshot(self, server: Any, clients: list[fl.Child], pub: Any) -> Json:
        """fanout_local's snapshot with the server CPU summed over processes from /proc
        (GC counters are not available from hub workers: reported as 0)."""
        for c in clients:
            await c.send({"op": "mark"})
        marks = await asyncio.gather(*(c.recv("mark", 30) for c in clients))
        user, sys_ = server.cpu()
        client_user, client_sys = clients_cpu(clients)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        zero = {"gc_count": [0, 0, 0], "gc_pause_s": [0.0] * 3, "gc_max_s": [0.0] * 3}
        assert self.redis is not None
        return {
            "t": time.monotonic(),
            "server_user": user,
            "server_sys": sys_,
            "rss_kb": server.rss_kb(),
            "gc": zero,
            "marks": [(int(m["mark"]), float(m["t"])) for m in marks],
            "client_user": client_user,
            "client_sys": client_sys,
            "parent": ru.ru_utime + ru.ru_stime,
            "busy": machine_busy_s(),
            "seq": pub.seq,
            "redis_cpu": sum(proc_cpu_s(self.redis.pid)),
        }

    async def user_phase(self, label: str, live: Live, n: int) -> Json:
        """``rounds`` x one message to each of the n users; time until the last one arrives.
        Rounds continue from the implementation's previous phase (the clients check that every
        user gets every round once, in order)."""
        servers, clients, pub = live.servers, live.clients, live.pub
        rounds = self.args.user_rounds
        first_round, last_round = live.rounds + 1, live.rounds + rounds
        total = n * rounds
        self.progress(
            f"{label}: per-user send: rounds {first_round}-{last_round} x {n:,} users = "
            f"{total:,} messages"
        )
        s0 = await self.snapshot(servers, clients, pub)
        t0 = time.monotonic()
        for rnd in range(first_round, last_round + 1):
            for first in range(0, n, USER_BATCH):
                for _ in range(100_000):
                    if pub.inflight < self.args.user_inflight:
                        break
                    self.wake.clear()
                    # A timer, not wait_for's task: this wait runs once per batch.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self.wake.wait()
                pub.send_to_users(range(first, min(first + USER_BATCH, n)), rnd)
        t_pub = time.monotonic() - t0
        if not await pub.drain(60):
            raise BenchError(f"{pub.inflight} per-user publishes unanswered")
        got: list[Json] = []
        deadline = time.monotonic() + 60
        for _ in range(10_000):
            for c in clients:
                await c.send({"op": "usync", "rounds": last_round})
            got = await asyncio.gather(*(c.recv("usync", 30) for c in clients))
            done = sum(int(g["usync"]) for g in got) - live.received
            if done >= total or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        s1 = await self.snapshot(servers, clients, pub)
        received = sum(int(g["usync"]) for g in got) - live.received
        live.rounds, live.received = last_round, live.received + received
        t_end = max(float(g["t"]) for g in got)
        cpu = (s1["server_user"] + s1["server_sys"]) - (s0["server_user"] + s0["server_sys"])
        wall = max(t_end - t0, 1e-9)
        r: Json = {
            "rounds": rounds,
            "messages": total,
            "received": received,
            "lost": sum(int(g["lost"]) for g in got),
            "bad": sum(int(g["bad"]) for g in got),
            "wall_s": wall,
            "publish_s": t_pub,
            "msgs_per_s": received / wall,
            "server_cpu_s": cpu,
            "server_us_per_msg": cpu / max(received, 1) * 1e6,
            "server_util": cpu / wall,
            "redis_cpu_s": s1["redis_cpu"] - s0["redis_cpu"],
            "redis_us_per_msg": (s1["redis_cpu"] - s0["redis_cpu"]) / max(received, 1) * 1e6,
            "publisher_cpu_s": s1["parent"] - s0["parent"],
            "errors": sorted({e for g in got for e in g["errors"]})[:5],
        }
        self.progress(
            f"{label}: per-user: {received:,}/{total:,} received in {wall:.2f}s "
            f"({r['msgs_per_s']:,.0f} msgs/s; publishing took {t_pub:.2f}s, publisher CPU "
            f"{r['publisher_cpu_s']:.2f}s), server {r['server_us_per_msg']:.2f} us/msg, busy "
            f"{r['server_util']:.0%}, redis {r['redis_us_per_msg']:.2f} us/msg; lost {r['lost']}, "
            f"bad {r['bad']}"
            + ("; PUBLISHER-BOUND: the rate is a lower bound" if t_pub > 0.9 * wall else "")
        )
        return r

    async def run_impl(self, impl: str) -> None:
        a = self.args
        n = a.subscribers
        label = impl
        port = free_port()
        self.progress(f"{label}: starting 2 server processes on port {port}, {n:,} subscribers")
        pub: RedisPub | None = None
        try:
            if impl == "hub":
                servers = await self.start_hub(port)
            else:
                servers, _ = await self.start_baseline(port)
            await asyncio.sleep(1.0)  # let start-up settle before the idle RSS reading
            rss0, sock0 = servers.rss_kb(), servers.sockets()

            def client_role(conns: int, first: int) -> list[str]:
                role = ["_client", "--port", str(port), "--conns", str(conns)]
                return [*role, "--first-user", str(first), "--size", str(fl.PUSH_SIZE)]

            clients = await self.spawn_clients(n, a.client_procs, client_role)
            t0 = time.monotonic()
            await self.await_connected(clients, n)
            subs = await asyncio.gather(*(c.recv("subscribed", 90) for c in clients))
            if sum(int(s["subscribed"]) for s in subs) != n:
                raise BenchError(f"only {sum(int(s['subscribed']) for s in subs)} subscribed")
            connect_s = time.monotonic() - t0
            await asyncio.sleep(2.0)  # idle: the per-user Redis subscriptions settle too
            rss1, sock1 = servers.rss_kb(), servers.sockets()
            spread = [b - a_ for a_, b in zip(sock0, sock1, strict=True)]
            memory = {
                "rss_before_kb": rss0,
                "rss_after_kb": rss1,
                "kb_per_conn": (rss1 - rss0) / n,
                "total_kb_per_conn": rss1 / n,
                "conns_per_process": spread,
            }
            self.progress(
                f"{label}: {n:,} subscribed in {connect_s:.1f}s; connections per process "
                f"{spread}; server RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB = "
                f"{memory['kb_per_conn']:.2f} KiB/conn (pids {servers.pids})"
            )
            if min(spread) <= 0:
                raise BenchError(f"connections did not spread over both processes: {spread}")
            self.step()
            pub = RedisPub(impl, self.redis_url, self.wake, fl.PUSH_SIZE)
            for c in clients:
                await c.send({"op": "run", "read_interval": a.read_interval_ms / 1000})
            lat = await self.latency_phase(label, servers, clients, pub, n)  # type: ignore[arg-type]
            self.step()
            tps = []
            for w in a.windows:
                tps.append(
                    await self.throughput_phase(label, servers, clients, pub, n, w)  # type: ignore[arg-type]
                )
                self.step()
            final = await self.sync(clients, pub.seq)
            self.step()
            integrity = {
                k: sum(int(o[k]) for o in final)
                for k in ("lost", "dup", "reordered", "bad", "closed")
            }
            integrity["messages"] = sum(int(o["messages"]) for o in final)
            integrity["expected"] = pub.seq * n
            integrity["published"] = pub.seq
            integrity["publish_errors"] = len(pub.errors)
            errors = sorted({e for o in final for e in o["errors"]})[:5] + pub.errors[:5]
            self.results[impl] = {
                "impl": impl,
                "subscribers": n,
                "connect_s": connect_s,
                "memory": memory,
                "latency": lat,
                "throughput": tps,
                "integrity": integrity,
                "client_errors": errors,
                "server_pids": servers.pids,
            }
            self.progress(
                f"{label}: integrity over {pub.seq:,} publishes x {n:,}: "
                f"{integrity['messages']:,} received of {integrity['expected']:,}, "
                f"lost {integrity['lost']}, duplicated {integrity['dup']}, reordered "
                f"{integrity['reordered']}, bad {integrity['bad']}, closed {integrity['closed']}, "
                f"publish errors {len(pub.errors)}" + (f"; errors: {errors}" if errors else "")
            )
            self.live[impl] = Live(servers, clients, pub)
            pub = None  # kept running for the per-user phases; closed at the end of the run
        except BenchError as exc:
            self.fail(label, exc)
        finally:
            if pub is not None:
                await pub.close()

    async def user_phases(self) -> None:
        """The per-user phases of both implementations, alternating (A B B A A B ...) with
        all processes up, so a drift in the machine's speed over the run (a shared VM moves
        by tens of percent over minutes) weighs on both alike."""
        a = self.args
        impls = [impl for impl in fl.IMPLS if impl in self.live]
        phases: dict[str, list[Json]] = {impl: [] for impl in impls}
        for k in range(a.user_pairs):
            for impl in impls if k % 2 == 0 else impls[::-1]:
                try:
                    phases[impl].append(await self.user_phase(impl, self.live[impl], a.subscribers))
                except BenchError as exc:
                    self.fail(f"{impl} per-user", exc)
                    return
            if len(impls) == 2:
                b, h = (phases[impl][-1]["msgs_per_s"] for impl in impls)
                self.progress(f"per-user pair {k + 1}: hub / baseline = {h / b:.2f}x")
            self.step()
        for impl in impls:
            self.results[impl]["users"] = combine(phases[impl])

    async def run(self) -> None:
        impls = fl.IMPLS if self.args.impl == "both" else (self.args.impl,)
        self.steps_total = len(impls) * (3 + len(self.args.windows)) + self.args.user_pairs
        try:
            await self.start_redis()
            for impl in impls:
                await self.run_impl(impl)
            await self.user_phases()
        except BenchError as exc:
            self.fail("setup", exc)
        finally:
            for live in self.live.values():
                await live.pub.close()
            await self.stop_all()
            await self.stop_hub()
            await self.stop_redis()
            await self.finish()


def readyz(port: int) -> str | None:
    """The worker pid (``X-Hub-Worker``) of a 200 answer to GET /readyz, else None."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=2) as resp:
            return resp.headers.get("X-Hub-Worker") if resp.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


# --------------------------------------------------------------------------------------------
# Report and entry points
# --------------------------------------------------------------------------------------------

TARGETS = {**fl.TARGETS, "user_x": 3.0, "idle_kb": 8.0}


def make_rows(results: dict[str, Json]) -> list[fl.Row]:
    """fanout_local's rows (without its GC row), then per-user send, memory and Redis."""
    rows = [r for r in fl.make_rows(results, TARGETS) if "GC" not in r.metric]
    b, h = results.get("baseline"), results.get("hub")

    def get(r: Json | None, sect: str, key: str) -> float | None:
        v = None if r is None else r.get(sect, {}).get(key)
        return None if v is None else float(v)

    def ratio(bv: float | None, hv: float | None, lower_better: bool) -> float | None:
        if bv is None or hv is None or bv <= 0 or hv <= 0:
            return None
        return bv / hv if lower_better else hv / bv

    rows.append(fl.Row("per-user send (1 msg to each of N users):", None, None))
    bv, hv = get(b, "users", "msgs_per_s"), get(h, "users", "msgs_per_s")
    rt = ratio(bv, hv, False)
    verdict = "" if rt is None else ("PASS" if rt >= TARGETS["user_x"] else "FAIL")
    rows.append(fl.Row("  messages/s", bv, hv, rt, f"hub >= {TARGETS['user_x']:g}x", verdict))
    for key, name in (
        ("server_us_per_msg", "  server CPU us/message"),
        ("server_util", "  server busy (cores)"),
        ("redis_us_per_msg", "  redis CPU us/message"),
        ("publisher_cpu_s", "  publisher CPU s"),
        ("publish_s", "  publishing took s"),
        ("wall_s", "  first publish to last delivery s"),
    ):
        bv, hv = get(b, "users", key), get(h, "users", key)
        rows.append(fl.Row(name, bv, hv, ratio(bv, hv, True) if "us_per" in key else None))
    for key, name in (("lost", "  lost"), ("bad", "  wrong user/dup/reordered")):
        bv, hv = get(b, "users", key), get(h, "users", key)
        vals = [v for v in (bv, hv) if v is not None]
        ok = bool(vals) and all(v == 0 for v in vals)
        rows.append(fl.Row(name, bv, hv, None, "0", "PASS" if ok else "FAIL", integer=True))
    rows.append(fl.Row("idle memory (all server processes):", None, None))
    bv, hv = get(b, "memory", "kb_per_conn"), get(h, "memory", "kb_per_conn")
    verdict = "" if hv is None else ("PASS" if hv <= TARGETS["idle_kb"] else "FAIL")
    rows.append(
        fl.Row(
            "  RSS growth KiB/conn",
            bv,
            hv,
            ratio(bv, hv, True),
            f"hub <= {TARGETS['idle_kb']:g}",
            verdict,
        )
    )
    bv, hv = get(b, "memory", "total_kb_per_conn"), get(h, "memory", "total_kb_per_conn")
    rows.append(fl.Row("  total RSS KiB/conn", bv, hv, ratio(bv, hv, True)))
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="fanout.py",
        description="Fan-out through hub serve --workers 2 + Redis vs a websockets FAQ-style "
        "pub/sub server on 2 processes + Redis.",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: shorter phases")
    add_impl_json(ap, fl.IMPLS)
    ap.add_argument("--subscribers", type=int, default=2000, help="subscribers (default 2000)")
    ap.add_argument("--rate", type=float, default=20.0, help="fixed-rate publishes/s (20)")
    ap.add_argument("--windows", help="closed-loop windows (default 16,1; --quick 16)")
    ap.add_argument("--max-lag", type=int, default=64, help="closed-loop lag bound (64)")
    ap.add_argument("--tp-seconds", type=float, help="measured closed-loop seconds (10; quick 3)")
    ap.add_argument("--lat-seconds", type=float, help="timed fixed-rate seconds (15; quick 4)")
    ap.add_argument(
        "--user-rounds",
        type=int,
        help="per-user rounds of N messages in each per-user phase (50; quick 5)",
    )
    ap.add_argument(
        "--user-pairs",
        type=int,
        help="per-user phases of each implementation, alternating (3; quick 1)",
    )
    ap.add_argument(
        "--user-inflight",
        type=int,
        default=4000,
        help="per-user phase: messages in flight at most (4000: two rounds, so the one "
        "publisher is less of a bound)",
    )
    ap.add_argument("--plot", metavar="PNG", help="also draw latency over time (needs matplotlib)")
    ap.add_argument("--client-procs", type=int, default=2, choices=range(1, 5), metavar="1..4")
    ap.add_argument("--read-interval-ms", type=float, default=1.0, help="as fanout_local (1)")
    args = ap.parse_args(argv)
    args.user_rounds = args.user_rounds or (5 if args.quick else 50)
    args.user_pairs = args.user_pairs or (1 if args.quick else 3)
    args.py_spy = None
    if not 2 <= args.subscribers <= 20_000 or not 1 <= args.user_rounds <= 1000:
        ap.error("--subscribers must be in 2..20000 and --user-rounds in 1..1000")
    if not 1 <= args.user_pairs <= 20:
        ap.error("--user-pairs must be in 1..20")
    return fl.phase_args(ap, args)


def role_main(argv: list[str]) -> int:
    """The subprocess side: ``_server`` (a baseline process) or ``_client``."""
    ap = role_parser("fanout.py", argv)
    raise_nofile()
    if argv[0] == "_server":
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--redis", required=True)
        a = ap.parse_args(argv[1:])
        asyncio.run(baseline_main(a.port, a.redis))
    else:
        ap.add_argument("--first-user", type=int, required=True)
        ap.add_argument("--size", type=int, required=True)
        a = ap.parse_args(argv[1:])
        client_main(a.port, a.conns, a.first_user, a.size, a.batch)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ROLES:
        return role_main(argv)
    args = parse_args(argv)
    raise_nofile()
    import redis
    import websockets

    import hub

    meta: Json = {
        "command": command_line(),
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "redis_py": redis.__version__,
        "hub": f"{hub.__version__} ({git_rev()})",
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
    }
    print(f"command:     {meta['command']}")
    print(f"python:      {meta['python']}   websockets: {meta['websockets']}   ", end="")
    print(f"redis-py: {meta['redis_py']}   hub: {meta['hub']}")
    print(f"cpu:         {meta['cpu']}   platform: {meta['platform']}")
    print(
        f"setup:       2 server processes + private Redis, {args.subscribers:,} subscribers on "
        f"{CHANNEL!r} in {args.client_procs} client procs, {fl.PUSH_SIZE}-byte pushes published "
        f"to Redis (hub: AsyncPublisher), windows {args.windows}, fixed rate {args.rate:g}/s, "
        f"per-user: {args.user_pairs} alternating phases of {args.user_rounds} rounds each"
    )
    sys.stdout.flush()
    bench = Bench(args)
    elapsed = run_timed(lambda: asyncio.run(bench.run()))
    if elapsed is None:
        return 130
    meta["elapsed_s"] = elapsed
    rows = make_rows(bench.results)
    print()
    print(fl.render(rows))
    print()
    print(
        "ratio > 1 means the hub is better (throughput: hub/baseline; costs: baseline/hub). "
        f"Server CPU = all server processes (hub: supervisor + 2 workers). Targets: hub >= "
        f"{TARGETS['throughput_x']:g}x delivered msgs/s at <= 1/{TARGETS['cpu_x']:g} CPU per "
        f"delivery (W={args.windows[0]}), per-user >= {TARGETS['user_x']:g}x, p99 < "
        f"{TARGETS['p99_ms']:g} ms, idle <= {TARGETS['idle_kb']:g} KiB/conn, integrity 0."
    )
    print(f"elapsed: {elapsed}s")
    return fl.finish(args, meta, TARGETS, rows, bench)


if __name__ == "__main__":
    sys.exit(main())
