"""Inboxes through Redis: what storing every notification costs the backend, how fast a client
that missed 1,000 notifications catches up, and what a stored notification costs Redis.

Why this exists: a notify is one script run (``hub/inbox.lua``: seq, idempotency and collapse
bookkeeping when asked, a stream append, trimming, expiries, then the ``PUBLISH``) where a plain
per-user send is one ``PUBLISH``. The target is that notify keeps at least half the rate of the
plain send. Catch-up is the other half: a client asking for its inbox gets what it missed ahead
of the live stream.

Setup, all on 127.0.0.1: a private ``redis-server``, one ``hub serve --redis`` process, and one
WebSocket client (its own process) of the measured user, which asked for its inbox, so every
notify and every send is delivered to a hub process and on to a client, as in production. The
backend is in this process: ``AsyncPublisher.notify`` (EVALSHA of the shipped script) against
``AsyncPublisher.send_to_user``, on the same kind of publisher (one pipelined connection, the
same packing of data), each keeping ``--window`` calls in flight for ``--seconds``; the kinds
alternate (``--rounds`` each) and the ratio is the median over the pairs. The client
checks it got every number once and in order. The hub's ``outbound_buffer`` is 256 MiB, so a
client process the machine starves for a moment is not closed as a slow consumer, and Redis
has no output limit on pub/sub links, so a burst of plain sends that outruns the hub for a
moment is not cut off.

Catch-up: 1,000 notifications to a user who is offline; the client connects and sends
``inbox``; timed from the connect to the 1,000th push, ``--catch-ups`` times (a fresh user
each). Memory: ``used_memory`` before and after 10,000 notifications (10 users x 1,000, the
default ``inbox_size``) of a small payload, divided by 10,000.

    .venv/bin/python bench/inbox.py             # ~60 s
    .venv/bin/python bench/inbox.py --quick     # smoke run (~20 s)
    .venv/bin/python bench/inbox.py --json out.json

Only 127.0.0.1 is contacted; Redis is a private ``redis-server`` started and stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
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
    command_line,
    cpu_info,
    fmt_num,
    format_table,
    free_port,
    git_rev,
    proc_cpu_s,
    run_timed,
    write_json,
)

Json = dict[str, Any]
MISSED = 1000
TARGET_RATIO = 0.5
PAYLOAD = {"title": "New message", "from": "alice", "unread": 3}
#: The client reads in another process that the machine may starve: a big outbound buffer, so
#: the rounds measure the backend and the hub, not a slow-consumer close.
HUB_TOML = "outbound_buffer = 268435456\n"
#: Where the CPU of a call goes, each process's user + sys over the round, per call.
CPU_PARTS = ("backend", "redis", "hub", "client")


async def ws_connect(port: int, user: str) -> Any:
    from websockets.asyncio.client import connect

    url = f"ws://{HOST}:{port}/ws?user={user}"
    return await connect(url, compression=None, ping_interval=None, proxy=None, max_size=None)


async def call(ws: Any, command: Json) -> Json:
    await ws.send(json.dumps(command))
    while True:
        message = json.loads(await ws.recv())
        if message.get("id") == command["id"]:
            return message


# --------------------------------------------------------------------------------------------
# Client role: the measured user in its own process, checking order and completeness
# --------------------------------------------------------------------------------------------


async def client_main(port: int, user: str) -> None:
    """Open the inbox, say ``ready``; on ``expect N``, wait for numbers 0..N-1 and report."""
    ws = await ws_connect(port, user)
    reply = await call(ws, {"op": "inbox", "id": 1})
    print(json.dumps({"ready": reply.get("result")}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = await reader.readline()
    expect = int(line.split()[1])
    received = errors = 0
    while received < expect:
        try:
            push = json.loads(await asyncio.wait_for(ws.recv(), 30))
        except TimeoutError:
            break
        if push.get("data", {}).get("n") != received:
            errors += 1
        received += 1
    print(json.dumps({"received": received, "errors": errors}), flush=True)
    await ws.close()


# --------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hub-bench-inbox-"))
        self.procs: list[asyncio.subprocess.Process] = []
        self.redis_url = ""
        self.port = 0
        self.pids: dict[str, int] = {}
        self.results: Json = {"send": [], "notify": [], "catch_up": [], "memory": {}}
        self.errors: list[str] = []

    def progress(self, text: str) -> None:
        print(f"  .. {text}", flush=True)

    async def spawn(self, name: str, *argv: str, **kw: Any) -> asyncio.subprocess.Process:
        log = (self.tmp / f"{name}.log").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        kw.setdefault("stdout", log)
        proc = await asyncio.create_subprocess_exec(*argv, stderr=log, env=env, **kw)
        self.procs.append(proc)
        return proc

    async def start(self) -> None:
        import redis

        port = free_port()
        exe = shutil.which("redis-server") or "redis-server"
        argv = [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        # A burst of plain sends can outrun the hub's reading: no output limit on its link.
        argv += ["--client-output-buffer-limit", "pubsub 0 0 0"]
        self.pids["redis"] = (await self.spawn("redis", *argv)).pid
        self.redis_url = f"redis://{HOST}:{port}"
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1)
        for _ in range(100):
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            await asyncio.sleep(0.1)
        else:
            raise BenchError("redis-server did not answer PING within 10s")
        client.close()
        self.port = free_port()
        cmd = [sys.executable, "-m", "hub.cli", "serve", "--host", HOST, "--port", str(self.port)]
        config = self.tmp / "hub.toml"
        config.write_text(HUB_TOML)
        hub = await self.spawn(
            "hub", *cmd, "--redis", self.redis_url, "--insecure", "--config", str(config)
        )
        self.pids["hub"] = hub.pid
        for _ in range(200):
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection(HOST, self.port)
                w.close()
                self.progress(f"redis on :{port}, hub on :{self.port}")
                return
            await asyncio.sleep(0.05)
        raise BenchError("hub serve did not listen within 10s")

    async def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    def inbox(self) -> Any:
        from hub.inbox import RedisInbox
        from hub.redis.cluster import Router

        return RedisInbox(Router.from_url(self.redis_url))

    async def round(self, user: str, notify: bool) -> Json:
        """Closed loop for ``--seconds`` with ``--window`` in flight; calls/s. Both kinds go
        through one ``AsyncPublisher`` (one pipelined connection, the same packing of data):
        ``notify`` against ``send_to_user``."""
        from hub.redis.publisher import AsyncPublisher

        script = Path(__file__).resolve()
        argv = [sys.executable, str(script), "_client", "--port", str(self.port), "--user", user]
        sub = await self.spawn(
            "client", *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert sub.stdout is not None and sub.stdin is not None
        ready = await asyncio.wait_for(sub.stdout.readline(), 15)
        if not ready.startswith(b'{"ready"'):
            raise BenchError(f"client failed: {ready!r}")
        pub = AsyncPublisher(self.redis_url)
        seq = 0
        deadline = 0.0

        async def worker() -> None:
            nonlocal seq
            while time.perf_counter() < deadline:
                data = {**PAYLOAD, "n": seq}
                seq += 1
                if notify:
                    await pub.notify(user, data)
                else:
                    await pub.send_to_user(user, data)

        pids = {**self.pids, "backend": os.getpid(), "client": sub.pid}
        cpu_before = {part: sum(proc_cpu_s(pid)) for part, pid in pids.items()}
        start = time.perf_counter()
        deadline = start + self.args.seconds
        await asyncio.gather(*(worker() for _ in range(self.args.window)))
        elapsed = time.perf_counter() - start
        await pub.aclose()
        sub.stdin.write(f"expect {seq}\n".encode())
        await sub.stdin.drain()
        report = json.loads(await asyncio.wait_for(sub.stdout.readline(), 60))
        # Up to the client's report: the hub and the client may still be delivering after the
        # backend's last call; their CPU for this round's calls is counted all the same.
        cpu = {
            f"cpu_us_{part}": round((sum(proc_cpu_s(pid)) - cpu_before[part]) / seq * 1e6, 1)
            for part, pid in pids.items()
        }
        await sub.wait()
        self.procs.remove(sub)
        missing = seq - report["received"]
        if missing or report["errors"]:
            self.errors.append(f"{user}: {missing} missing, {report['errors']} out of order")
        return {"rate": seq / elapsed, "sent": seq, "seconds": elapsed, **cpu, **report}

    async def catch_up(self, i: int) -> Json:
        import msgpack

        user = f"late{i}"
        inbox = self.inbox()
        for n in range(MISSED):
            await inbox.notify(user, msgpack.packb({"data": {**PAYLOAD, "n": n}}))
        await inbox.close()
        t0 = time.perf_counter()
        ws = await ws_connect(self.port, user)
        t1 = time.perf_counter()
        reply = await call(ws, {"op": "inbox", "id": 1})
        if reply.get("result", {}).get("seq") != MISSED:
            raise BenchError(f"inbox reply: {reply}")
        got = [json.loads(await ws.recv())["data"]["n"] for _ in range(MISSED)]
        t2 = time.perf_counter()
        await ws.close()
        if got != list(range(MISSED)):
            self.errors.append(f"catch-up {i}: wrong notifications")
        return {"connect_to_last_ms": (t2 - t0) * 1000, "inbox_to_last_ms": (t2 - t1) * 1000}

    async def memory(self) -> Json:
        import msgpack
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        before = int(client.info("memory")["used_memory"])
        inbox = self.inbox()
        users, each = 10, 1000
        for u in range(users):
            for n in range(each):
                await inbox.notify(f"mem{u}", msgpack.packb({"data": {**PAYLOAD, "n": n}}))
        await inbox.close()
        after = int(client.info("memory")["used_memory"])
        client.close()
        size = len(msgpack.packb({"data": {**PAYLOAD, "n": 500}}))
        return {"bytes_per_entry": (after - before) / (users * each), "envelope_bytes": size}

    async def run(self) -> None:
        try:
            await self.start()
            for r in range(self.args.rounds):
                for name, notify in (("send", False), ("notify", True)):
                    res = await self.round(f"{name}{r}", notify)
                    self.results[name].append(res)
                    cpu = ", ".join(f"{p} {res['cpu_us_' + p]:g}" for p in CPU_PARTS)
                    self.progress(
                        f"round {r + 1} {name}: {res['rate']:,.0f}/s; CPU us per call: {cpu}"
                    )
            for i in range(self.args.catch_ups):
                self.results["catch_up"].append(await self.catch_up(i))
            self.results["memory"] = await self.memory()
        except BenchError as exc:
            self.errors.append(str(exc))
        finally:
            await self.stop()
        if not self.errors:
            shutil.rmtree(self.tmp, ignore_errors=True)


def cpu_median(rounds: list[Json], part: str) -> float:
    return round(statistics.median(r[f"cpu_us_{part}"] for r in rounds), 1)


def summarize(results: Json) -> tuple[list[tuple[str, ...]], Json]:
    send = statistics.median(r["rate"] for r in results["send"])
    notify = statistics.median(r["rate"] for r in results["notify"])
    pairs = zip(results["send"], results["notify"], strict=True)
    ratio = statistics.median(n["rate"] / s["rate"] for s, n in pairs)
    connect = sorted(r["connect_to_last_ms"] for r in results["catch_up"])
    asked = sorted(r["inbox_to_last_ms"] for r in results["catch_up"])
    connect_p50, asked_p50 = connect[len(connect) // 2], asked[len(asked) // 2]
    memory = results["memory"]
    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    rows = [
        ("metric", "value", "target", ""),
        ("per-user sends/s, plain PUBLISH (median)", fmt_num(send), "", ""),
        ("notifies/s, inbox.lua (median)", fmt_num(notify), "", ""),
        ("notify / send (median of pairs)", f"{ratio:.2f}", f">= {TARGET_RATIO}", verdict),
        (
            f"catch up {MISSED} missed: connect to last push, p50 ms",
            fmt_num(connect_p50),
            "",
            "",
        ),
        (f"catch up {MISSED} missed: connect to last push, max ms", fmt_num(connect[-1]), "", ""),
        (
            f"catch up {MISSED} missed: inbox to last push, p50 ms",
            fmt_num(asked_p50),
            "",
            "",
        ),
        *(
            (
                f"CPU us per call in {part}: send / notify (median)",
                f"{cpu_median(results['send'], part):g} / {cpu_median(results['notify'], part):g}",
                "",
                "",
            )
            for part in CPU_PARTS
        ),
        ("Redis memory per stored notification, bytes", fmt_num(memory["bytes_per_entry"]), "", ""),
        ("  (its envelope, bytes)", str(memory["envelope_bytes"]), "", ""),
    ]
    summary = {"send_rate": send, "notify_rate": notify, "ratio": ratio, "verdict": verdict}
    return rows, summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="inbox.py", description="Notify rate against plain sends; catch-up; memory."
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s rounds, 2 rounds")
    ap.add_argument("--seconds", type=float, help="seconds per round (3; quick 2)")
    ap.add_argument("--rounds", type=int, help="rounds of each kind, alternating (5; quick 2)")
    ap.add_argument("--window", type=int, default=32, help="calls in flight (32)")
    ap.add_argument("--catch-ups", type=int, help="catch-up measurements (10; quick 3)")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write meta, results, table")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.catch_ups = args.catch_ups or (3 if args.quick else 10)
    if not 0.5 <= args.seconds <= 120 or not 1 <= args.rounds <= 20:
        ap.error("--seconds must be in 0.5..120 and --rounds in 1..20")
    if not 1 <= args.window <= 1024 or not 1 <= args.catch_ups <= 100:
        ap.error("--window must be in 1..1024 and --catch-ups in 1..100")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_client":
        ap = argparse.ArgumentParser(prog="inbox.py _client")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--user", required=True)
        a = ap.parse_args(argv[1:])
        asyncio.run(client_main(a.port, a.user))
        return 0
    args = parse_args(argv)
    import hub

    meta = {
        "command": command_line(),
        "python": platform.python_version(),
        "hub": f"{hub.__version__} ({git_rev()})",
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "window": args.window,
    }
    print(f"command:  {meta['command']}")
    print(f"hub:      {meta['hub']}   python {meta['python']}   cpu: {meta['cpu']}")
    print(
        f"setup:    one hub process, one client, {args.window} calls in flight, "
        f"{args.rounds} x {args.seconds:g} s per kind"
    )
    bench = Bench(args)
    load_before = os.getloadavg()[0]
    elapsed = run_timed(lambda: asyncio.run(bench.run()))
    if elapsed is None:
        return 130
    meta["elapsed_s"] = elapsed
    meta["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if bench.errors:
        print("errors:\n  " + "\n  ".join(bench.errors), file=sys.stderr)
        return 1
    rows, summary = summarize(bench.results)
    print(format_table(rows, right={1}))
    print(f"load average (1 min) before / after: {meta['loadavg_1min']}")
    if args.json:
        write_json(args.json, {"meta": meta, "results": bench.results, "summary": summary})
    return 0 if summary["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
