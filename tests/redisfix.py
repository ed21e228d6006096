"""A private ``redis-server`` per test: its own free port and temp dir, no persistence, so a test
can kill, stop (SIGSTOP) and restart it without touching any shared Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

INSTALL_HINT = (
    "redis-server not found on PATH: the bridge tests start a private Redis 7. Install it "
    "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis; or build from "
    "https://redis.io/download) and make sure redis-server is on PATH"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1:``port``; restartable on the same port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.executable = executable
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0) -> None:
        assert self.process is None, "already running"
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # no RDB snapshots
            "appendonly": "no",
            "dir": str(self.directory),
            "daemonize": "no",
            "protected-mode": "no",
            "loglevel": "warning",
        }
        argv = [self.executable]
        for key, value in options.items():
            argv += [f"--{key}", value]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                self.process = None
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL: connections drop without a goodbye, as in a crash."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(5)
            if process.stderr is not None:
                process.stderr.close()

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A blocking client for inspection (``PUBSUB NUMSUB``, ``INFO commandstats``)."""
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        self._clients.append(client)
        return client

    def numsub(self, name: str) -> int:
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            return int(dict(client.pubsub_numsub(name))[name.encode()])

    def channels(self, pattern: str = "*") -> set[str]:
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            return {c.decode() for c in client.pubsub_channels(pattern)}

    def calls(self, command: str) -> int:
        """How many times ``command`` ran since the last ``CONFIG RESETSTAT``."""
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            stats = client.info("commandstats")
        return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))

    def reset_stats(self) -> None:
        with redis.Redis.from_url(self.url, socket_timeout=5) as client:
            client.config_resetstat()

    def close(self) -> None:
        for client in self._clients:
            client.close()
        if self.process is not None:
            self.resume()  # a stopped process still dies of SIGKILL, but leave it clean
        self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started private Redis, killed after the test."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.close()
