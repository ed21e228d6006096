"""Open-file limits: ``hub serve`` raises its soft limit to the hard one, says how many
connections it can hold, and refuses the ones past that cleanly (a 503, never an accept()
failing on EMFILE and logged on every retry).

Real ``hub serve`` processes started with a low RLIMIT_NOFILE (``preexec_fn``), real sockets.
"""

from __future__ import annotations

import re
import resource
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from procfix import HUB, clean_env, free_port, wait_until

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

UPGRADE = (
    b"GET /ws?user=u HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
ROOM = re.compile(r"open files: limit (\d+)(, raised from (\d+))?, .*room for (\d+) connections")


@contextmanager
def limited_hub(tmp_path: Path, soft: int, hard: int, *args: str) -> Iterator[tuple[int, Path]]:
    """``hub serve --insecure *args`` started with RLIMIT_NOFILE (soft, hard); yields its port
    and log once ready, and checks at the end that the log holds no traceback."""
    port = free_port()
    log_path = tmp_path / "hub.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [HUB, "serve", "--insecure", "--port", str(port), *args],
            env=clean_env(HUB_DRAIN_SECONDS="0", TMPDIR=str(tmp_path)),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    try:
        wait_until(
            lambda: proc.poll() is not None or " ready: ws://" in log_path.read_text(),
            30,
            "hub serve ready",
        )
        assert proc.poll() is None, log_path.read_text()
        yield port, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    text = log_path.read_text()
    assert "Traceback" not in text, text


def upgrade(port: int) -> tuple[socket.socket, bytes]:
    """A WebSocket upgrade on a fresh socket: the socket and the status line answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(UPGRADE)
    return sock, status_line(sock)


def status_line(sock: socket.socket) -> bytes:
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        return b"reset"
    except TimeoutError:
        return b"no answer"
    return data.partition(b"\r\n")[0]


def test_serve_raises_its_limit_and_refuses_connections_past_it(tmp_path: Path) -> None:
    with limited_hub(tmp_path, 256, 400) as (port, log_path):
        found = ROOM.search(log_path.read_text())
        assert found, log_path.read_text()
        assert (found.group(1), found.group(3)) == ("400", "256")
        room = int(found.group(4))
        assert 0 < room < 400
        held: list[socket.socket] = []
        try:
            for _ in range(room):
                sock, line = upgrade(port)
                held.append(sock)
                assert line == b"HTTP/1.1 101 Switching Protocols", len(held)
            # Past the limit: told why, with the request read (no reset under it).
            for _ in range(40):
                sock, line = upgrade(port)
                held.append(sock)
                assert line == b"HTTP/1.1 503 Service Unavailable"
            # A crowd that never sends a request: a few wait for their 503, the rest are reset
            # at once; the process still never runs out of descriptors.
            silent: list[socket.socket] = []
            for _ in range(150):
                try:
                    silent.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                except ConnectionResetError:
                    pass  # reset before connect() even returned: refused at once, as it should
            held += silent
            assert len(silent) >= 32  # the ones that wait for their 503
            ends = [status_line(sock) for sock in silent[40:]]
            assert all(end in (b"", b"reset") for end in ends), ends
            for sock in held[room:]:
                sock.close()
            del held[room:]
            for sock in held[:5]:
                sock.close()
            del held[:5]
            # Room again: a new connection gets in, the HTTP side answers.
            sock, line = upgrade(port)
            held.append(sock)
            assert line == b"HTTP/1.1 101 Switching Protocols"

            def scraped() -> bytes | None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
                        return bytes(answer.read())
                except OSError:
                    return None

            body = wait_until(scraped, 10, "/metrics")
            refused = re.search(rb"^hub_connections_refused_total (\S+)$", body, re.M)
            assert refused and float(refused.group(1)) >= 40 + 80
        finally:
            for sock in held:
                sock.close()
        log = log_path.read_text()
        assert log.count("refusing new connections") == 1, log  # once a minute at most
        assert "out of system resource" not in log and "Too many open files" not in log, log


def test_supervisor_logs_the_room_of_all_its_workers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    with limited_hub(tmp_path, 300, 300, "--workers", "2", "--redis", redis_server.url) as (
        port,
        log_path,
    ):
        log = wait_until(
            lambda: "room for" in log_path.read_text() and log_path.read_text(), 10, "room"
        )
        workers = [int(m.group(4)) for m in ROOM.finditer(log)]
        assert len(workers) == 2, log
        total = re.search(r"2 workers: room for (\d+) connections in all", log)
        assert total and int(total.group(1)) == sum(workers), log
        # Each worker refuses past its own room (the kernel picks the worker).
        held: list[socket.socket] = []
        try:
            answers: dict[bytes, int] = {}
            for _ in range(sum(workers) + 60):
                sock, line = upgrade(port)
                held.append(sock)
                answers[line] = answers.get(line, 0) + 1
            assert answers.get(b"HTTP/1.1 503 Service Unavailable", 0) >= 60, answers
            assert set(answers) <= {
                b"HTTP/1.1 101 Switching Protocols",
                b"HTTP/1.1 503 Service Unavailable",
            }, answers
        finally:
            for sock in held:
                sock.close()
        assert "out of system resource" not in log_path.read_text()
