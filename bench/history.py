"""History through Redis: what storing every publication costs the publisher, and how fast a
client that missed 100 publications catches up.

Why this exists: a namespace with history turns each publish from one ``PUBLISH`` into one script
run (``hub/history.lua``: offset, stream append with trimming, two expiries, then the
``PUBLISH``). The target is that publishing with history keeps at least half the rate of
publishing without it. Recovery is the other half of the feature: a reconnecting client's
``subscribe`` with ``since`` reads the missed publications from the stream and gets them ahead of
the live ones.

Setup, all on 127.0.0.1: a private ``redis-server``, one ``hub serve --redis`` process with a
namespace ``hist`` (history_size 1000) and the default namespace without history, and one
WebSocket subscriber (its own process) on the measured channel, so every publish is delivered
to a hub process and on to a client, as in production. The publisher is ``hub.AsyncPublisher``
(the bridge's own publisher) in this process, keeping ``--window`` publishes in flight for
``--seconds``; plain and history rounds alternate (``--rounds`` each), and the ratio is the
median over the pairs (a history round against the plain round before it). The
subscriber checks it got every sequence number once and in order, with consecutive offsets on
the history channel.

Recovery: a client subscribes to a history channel, notes offset and epoch, disconnects; 100
publications are made; the client connects again and subscribes with ``since``. Timed from the
connect (and from the subscribe) to the 100th recovered push, ``--recoveries`` times.

    .venv/bin/python bench/history.py             # ~60 s
    .venv/bin/python bench/history.py --quick     # smoke run (~15 s)
    .venv/bin/python bench/history.py --json out.json

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
    run_timed,
    write_json,
)

Json = dict[str, Any]
HISTORY_SIZE = 1000
HISTORY_TTL = 300
HUB_TOML = f"""
insecure = true
[namespaces.hist]
history_size = {HISTORY_SIZE}
history_ttl = {HISTORY_TTL}
"""
PLAIN, HIST = "bench:plain", "hist:feed"
MISSED = 100
TARGET_RATIO = 0.5


def ws_url(port: int, user: str) -> str:
    return f"ws://{HOST}:{port}/ws?user={user}"


async def ws_connect(port: int, user: str) -> Any:
    from websockets.asyncio.client import connect

    return await connect(ws_url(port, user), compression=None, ping_interval=None, proxy=None)


async def call(ws: Any, command: Json) -> Json:
    await ws.send(json.dumps(command))
    while True:
        message = json.loads(await ws.recv())
        if message.get("id") == command["id"]:
            return message


# --------------------------------------------------------------------------------------------
# Subscriber role: one WebSocket client in its own process, checking order and completeness
# --------------------------------------------------------------------------------------------


async def subscriber_main(port: int, channel: str) -> None:
    """Subscribe, say ``ready``; on ``expect N`` from stdin, wait for pushes 0..N-1 and report."""
    ws = await ws_connect(port, "subscriber")
    reply = await call(ws, {"op": "subscribe", "channel": channel, "id": 1})
    print(json.dumps({"ready": reply.get("result")}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    expect: asyncio.Future[int] = loop.create_future()

    async def control() -> None:
        line = await reader.readline()
        expect.set_result(int(line.split()[1]))

    task = loop.create_task(control())
    received = errors = 0
    last_offset: int | None = None
    while not expect.done() or received < expect.result():
        try:
            raw = await asyncio.wait_for(ws.recv(), 30)
        except TimeoutError:
            break
        push = json.loads(raw)
        if push.get("data") != received:
            errors += 1
        offset = push.get("offset")
        if offset is not None:
            if last_offset is not None and offset != last_offset + 1:
                errors += 1
            last_offset = offset
        received += 1
    await task
    print(json.dumps({"received": received, "errors": errors}), flush=True)
    await ws.close()


# --------------------------------------------------------------------------------------------
# The parent: processes, phases, report
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="hub-bench-history-"))
        self.procs: list[asyncio.subprocess.Process] = []
        self.redis_url = ""
        self.port = 0
        self.results: Json = {"plain": [], "history": [], "recovery": []}
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
        await self.spawn(
            "redis", exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"
        )
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
        config = self.tmp / "hub.toml"
        config.write_text(HUB_TOML)
        self.port = free_port()
        cmd = [sys.executable, "-m", "hub.cli", "serve", "--host", HOST, "--port", str(self.port)]
        await self.spawn("hub", *cmd, "--redis", self.redis_url, "--config", str(config))
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

    async def publish_round(self, channel: str, history: bool) -> Json:
        """Closed loop for ``--seconds`` with ``--window`` in flight; publishes/s."""
        from hub.redis.publisher import AsyncPublisher

        script = Path(__file__).resolve()
        sub = await self.spawn(
            "subscriber",
            sys.executable,
            str(script),
            "_client",
            "--port",
            str(self.port),
            "--channel",
            channel,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert sub.stdout is not None and sub.stdin is not None
        ready = await asyncio.wait_for(sub.stdout.readline(), 15)
        if not ready.startswith(b'{"ready"'):
            raise BenchError(f"subscriber failed: {ready!r}")
        options = {"history_size": HISTORY_SIZE, "history_ttl": HISTORY_TTL} if history else {}
        pub = AsyncPublisher(self.redis_url)
        seq = 0
        deadline = 0.0

        async def worker() -> None:
            nonlocal seq
            while time.perf_counter() < deadline:
                n = seq
                seq += 1
                await pub.publish(channel, n, **options)

        # Sequence numbers are taken in order and one connection keeps the order, so the
        # subscriber can check it.
        start = time.perf_counter()
        deadline = start + self.args.seconds
        await asyncio.gather(*(worker() for _ in range(self.args.window)))
        elapsed = time.perf_counter() - start
        await pub.aclose()
        sub.stdin.write(f"expect {seq}\n".encode())
        await sub.stdin.drain()
        report = json.loads(await asyncio.wait_for(sub.stdout.readline(), 60))
        await sub.wait()
        self.procs.remove(sub)
        missing = seq - report["received"]
        if missing or report["errors"]:
            self.errors.append(f"{channel}: {missing} missing, {report['errors']} out of order")
        return {"rate": seq / elapsed, "published": seq, "seconds": elapsed, **report}

    async def recovery_round(self, i: int) -> Json:
        from hub.redis.publisher import AsyncPublisher

        channel = f"hist:rec{i}"
        ws = await ws_connect(self.port, "rec")
        reply = await call(ws, {"op": "subscribe", "channel": channel, "id": 1})
        since = reply["result"]
        await ws.close()
        async with AsyncPublisher(self.redis_url) as pub:
            for n in range(MISSED):
                await pub.publish(channel, n, history_size=HISTORY_SIZE, history_ttl=HISTORY_TTL)
        t0 = time.perf_counter()
        ws = await ws_connect(self.port, "rec")
        t1 = time.perf_counter()
        command = {"op": "subscribe", "channel": channel, "since": since, "id": 2}
        reply = await call(ws, command)
        if reply.get("result", {}).get("recovered") is not True:
            raise BenchError(f"not recovered: {reply}")
        got = [json.loads(await ws.recv())["data"] for _ in range(MISSED)]
        t2 = time.perf_counter()
        await ws.close()
        if got != list(range(MISSED)):
            self.errors.append(f"recovery {i}: wrong publications")
        return {"connect_to_last_ms": (t2 - t0) * 1000, "subscribe_to_last_ms": (t2 - t1) * 1000}

    async def run(self) -> None:
        try:
            await self.start()
            for r in range(self.args.rounds):
                for name, channel, history in (("plain", PLAIN, False), ("history", HIST, True)):
                    res = await self.publish_round(f"{channel}{r}", history)
                    self.results[name].append(res)
                    self.progress(f"round {r + 1} {name}: {res['rate']:,.0f} publishes/s")
            for i in range(self.args.recoveries):
                self.results["recovery"].append(await self.recovery_round(i))
        except BenchError as exc:
            self.errors.append(str(exc))
        finally:
            await self.stop()
        if not self.errors:
            shutil.rmtree(self.tmp, ignore_errors=True)


def summarize(results: Json) -> tuple[list[tuple[str, ...]], Json]:
    plain = statistics.median(r["rate"] for r in results["plain"])
    hist = statistics.median(r["rate"] for r in results["history"])
    # Each history round against the plain round just before it: the machine's load drifts.
    pairs = zip(results["plain"], results["history"], strict=True)
    ratio = statistics.median(h["rate"] / p["rate"] for p, h in pairs)
    rec = results["recovery"]
    connect = sorted(r["connect_to_last_ms"] for r in rec)
    sub = sorted(r["subscribe_to_last_ms"] for r in rec)

    def p90(v: list[float]) -> float:
        return v[min(len(v) - 1, int(len(v) * 0.9))]

    verdict = "PASS" if ratio >= TARGET_RATIO else "FAIL"
    rows = [
        ("metric", "value", "target", ""),
        ("publishes/s, no history (median)", fmt_num(plain), "", ""),
        ("publishes/s, with history (median)", fmt_num(hist), "", ""),
        ("with / without history (median of pairs)", f"{ratio:.2f}", f">= {TARGET_RATIO}", verdict),
        (
            f"recover {MISSED} missed: connect to last push, p50 ms",
            fmt_num(connect[len(connect) // 2]),
            "",
            "",
        ),
        (f"recover {MISSED} missed: connect to last push, p90 ms", fmt_num(p90(connect)), "", ""),
        (
            f"recover {MISSED} missed: subscribe to last push, p50 ms",
            fmt_num(sub[len(sub) // 2]),
            "",
            "",
        ),
    ]
    summary = {"plain_rate": plain, "history_rate": hist, "ratio": ratio, "verdict": verdict}
    return rows, summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="history.py", description="Publish rate with and without history; recovery time."
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s rounds, 2 rounds")
    ap.add_argument("--seconds", type=float, help="seconds per publish round (3; quick 2)")
    ap.add_argument("--rounds", type=int, help="rounds of each kind, alternating (5; quick 2)")
    ap.add_argument("--window", type=int, default=32, help="publishes in flight (32)")
    ap.add_argument("--recoveries", type=int, help="recovery measurements (30; quick 5)")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write meta, results, table")
    args = ap.parse_args(argv)
    args.seconds = args.seconds or (2.0 if args.quick else 3.0)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.recoveries = args.recoveries or (5 if args.quick else 30)
    if not 0.5 <= args.seconds <= 120 or not 1 <= args.rounds <= 20:
        ap.error("--seconds must be in 0.5..120 and --rounds in 1..20")
    if not 1 <= args.window <= 1024 or not 1 <= args.recoveries <= 1000:
        ap.error("--window must be in 1..1024 and --recoveries in 1..1000")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_client":
        ap = argparse.ArgumentParser(prog="history.py _client")
        ap.add_argument("--port", type=int, required=True)
        ap.add_argument("--channel", required=True)
        a = ap.parse_args(argv[1:])
        asyncio.run(subscriber_main(a.port, a.channel))
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
        "history_size": HISTORY_SIZE,
    }
    print(f"command:  {meta['command']}")
    print(f"hub:      {meta['hub']}   python {meta['python']}   cpu: {meta['cpu']}")
    print(
        f"setup:    one hub process, one subscriber, AsyncPublisher with {args.window} in "
        f"flight, {args.rounds} x {args.seconds:g} s per kind, history_size {HISTORY_SIZE}"
    )
    bench = Bench(args)
    load_before = os.getloadavg()[0]
    elapsed = run_timed(lambda: asyncio.run(bench.run()))
    if elapsed is None:
        return 130
    meta["elapsed_s"] = elapsed
    # The machine may be shared: rates move with other load (this run adds about 2-3 itself).
    meta["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    if bench.errors:
        print(f"\n{len(bench.errors)} error(s) (logs kept in {bench.tmp}):")
        for e in bench.errors:
            print(f"  - {e}")
    if not bench.results["recovery"] or len(bench.results["history"]) < args.rounds:
        return 1
    rows, summary = summarize(bench.results)
    print()
    print(format_table(rows, right={1, 2}))
    print(f"elapsed: {elapsed}s   load average (1 min) before / after: {meta['loadavg_1min']}")
    if args.json:
        write_json(args.json, {"meta": meta, "summary": summary, "results": bench.results})
    return 1 if bench.errors or summary["verdict"] != "PASS" else 0


if __name__ == "__main__":
    sys.exit(main())
