"""Real ``hub serve`` processes for the end-to-end tests of the clients (hub.js in Chromium and
Node, hub.client) and the HTTP API: each on a fixed free port, killable like a crashed server and
restartable there, its log shown when a test fails."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procfix import free_port

from hub.redis.publisher import Publisher

__all__ = ["WAIT", "HubProcess", "SequencePublisher", "hubs"]

#: Bound (s) of any single wait on a process; a healthy run needs a fraction of it.
WAIT = 30.0


class HubProcess:
    """One ``hub serve`` subprocess on a fixed free port; killable and restartable there."""

    def __init__(
        self, directory: Path, toml: str, redis_url: str | None = None, name: str = "hub"
    ) -> None:
        self.port = free_port()
        self.config = directory / f"{name}.toml"
        self.config.write_text(toml)
        self.log = directory / f"{name}.log"
        self.redis_url = redis_url
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.process is None
        argv = [sys.executable, "-m", "hub.cli", "serve", "--config", str(self.config)]
        argv += ["--port", str(self.port)]
        if "token_secret" not in self.config.read_text():
            argv.append("--insecure")  # dev mode, as `make run` asks for it
        if self.redis_url:
            argv += ["--redis", self.redis_url]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + WAIT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"hub exited at start:\n{self.log.read_text()[-2000:]}")
            if self.ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"hub not ready:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: clients see the connection drop without a close frame (1006)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(WAIT)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/readyz", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def get(self, path: str, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
        request = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return json.loads(response.read())


@pytest.fixture
def hubs(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """A factory of started hub processes, all stopped after the test (logs shown on failure)."""
    started: list[HubProcess] = []

    def start(toml: str, redis_url: str | None = None) -> HubProcess:
        hub = HubProcess(tmp_path, toml, redis_url, name=f"hub{len(started)}")
        started.append(hub)
        hub.start()
        return hub

    try:
        yield start
    finally:
        for hub in started:
            hub.kill()
        for hub in started:
            print(f"--- {hub.log.name} ---\n{hub.log.read_text()[-3000:]}")


class SequencePublisher(threading.Thread):
    """Publishes ``{"seq": n}`` with history, non-stop, until stopped."""

    def __init__(self, redis_url: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.publisher = Publisher(redis_url, prefix="hub")
        self.channel = channel
        self.count = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.publisher.publish(
                    self.channel, {"seq": self.count}, history_size=100000, history_ttl=600
                )
                self.count += 1
                time.sleep(0.004)
        except BaseException as exc:
            self.error = exc

    def finish(self) -> int:
        self._halt.set()
        self.join(WAIT)
        self.publisher.close()
        if self.error is not None:
            raise self.error
        return self.count
