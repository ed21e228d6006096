"""Where the suite's Redis servers and the compose end-to-end test run: in Docker containers
through testcontainers where a Docker engine answers, else as local processes.

``HUB_TEST_DOCKER``: unset (or ``auto``) picks by whether an engine answers; ``0`` always uses
local processes; ``1`` requires an engine and stops the run without one. The pytest report
header names the choice and why (tests/conftest.py), so it is never silent.

The container path runs the same ``redis-server`` arguments as the local one, in the ``redis``
image on the host's network (``network_mode=host``): the server listens on the same
127.0.0.1:<free port> a local process would, so every test, and Redis Cluster's announced
addresses, work unchanged. That needs an engine on Linux (Docker Desktop's host networking
differs). Machines without an engine run the local path, which is the one CI exercises.
"""

from __future__ import annotations

import functools
import os
from typing import Any

__all__ = ["REDIS_IMAGE", "ContainerRedis", "enabled", "engine", "required"]

#: The image of the containerised Redis (the Redis 7 the local path expects on PATH).
REDIS_IMAGE = os.environ.get("HUB_TEST_REDIS_IMAGE", "redis:7")


@functools.cache
def engine() -> tuple[bool, str]:
    """(use containers?, a line for the report header saying which and why)."""
    choice = os.environ.get("HUB_TEST_DOCKER", "auto").strip().lower()
    if choice in ("0", "no", "false"):
        return False, "local redis-server processes (HUB_TEST_DOCKER=0)"
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            version = client.version().get("Version", "?")
        finally:
            client.close()
    except Exception as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return False, f"local redis-server processes (no Docker engine: {reason})"
    return True, f"testcontainers, Docker engine {version} ({REDIS_IMAGE}, host network)"


def enabled() -> bool:
    return engine()[0]


def required() -> bool:
    """``HUB_TEST_DOCKER=1``: a run without an engine must stop, not fall back."""
    return os.environ.get("HUB_TEST_DOCKER", "").strip().lower() in ("1", "yes", "true")


class ContainerRedis:
    """``redis-server <args>`` in a container: the container path of ``redisfix.RedisServer``.

    ``kill`` is SIGKILL to the server (``docker kill``) and ``start`` starts the same container
    again, so its ``/data`` (a cluster node's ``nodes-<port>.conf``, an append-only file) survives
    a crash the way a local process's directory does. ``pause``/``resume`` freeze and thaw it
    (``docker pause``: connections stay open, nothing is answered, as with SIGSTOP).
    """

    def __init__(self, args: list[str]) -> None:
        from testcontainers.core.container import DockerContainer

        self._tc = DockerContainer(REDIS_IMAGE, network_mode="host")
        self._tc.with_command(["redis-server", *args])
        self._tc.start()

    @property
    def _container(self) -> Any:
        return self._tc.get_wrapped_container()

    def start(self) -> None:
        self._container.start()

    def failure(self) -> str | None:
        """None while the server runs; else why it stopped (the end of its log)."""
        container = self._container
        container.reload()
        if container.status in ("running", "created", "restarting", "paused"):
            return None
        return str(container.logs(tail=20).decode(errors="replace")).strip()

    def kill(self) -> None:
        container = self._container
        container.reload()
        if container.status in ("running", "paused"):
            if container.status == "paused":
                container.unpause()
            container.kill()
            container.wait(timeout=10)

    def pause(self) -> None:
        self._container.pause()

    def resume(self) -> None:
        container = self._container
        container.reload()
        if container.status == "paused":
            container.unpause()

    def exec(self, argv: list[str]) -> tuple[int, str]:
        """Run a command in the container (``redis-cli --cluster create``): (exit code, output)."""
        result = self._tc.exec(argv)
        code = -1 if result.exit_code is None else int(result.exit_code)
        return code, result.output.decode(errors="replace")

    def remove(self) -> None:
        self._tc.stop()  # stops and removes the container
