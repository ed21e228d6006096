"""``hub serve`` for the hostile-input tests: a real process (tests/hubproc.py) with a token
secret and an API key (never dev mode), and a check that its log holds no traceback."""

from __future__ import annotations

import itertools
import json
import socket
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hubproc import HubProcess

__all__ = ["API_KEY", "SECRET", "Served", "hub_serve", "raw_http"]

SECRET = "hostile-test-secret-0123456789abcdef0123456789"
API_KEY = "hostile-test-api-key-0123456789abcdef0123456789"
_names = itertools.count()


class Served:
    """A running ``hub serve``: ``port`` is all ``hubfix.client`` / ``hubfix.http`` need."""

    def __init__(self, process: HubProcess) -> None:
        self.process = process
        self.port = process.port

    def log(self) -> str:
        return self.process.log.read_text(errors="replace")

    def assert_clean(self) -> None:
        """Alive, and no traceback in the log: bad input was answered, not crashed on."""
        log = self.log()
        popen = self.process.process
        assert popen is not None and popen.poll() is None, f"hub serve exited:\n{log[-3000:]}"
        assert "Traceback" not in log, log[-6000:]


@contextmanager
def hub_serve(
    tmp_path: Path, toml: str = "", redis_url: str | None = None, **settings: Any
) -> Iterator[Served]:
    """``hub serve`` with the namespaces of ``toml`` and top-level ``settings`` (a token secret
    and an API key unless given), stopped on the way out."""
    top = {"token_secret": SECRET, "api_key": API_KEY, "drain_seconds": 0, **settings}
    head = "".join(f"{key} = {json.dumps(value)}\n" for key, value in top.items())
    process = HubProcess(tmp_path, head + textwrap.dedent(toml), redis_url, f"hub{next(_names)}")
    process.start()
    try:
        yield Served(process)
    finally:
        process.stop()


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` as is on a fresh connection; what the server answers (one response, or
    everything until it closes or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not _complete(answer):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            answer += chunk
        return answer


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False
