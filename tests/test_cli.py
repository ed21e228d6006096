"""The ``hub`` command line, run as a subprocess: ``check-config`` exit codes, ``token``, and
``publish`` through the HTTP API of a ``hub serve`` started here (dev mode, ephemeral port).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from hubfix import SECRET
from websockets.asyncio.client import connect
from wshelp import run, within

HUB = str(Path(sys.executable).with_name("hub"))
TIMEOUT = 15


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any HUB_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(extra)
    return env


def hub(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HUB, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env if env is not None else clean_env(),
        check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    return path


# --- check-config --------------------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 9001\ninsecure = true\n[namespaces.chat]\npublish = true\n")
    result = hub("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "config ok" in result.stdout
    assert "9001" in result.stdout


def test_check_config_defaults_need_credentials_or_insecure() -> None:
    result = hub("check-config")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "HUB_TOKEN_SECRET" in lines[0] and "--insecure" in lines[0]
    result = hub("check-config", "--insecure")
    assert result.returncode == 0, result.stderr
    assert "dev mode" in result.stdout


@pytest.mark.parametrize(
    ("toml", "env", "field"),
    [
        ('port = "abc"', {}, "port"),
        ('host = "0.0.0.0"', {}, "token_secret"),
        ("[namespaces.chat]\nsubscribe = 'x'", {}, "namespaces.chat.subscribe"),
        ("", {"HUB_PORT": "abc"}, "HUB_PORT"),
        ("port = ", {}, "hub.toml"),
    ],
)
def test_check_config_errors_exit_2_with_one_line(
    tmp_path: Path, toml: str, env: dict[str, str], field: str
) -> None:
    path = write(tmp_path, toml)
    result = hub("check-config", "--config", str(path), env=clean_env(**env))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "config error" in lines[0] and field in lines[0]


def test_check_config_missing_file_exits_2(tmp_path: Path) -> None:
    result = hub("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr


def test_check_config_reads_hub_config_env(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 'abc'\n")
    result = hub("check-config", env=clean_env(HUB_CONFIG=str(path)))
    assert result.returncode == 2


# --- token ---------------------------------------------------------------------------------------


def test_token_prints_a_jwt_that_verifies() -> None:
    result = hub("token", "--user", "alice", "--secret", SECRET)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert 3500 < claims["exp"] - time.time() <= 3600
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-0123456789abcdef0123", algorithms=["HS256"])


def test_token_channels_and_no_expiry() -> None:
    result = hub(
        "token", "--user", "bob", "--secret", SECRET, "--channels", "private:*,a:b", "--ttl", "0"
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob"
    assert claims["channels"] == ["private:*", "a:b"]
    assert "exp" not in claims


def test_token_secret_from_the_environment() -> None:
    result = hub("token", "--user", "carol", env=clean_env(HUB_TOKEN_SECRET=SECRET))
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "carol"


def test_token_without_a_secret_exits_2_and_says_what_dev_mode_takes() -> None:
    result = hub("token", "--user", "alice")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "--secret" in result.stderr and "HUB_TOKEN_SECRET" in result.stderr
    assert "?user=" in result.stderr


# --- serve + publish -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def served() -> Iterator[int]:
    """``hub serve --port P`` in dev mode; yields P once /healthz answers; SIGTERM at the end."""
    port = free_port()
    proc = subprocess.Popen(
        [HUB, "serve", "--insecure", "--port", str(port)],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, f"hub serve exited: {proc.stderr.read()}"  # type: ignore[union-attr]
            try:
                if http_get(f"http://127.0.0.1:{port}/healthz") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "hub serve did not become healthy"
            time.sleep(0.05)
        yield port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()


async def hub_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``hub ...`` without blocking the event loop the WebSocket clients need."""
    proc = await asyncio.create_subprocess_exec(
        HUB,
        *args,
        env=env if env is not None else clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await within(proc.communicate(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def test_publish_through_http_to_a_running_hub(served: int) -> None:
    port = served
    base = f"http://127.0.0.1:{port}"

    async def main() -> None:
        url = f"ws://127.0.0.1:{port}/ws?user=alice"
        async with (
            connect(url, proxy=None, compression=None) as alice,
            connect(f"ws://127.0.0.1:{port}/ws?user=bob", proxy=None) as bob,
        ):
            await within(alice.send('{"op":"subscribe","channel":"news","id":1}'))
            assert await within(alice.recv()) == '{"id":1,"result":{}}'

            code, out, err = await hub_cli("publish", "news", '{"n": 1}', "--http", base)
            assert code == 0, err
            assert out == '{"result":{}}\n'
            assert await within(alice.recv()) == '{"channel":"news","data":{"n":1}}'

            # Not JSON: published as a string. Base URL from the environment's port.
            code, _, err = await hub_cli(
                "publish", "news", "plain words", env=clean_env(HUB_PORT=str(port))
            )
            assert code == 0, err
            assert await within(alice.recv()) == '{"channel":"news","data":"plain words"}'

            code, _, err = await hub_cli("publish", "--user", "bob", '"psst"', "--http", base)
            assert code == 0, err
            assert await within(bob.recv()) == '{"data":"psst"}'

            code, _, err = await hub_cli("publish", "[1,2]", "--http", base)
            assert code == 0, err
            for c in (alice, bob):
                assert await within(c.recv()) == '{"data":[1,2]}'

    run(main, timeout=30)


def test_publish_errors_exit_1(served: int) -> None:
    async def main() -> None:
        unused = free_port()
        code, _, err = await hub_cli("publish", "news", "1", "--http", f"http://127.0.0.1:{unused}")
        assert code == 1
        assert "cannot reach" in err
        code, _, err = await hub_cli(
            "publish", "news", "1", "--http", f"http://127.0.0.1:{served}/nowhere"
        )
        assert code == 1
        assert "404" in err

    run(main, timeout=30)


def test_tune_gc_freezes_start_up_objects_and_raises_the_threshold() -> None:
    """hub.runtime.tune_gc, which ``hub serve`` and each worker call once started (in a child
    process: the test runner's own collector stays as it is)."""
    code = (
        "import gc\n"
        "from hub.runtime import GEN0_THRESHOLD, tune_gc\n"
        "tune_gc()\n"
        "assert gc.get_threshold()[0] == GEN0_THRESHOLD, gc.get_threshold()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def serve_until_ready(*args: str, env: dict[str, str]) -> str:
    """Start ``hub serve ARGS``, return its stderr up to the ready line, then stop it."""
    proc = subprocess.Popen(
        [HUB, "serve", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, f"hub serve exited: {''.join(lines)}"
            lines.append(line)
            if " ready: ws://" in line:
                return "".join(lines)
        raise AssertionError("no ready line")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()


def test_a_flag_overrides_a_bad_environment_value() -> None:
    """``HUB_PORT=abc hub serve --port P`` serves on P; without the flag it is the one-line
    config error (exit 2)."""
    port = free_port()
    log = serve_until_ready("--port", str(port), "--insecure", env=clean_env(HUB_PORT="abc"))
    assert f"ready: ws://127.0.0.1:{port}/ws  broker: memory  auth: dev mode" in log
    result = hub("serve", "--insecure", env=clean_env(HUB_PORT="abc"))
    assert result.returncode == 2
    assert result.stderr == "hub: config error: HUB_PORT: expected int, got 'abc'\n"


def test_the_ready_line_names_broker_and_auth_without_secrets() -> None:
    port = free_port()
    secret = "ready-line-secret-0123456789abcdef"
    redis_url = f"redis://hub:redispass@127.0.0.1:{free_port()}/0"  # nothing listens: not needed
    env = clean_env(HUB_TOKEN_SECRET=secret, HUB_REDIS_URL=redis_url)
    log = serve_until_ready("--port", str(port), env=env)
    ready = next(line for line in log.splitlines() if " ready: ws://" in line)
    masked = redis_url.replace("redispass", "***")
    assert ready.endswith(f"ready: ws://127.0.0.1:{port}/ws  broker: {masked}  auth: jwt HS256")
    assert "redispass" not in log and secret not in log
