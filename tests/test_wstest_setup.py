"""The Autobahn wstest venv the project builds for itself (``scripts/wstest_setup.py``).

Each build here goes to a cache folder of the test's own (``HUB_AUTOBAHN_CACHE``), never to the
cache the conformance tests share. "Unreachable" is real: pip is pointed at a closed port on
loopback, with the machine's pip configuration and local wheel folders switched off.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SETUP = SCRIPTS / "wstest_setup.py"


def load_setup() -> ModuleType:
    name = "hub_wstest_setup"  # the name scripts/autobahn.py loads it under, so it is one module
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SETUP)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ws = load_setup()


def closed_port() -> int:
    """A loopback port nobody listens on (bound and released, so it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_env(cache: Path, index: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HUB_AUTOBAHN_CACHE"}
    env["HUB_AUTOBAHN_CACHE"] = str(cache)
    if index is not None:
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
        env |= {
            "PIP_CONFIG_FILE": os.devnull,  # no pip.conf: no local wheel folders or extra indexes
            "PIP_INDEX_URL": index,
            "PIP_RETRIES": "0",
            "PIP_DEFAULT_TIMEOUT": "5",
        }
    return env


def run_setup(
    env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SETUP), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def in_cache(cache: Path) -> Path:
    """Where the venv goes for ``cache`` (the folder name is the hash of the recipe)."""
    return cache / ws.venv_path().name


def assert_unreachable_message(proc: subprocess.CompletedProcess[str], index: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert err.count("\n") == 0, f"not one line:\n{err}"
    assert err.startswith(f"autobahn: cannot reach the package registry at {index} ("), err
    assert "Connection refused" in err and "PIP_INDEX_URL" in err, err


@pytest.mark.timeout(300)
def test_unreachable_registry_is_one_clear_line(tmp_path: Path) -> None:
    """No registry: one line saying so, where, and what to check; no half-built venv left."""
    index = f"http://127.0.0.1:{closed_port()}/simple"
    proc = run_setup(setup_env(tmp_path, index))
    assert_unreachable_message(proc, index)
    assert not in_cache(tmp_path).exists()
    assert "Could not find a version" in (tmp_path / "build.log").read_text()


@pytest.mark.timeout(300)
def test_incomplete_cache_is_not_trusted(tmp_path: Path) -> None:
    """A venv whose marker names its files but one is gone is thrown away and built again."""
    venv = in_cache(tmp_path)
    site = "lib/python3/site-packages"
    for path in ws.required_files(venv, site)[:-1]:  # all but the last file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    (venv / ws.MARKER).write_text(json.dumps({"key": ws.cache_key(), "site": site}))
    missing = ws.required_files(venv, site)[-1].relative_to(venv)
    assert ws.problem(venv) == f"{missing} is missing"
    index = f"http://127.0.0.1:{closed_port()}/simple"
    proc = run_setup(setup_env(tmp_path, index))
    assert f"not usable ({missing} is missing); rebuilding" in proc.stdout
    assert_unreachable_message(proc, index)  # the rebuild really went to the registry
    assert not venv.exists()


def test_cache_problems_are_named(tmp_path: Path) -> None:
    """Each way a cached venv can be unfinished is told apart from a complete one."""
    venv = tmp_path / "v"
    assert ws.problem(venv) == "no completion marker"
    venv.mkdir()
    (venv / ws.MARKER).write_text("{half")
    assert ws.problem(venv) == "unreadable completion marker"
    (venv / ws.MARKER).write_text(json.dumps({"key": "0" * 12, "site": "lib"}))
    assert ws.problem(venv) == "completion marker of another build"
    (venv / ws.MARKER).write_text(json.dumps({"key": ws.cache_key(), "site": "../elsewhere"}))
    assert ws.problem(venv) == "completion marker without its site-packages path"
    (venv / ws.MARKER).write_text(json.dumps({"key": ws.cache_key(), "site": "lib"}))
    assert ws.problem(venv) == "bin/python is missing"


@pytest.mark.timeout(900)
def test_default_cache_is_complete_and_reused() -> None:
    """The cache the conformance tests use: built (now, if missing), complete, then reused."""
    built = ws.ensure_wstest(log=print)
    assert ws.problem(built) is None
    logged: list[str] = []
    assert ws.ensure_wstest(log=logged.append) == built
    assert logged == []  # a complete cache is not rebuilt, not even locked


def test_cache_location_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HUB_AUTOBAHN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ws.venv_path().parent == tmp_path / "hub-autobahn"
    monkeypatch.setenv("HUB_AUTOBAHN_CACHE", str(tmp_path / "own"))
    assert ws.venv_path().parent == tmp_path / "own"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_concurrent_first_uses_build_once_and_damage_is_rebuilt(tmp_path: Path) -> None:
    """Two first uses at once share one build; a file lost later makes the next use rebuild."""
    env = setup_env(tmp_path)
    procs = [
        subprocess.Popen(
            [sys.executable, str(SETUP)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=1500) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    venv = in_cache(tmp_path)
    assert {out.strip().splitlines()[-1] for out, _ in outs} == {str(venv)}
    said = "\n".join(out for out, _ in outs)
    assert said.count("autobahn: building wstest") == 1, said
    assert "waiting for another process building wstest" in said, said
    assert ws.problem(venv) is None

    compat = next(venv.glob(f"lib/python3*/site-packages/autobahntestsuite/{ws.COMPAT_NAME}.py"))
    compat.unlink()
    proc = run_setup(env, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is missing); rebuilding" in proc.stdout, proc.stdout
    assert compat.is_file() and ws.problem(venv) is None
    shutil.rmtree(tmp_path, ignore_errors=True)
