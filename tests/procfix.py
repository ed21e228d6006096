"""Helpers for the tests that run real ``hub serve`` processes (and nginx, Prometheus): a clean
environment for a child, and polling with a deadline."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["clean_env", "free_port", "wait_until"]

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
