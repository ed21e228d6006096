"""``hub serve --workers N``: real processes on one port, joined through a private Redis.

The supervisor runs as a subprocess (the installed ``hub`` command); which worker answered is
read from the ``X-Hub-Worker`` response header (its pid). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from hubfix import client, eventually, make_settings, running
from procfix import clean_env, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from wshelp import run, within

from hub.config import Namespace
from workers.supervisor import Policy, backoff
from workers.worker import WORKER_HEADER, decode_settings, encode_settings

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

HUB = str(Path(sys.executable).with_name("hub"))
DRAIN = 1.0  # drain_seconds for these tests
KILL_GRACE = Policy().kill_grace
START_TIMEOUT = 15.0
READY = re.compile(r"worker (\d+) ready: pid (\d+), port (\d+)")
T = TypeVar("T")


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@dataclass
class Served:
    """A running ``hub serve --workers N`` and its combined log (supervisor and workers)."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready_pids(self) -> list[int]:
        """Pids of workers that reported ready, in order (replacements included)."""
        return [int(m.group(2)) for m in READY.finditer(self.log())]

    def current_pids(self) -> set[int]:
        return {pid for pid in self.ready_pids() if alive(pid)}

    def get(self, path: str) -> tuple[int, int, bytes]:
        """(status, worker pid, body) of one HTTP GET on the shared port."""
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.status, int(response.headers[WORKER_HEADER]), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, int(exc.headers[WORKER_HEADER]), exc.read()

    def post(self, path: str, body: Any) -> tuple[int, int]:
        request = urllib.request.Request(
            self.base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, int(response.headers[WORKER_HEADER])


@contextmanager
def serve_workers(redis_url: str, tmp_path: Path, n: int = 2) -> Iterator[Served]:
    port = free_port()
    log_path = tmp_path / "hub.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                HUB,
                "serve",
                "--insecure",
                "--workers",
                str(n),
                "--port",
                str(port),
                "--redis",
                redis_url,
            ],
            # TMPDIR: the metrics directory lands in tmp_path, even if the supervisor is killed.
            env=clean_env(HUB_DRAIN_SECONDS=str(DRAIN), TMPDIR=str(tmp_path)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    served = Served(proc, port, log_path)
    try:
        wait_until(
            lambda: proc.poll() is not None or " ready: ws://" in served.log(),
            START_TIMEOUT,
            "hub serve --workers ready",
        )
        assert proc.poll() is None, f"hub serve exited:\n{served.log()}"
        yield served
    finally:
        pids = served.ready_pids()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DRAIN + KILL_GRACE + 5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in pids:  # never leave a worker behind, whatever the test did
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def ws_client(served: Served, user: str) -> tuple[ClientConnection, int]:
    """A connected client and the pid of the worker it landed on."""
    conn = await within(
        connect(
            f"ws://127.0.0.1:{served.port}/ws?user={user}",
            subprotocols=["hub.v1.json"],  # type: ignore[list-item]
            compression=None,
            ping_interval=None,
            proxy=None,
        )
    )
    assert conn.response is not None
    return conn, int(conn.response.headers[WORKER_HEADER])


async def clients_on_every_worker(
    served: Served, n_workers: int = 2, at_least: int = 6
) -> list[tuple[ClientConnection, int]]:
    """Connect until every worker has a client (the kernel picks the socket per connection)."""
    clients: list[tuple[ClientConnection, int]] = []
    while len(clients) < at_least or len({pid for _, pid in clients}) < n_workers:
        assert len(clients) < 64, "64 connections all landed on one worker"
        clients.append(await ws_client(served, f"u{len(clients)}"))
    return clients


async def close_code(conn: ClientConnection, timeout: float) -> int | None:
    try:
        while True:
            await within(conn.recv(), timeout)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


def samples(body: bytes) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if not s.labels
    }


# --- the whole server --------------------------------------------------------------------------


