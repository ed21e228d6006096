"""The supervisor of ``hub serve --workers N``: N worker processes on one port, kept running.

Sockets. The supervisor binds one listening socket per worker slot, all on the same address with
``SO_REUSEPORT``: the kernel spreads new connections over them (one accept queue per worker, no
thundering herd on a shared one). It keeps its own copy of each socket and hands it to the slot's
worker, so in a rolling restart the replacement inherits the very same socket and accept queue:
nothing queued there is lost when the old worker stops accepting. A bound but never listening
"anchor" socket keeps the port reserved while every worker is down.

Lifecycle:

- a worker that dies is restarted after an exponential backoff (``Policy``), reset once a worker
  has been ready for ``stable_after`` seconds; its slot's socket is closed at once so that new
  connections go to the other workers meanwhile, and the replacement gets a fresh one;
- SIGTERM or SIGINT drains: every worker stops accepting, reports not ready and closes its
  clients with 1001 in batches over ``drain_seconds``; the supervisor kills whatever is still
  running ``kill_grace`` seconds after that, and exits. A second signal kills at once;
- SIGHUP reloads the settings (a bad file keeps the running workers) and replaces the workers one
  at a time: start the new one on the slot's socket, wait until it is ready, then drain the old
  one and wait for it to exit before the next slot, so at most N + 1 workers ever run;
- metrics: ``PROMETHEUS_MULTIPROC_DIR`` is set, for the workers only, to a fresh temporary
  directory (removed at exit); dead workers are passed to ``mark_process_dead``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hub import __version__
from hub.config import ConfigError, Settings, summary

from .worker import encode_settings

__all__ = ["Policy", "Supervisor", "backoff"]

log = logging.getLogger("hub.supervisor")

BACKLOG = 1024
#: Seconds between two polls of the workers' exit status (SIGCHLD normally comes first).
REAP_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class Policy:
    """Timings of the supervisor; the defaults suit production, tests shorten them."""

    backoff_base: float = 0.25  # the delay before the first restart after a crash
    backoff_max: float = 30.0  # the delay never grows past this
    stable_after: float = 30.0  # a worker ready this long counts as healthy: backoff starts over
    ready_timeout: float = 30.0  # for a replacement to become ready in a rolling restart
    kill_grace: float = 5.0  # after drain_seconds, before stragglers get SIGKILL


def backoff(failures: int, policy: Policy) -> float:
    """The restart delay after ``failures`` crashes in a row: base, 2 x base, 4 x base... capped."""
    if failures <= 0:
        return 0.0
    return float(min(policy.backoff_max, policy.backoff_base * 2 ** (failures - 1)))


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Worker:
    """One worker process, as the supervisor sees it."""

    def __init__(
        self,
        slot: int,
        proc: subprocess.Popen[bytes],
        status_fd: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.slot = slot
        self.proc = proc
        self.pid = proc.pid
        self.status_fd = status_fd
        self.started = time.monotonic()
        self.ready_at: float | None = None  # stability counts from here, not from the spawn
        self.port: int | None = None
        self.connections: int | None = None  # how many its open-file limit leaves room for
        self.listening = False
        self.ready = asyncio.Event()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.retiring = False
        self.buffer = b""

    def __repr__(self) -> str:
        return f"<worker {self.slot} pid {self.pid}>"


@dataclass(eq=False)
class Slot:
    """A place for one worker: its listening socket survives the worker in a rolling restart."""

    index: int
    sock: socket.socket | None = None
    worker: Worker | None = None
    failures: int = 0
    requests: asyncio.Queue[asyncio.Future[bool]] = dataclasses.field(default_factory=asyncio.Queue)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        reload: Callable[[], Settings] | None = None,
        policy: Policy | None = None,
        worker_command: Sequence[str] = (sys.executable, "-m", "workers.worker"),
    ) -> None:
        """``reload`` re-reads the settings on SIGHUP; ``worker_command`` is what runs a worker
        (its ``--slot``, ``--listen-fd`` and ``--status-fd`` options are appended)."""
        self.settings = settings
        self.reload = reload
        self.policy = policy or Policy()
        self.worker_command = list(worker_command)
        self.slots = [Slot(i) for i in range(1, settings.workers + 1)]
        self.workers: set[Worker] = set()  # every live process: current, starting or retiring
        self.port = settings.port
        self.metrics_dir = ""
        self._anchor: socket.socket | None = None
        self._family = socket.AF_INET
        self._address: tuple[object, ...] = ()
        self._env: dict[str, str] = {}
        self._initial = True
        self._stopping = False
        self._fatal: str | None = None
        self._rolling: asyncio.Task[None] | None = None
        self._again = False

    # -- entry point ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status (1 when the server cannot start)."""
        try:
            self._bind()
        except OSError as exc:
            host = self.settings.host
            print(
                f"hub: serve: cannot listen on {host}:{self.settings.port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        self.metrics_dir = tempfile.mkdtemp(prefix="hub-metrics-")
        self._env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        try:
            return asyncio.run(self._main())
        finally:
            self._close_sockets()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def _main(self) -> int:
        loop = self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        reaper = loop.create_task(self._reap_periodically())
        watchers = [loop.create_task(self._watch(slot)) for slot in self.slots]
        announcer = loop.create_task(self._announce())
        await self._stop.wait()
        tasks = [announcer, *watchers]
        if self._rolling is not None:
            tasks.append(self._rolling)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._shutdown()
        reaper.cancel()
        if self._fatal is not None:
            print(f"hub: serve: {self._fatal}", file=sys.stderr)
            return 1
        return 0

    # -- sockets -------------------------------------------------------------------------------

    def _socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if self._family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind(self) -> None:
        """Resolve the address, check that nobody listens there, reserve the port."""
        if not hasattr(socket, "SO_REUSEPORT"):
            raise OSError("--workers needs SO_REUSEPORT, which this platform lacks")
        s = self.settings
        infos = socket.getaddrinfo(
            s.host or None, s.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        others = sorted({str(info[4][0]) for info in infos} - {str(address[0])})
        if others:
            log.warning(
                "%s resolves to several addresses; the workers listen on %s only (not %s)",
                s.host,
                address[0],
                ", ".join(others),
            )
        self._family = family
        if s.port:
            # SO_REUSEPORT would let us share a port another server of this user listens on:
            # bind once without it, which fails if anything is listening there.
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        anchor = self._anchor = self._socket()
        anchor.bind(address)  # bound, never listening: holds the port, receives nothing
        self.port = int(anchor.getsockname()[1])
        self._address = (address[0], self.port, *address[2:])

    def _listener(self) -> socket.socket:
        sock = self._socket()
        try:
            sock.bind(self._address)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def _close_sockets(self) -> None:
        for slot in self.slots:
            if slot.sock is not None:
                slot.sock.close()
                slot.sock = None
        if self._anchor is not None:
            self._anchor.close()
            self._anchor = None

    # -- workers -------------------------------------------------------------------------------

    def _spawn(self, slot: Slot) -> Worker:
        if slot.sock is None:
            slot.sock = self._listener()
        listen_fd = slot.sock.fileno()
        read_fd, write_fd = os.pipe()
        argv = [
            *self.worker_command,
            *("--slot", str(slot.index)),
            *("--listen-fd", str(listen_fd)),
            *("--status-fd", str(write_fd)),
        ]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                pass_fds=(listen_fd, write_fd),
                env=self._env,
                # Signals come from the supervisor only (not from the terminal's Ctrl-C or
                # hangup); a worker whose supervisor vanished notices EOF on its stdin.
                start_new_session=True,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker = Worker(slot.index, proc, read_fd, self.loop)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it died already: the reaper reports it
            proc.stdin.write(encode_settings(self.settings))
            proc.stdin.flush()
        os.set_blocking(read_fd, False)
        self.loop.add_reader(read_fd, self._on_status, worker)
        self.workers.add(worker)
        log.debug("worker %d starting: pid %d", slot.index, worker.pid)
        return worker

    def _on_status(self, worker: Worker) -> None:
        """Read the worker's status lines (``listening``, ``ready``); EOF when it exits."""
        while worker.status_fd >= 0:
            try:
                data = os.read(worker.status_fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove_reader(worker.status_fd)
                os.close(worker.status_fd)
                worker.status_fd = -1
                return
            worker.buffer += data
            while b"\n" in worker.buffer:
                line, _, worker.buffer = worker.buffer.partition(b"\n")
                try:
                    message = json.loads(line)
                    event = message["event"]
                except (ValueError, TypeError, KeyError):
                    log.warning("%r: unreadable status line %r", worker, line[:100])
                    continue
                if event == "listening":
                    worker.listening = True
                    worker.port = message.get("port")
                    room = message.get("connections")
                    worker.connections = room if isinstance(room, int) else None
                elif event == "ready" and not worker.ready.is_set():
                    worker.ready_at = time.monotonic()
                    worker.ready.set()
                    self._log_ready(worker)

    def _log_ready(self, worker: Worker) -> None:
        """One line per worker as it gets ready; at start, how many of the N are up so far."""
        if not self._initial:
            log.info("worker %d ready: pid %d, port %s", worker.slot, worker.pid, worker.port)
            return
        up = sum(1 for slot in self.slots if slot.worker is not None and slot.worker.ready.is_set())
        log.info(
            "worker %d ready: pid %d, port %s (%d of %d)",
            worker.slot,
            worker.pid,
            worker.port,
            up,
            len(self.slots),
        )

    def _reap(self) -> None:
        """Collect exited workers (SIGCHLD, and a periodic poll in case one was coalesced)."""
        from prometheus_client.multiprocess import mark_process_dead

        for worker in list(self.workers):
            code = worker.proc.poll()
            if code is None:
                continue
            self.workers.discard(worker)
            self._on_status(worker)  # whatever it reported before it died, then EOF
            if worker.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    worker.proc.stdin.close()
            mark_process_dead(worker.pid, self.metrics_dir)
            if worker.retiring or self._stopping:
                log.info("worker %d (pid %d) %s", worker.slot, worker.pid, describe_exit(code))
            worker.exited.set_result(code)

    async def _reap_periodically(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            self._reap()

    def _signal(self, worker: Worker, sig: int) -> None:
        if not worker.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, sig)

    async def _retire(self, worker: Worker) -> None:
        """Drain ``worker`` (SIGTERM); SIGKILL it if it outlives the drain period plus grace."""
        worker.retiring = True
        self._signal(worker, signal.SIGTERM)
        limit = self.settings.drain_seconds + self.policy.kill_grace
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), limit)
        except TimeoutError:
            log.warning("%r did not exit within %gs; killing it", worker, limit)
            self._signal(worker, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(worker.exited), 5)

    # -- one slot ------------------------------------------------------------------------------

    async def _watch(self, slot: Slot) -> None:
        """Keep one worker running in ``slot``; serve the rolling restart's requests for it."""
        while not self._stopping:
            worker = slot.worker
            if worker is None:
                try:
                    worker = slot.worker = self._spawn(slot)
                except OSError as exc:
                    log.error("worker %d: cannot start: %s", slot.index, exc)
                    slot.failures += 1
                    await self._pause(slot, backoff(slot.failures, self.policy))
                    continue
            request = asyncio.ensure_future(slot.requests.get())
            try:
                await asyncio.wait({worker.exited, request}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not request.done():
                    request.cancel()
            if worker.exited.done():
                if request.done():
                    _reply(request.result(), True)  # the restart below starts afresh anyway
                slot.worker = None
                await self._crashed(slot, worker)
                continue
            await self._replace(slot, worker, request.result())

    async def _crashed(self, slot: Slot, worker: Worker) -> None:
        code = worker.exited.result()
        if self._initial and not worker.listening:
            self._fatal = f"worker {slot.index} {describe_exit(code)} before it could listen"
            self._stopping = True
            self._stop.set()
            return
        # A slow start (a loaded machine, a slow Redis) is not uptime: count from readiness.
        ready_at = worker.ready_at
        if ready_at is not None and time.monotonic() - ready_at >= self.policy.stable_after:
            slot.failures = 0
        slot.failures += 1
        delay = backoff(slot.failures, self.policy)
        if slot.sock is not None:
            # Nobody accepts there now: let the kernel send new connections to the others.
            slot.sock.close()
            slot.sock = None
        log.warning(
            "worker %d (pid %d) %s; restarting it in %.2fs",
            slot.index,
            worker.pid,
            describe_exit(code),
            delay,
        )
        await self._pause(slot, delay)

    async def _pause(self, slot: Slot, delay: float) -> None:
        """Sleep before a restart; a rolling restart's request cuts it short (it asked for one)."""
        request = asyncio.ensure_future(slot.requests.get())
        try:
            await asyncio.wait({request}, timeout=delay)
        finally:
            if request.done():
                _reply(request.result(), True)
            else:
                request.cancel()

    async def _replace(self, slot: Slot, old: Worker, reply: asyncio.Future[bool]) -> None:
        """One rolling restart step: a new worker on the slot's socket, ready, then drain ``old``.

        ``reply`` gets True once the old worker has exited (the coordinator then moves on to the
        next slot), False if the new one does not come up (the old one keeps serving).
        """
        try:
            new = self._spawn(slot)
        except OSError as exc:
            log.error("rolling restart: cannot start worker %d: %s", slot.index, exc)
            _reply(reply, False)
            return
        ready = asyncio.ensure_future(new.ready.wait())
        try:
            await asyncio.wait(
                {ready, new.exited},
                timeout=self.policy.ready_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not ready.done():
                ready.cancel()
        if not new.ready.is_set():
            why = (
                describe_exit(new.exited.result())
                if new.exited.done()
                else f"was not ready within {self.policy.ready_timeout:g}s"
            )
            log.error("rolling restart: new worker %d (pid %d) %s", slot.index, new.pid, why)
            await self._retire(new)
            _reply(reply, False)
            return
        slot.worker = new
        slot.failures = 0
        log.info(
            "worker %d replaced: pid %d -> pid %d; draining the old one",
            slot.index,
            old.pid,
            new.pid,
        )
        retiring = self.loop.create_task(self._retire(old))
        retiring.add_done_callback(lambda _: _reply(reply, True))

    # -- supervisor-wide -----------------------------------------------------------------------

    async def _announce(self) -> None:
        """Log the URL once every first worker is ready (each one is logged as it gets there);
        in dev mode also the page to open in a browser (the demo page at ``/``)."""
        while True:
            workers = [slot.worker for slot in self.slots]
            if all(w is not None and w.ready.is_set() for w in workers):
                break
            await asyncio.sleep(0.05)
        self._initial = False
        s = self.settings
        rooms = [w.connections for w in workers if w is not None and w.connections is not None]
        if rooms:
            log.info(
                "%d workers: room for %d connections in all (%s each)",
                len(rooms),
                sum(rooms),
                f"{min(rooms)} to {max(rooms)}" if len(set(rooms)) > 1 else rooms[0],
            )
        host = f"[{s.host}]" if ":" in s.host else s.host
        log.info(
            "hub %s ready: ws://%s:%d/ws (%d workers, supervisor pid %d)  %s",
            __version__,
            host,
            self.port,
            len(self.slots),
            os.getpid(),
            summary(s),
        )
        if s.insecure:
            log.info("dev mode (no auth, loopback only): open http://%s:%d/", host, self.port)

    def _on_stop_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._stopping:
            log.warning("%s again: killing the workers now", name)
            for worker in list(self.workers):
                self._signal(worker, signal.SIGKILL)
            return
        log.info(
            "%s: draining %d workers (up to %gs)",
            name,
            len(self.workers),
            self.settings.drain_seconds,
        )
        self._stopping = True
        self._stop.set()

    def _on_hup(self) -> None:
        if self._stopping:
            return
        if self._rolling is not None and not self._rolling.done():
            log.info("SIGHUP: a rolling restart is running; another one follows it")
            self._again = True
            return
        self._rolling = self.loop.create_task(self._rolling_restart())

    async def _rolling_restart(self) -> None:
        """Replace the workers one at a time (SIGHUP), with freshly loaded settings."""
        while True:
            self._again = False
            if self.reload is not None:
                try:
                    fresh = self.reload()
                except ConfigError as exc:
                    log.error("SIGHUP: config error: %s; keeping the running workers", exc)
                    return
                self.settings = self._keep_fixed(fresh)
            log.info("SIGHUP: rolling restart of %d workers", len(self.slots))
            for slot in self.slots:
                reply: asyncio.Future[bool] = self.loop.create_future()
                slot.requests.put_nowait(reply)
                if not await reply:
                    log.error("rolling restart stopped at worker %d", slot.index)
                    return
            pids = ", ".join(str(slot.worker.pid) for slot in self.slots if slot.worker)
            log.info("rolling restart done: pids %s", pids)
            if not self._again:
                return

    def _keep_fixed(self, fresh: Settings) -> Settings:
        """Sockets and slots outlive a reload: host, port and workers need a full restart."""
        current = self.settings
        fixed = {k: getattr(current, k) for k in ("host", "port", "workers")}
        changed = [k for k, v in fixed.items() if getattr(fresh, k) != v]
        if changed:
            log.warning("SIGHUP: %s changed; that needs a full restart", ", ".join(changed))
        return dataclasses.replace(fresh, **fixed)

    async def _shutdown(self) -> None:
        """SIGTERM every worker, close the listening sockets, wait, then kill stragglers."""
        workers = list(self.workers)
        for worker in workers:
            worker.retiring = True
            self._signal(worker, signal.SIGTERM)
        # Once the workers let go of them too, new connections are refused instead of queued.
        self._close_sockets()
        limit = self.settings.drain_seconds + self.policy.kill_grace
        exits = [w.exited for w in workers]
        if exits:
            await asyncio.wait(exits, timeout=limit)
        stragglers = [w for w in workers if not w.exited.done()]
        for worker in stragglers:
            log.warning("%r still running after %gs; killing it", worker, limit)
            self._signal(worker, signal.SIGKILL)
        if stragglers:
            await asyncio.wait([w.exited for w in stragglers], timeout=5)
        log.info("stopped")


def _reply(future: asyncio.Future[bool], ok: bool) -> None:
    if not future.done():
        future.set_result(ok)
