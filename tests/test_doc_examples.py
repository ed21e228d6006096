"""Every example of README.md and docs/*.md, run as written: the code blocks are read from the
markdown here (so an edited doc is what gets tested), run against real ``hub serve`` processes
and private Redis servers, and their documented output is asserted.

What a test changes in a block is only where it points: the hub's port 8765 becomes a free
port and Redis's 127.0.0.1:6379 a private server (``localize``). Every block is listed in
``RUN`` (the test that runs it) or in ``EXCLUDED`` (why it cannot run on one machine);
``test_every_block_is_run_or_excluded`` fails on a block that is in neither, so nothing is
skipped silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from procfix import clean_env, free_port, hub_serve, wait_until
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from hub.config import load_settings
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: hub, python
HUB = str(BIN / "hub")
TIMEOUT = 30
SECRET = "doc-examples-secret-0123456789abcdef"


# -- the blocks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    doc: str
    heading: str
    n: int  # its place among the heading's blocks
    lang: str
    text: str

    @property
    def key(self) -> str:
        return f"{self.doc} > {self.heading} #{self.n}"


def parse(doc: str) -> list[Block]:
    blocks, heading, seen = [], "", Counter[str]()
    lines: list[str] | None = None
    lang = ""
    for line in (ROOT / doc).read_text().splitlines(keepends=True):
        if lines is None:
            fence = re.match(r"```(\S*)\s*$", line)
            if fence:
                lines, lang = [], fence.group(1)
            elif line.startswith("#"):
                heading = line.lstrip("#").strip()
        elif line.strip() == "```":
            blocks.append(Block(doc, heading, seen[heading], lang, "".join(lines)))
            seen[heading] += 1
            lines = None
        else:
            lines.append(line)
    assert lines is None, f"{doc}: unclosed code block"
    return blocks


DOCS = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
BLOCKS = {b.key: b for doc in DOCS for b in parse(doc)}


def block(doc: str, heading: str, n: int = 0) -> Block:
    key = f"{doc} > {heading} #{n}"
    assert key in BLOCKS, f"{key}: no such block (did the doc change?)"
    return BLOCKS[key]


REDIS_CLI_PRINTF = "tests/test_bridge.py::test_the_redis_cli_examples_in_the_docs"
WORKERS = "docs/operations.md > Workers: several processes on one port"

# Block -> the test that runs it (here, or "file::test" elsewhere in the suite).
RUN = {
    "README.md > The two commands #0": "test_make_run",
    "README.md > A 5-minute tour #0": "test_tour_terminal_curl_and_cli",
    "README.md > A 5-minute tour #1": "test_tour_terminal_curl_and_cli",
    "README.md > A 5-minute tour #2": "test_tour_publisher_through_redis",
    "README.md > A 5-minute tour #3": REDIS_CLI_PRINTF,
    "README.md > A 5-minute tour #4": "test_tour_browser_module",
    "README.md > Configuration reference #0": (
        "tests/test_docs.py::test_the_namespace_example_names_every_option_and_loads"
    ),
    "README.md > The WebSocket core on its own #0": "test_websocket_core_echo",
    "docs/protocol.md > Commands (client to hub) #0": "test_protocol_commands_transcript",
    "docs/protocol.md > Presence #0": "test_protocol_presence_transcript",
    "docs/protocol.md > History and recovery #0": "test_protocol_history_transcripts",
    "docs/protocol.md > History and recovery #1": "test_protocol_history_transcripts",
    "docs/protocol.md > History and recovery #2": "test_protocol_history_transcripts",
    "docs/protocol.md > History and recovery #3": "test_protocol_toml_blocks_load",
    "docs/protocol.md > Channels and namespaces #0": "test_protocol_toml_blocks_load",
    "docs/protocol.md > Tokens #0": "test_protocol_token_command",
    "docs/protocol.md > Publishing #0": "test_protocol_publication_carries_from",
    "docs/http-api.md > HTTP API #0": "test_http_api_curl_with_key",
    "docs/proxy.md > Settings #0": "test_proxy_backend_example",
    "docs/proxy.md > A backend in Python #0": "test_proxy_backend_example",
    "docs/publish-api.md > Channels with history #0": "test_history_publish_python",
    "docs/publish-api.md > Channels with history #1": "test_history_publish_plain_redis_py",
    "docs/publish-api.md > Channels with history #2": "test_history_publish_ioredis",
    "docs/publish-api.md > Python #0": "test_publisher_python",
    "docs/publish-api.md > Python #1": "test_async_publisher_python",
    "docs/publish-api.md > Notifications (inboxes) #0": "test_notify_python",
    "docs/publish-api.md > Node.js #0": "test_node_redis_example_delivers_and_exits",
    "docs/publish-api.md > redis-cli #0": "test_redis_cli_payload_bin",
    "docs/publish-api.md > redis-cli #1": REDIS_CLI_PRINTF,
    "docs/client-python.md > hub.client: the Python client #1": "test_python_client_example",
    f"{WORKERS} #0": "test_workers_command_and_log",
    f"{WORKERS} #1": "test_workers_command_and_log",
    "docs/operations.md > Slow and stalled clients #0": "test_operations_outbound_toml_loads",
    "docs/operations.md > Capacity #0": "test_capacity_log_line",
    "docs/operations.md > Redis access control #0": (
        "tests/test_redis_acl.py::test_the_documented_acl_users_run_everything"
    ),
}

# Block -> why no test here runs it.
EXCLUDED = {
    "docs/architecture.md > Architecture #0": "a diagram",
    "docs/proxy.md > The calls #0": (
        "two answers, not one document; tests/test_proxy.py has a backend answer both"
    ),
    "docs/ws-core.md > Layers #0": "a diagram of the modules",
    "docs/client-js.md > hub.js: the JavaScript client #0": (
        "a template for the reader's app (hub.example.com, fetchTokenFromMyBackend, render); "
        "the README tour's module runs in Chromium here, hub.js itself in tests/test_browser.py"
    ),
    "docs/client-js.md > Node and bundlers #0": (
        "a template (hub.example.com, the app's token); tests/test_node.py runs hub.js with ws "
        "and with Node's global WebSocket against a real hub"
    ),
    "docs/publish-api.md > Redis Cluster #0": (
        "notation (<msgpack envelope>), and a cluster; SPUBLISH is run in tests/test_cluster.py"
    ),
    "docs/publish-api.md > The envelope #0": "notation of the envelope, not a command",
    "docs/publish-api.md > Control messages #0": "notation of a control message, not a command",
    "docs/publish-api.md > Python #2": (
        "addresses of a real multi-host Redis Cluster; the cluster publishers run against a "
        "private cluster in tests/test_cluster.py"
    ),
    "docs/client-python.md > hub.client: the Python client #0": (
        "installs from a package index (where the name hub may be another project); the extra is "
        "in this venv already, and tests/test_packaging.py installs the wheel in a fresh one"
    ),
    "docs/operations.md > Kubernetes #0": (
        "needs a Kubernetes cluster; tests/test_kubernetes.py validates the manifests and runs "
        "the pod's command locally"
    ),
    "docs/operations.md > Deploying #0": (
        "needs a Docker engine; tests/test_deploy.py runs the same topology without Docker"
    ),
}


def test_every_block_is_run_or_excluded() -> None:
    assert not set(RUN) & set(EXCLUDED)
    new = sorted(set(BLOCKS) - {*RUN, *EXCLUDED})
    assert not new, f"doc blocks neither run nor excluded (add a test to RUN, or a reason): {new}"
    gone = sorted({*RUN, *EXCLUDED} - set(BLOCKS))
    assert not gone, f"RUN / EXCLUDED name blocks the docs no longer have: {gone}"
    here = globals()
    for key, name in RUN.items():
        if "::" in name:
            path, func = name.split("::")
            assert f"def {func}(" in (ROOT / path).read_text(), key
        else:
            assert callable(here.get(name)) and name.startswith("test_"), key
    for reason in EXCLUDED.values():
        assert reason.strip()


# -- running things ------------------------------------------------------------------------------


def localize(text: str, port: int | None = None, redis: RedisServer | None = None) -> str:
    """Point a block at this test's hub and Redis: only addresses change."""
    if port is not None:
        assert "8765" in text, text
        text = re.sub(r"(?<=[:\s])8765\b", str(port), text)
    if redis is not None:
        assert "6379" in text or "redis-cli" in text, text
        text = text.replace("127.0.0.1:6379", f"127.0.0.1:{redis.port}")
        text = re.sub(r"\bredis-cli ", f"redis-cli -p {redis.port} ", text)
    return text


