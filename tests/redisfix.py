"""A private ``redis-server`` per test: its own free port and temp dir, no persistence, so a test
can kill, stop (SIGSTOP) and restart it without touching any shared Redis.

Each one runs as a local process, or, where a Docker engine answers, in a container through
testcontainers with the same arguments on the same 127.0.0.1 port (tests/dockerfix.py says how,
and the pytest report header says which ran).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dockerfix
import pytest
import redis
from procfix import free_port
from redis.crc import key_slot

INSTALL_HINT = (
    "redis-server not found on PATH: the bridge tests start a private Redis 7. Install it "
    "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis; or build from "
    "https://redis.io/download) and make sure redis-server is on PATH"
)


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, below the ephemeral range
    so neither collides with a client socket."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class LocalRedis:
    """``redis-server`` as a child process: the local path of :class:`RedisServer`."""

    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def failure(self) -> str | None:
        """None while the server runs; else why it stopped (its stderr)."""
        if self.popen.poll() is None:
            return None
        return self.popen.stderr.read().decode().strip() if self.popen.stderr else ""

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(5)
        if self.popen.stderr is not None:
            self.popen.stderr.close()

    def pause(self) -> None:
        os.kill(self.popen.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.popen.pid, signal.SIGCONT)


class RedisServer:
    """One ``redis-server`` on 127.0.0.1:``port``; restartable on the same port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.containers = dockerfix.enabled()
        executable = "redis-server" if self.containers else shutil.which("redis-server")
        if executable is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.executable = executable
        self.directory = directory
        self.port = port or free_port()
        #: The running server, None while it is down.
        self.process: LocalRedis | dockerfix.ContainerRedis | None = None
        #: The container path keeps its container (and its /data) from a kill to the restart.
        self._container: dockerfix.ContainerRedis | None = None
        #: More ``redis-server`` options (cluster mode).
        self.extra: dict[str, str] = {}
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0, *, loaded: bool = True) -> None:
        """Start and wait until it answers ``PING``; ``loaded=False``: until it answers at all,
        ``LOADING`` included (a server still reading its RDB, see :meth:`start_loading`)."""
        assert self.process is None, "already running"
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",  # no RDB snapshots
            "appendonly": "no",
            # In a container: the image's own data directory, kept with the container.
            "dir": "/data" if self.containers else str(self.directory),
            "daemonize": "no",
            "protected-mode": "no",
            "loglevel": "warning",
            **self.extra,
        }
        args: list[str] = []
        for key, value in options.items():
            args += [f"--{key}", value]
        if not self.containers:
            self.process = LocalRedis([self.executable, *args])
        elif self._container is None:
            self.process = self._container = dockerfix.ContainerRedis(args)
            timeout = max(timeout, 60.0)  # the first start may pull the image
        else:
            self._container.start()
            self.process = self._container
        deadline = time.monotonic() + timeout
        while True:
            err = self.process.failure()
            if err is not None:
                self.process = None
                raise RuntimeError(f"redis-server exited at start: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    answer = sock.recv(64)
                    if answer.startswith(b"+PONG") or (not loaded and b"LOADING" in answer):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.01)

    def start_loading(self, keys: int = 20000) -> None:
        """Restart as a server that is still loading its data, and stays so until
        :meth:`finish_loading`: ``keys`` keys saved to an RDB, then read back at a millisecond
        each (``key-load-delay``, Redis's own knob for this), answering ``LOADING`` to every
        command meanwhile (``loading-process-events-interval-bytes``: between small reads)."""
        with redis.Redis.from_url(self.url, socket_timeout=30) as client:
            script = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'load:' .. i, i) end"
            client.eval(script, 0, keys)
            client.save()
        self.kill()
        self.extra = {
            **self.extra,
            "key-load-delay": "1000",
            "loading-process-events-interval-bytes": "1024",
        }
        self.start(loaded=False)

    def finish_loading(self, timeout: float = 30.0) -> None:
        """Let a server started by :meth:`start_loading` load the rest at full speed (``CONFIG
        SET`` is served while loading), and wait until it answers ``PING``."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"CONFIG SET key-load-delay 0\r\n")
            assert sock.recv(64).startswith(b"+OK")
        self.extra.pop("key-load-delay", None)
        self.extra.pop("loading-process-events-interval-bytes", None)
        deadline = time.monotonic() + timeout
        while True:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} still loading")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: connections drop without a goodbye, as in a crash."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung server)."""
        assert self.process is not None
        self.process.pause()

    def resume(self) -> None:
        assert self.process is not None
        self.process.resume()

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
        if self._container is not None:
            self._container.remove()
            self._container = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started private Redis, killed after the test."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.close()


