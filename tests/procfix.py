"""Helpers for the tests that run real ``hub serve`` processes (and nginx, Prometheus): a clean
environment for a child, and polling with a deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = ["HUB", "ServedHub", "clean_env", "free_port", "hub_serve", "wait_until"]

HUB = str(Path(sys.executable).with_name("hub"))

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without hub settings or a prometheus multiprocess directory
    (a child must not inherit the test runner's), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "PROMETHEUS_"))}
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns something true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)


@dataclass
class ServedHub:
    """A running ``hub serve``: ``port`` is all ``hubfix.client`` / ``hubfix.api`` / ``scrape``
    need of a hub; ``log()`` is its combined stdout and stderr so far."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def hub_serve(
    tmp_path: Path,
    toml: str = "",
    *args: str,
    env: dict[str, str] | None = None,
    name: str = "hub",
) -> Iterator[ServedHub]:
    """``hub serve --config <toml> --port <free> *args`` in a clean environment plus ``env``;
    yields once it logs that it is ready. At the end it gets SIGTERM, and its log must hold no
    traceback: whatever a test threw at it, nothing may escape a handler."""
    config = tmp_path / f"{name}.toml"
    config.write_text(textwrap.dedent(toml))
    log_path = tmp_path / f"{name}.log"
    port = free_port()
    argv = [HUB, "serve", "--config", str(config), "--port", str(port), *args]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            env=clean_env(**{"HUB_DRAIN_SECONDS": "0", **(env or {})}),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    served = ServedHub(port, proc, log_path)
    try:
        wait_until(
            lambda: proc.poll() is not None or " ready: ws://" in served.log(), 30, "hub serve"
        )
        assert proc.poll() is None, f"hub serve exited:\n{served.log()}"
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert "Traceback" not in served.log(), served.log()