def env(**extra: str) -> dict[str, str]:
    """A clean environment with the venv first on PATH, as after ``source .venv/bin/activate``."""
    base = clean_env(**extra)
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"
    return base


def sh(text: str, cwd: Path = ROOT, **extra: str) -> str:
    done = subprocess.run(
        ["sh", "-ec", text],
        cwd=cwd,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{text}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def run_file(argv: list[str], text: str, name: str, cwd: Path, **extra: str) -> str:
    (cwd / name).write_text(text)
    done = subprocess.run(
        [*argv, name],
        cwd=cwd,
        env=env(**extra),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, f"{text}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class Served:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serving(*args: str, config: str | None = None, **extra: str) -> Iterator[Served]:
    """``hub serve --port P ARGS`` until its ready line; SIGTERM (drain) at the end. Without a
    token secret it is what the docs' ``make run`` starts: dev mode, asked for with
    ``--insecure``."""
    if "HUB_TOKEN_SECRET" not in extra and "token_secret" not in (config or ""):
        args = (*args, "--insecure")
    with tempfile.TemporaryDirectory() as tmp:
        if config is not None:
            (Path(tmp) / "hub.toml").write_text(config)
            args = (*args, "--config", str(Path(tmp) / "hub.toml"))
        port = free_port()
        log = Path(tmp) / "hub.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [HUB, "serve", "--port", str(port), *args],
                env=env(**extra),
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        served = Served(port, proc, log)
        try:
            wait_until(
                lambda: proc.poll() is not None or " ready: ws://" in served.text(),
                TIMEOUT,
                "hub serve ready",
            )
            assert proc.poll() is None, served.text()
            yield served
        except BaseException:
            print(f"--- hub serve log ---\n{served.text()[-3000:]}")  # shown when a test fails
            raise
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def ws(port: int, query: str = "user=alice", *channels: str) -> Iterator[ClientConnection]:
    with connect(f"ws://127.0.0.1:{port}/ws?{query}", proxy=None, open_timeout=TIMEOUT) as conn:
        for n, channel in enumerate(channels, 1):
            conn.send(json.dumps({"op": "subscribe", "channel": channel, "id": n}))
            reply = json.loads(conn.recv(timeout=TIMEOUT))
            assert reply["id"] == n and "result" in reply, reply
        yield conn


def recv(conn: ClientConnection) -> Any:
    return json.loads(conn.recv(timeout=TIMEOUT))


class Output:
    """A child's stdout, read on a thread, ANSI escapes removed (the websockets CLI draws a
    prompt), so a test can wait for a line."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.text = ""
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for chunk in iter(lambda: self._proc.stdout.read(1), ""):  # type: ignore[union-attr]
            self.text += chunk

    def lines(self) -> list[str]:
        clean = re.sub(r"\x1b(\[[0-9;]*[A-Za-z]|[78])", "\n", self.text)
        return [line.strip() for line in clean.replace("\r", "\n").split("\n") if line.strip()]

    def wait_for(self, line: str, count: int = 1) -> None:
        wait_until(lambda: self.lines().count(line) >= count, TIMEOUT, f"output {line!r}")


def _prose(doc: str, pattern: str) -> str:
    found = re.search(pattern, (ROOT / doc).read_text())
    assert found is not None, f"{doc}: {pattern}"
    return found.group(1)


# -- README.md ------------------------------------------------------------------------------------


def test_make_run() -> None:
    """``make run``: a working hub, one process, in-memory broker, dev mode. (The block's other
    line, ``make test``, is this suite.) ``-o`` keeps make from reinstalling the venv here."""
    lines = block("README.md", "The two commands").text.splitlines()
    assert [line.split("#")[0].strip() for line in lines] == ["make run", "make test"]
    port = free_port()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            ["make", "-o", ".venv/.installed", "run", f"ARGS=--port {port}"],
            cwd=ROOT,
            env=env(),
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        try:

            def log() -> str:
                out.seek(0)
                return out.read().decode(errors="replace")

            wait_until(
                lambda: " ready: ws://" in log() or proc.poll() is not None, TIMEOUT, "ready"
            )
            # The ready line the configuration reference shows.
            ready = _prose("README.md", r"\(`(ready: ws://[^`]+)`")
            assert localize(ready, port) in log()
            with ws(port, "user=alice", "news"):
                pass
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=TIMEOUT)


def test_tour_terminal_curl_and_cli() -> None:
    """Tour steps 2 and 3: the websockets CLI subscribes and shows the reply, curl and
    ``hub publish`` print the API's answer, and the CLI shows the push the README names."""
    terminal = block("README.md", "A 5-minute tour", 0).text.splitlines()
    command = terminal[0]
    sends = [line[2:] for line in terminal if line.startswith("> ")]
    expected = [line for line in terminal if line.startswith("< ")]
    assert command.startswith(".venv/bin/python -m websockets") and sends and expected
    push = _prose("README.md", r"The client receives `([^`]+)`")
    with serving() as hub:
        proc = subprocess.Popen(
            ["sh", "-c", localize(command, hub.port)],
            cwd=ROOT,
            env=env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdin is not None
        try:
            out = Output(proc)
            for line in sends:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
            for line in expected:
                out.wait_for(line)
            publish = block("README.md", "A 5-minute tour", 1).text
            # `hub publish` finds the hub from its settings: HUB_PORT points it at this one.
            answers = sh(localize(publish, hub.port), HUB_PORT=str(hub.port))
            assert answers == '{"result":{}}' * 2 + "\n"
            out.wait_for(f"< {push}", 2)
        finally:
            proc.stdin.close()
            proc.wait(timeout=TIMEOUT)


def test_tour_publisher_through_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    code = block("README.md", "A 5-minute tour", 2).text
    with serving("--redis", redis_server.url) as hub, ws(hub.port, "user=alice", "news") as alice:
        run_file([sys.executable], localize(code, redis=redis_server), "tour.py", tmp_path)
        assert recv(alice) == {"channel": "news", "data": {"title": "hello"}}
        assert recv(alice) == {"data": {"unread": 3}}


def test_tour_browser_module() -> None:
    """The README's ``<script type="module">`` in headless Chromium: it imports hub.js from the
    hub, subscribes, and logs each message (``news {title: "hello"}``)."""
    chromium = "/usr/bin/chromium"
    assert os.access(chromium, os.X_OK), "chromium is needed: run `make sysdeps`"
    from playwright.sync_api import sync_playwright

    html = block("README.md", "A 5-minute tour", 4).text
    assert html.lstrip().startswith('<script type="module">')
    with serving() as hub, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page()
            logged: list[list[Any]] = []
            page.on("console", lambda m: logged.append([a.json_value() for a in m.args]))
            page.goto(f"http://127.0.0.1:{hub.port}/healthz")
            page.set_content(f"<!doctype html>{localize(html, hub.port)}")
            deadline = time.monotonic() + TIMEOUT
            while ["news", {"title": "hello"}] not in logged:  # published until subscribed
                assert time.monotonic() < deadline, logged
                sh(
                    f".venv/bin/hub publish --http http://127.0.0.1:{hub.port} news "
                    '\'{"title":"hello"}\''
                )
                page.wait_for_timeout(200)
        finally:
            browser.close()


def test_websocket_core_echo(tmp_path: Path) -> None:
    port = free_port()
    code = localize(block("README.md", "The WebSocket core on its own").text, port)
    (tmp_path / "echo.py").write_text(code)
    proc = subprocess.Popen([sys.executable, "echo.py"], cwd=tmp_path, env=env())
    try:

        def echo() -> str | None:
            try:
                with connect(f"ws://localhost:{port}", proxy=None, open_timeout=2) as conn:
                    conn.send("hello")
                    return str(conn.recv(timeout=TIMEOUT))
            except OSError:
                return None

        assert wait_until(echo, TIMEOUT, "echo server") == "hello"
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)


# -- docs/protocol.md ----------------------------------------------------------------------------


def test_protocol_commands_transcript() -> None:
    """Each command line of the transcript, sent to a dev-mode hub, gets the next line back."""
    lines = block("docs/protocol.md", "Commands (client to hub)").text.splitlines()
    assert len(lines) % 2 == 0
    with serving() as hub, ws(hub.port) as conn:
        for command, reply in zip(lines[::2], lines[1::2], strict=True):
            conn.send(command)
            assert conn.recv(timeout=TIMEOUT) == reply


EPOCH = "x3Fq9aZk"  # the docs' example epoch: stands for the channel's real one


def matches(expected: Any, actual: Any, bound: dict[str, Any]) -> bool:
    """``actual`` is what the docs show: a string or key with "..." stands for any string, and
    the example epoch for the real one (the same one throughout, kept in ``bound``)."""
    if isinstance(expected, str) and "..." in expected:
        return isinstance(actual, str)
    if expected == EPOCH:
        return bound.setdefault("epoch", actual) == actual
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        named = [k for k in expected if "..." not in k]
        wild = [k for k in expected if "..." in k]
        rest = [k for k in actual if k not in named]
        if len(rest) != len(wild) or not all(k in actual for k in named):
            return False
        pairs = [(expected[k], actual[k]) for k in named]
        pairs += [(expected[w], actual[r]) for w, r in zip(wild, rest, strict=True)]
        return all(matches(e, a, bound) for e, a in pairs)
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(matches(e, a, bound) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual and type(expected) is type(actual))


def api_publish(port: int, channel: str, data: Any) -> None:
    body = json.dumps({"channel": channel, "data": data}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/publish", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        assert response.status == 200


def play(
    conn: ClientConnection, text: str, bound: dict[str, Any], port: int = 0, live: Any = ()
) -> None:
    """Send each command line of a transcript and match each other line against what comes
    back; before a push whose offset is in ``live``, publish its data to the hub on ``port``."""
    for line in text.splitlines():
        shown = json.loads(line)
        if "op" in shown:
            conn.send(line.replace(EPOCH, bound.get("epoch", EPOCH)))
            continue
        if "id" not in shown and shown.get("offset") in live:
            api_publish(port, shown["channel"], shown["data"])
        got = recv(conn)
        assert matches(shown, got, bound), (line, got)


def test_protocol_history_transcripts() -> None:
    """The three History transcripts in order, as the page tells them: a subscribe at offset 42
    and a push (43), a reconnect with since after 44-46 were missed (recovered, then 47 live),
    and the history command on a channel at offset 46. The namespace is the page's own TOML."""
    first, recovery, history = (
        block("docs/protocol.md", "History and recovery", n).text for n in range(3)
    )
    config = block("docs/protocol.md", "History and recovery", 3).text
    bound: dict[str, Any] = {}
    with serving(config=config) as hub:
        for _ in range(42):
            api_publish(hub.port, "news:world", "...")
        with ws(hub.port) as conn:
            play(conn, first, bound, hub.port, {43})
        for _ in range(3):  # missed while away
            api_publish(hub.port, "news:world", "...")
        with ws(hub.port) as conn:
            play(conn, recovery, bound, hub.port, {47})
    assert len(bound["epoch"]) >= 1
    with serving(config=config) as hub:
        for _ in range(46):
            api_publish(hub.port, "news:world", "...")
        with ws(hub.port) as conn:
            play(conn, history, {})


def test_protocol_presence_transcript() -> None:
    """alice (token ``info`` {"name": "Alice"}) alone on chat:lobby gets the page's presence
    reply; with bob's two connections joined, the page's presence_stats."""
    lines = block("docs/protocol.md", "Presence").text.splitlines()
    assert len(lines) == 4
    presence, stats = "\n".join(lines[:2]), "\n".join(lines[2:])
    alice = mint_token("alice", SECRET, info={"name": "Alice"})
    bob = mint_token("bob", SECRET)
    config = "[namespaces.chat]\npresence = true\n"
    with serving(config=config, HUB_TOKEN_SECRET=SECRET) as hub:
        with ws(hub.port, f"token={alice}", "chat:lobby") as conn:
            play(conn, presence, {})
            with (
                ws(hub.port, f"token={bob}", "chat:lobby"),
                ws(hub.port, f"token={bob}", "chat:lobby"),
            ):
                play(conn, stats, {})


def test_protocol_toml_blocks_load(tmp_path: Path) -> None:
    for key in ("History and recovery", 3), ("Channels and namespaces", 0):
        text = block("docs/protocol.md", *key).text
        path = tmp_path / "hub.toml"
        path.write_text(text)
        settings = load_settings(str(path), env={})
        for name, options in tomllib.loads(text)["namespaces"].items():
            ns = settings.namespace(f"{name}:x")
            for option, value in options.items():
                assert getattr(ns, option) == value, (name, option)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_proxy_backend_example(tmp_path: Path) -> None:
    """proxy.md's backend and settings, as written but for the port: a cookie lets alice in with
    no token, she is subscribed to her notes on the server, her publish is cleaned by the
    backend, her rpc answered by it; no cookie is closed with 4500 and the backend's message."""
    backend_port = free_port()
    secret = {"HUB_PROXY_SECRET": "doc-proxy-secret-0123456789abcdef0123"}
    code = block("docs/proxy.md", "A backend in Python").text.replace("9000", str(backend_port))
    (tmp_path / "backend.py").write_text(code)
    app = subprocess.Popen([sys.executable, "backend.py"], cwd=tmp_path, env=env(**secret))
    try:
        wait_until(lambda: _listening(backend_port), TIMEOUT, "the backend listening")
        toml = block("docs/proxy.md", "Settings").text.replace("9000", str(backend_port))
        with hub_serve(tmp_path, toml, env=secret) as hub:
            assert "auth: connect proxy" in hub.log()
            cookie = {"Cookie": "lang=en; session=s3cr3t-session"}
            with connect(
                f"ws://127.0.0.1:{hub.port}/ws", proxy=None, additional_headers=cookie
            ) as conn:
                assert recv(conn) == {"channel": "notes:alice", "subscribed": {"server": True}}
                conn.send('{"op":"rpc","method":"time","id":1}')
                assert abs(recv(conn)["result"]["data"] - time.time()) < 60
                conn.send('{"op":"subscribe","channel":"room:lobby","id":2}')
                assert recv(conn) == {"id": 2, "result": {}}
                conn.send('{"op":"publish","channel":"room:lobby","data":{"text":" hi "},"id":3}')
                got = [recv(conn), recv(conn)]
                assert {"id": 3, "result": {}} in got
                push = next(m for m in got if "channel" in m)
                assert push["data"] == {"text": "hi", "by": "alice"}
            with connect(f"ws://127.0.0.1:{hub.port}/ws", proxy=None) as conn:
                with pytest.raises(ConnectionClosed) as closed:
                    conn.recv(timeout=TIMEOUT)
                assert closed.value.rcvd is not None
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4500, "log in first")
    finally:
        app.terminate()
        app.wait(TIMEOUT)


def test_operations_outbound_toml_loads(tmp_path: Path) -> None:
    """The slow-consumer and write-delay example loads, with the values it says."""
    text = block("docs/operations.md", "Slow and stalled clients", 0).text
    path = tmp_path / "hub.toml"
    path.write_text(text)
    settings = load_settings(str(path), env={})
    table = tomllib.loads(text)
    assert settings.write_delay == table["write_delay"]
    for name, options in table["namespaces"].items():
        ns = settings.namespace(f"{name}:x")
        for option, value in options.items():
            assert getattr(ns, option) == value, (name, option)


def test_protocol_token_command() -> None:
    """``hub token --user alice --secret "$HUB_TOKEN_SECRET"`` mints a token the hub with that
    secret accepts; without a token that hub closes the connection with 4500."""
    command = block("docs/protocol.md", "Tokens").text
    token = sh(command, HUB_TOKEN_SECRET=SECRET).strip()
    with serving(HUB_TOKEN_SECRET=SECRET) as hub:
        assert "auth: jwt HS256" in hub.text()
        with ws(hub.port, f"token={token}", "news") as conn:
            conn.send('{"op":"presence_stats","channel":"news","id":9}')
            assert recv(conn)["id"] == 9
        with connect(f"ws://127.0.0.1:{hub.port}/ws?user=alice", proxy=None) as conn:
            with pytest.raises(ConnectionClosed) as closed:
                conn.recv(timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4500


def test_protocol_publication_carries_from() -> None:
    """A client's publication reaches subscribers as the Publishing block shows: ``from`` holds
    the token's ``sub`` and ``info`` and the connection's client id, whatever the client claims."""
    shown = json.loads(block("docs/protocol.md", "Publishing").text)
    sender = shown["from"]
    import jwt

    claims = {"sub": sender["user"], "info": sender["info"], "exp": int(time.time()) + 600}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    namespace = shown["channel"].split(":")[0]
    config = f"[namespaces.{namespace}]\npublish = true\n"
    with serving(config=config, HUB_TOKEN_SECRET=SECRET) as hub:
        with ws(hub.port, f"token={token}", shown["channel"]) as alice:
            alice.send(
                json.dumps(
                    {
                        "op": "publish",
                        "channel": shown["channel"],
                        "data": shown["data"],
                        "from": {"user": "mallory"},  # claimed: ignored
                        "id": 7,
                    }
                )
            )
            got = [recv(alice), recv(alice)]
            push = next(m for m in got if "id" not in m)
            assert next(m for m in got if "id" in m) == {"id": 7, "result": {}}
            assert set(push) == set(shown) and push["data"] == shown["data"]
            assert push["channel"] == shown["channel"]
            assert push["from"]["user"] == sender["user"]
            assert push["from"]["info"] == sender["info"]
            assert isinstance(push["from"]["client"], str) and push["from"]["client"]


def test_config_error_line_and_an_overridden_value() -> None:
    """The configuration reference's error line is what a bad HUB_PORT prints, and a flag that
    overrides it is no error."""
    shown = _prose("README.md", r"\(`(hub: config error: HUB_PORT: [^`]+)`\)")
    bad = re.search(r"got '([^']*)'", shown)
    assert bad is not None
    done = subprocess.run(
        [HUB, "serve"],
        env=env(HUB_PORT=bad.group(1)),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert (done.returncode, done.stderr) == (2, shown + "\n")
    with serving(HUB_PORT=bad.group(1)) as hub:  # serving passes --port
        assert f"ready: ws://127.0.0.1:{hub.port}/ws" in hub.text()


# -- docs/client-python.md ----------------------------------------------------------------------


def test_python_client_example(tmp_path: Path) -> None:
    """The example publishes on chat:lobby (a namespace that allows it, as its comment says) and
    prints its own message; it then waits for more, so it is stopped here."""
    code = block("docs/client-python.md", "hub.client: the Python client", 1).text
    with serving(config="[namespaces.chat]\npublish = true\n") as hub:
        (tmp_path / "client.py").write_text(localize(code, hub.port))
        proc = subprocess.Popen(
            [sys.executable, "client.py"],
            cwd=tmp_path,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            Output(proc).wait_for("chat:lobby {'text': 'hi'}")
        finally:
            proc.terminate()
            proc.wait(timeout=TIMEOUT)


# -- docs/http-api.md ----------------------------------------------------------------------------


def test_http_api_curl_with_key() -> None:
    command = block("docs/http-api.md", "HTTP API").text
    key = "doc-example-key"
    with serving(HUB_API_KEY=key) as hub, ws(hub.port, "user=alice", "news") as alice:
        assert sh(localize(command, hub.port), HUB_API_KEY=key) == '{"result":{}}'
        assert recv(alice) == {"channel": "news", "data": {"title": "hello"}}
        refused = sh(localize(command, hub.port), HUB_API_KEY="wrong")
        assert json.loads(refused)["error"]


# -- docs/publish-api.md ---------------------------------------------------------------------------

HISTORY_CONFIG = "[namespaces.news]\nhistory_size = 100\nhistory_ttl = 300\n"


def history_dir(tmp_path: Path) -> Path:
    """A folder with ``history.lua`` beside the script, as the docs ask backends to ship it."""
    shutil.copy(ROOT / "hub" / "history.lua", tmp_path / "history.lua")
    return tmp_path


def test_history_publish_python(redis_server: RedisServer, tmp_path: Path) -> None:
    code = block("docs/publish-api.md", "Channels with history", 0).text
    prelude = f"from hub.redis.publisher import Publisher\npub = Publisher({redis_server.url!r})\n"
    show = "print(sent.offset, sent.epoch, page.offset, [e['data'] for e in page.entries])\n"
    with serving("--redis", redis_server.url, config=HISTORY_CONFIG) as hub:
        with ws(hub.port, "user=alice", "news:world") as alice:
            out = run_file([sys.executable], prelude + code + show, "h.py", tmp_path)
            push = recv(alice)
    offset, epoch, newest, entries = out.split(" ", 3)
    assert push == {
        "channel": "news:world",
        "data": {"title": "hello"},
        "offset": 1,
        "epoch": epoch,
    }
    assert (offset, newest, entries.strip()) == ("1", "1", "[]")  # since=40: nothing after it


def test_history_publish_plain_redis_py(redis_server: RedisServer, tmp_path: Path) -> None:
    code = localize(
        block("docs/publish-api.md", "Channels with history", 1).text, redis=redis_server
    )
    show = "print(offset, epoch.decode(), receivers)\n"
    with serving("--redis", redis_server.url, config=HISTORY_CONFIG) as hub:
        with ws(hub.port, "user=alice", "news:world") as alice:
            out = run_file([sys.executable], code + show, "h.py", history_dir(tmp_path))
            push = recv(alice)
    offset, epoch, receivers = out.split()
    assert (offset, receivers) == ("1", "1")
    assert push == {
        "channel": "news:world",
        "data": {"title": "hello"},
        "offset": 1,
        "epoch": epoch,
    }


def run_node(code: str, cwd: Path, node_modules: Path) -> str:
    """Run an ES module in ``cwd`` with the project's node_modules beside it; it must exit."""
    (cwd / "node_modules").symlink_to(node_modules)
    return run_file(["node"], code, "example.mjs", cwd)


def test_history_publish_ioredis(
    redis_server: RedisServer, tmp_path: Path, node_modules: Path
) -> None:
    code = localize(
        block("docs/publish-api.md", "Channels with history", 2).text, redis=redis_server
    )
    show = "console.log(offset, epoch, receivers);\n"
    with serving("--redis", redis_server.url, config=HISTORY_CONFIG) as hub:
        with ws(hub.port, "user=alice", "news:world") as alice:
            out = run_node(code + show, history_dir(tmp_path), node_modules)
            push = recv(alice)
    offset, epoch, receivers = out.split()
    assert (offset, receivers) == ("1", "1")
    assert push == {
        "channel": "news:world",
        "data": {"title": "hello"},
        "offset": 1,
        "epoch": epoch,
    }


def deliveries(hub: Served, publish: Any, to_alice: int, to_bob: int) -> tuple[list, list]:
    """Run ``publish`` with alice (on news and prices), bob and mallory connected: what alice and
    bob get, once mallory was disconnected with 4503 "banned" as the blocks ask."""
    with (
        ws(hub.port, "user=alice", "news", "prices") as alice,
        ws(hub.port, "user=bob") as bob,
        ws(hub.port, "user=mallory") as mallory,
    ):
        publish()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                mallory.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4503, "banned")
        return [recv(alice) for _ in range(to_alice)], [recv(bob) for _ in range(to_bob)]


def test_publisher_python(redis_server: RedisServer, tmp_path: Path) -> None:
    code = localize(block("docs/publish-api.md", "Python", 0).text, redis=redis_server)
    with serving("--redis", redis_server.url) as hub:
        alice, bob = deliveries(
            hub, lambda: run_file([sys.executable], code, "p.py", tmp_path), 5, 2
        )
    assert alice == [
        {"channel": "news", "data": {"title": "hello"}},
        {"channel": "prices", "data": {"eur": 1.08}, "event": "tick"},
        {"data": {"unread": 3}},
        {"data": {"unread": 4}},
        {"data": "maintenance in 5 minutes"},
    ]
    assert bob == [{"data": {"unread": 1}}, {"data": "maintenance in 5 minutes"}]


def test_async_publisher_python(redis_server: RedisServer, tmp_path: Path) -> None:
    """The fragment inside a coroutine (it uses ``async with`` and ``asyncio``): 1000 publishes,
    delivered in order."""
    fragment = localize(block("docs/publish-api.md", "Python", 1).text, redis=redis_server)
    body = "".join(f"    {line}\n" for line in fragment.splitlines())
    code = f"import asyncio\n\n\nasync def main():\n{body}\n\nasyncio.run(main())\n"
    with serving("--redis", redis_server.url) as hub, ws(hub.port, "user=a", "news") as a:
        run_file([sys.executable], code, "a.py", tmp_path)
        assert [recv(a)["data"] for _ in range(1000)] == list(range(1000))


def test_notify_python(redis_server: RedisServer, tmp_path: Path) -> None:
    """The notify block: its printed answers, and the push to a connection that asked for its
    inbox (the connect option)."""
    code = localize(
        block("docs/publish-api.md", "Notifications (inboxes)").text, redis=redis_server
    )
    with serving("--redis", redis_server.url) as hub, ws(hub.port, "user=alice&inbox=1") as a:
        opened = recv(a)["inbox"]["opened"]
        assert opened == {"seq": 0, "epoch": "", "read": 0, "acked": 0}
        out = run_file([sys.executable], code, "n.py", tmp_path)
        push = recv(a)
    assert out.split() == ["1", "False", "1", "True"]
    assert push == {
        "inbox": {"seq": 1, "epoch": push["inbox"]["epoch"], "id": "msg-17"},
        "data": {"title": "New message"},
    }


def test_node_redis_example_delivers_and_exits(
    redis_server: RedisServer, tmp_path: Path, node_modules: Path
) -> None:
    """The Node.js block delivers each message and exits by itself (run_file's timeout)."""
    code = localize(block("docs/publish-api.md", "Node.js").text, redis=redis_server)
    with serving("--redis", redis_server.url) as hub:
        alice, bob = deliveries(hub, lambda: run_node(code, tmp_path, node_modules), 3, 1)
    assert alice == [
        {"channel": "news", "data": {"title": "hello"}},
        {"data": {"unread": 3}},
        {"data": "maintenance in 5 minutes"},
    ]
    assert bob == [{"data": "maintenance in 5 minutes"}]


def test_redis_cli_payload_bin(redis_server: RedisServer, tmp_path: Path) -> None:
    """The payload.bin recipe with the venv's python; its cluster line needs a cluster (the
    SPUBLISH path is run in tests/test_cluster.py), so it is left out, by name."""
    lines = block("docs/publish-api.md", "redis-cli", 0).text.splitlines()
    cluster = [line for line in lines if "SPUBLISH" in line]
    assert len(cluster) == 1 and "on a cluster" in cluster[0]
    script = "\n".join(line for line in lines if line not in cluster)
    (tmp_path / ".venv").symlink_to(BIN.parent)
    with serving("--redis", redis_server.url) as hub, ws(hub.port, "user=a", "news") as a:
        assert sh(localize(script, redis=redis_server), cwd=tmp_path).strip() == "1"
        assert recv(a) == {"channel": "news", "data": {"title": "hello"}}


# -- docs/operations.md --------------------------------------------------------------------------


def test_workers_command_and_log(redis_server: RedisServer) -> None:
    """The workers command, as written, and the log the page shows: each sample line (pids,
    ports and counts aside) appears in the real log."""
    command = block("docs/operations.md", "Workers: several processes on one port", 0).text
    sample = block("docs/operations.md", "Workers: several processes on one port", 1).text
    port = free_port()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            ["sh", "-c", "exec " + localize(command, port, redis_server)],
            env=env(),
            stdout=out,
            stderr=out,
        )
        try:

            def log() -> str:
                out.seek(0)
                return out.read().decode(errors="replace")

            wait_until(
                lambda: "open http://" in log() or proc.poll() is not None, 60, "workers ready"
            )
            for line in sample.splitlines():  # numbers (pids, ports, counts) vary
                assert re.search(re.sub(r"\d+", r"\\d+", re.escape(line)), log()), (line, log())
            assert "(4 workers" in log() and f"127.0.0.1:{redis_server.port}" in log()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def test_capacity_log_line(tmp_path: Path) -> None:
    """The open-file line of the Capacity section, numbers aside, is what ``hub serve`` logs
    when started with a soft limit below the hard one."""
    import resource

    sample = block("docs/operations.md", "Capacity", 0).text.strip()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    port = free_port()
    log_path = tmp_path / "hub.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "hub"), "serve", "--insecure", "--port", str(port)],
            env=env(),
            stdout=out,
            stderr=out,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
        )
    try:
        wait_until(
            lambda: "ready: ws://" in log_path.read_text() or proc.poll() is not None, 30, "ready"
        )
        pattern = re.sub(r"\d+", r"\\d+", re.escape(sample))  # numbers vary
        assert re.search(pattern, log_path.read_text()), (sample, log_path.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