def test_workers_share_the_port_join_through_redis_and_add_up_metrics(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with serve_workers(redis_server.url, tmp_path) as served:
        log = served.log()
        pids = set(served.ready_pids())
        assert len(pids) == 2, log
        assert f"port {served.port}" in log
        assert f"ready: ws://127.0.0.1:{served.port}/ws (2 workers" in log
        assert os.getpgid(next(iter(pids))) != os.getpgid(served.proc.pid)

        async def main() -> None:
            clients = await clients_on_every_worker(served)
            assert {pid for _, pid in clients} == pids
            (a, a_pid), *_ = clients
            await within(a.send(json.dumps({"op": "subscribe", "channel": "news", "id": 1})))
            assert json.loads(await within(a.recv())) == {"id": 1, "result": {}}
            # Publish until one request lands on the other worker: Redis carries it over.
            for n in range(50):
                status, pid = await asyncio.to_thread(
                    served.post, "/api/publish", {"channel": "news", "data": n}
                )
                assert status == 200
                if pid != a_pid:
                    break
            else:
                raise AssertionError("50 publishes all landed on the subscriber's worker")
            for i in range(n + 1):
                assert json.loads(await within(a.recv())) == {"channel": "news", "data": i}

            # One scrape, whichever worker answers, sees both workers' counters and gauges.
            answered: set[int] = set()

            def whole_server() -> bool:
                status, pid, body = served.get("/metrics")
                assert status == 200
                values = samples(body)
                assert values["hub_connections_accepted_total"] == len(clients), values
                if values["hub_connections"] == len(clients):
                    answered.add(pid)
                return answered == pids

            await asyncio.to_thread(wait_until, whole_server, 10, "both workers scraped")
            for conn, _ in clients:
                await within(conn.close())

        run(main, timeout=30)


def test_a_killed_worker_is_restarted_and_the_port_keeps_serving(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with serve_workers(redis_server.url, tmp_path) as served:
        survivor, victim = sorted(served.ready_pids())
        os.kill(victim, signal.SIGKILL)
        answered: set[int] = set()
        failures: list[str] = []

        def replaced() -> bool:
            try:
                status, pid, _ = served.get("/healthz")
            except OSError as exc:  # queued on the dead worker's socket when it died
                failures.append(repr(exc))
                return False
            assert status == 200
            answered.add(pid)
            return len(answered - {survivor, victim}) == 1

        wait_until(replaced, 10, "a replacement worker answers")
        assert victim not in answered
        assert survivor in answered, "the other worker kept serving"
        assert len(failures) <= 3, failures
        assert f"(pid {victim}) was killed by SIGKILL; restarting it in" in served.log()
        wait_until(lambda: served.current_pids() == answered, 5, "the replacement is ready")
        for _ in range(20):
            assert served.get("/healthz")[0] == 200


def test_sighup_replaces_every_worker_without_refusing_a_connection(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with serve_workers(redis_server.url, tmp_path) as served:
        old = set(served.ready_pids())
        errors: list[str] = []
        statuses: dict[int, int] = {}
        answered: set[int] = set()
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    status, pid, _ = served.get("/healthz")
                except OSError as exc:
                    errors.append(repr(exc))
                    continue
                statuses[status] = statuses.get(status, 0) + 1
                answered.add(pid)

        async def main() -> None:
            clients = await clients_on_every_worker(served, at_least=2)
            thread = threading.Thread(target=hammer)
            thread.start()
            try:
                await asyncio.sleep(0.2)
                served.proc.send_signal(signal.SIGHUP)
                codes = await asyncio.gather(
                    *(close_code(conn, 10 + 2 * DRAIN) for conn, _ in clients)
                )
                assert codes == [1001] * len(clients)
                await asyncio.to_thread(
                    wait_until,
                    lambda: "rolling restart done" in served.log(),
                    10 + 2 * (DRAIN + KILL_GRACE),
                    "rolling restart",
                )
                await asyncio.sleep(0.3)
            finally:
                stop.set()
                await asyncio.to_thread(thread.join, 10)

        run(main, timeout=45)
        new = served.current_pids()
        assert len(new) == 2 and not new & old, served.log()
        assert not any(alive(pid) for pid in old)
        assert errors == [], errors[:5]
        assert set(statuses) == {200}, statuses
        assert new <= answered, "the new workers served the loop"
        log = served.log()
        assert log.count("replaced: pid") == 2


def test_sigterm_closes_clients_with_1001_and_the_tree_exits_in_time(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with serve_workers(redis_server.url, tmp_path) as served:
        pids = set(served.ready_pids())

        async def main() -> None:
            clients = await clients_on_every_worker(served)
            started = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            codes = await asyncio.gather(*(close_code(conn, DRAIN + 5) for conn, _ in clients))
            assert codes == [1001] * len(clients)
            code = await asyncio.to_thread(served.proc.wait, DRAIN + KILL_GRACE + 2)
            assert code == 0, served.log()
            assert time.monotonic() - started < DRAIN + KILL_GRACE
            assert not any(alive(pid) for pid in pids)

        run(main, timeout=30)
        with pytest.raises(OSError):
            served.get("/healthz")
        assert "stopped" in served.log()


def test_workers_outlive_no_supervisor(redis_server: RedisServer, tmp_path: Path) -> None:
    """A SIGKILLed supervisor cannot forward anything: its workers see their stdin close."""
    with serve_workers(redis_server.url, tmp_path) as served:
        pids = set(served.ready_pids())
        served.proc.kill()
        served.proc.wait(5)
        wait_until(lambda: not any(alive(p) for p in pids), DRAIN + 5, "orphaned workers exit")


# --- crash loops, with a fake worker -------------------------------------------------------------

FAKE_WORKER = """
import os, sys, time
from pathlib import Path

counter = Path(os.environ["FAKE_COUNTER"])
n = int(counter.read_text()) + 1 if counter.exists() else 1
Path(f"{counter}.tmp").write_text(str(n))
os.replace(f"{counter}.tmp", counter)  # atomic: the test reads it meanwhile
if os.environ["FAKE_MODE"] == "boot-fail":
    sys.exit(3)
status = int(sys.argv[sys.argv.index("--status-fd") + 1])
os.write(status, b'{"event": "listening", "port": 0}\\n{"event": "ready"}\\n')
time.sleep(1.0 if n == 5 else 0.02)  # the fifth run stays up long enough to count as stable
sys.exit(1)
"""

SUPERVISE_FAKE = """
import logging, sys
from hub.config import Settings
from workers.supervisor import Policy, Supervisor

logging.basicConfig(level=logging.INFO)
policy = Policy(backoff_base=0.05, backoff_max=0.2, stable_after=0.8)
settings = Settings(workers=1, insecure=True, port=0, drain_seconds=0.2)
sys.exit(Supervisor(settings, policy=policy, worker_command=[sys.executable, sys.argv[1]]).run())
"""


def supervise_fake(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    counter = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISE_FAKE, str(fake)],
        env=clean_env(FAKE_COUNTER=str(counter), FAKE_MODE=mode, TMPDIR=str(tmp_path)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, counter


def test_a_crash_looping_worker_is_restarted_with_backoff_reset_once_stable(
    tmp_path: Path,
) -> None:
    proc, counter = supervise_fake(tmp_path, "crash")
    try:
        wait_until(lambda: counter.exists() and int(counter.read_text()) >= 7, 15, "7 runs")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    delays = re.findall(r"exited with code 1; restarting it in ([0-9.]+)s", err)
    assert delays[:6] == ["0.05", "0.10", "0.20", "0.20", "0.05", "0.10"], err


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    proc, counter = supervise_fake(tmp_path, "boot-fail")
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 1
    assert "hub: serve: worker 1 exited with code 3 before it could listen" in err
    assert counter.read_text() == "1", "not restarted in a loop"


# --- the CLI around it ---------------------------------------------------------------------------


def test_several_workers_without_redis_are_refused() -> None:
    done = subprocess.run(
        [HUB, "serve", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=15,
        env=clean_env(),
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "config error" in lines[0] and "redis" in lines[0], done.stderr


def test_a_port_in_use_is_an_error_not_a_shared_port(redis_server: RedisServer) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                HUB,
                "serve",
                "--insecure",
                "--workers",
                "2",
                "--port",
                str(port),
                "--redis",
                redis_server.url,
            ],
            capture_output=True,
            text=True,
            timeout=15,
            env=clean_env(),
        )
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize("dev", [True, False], ids=["dev-mode", "tokens"])
def test_serve_reports_each_worker_then_the_urls_on_stderr(
    redis_server: RedisServer, tmp_path: Path, dev: bool
) -> None:
    """Progress goes to stderr, in order: each worker as it is ready (k of N), then the URL to
    open; in dev mode also the page to open in a browser, never with tokens required."""
    port = free_port()
    extra = {"HUB_INSECURE": "1"} if dev else {"HUB_TOKEN_SECRET": "s" * 32}
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [HUB, "serve", "--workers", "3", "--port", str(port), "--redis", redis_server.url],
            env=clean_env(HUB_DRAIN_SECONDS=str(DRAIN), TMPDIR=str(tmp_path), **extra),
            stdout=out,
            stderr=err,
        )
    pids: list[int] = []
    try:
        ws_line = f"ready: ws://127.0.0.1:{port}/ws (3 workers"
        wait_until(
            lambda: proc.poll() is not None or ws_line in err_path.read_text(),
            START_TIMEOUT,
            "hub serve --workers 3 ready",
        )
        assert proc.poll() is None, err_path.read_text()
        if dev:  # logged right after the ws line
            wait_until(lambda: "open http://" in err_path.read_text(), 5, "the page URL")
        pids += [int(p) for p in re.findall(r"ready: pid (\d+)", err_path.read_text())]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(DRAIN + KILL_GRACE + 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0
    lines = err_path.read_text().splitlines()
    progress = [m.group(1) for line in lines if (m := re.search(r"\((\d) of 3\)$", line))]
    assert progress == ["1", "2", "3"], lines
    slots = sorted(int(m.group(1)) for line in lines if (m := READY.search(line)))
    assert slots == [1, 2, 3], lines
    ws_at = next(i for i, line in enumerate(lines) if ws_line in line)
    assert ws_at > max(i for i, line in enumerate(lines) if "(3 of 3)" in line)
    page = [i for i, line in enumerate(lines) if f"open http://127.0.0.1:{port}/" in line]
    assert page == ([ws_at + 1] if dev else []), lines
    assert out_path.read_text() == "", "progress belongs on stderr"


def test_single_process_serve_reports_the_page_url_in_dev_mode(tmp_path: Path) -> None:
    """``hub serve`` without workers says the same: the ws URL, then in dev mode the page."""
    port = free_port()
    err_path = tmp_path / "stderr"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [HUB, "serve", "--insecure", "--port", str(port)],
            env=clean_env(HUB_DRAIN_SECONDS="0"),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        wait_until(
            lambda: proc.poll() is not None or "open http://" in err_path.read_text(),
            START_TIMEOUT,
            "hub serve ready",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(DRAIN + KILL_GRACE + 5)
    lines = err_path.read_text().splitlines()
    ws_at = next(i for i, line in enumerate(lines) if f"ready: ws://127.0.0.1:{port}/ws" in line)
    assert f"open http://127.0.0.1:{port}/" in lines[ws_at + 1], lines


# --- pieces --------------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = Policy(backoff_base=0.25, backoff_max=3.0)
    assert [backoff(n, policy) for n in range(7)] == [0, 0.25, 0.5, 1, 2, 3, 3]


def test_settings_travel_to_workers_intact() -> None:
    settings = make_settings(
        "[namespaces.chat]\npublish = true\nhistory_size = 5\n",
        allowed_origins="https://a.example,https://b.example",
        drain_seconds=2.5,
    )
    again = decode_settings(encode_settings(settings))
    assert again == settings
    assert again.namespaces["chat"] == Namespace(name="chat", publish=True, history_size=5)


def test_drain_is_not_ready_refuses_new_clients_and_closes_in_batches() -> None:
    """In one process: the drain every worker (and ``hub serve`` alone) does on SIGTERM."""

    async def main() -> None:
        async with running(make_settings(drain_seconds=1.0)) as hub:
            port = hub.port
            async with client(hub, user="x") as first:
                others = [await within(_connect(port, f"u{i}")) for i in range(9)]
                # Accepted before the drain, request not sent yet: it is still answered.
                reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
                await eventually(lambda: len(hub.server._all) >= 11)  # type: ignore[union-attr]
                loop = asyncio.get_running_loop()
                started = loop.time()
                drain = loop.create_task(hub.drain())
                await asyncio.sleep(0)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await within(reader.read(1024))
                assert head.startswith(b"HTTP/1.1 503"), head
                assert b"draining" in head
                writer.close()
                with pytest.raises(OSError):
                    await within(asyncio.open_connection("127.0.0.1", port))
                closed: list[float] = []

                async def closed_at(conn: ClientConnection) -> int | None:
                    code = await close_code(conn, 5)
                    closed.append(loop.time() - started)
                    return code

                codes = await asyncio.gather(*(closed_at(c) for c in others))
                assert (await first.closed_with())[0] == 1001
                assert codes == [1001] * 9
                assert max(closed) - min(closed) > 0.2, closed  # in batches, not all at once
                await within(drain, 5)
                assert loop.time() - started < 1.0 + 1.0

    run(main)


async def _connect(port: int, user: str) -> ClientConnection:
    return await connect(
        f"ws://127.0.0.1:{port}/ws?user={user}", compression=None, ping_interval=None, proxy=None
    )