class LocalCluster:
    """A private Redis Cluster of ``size`` masters, each with ``replicas`` replicas (none by
    default), on free ports, in one temp dir.

    Nodes keep their ``nodes-<port>.conf``, so a killed node restarted on its port rejoins with
    its slots. ``cluster-node-timeout`` is short so the cluster notices a dead node quickly, and
    ``cluster-require-full-coverage no`` keeps the other shards serving meanwhile.
    """

    def __init__(self, directory: Path, size: int = 3, replicas: int = 0) -> None:
        self.directory = directory
        self.replicas = replicas
        self.nodes: list[RedisServer] = []
        # Each master's replicas as the cluster was created (by port).
        self._replicas: dict[int, list[int]] = {}
        for _ in range(size * (1 + replicas)):
            node = RedisServer(directory, cluster_port())
            node.extra = {
                "cluster-enabled": "yes",
                "cluster-config-file": f"nodes-{node.port}.conf",
                "cluster-node-timeout": "1000",
                "cluster-require-full-coverage": "no",
                # A replica's first sync starts at once, not after the default 5 s wait for more
                # replicas to share one diskless transfer; and CLUSTER SLOTS lists a replica only
                # once its replication offset moved, which the master's replica pings do every
                # 10 s by default. With both, a cluster with replicas is ready in about 2 s, not
                # about 10 s of a 15 s timeout (that margin ran out on a loaded 2-core box).
                "repl-diskless-sync-delay": "0",
                "repl-ping-replica-period": "1",
            }
            self.nodes.append(node)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 15.0) -> None:
        for node in self.nodes:
            node.start()
        create = ["--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes)]
        create += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        first = self.nodes[0].process
        if isinstance(first, dockerfix.ContainerRedis):
            # The image's redis-cli, from inside the first node (host network: same addresses).
            code, output = first.exec(["redis-cli", *create])
        else:
            cli = shutil.which("redis-cli")
            if cli is None:
                pytest.fail(INSTALL_HINT.replace("redis-server", "redis-cli"), pytrace=False)
            done = subprocess.run([cli, *create], capture_output=True, timeout=timeout, check=False)
            code, output = done.returncode, done.stdout.decode()
        if code != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {output[-500:]}")
        self.wait_ok(timeout)
        if self.replicas:
            self._wait_replicas(timeout)

    def _wait_replicas(self, timeout: float) -> None:
        """Until every replica has synced with its master (else it cannot take over)."""
        deadline = time.monotonic() + timeout
        while True:
            node = self.nodes[0]
            with redis.Redis(port=node.port, socket_timeout=5) as client:
                slots = client.execute_command("CLUSTER", "SLOTS")
            self._replicas = {int(e[2][1]): sorted(int(r[1]) for r in e[3:]) for e in slots}
            ports = [p for replicas in self._replicas.values() for p in replicas]
            if len(ports) == len(self.nodes) - len(self._replicas) and all(
                self._synced(p) for p in ports
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster replicas did not sync")
            time.sleep(0.05)

    @staticmethod
    def _synced(port: int) -> bool:
        with redis.Redis(port=port, socket_timeout=1) as client:
            info = client.info("replication")
        return info.get("master_link_status") == "up"

    @property
    def masters(self) -> list[RedisServer]:
        """The nodes the cluster was created with as masters (each owns slots)."""
        if not self.replicas:
            return list(self.nodes)
        return [n for n in self.nodes if n.port in self._replicas]

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """``master``'s replicas as the cluster was created."""
        return [n for n in self.nodes if n.port in self._replicas.get(master.port, ())]

    def wait_ok(self, timeout: float = 15.0) -> None:
        """Until every running node reports ``cluster_state:ok`` and knows every slot."""
        deadline = time.monotonic() + timeout
        while True:
            if all(self._ok(node) for node in self.nodes if node.process is not None):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    @staticmethod
    def _ok(node: RedisServer) -> bool:
        try:
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
        except redis.RedisError:
            return False
        return "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info

    def owner(self, name: str) -> RedisServer:
        """The node that owns ``name``'s hash slot (by ``CLUSTER SLOTS`` of a running node)."""
        slot = key_slot(name.encode())
        node = next(n for n in self.nodes if n.process is not None)
        with redis.Redis(port=node.port, socket_timeout=5) as client:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise LookupError(f"no node owns slot {slot}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A started private 3-master Redis Cluster, killed after the test."""
    cluster = LocalCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
