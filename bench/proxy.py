"""What asking the backend costs: connects per second through the connect proxy against JWTs,
and the latency a publish proxy adds to a client's publish.

Why this exists: a connect proxy puts one HTTP round trip to the backend in front of every
connection, and a publish proxy one in front of every client publish (docs/proxy.md). These
numbers say what that costs on one machine, each side by side with the path without the proxy.

Setup, all on 127.0.0.1: one ``hub serve`` process with a token secret, ``connect_proxy`` and a
namespace ``room`` with a ``publish_proxy``; a backend in its own process (aiohttp.web, checking
every call's signature as a real backend must); the clients (``websockets``) in this process.

- connects: ``--connects`` connections, ``--concurrency`` at a time, each opened, authenticated
  (its first reply proves it: an ``unsubscribe`` answered 109) and closed; once with a JWT in the
  URL, once with a session cookie for the connect proxy. Rounds alternate (``--rounds`` each);
  the table gives the median rate of each.
- publish: one client subscribed to ``room:x`` (proxied) and ``plain:x`` (not) publishes one
  message at a time and times each until its own push comes back, alternating channels, for
  ``--publishes`` of each. p50 / p99 of both, and the difference (the proxy's added latency).

    .venv/bin/python bench/proxy.py            # ~40 s
    .venv/bin/python bench/proxy.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # benchlib.py sits next to this file

from benchlib import free_port  # noqa: E402

from hub.tokens import mint_token  # noqa: E402

SECRET = "bench-token-secret-0123456789abcdef0123456789"
PROXY_SECRET = "bench-proxy-secret-0123456789abcdef0123456789"


# -- the backend (its own process: `python bench/proxy.py _backend PORT`) ----------------------


def backend_main(port: int) -> None:
    from aiohttp import web

    key = PROXY_SECRET.encode()

    async def answer(request: web.Request) -> web.Response:
        raw = await request.read()
        stamp = request.headers.get("X-Hub-Timestamp", "")
        mac = hmac.new(key, stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("X-Hub-Signature", ""), "sha256=" + mac):
            return web.Response(status=403)
        body = json.loads(raw)
        if request.path == "/connect":
            sid = body["cookies"].get("sid", "")
            if not sid.startswith("user-"):
                return web.json_response({"error": {"code": 401, "message": "no session"}})
            return web.json_response({"result": {"user": sid[5:]}})
        return web.json_response({"result": {"data": body["data"]}})  # publish: as sent

    app = web.Application()
    app.router.add_post("/connect", answer)
    app.router.add_post("/publish", answer)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# -- processes ---------------------------------------------------------------------------------


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not listening")


def start(tmp: Path) -> tuple[int, list[subprocess.Popen[bytes]]]:
    backend_port, hub_port = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, __file__, "_backend", str(backend_port)])
    wait_port(backend_port, backend, "backend")
    config = tmp / "hub.toml"
    config.write_text(
        f'token_secret = "{SECRET}"\n'
        f'proxy_secret = "{PROXY_SECRET}"\n'
        f'connect_proxy = "http://127.0.0.1:{backend_port}/connect"\n'
        "command_rate = 0\n"
        "[namespaces.room]\npublish = true\n"
        f'publish_proxy = "http://127.0.0.1:{backend_port}/publish"\n'
        "[namespaces.plain]\npublish = true\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    hub_bin = str(Path(sys.executable).with_name("hub"))
    argv = [hub_bin, "serve", "--config", str(config), "--port", str(hub_port)]
    log = (tmp / "hub.log").open("wb")
    hub = subprocess.Popen(argv, env=env, stdout=log, stderr=log)
    wait_port(hub_port, hub, "hub")
    return hub_port, [hub, backend]


# -- measurements ------------------------------------------------------------------------------


async def one_connect(url: str, headers: dict[str, str] | None) -> None:
    async with connect(
        url, additional_headers=headers, compression=None, ping_interval=None, proxy=None
    ) as ws:
        await ws.send('{"op":"unsubscribe","channel":"x","id":1}')
        reply = json.loads(await ws.recv())
        if reply.get("error", {}).get("code") != 109:
            raise RuntimeError(f"not authenticated: {reply}")


async def connects(port: int, how: str, count: int, concurrency: int) -> float:
    base = f"ws://127.0.0.1:{port}/ws"
    tokens = [mint_token(f"u{i}", SECRET) for i in range(count)] if how == "jwt" else []
    slots = asyncio.Semaphore(concurrency)

    async def go(i: int) -> None:
        async with slots:
            if how == "jwt":
                await one_connect(f"{base}?token={tokens[i]}", None)
            else:
                await one_connect(base, {"Cookie": f"sid=user-u{i}"})

    started = time.perf_counter()
    await asyncio.gather(*(go(i) for i in range(count)))
    return count / (time.perf_counter() - started)


async def publishes(port: int, count: int) -> dict[str, list[float]]:
    token = mint_token("publisher", SECRET)
    times: dict[str, list[float]] = {"room:x": [], "plain:x": []}
    async with connect(
        f"ws://127.0.0.1:{port}/ws?token={token}", compression=None, ping_interval=None, proxy=None
    ) as ws:
        cid = 0
        for channel in times:
            cid += 1
            await ws.send(json.dumps({"op": "subscribe", "channel": channel, "id": cid}))
            await ws.recv()
        for _ in range(count):
            for channel, samples in times.items():
                cid += 1
                started = time.perf_counter()
                await ws.send(
                    json.dumps({"op": "publish", "channel": channel, "data": cid, "id": cid})
                )
                while True:  # the reply and the push, in either order: until the push
                    message = json.loads(await ws.recv())
                    if message.get("channel") == channel and message.get("data") == cid:
                        break
                samples.append(time.perf_counter() - started)
    return times


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(port: int, args: argparse.Namespace) -> dict[str, Any]:
    await one_connect(f"ws://127.0.0.1:{port}/ws", {"Cookie": "sid=user-warm"})  # pools warm
    rates: dict[str, list[float]] = {"jwt": [], "proxy": []}
    for _ in range(args.rounds):
        for how in rates:
            rates[how].append(await connects(port, how, args.connects, args.concurrency))
    times = await publishes(port, args.publishes)
    return {"rates": rates, "times": times}


def report(result: dict[str, Any], args: argparse.Namespace, seconds: float) -> str:
    jwt = statistics.median(result["rates"]["jwt"])
    proxy = statistics.median(result["rates"]["proxy"])
    ms = {ch: [t * 1000 for t in s] for ch, s in result["times"].items()}
    lines = [
        f"bench/proxy.py  python {platform.python_version()}  aiohttp {aiohttp.__version__}  "
        f"websockets {websockets.__version__}  {seconds:.0f} s",
        "",
        "| scenario | metric | without proxy | with proxy | ratio |",
        "|---|---|---|---|---|",
        f"| connect, {args.concurrency} at a time (median of {args.rounds}) | connects / s | "
        f"{jwt:,.0f} (JWT) | {proxy:,.0f} (connect proxy) | {proxy / jwt:.2f}x |",
    ]
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        plain, room = quantile(ms["plain:x"], q), quantile(ms["room:x"], q)
        lines.append(
            f"| publish to own push, {args.publishes} each | {name} ms | {plain:.3f} | "
            f"{room:.3f} (+{room - plain:.3f}) | {plain / room:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_backend":
        backend_main(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connects", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.connects, args.rounds, args.publishes = 100, 1, 100
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        port, procs = start(Path(tmp))
        try:
            result = asyncio.run(measure(port, args))
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(report(result, args, time.perf_counter() - started))


if __name__ == "__main__":
    main()
