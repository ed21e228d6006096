"""``pip install .``: the wheel carries everything the hub reads at run time, and runs from a venv
that holds nothing but that wheel.

The wheel is built from a copy of exactly what the Docker image's build stage copies (so the
source tree gets no ``build/`` or ``egg-info``), installed with ``--no-deps`` into a fresh venv.
The dependencies come from this test run's own environment through a ``.pth`` line (installing
them again would mean a download per run); ``hub`` and ``workers`` come from the wheel only, which
each run checks. Then the installed ``hub`` serves for real: ``/hub.js``, and a publish on a
history channel, which runs the wheel's Lua script in a private Redis.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from procfix import clean_env, free_port, wait_until

import hub

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

REPO = Path(__file__).resolve().parent.parent
#: What the image's build stage copies before ``pip install .`` (deploy/Dockerfile).
SOURCES = ("pyproject.toml", "README.md", "hub", "workers")
#: reStructuredText a terminal shows as noise: ``literal``, :role:`x`, `interpreted`_.
RST = re.compile(r"``|:[a-z]+:`|`_")
SECRET = "packaging-test-secret-0123456789abcdef"
KEY = "packaging-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    dist = tmp / "dist"
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run(
        [*argv, "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    (built,) = dist.glob("hub-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed (and only it, from this project)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    done = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    purelib = subprocess.run(
        [
            str(root / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # After the venv's own site-packages: the wheel's hub wins over this checkout's editable one.
    (Path(purelib) / "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return root


def run_in(venv: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_wheel_carries_the_static_files_lua_scripts_and_both_packages(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = {f"hub/static/{p.name}" for p in (REPO / "hub" / "static").iterdir()}
    needed |= {f"hub/{p.name}" for p in (REPO / "hub").glob("*.lua")}
    needed |= {"hub/py.typed", "hub/__main__.py", "workers/worker.py", "workers/supervisor.py"}
    assert len([n for n in needed if n.endswith(".lua")]) >= 2
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.startswith("tests/")], "tests are not shipped"


def test_installed_hub_help_is_plain_text_and_python_m_hub_works(
    venv: Path, tmp_path: Path
) -> None:
    where = run_in(
        venv,
        "python",
        "-c",
        "import hub, workers; print(hub.__file__, workers.__file__)",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(venv), f"imported from outside the venv: {path}"

    helps = [run_in(venv, "hub", "--help", cwd=tmp_path)]
    for command in ("serve", "token", "publish", "check-config"):
        helps.append(run_in(venv, "hub", command, "--help", cwd=tmp_path))
    for done in helps:
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: hub")
        assert not RST.search(done.stdout), f"reStructuredText in help:\n{done.stdout}"
    assert "serve" in helps[0].stdout and "publish" in helps[0].stdout

    version = run_in(venv, "python", "-m", "hub", "--version", cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"hub {hub.__version__}"
    # python -m hub is the same command line: a bad setting is the same one-line error.
    bad = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "hub", "check-config"],
        cwd=tmp_path,
        env=clean_env(HUB_PORT="nope"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("hub: config error: HUB_PORT"), bad.stderr


def post(port: int, path: str, body: object) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "X-API-Key": KEY},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, object] = json.loads(response.read())
    return answer


def test_installed_hub_serves_its_client_and_runs_its_lua_scripts(
    venv: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("[namespaces.log]\nhistory_size = 5\n")
    port = free_port()
    log_path = tmp_path / "hub.log"
    env = clean_env(
        HUB_TOKEN_SECRET=SECRET, HUB_API_KEY=KEY, HUB_DRAIN_SECONDS="0.5", TMPDIR=str(tmp_path)
    )
    argv = [str(venv / "bin" / "hub"), "serve", "--config", str(config), "--port", str(port)]
    argv += ["--redis", redis_server.url, "--workers", "2"]  # workers: the wheel's other package
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: proc.poll() is not None or log_path.read_text().count(" ready: ") >= 2,
            30,
            "hub serve from the wheel ready",
        )
        assert proc.poll() is None, log_path.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/hub.js", timeout=10) as response:
            assert response.read() == (REPO / "hub" / "static" / "hub.js").read_bytes()
        redis_server.reset_stats()
        first = post(port, "/api/publish", {"channel": "log:a", "data": {"n": 1}})
        second = post(port, "/api/publish", {"channel": "log:a", "data": {"n": 2}})
        assert first["result"]["offset"] == 1 and second["result"]["offset"] == 2  # type: ignore[index]
        assert redis_server.calls("evalsha") + redis_server.calls("eval") >= 2
        history = post(port, "/api/history", {"channel": "log:a"})
        assert [p["data"] for p in history["result"]["publications"]] == [{"n": 1}, {"n": 2}]  # type: ignore[index]
    finally:
        if proc.poll() is None:
            proc.terminate()
        assert proc.wait(20) == 0, log_path.read_text()
