"""The offline fallback against a real local HTTP server (aiohttp) as the backend: entries no
device acknowledged in time are POSTed, signed, once each across two hubs on one Redis; bad
answers are retried or given up as they should be, and counted; a backend that answers 503
every time gets each entry the set number of times, from one ``hub serve`` process only."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from hubfix import api, client, eventually, make_settings, metric, running, scrape
from prometheus_client.parser import text_string_to_metric_families
from wshelp import run

from hub.notify import FALLBACK_ATTEMPTS, FALLBACK_BACKOFF

if TYPE_CHECKING:
    from hubproc import HubProcess
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

SECRET = "fallback-secret-0123456789abcdef0123"


class Backend:
    """A local HTTP server standing for the notification backend: it checks each signature
    and answers what ``answer(body, attempt)`` says (a status, or None to drop the connection)."""

    def __init__(self, answer: Callable[[dict[str, Any], int], int | None]) -> None:
        self.answer = answer
        self.received: list[dict[str, Any]] = []
        self.attempts: dict[tuple[str, int], int] = {}
        self.bad_signatures = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        timestamp = request.headers.get("X-Hub-Timestamp", "")
        mac = hmac.new(SECRET.encode(), timestamp.encode() + b"." + raw, hashlib.sha256)
        if request.headers.get("X-Hub-Signature") != "sha256=" + mac.hexdigest():
            self.bad_signatures += 1
            return web.Response(status=401)
        body = json.loads(raw)
        key = (body["user"], body["seq"])
        self.attempts[key] = self.attempts.get(key, 0) + 1
        status = self.answer(body, self.attempts[key])
        if status is None:
            assert request.transport is not None
            request.transport.abort()  # no answer at all
            return web.Response(status=500)
        if 200 <= status < 300:
            self.received.append(body)
        return web.Response(status=status, text="garbage\x00" if status >= 500 else "ok")


@asynccontextmanager
async def serving(backend: Backend) -> AsyncIterator[Backend]:
    app = web.Application()
    app.router.add_post("/hook", backend.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    backend.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield backend
    finally:
        await runner.cleanup()


def test_unacknowledged_entries_are_posted_once_each_across_two_hubs(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with serving(Backend(lambda body, attempt: 200)) as backend, AsyncExitStack() as st:
            settings = make_settings(
                redis_url=redis_server.url,
                fallback_url=backend.url,
                fallback_secret=SECRET,
            )
            a = await st.enter_async_context(running(settings))
            b = await st.enter_async_context(running(settings))
            batch = [
                {"user": "off", "data": {"n": i}, "id": f"n-{i}", "fallback_after": 0.5}
                for i in range(20)
            ]
            status, body = await api(a, "/api/notify", {"notifications": batch})
            assert status == 200, body
            async with client(b, user="off") as phone:
                assert (await phone.call("inbox"))["result"]["seq"] == 20
                for _ in range(5):
                    await phone.push()
                assert (await phone.call("ack", seq=5))["result"] == {"acked": 5}
            await eventually(lambda: len(backend.received) >= 15, timeout=10)
            await asyncio.sleep(1.5)  # two more polls on each hub: nothing else comes
            seqs = sorted(body["seq"] for body in backend.received)
            assert seqs == list(range(6, 21))
            first = min(backend.received, key=lambda body: body["seq"])
            assert first["user"] == "off" and first["data"] == {"n": 5}
            assert first["id"] == "n-5" and isinstance(first["epoch"], str)
            assert backend.bad_signatures == 0
            sent = [
                metric(await scrape(h), "hub_inbox_fallbacks_total", result="sent") for h in (a, b)
            ]
            assert sum(sent) == 15

    run(main, timeout=40)


def test_bad_answers_are_retried_or_given_up_and_counted() -> None:
    def answer(body: dict[str, Any], attempt: int) -> int | None:
        n = body["data"]
        if n == "flaky":
            return 503 if attempt <= 2 else 200
        if n == "refused":
            return 400
        if n == "dropped":
            return None if attempt == 1 else 204
        return 200

    async def main() -> None:
        async with serving(Backend(answer)) as backend:
            settings = make_settings(
                fallback_url=backend.url, fallback_secret=SECRET, fallback_after=0.2
            )
            async with running(settings) as hub:
                for data in ("flaky", "refused", "dropped", "fine"):
                    status, _ = await api(hub, "/api/notify", {"user": "off", "data": data})
                    assert status == 200
                expired = {"user": "off", "data": "gone", "ttl": 0.05}
                assert (await api(hub, "/api/notify", expired))[0] == 200
                status, _ = await api(hub, "/api/notify", {"user": "on", "data": "x"})

                async def done() -> bool:
                    samples = await scrape(hub)
                    sent = metric(samples, "hub_inbox_fallbacks_total", result="sent")
                    failed = metric(samples, "hub_inbox_fallbacks_total", result="failed")
                    return sent + failed >= 5

                await eventually(done, timeout=15)
                samples = await scrape(hub)
                assert metric(samples, "hub_inbox_fallbacks_total", result="sent") == 4
                assert metric(samples, "hub_inbox_fallbacks_total", result="failed") == 1
                assert sorted(b["data"] for b in backend.received) == [
                    "dropped",
                    "fine",
                    "flaky",
                    "x",
                ]
                assert backend.attempts[("off", 1)] == 3  # flaky: two 503s, then taken
                assert backend.attempts[("off", 2)] == 1  # refused: a 4xx is not asked again
                assert backend.attempts[("off", 3)] == 2  # dropped once
                assert ("off", 5) not in backend.attempts  # expired before it was due

    run(main, timeout=40)


def test_fallback_settings_are_checked() -> None:
    from hub.config import ConfigError

    for overrides in (
        {"fallback_url": "ftp://x"},
        {"fallback_url": "http://127.0.0.1:9/hook"},
        {"fallback_url": "http://127.0.0.1:9/hook", "fallback_secret": "short"},
        {"fallback_after": -1},
        {"inbox_size": 0},
        {"inbox_ttl": 0},
    ):
        try:
            make_settings(**overrides)
        except ConfigError as exc:
            named = str(exc).split(":")[0]
            assert named.startswith(("fallback_", "inbox_")), (overrides, exc)
        else:
            raise AssertionError(f"accepted {overrides}")


async def process_metric(
    session: aiohttp.ClientSession, hub: HubProcess, name: str, **labels: str
) -> float:
    """One sample of a ``hub serve`` process's ``/metrics`` (0 when absent)."""
    async with session.get(hub.base + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_a_backend_answering_503_every_time_gets_each_entry_the_set_times_from_one_process(
    hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    """Two ``hub serve`` processes on one Redis, a backend answering 503 to every fallback of
    one user: that entry is POSTed ``FALLBACK_ATTEMPTS`` times in all (by the process that
    claimed it), then counted failed and never sent again; another user's fallback is taken,
    and a client live on the other process gets its notifications meanwhile."""
    backend = Backend(lambda body, attempt: 503 if body["user"] == "down" else 200)
    toml = ""

    async def main() -> None:
        nonlocal toml
        async with serving(backend), aiohttp.ClientSession() as session:
            toml = (
                f'fallback_url = "{backend.url}"\n'
                f'fallback_secret = "{SECRET}"\n'
                "fallback_after = 0.3\n"
            )
            a = await asyncio.to_thread(hubs, toml, redis_server.url)
            b = await asyncio.to_thread(hubs, toml, redis_server.url)

            async def notify(hub: HubProcess, body: dict[str, Any]) -> dict[str, Any]:
                async with session.post(hub.base + "/api/notify", json=body) as response:
                    assert response.status == 200, await response.text()
                    return (await response.json())["result"]

            async with session.ws_connect(
                f"ws://127.0.0.1:{b.port}/ws?user=live&inbox=1", protocols=["hub.v1.json"]
            ) as live:
                opened = json.loads((await live.receive(timeout=10)).data)
                assert opened["inbox"]["opened"]["seq"] == 0
                await notify(a, {"user": "down", "data": "to the fallback"})
                await notify(a, {"user": "fine", "data": "taken"})
                got = []
                for n in range(10):  # while the fallback is retried
                    await notify(a, {"user": "live", "data": n, "fallback_after": 0})
                    got.append(json.loads((await live.receive(timeout=10)).data))
                    await asyncio.sleep(0.2)
                    await live.send_str(json.dumps({"op": "ack", "id": n, "seq": n + 1}))
                    reply = json.loads((await live.receive(timeout=10)).data)
                    assert reply == {"id": n, "result": {"acked": n + 1}}, reply
                assert [m["data"] for m in got] == list(range(10))

                async def failed() -> float:
                    counts = [
                        await process_metric(
                            session, h, "hub_inbox_fallbacks_total", result="failed"
                        )
                        for h in (a, b)
                    ]
                    return sum(counts)

                # Backoff 0.5, 1, 2, 4 s (plus up to half again): about 11 s at most.
                wait = FALLBACK_BACKOFF * (2 ** (FALLBACK_ATTEMPTS - 1)) * 1.5 + 10
                await eventually(lambda: failed(), timeout=wait, interval=0.2)
                await asyncio.sleep(2.5)  # more polls on each process: nothing comes again
                assert backend.attempts[("down", 1)] == FALLBACK_ATTEMPTS
                assert backend.attempts[("fine", 1)] == 1
                assert ("live", 1) not in backend.attempts  # no fallback_after: none
                assert await failed() == 1
                sent = [
                    await process_metric(session, h, "hub_inbox_fallbacks_total", result="sent")
                    for h in (a, b)
                ]
                assert sum(sent) == 1
                assert backend.bad_signatures == 0
                await notify(a, {"user": "live", "data": "still live"})
                assert json.loads((await live.receive(timeout=10)).data)["data"] == "still live"
                assert a.ready() and b.ready()

    run(main, timeout=90)
