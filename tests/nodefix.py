"""The Node.js side of the tests: ``node`` itself (20.10+) and tests/node/node_modules, the npm
packages of hub.js's Node tests (tests/test_node.py) and of the docs' Node examples
(tests/test_doc_examples.py), installed with ``npm ci`` from the committed lock file on first use
and reused while package.json and the lock file stay as they are."""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["NODE_DIR", "node", "node_modules"]

NODE_DIR = Path(__file__).resolve().parent / "node"
HINT = "install Node.js 20.10+ with npm (Debian/Ubuntu: apt-get install nodejs npm; or nodejs.org)"
NETWORK = re.compile(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ECONNRESET|ENETUNREACH|network")


def node() -> str:
    executable = shutil.which("node")
    if executable is None:
        pytest.fail(f"node not found: {HINT}", pytrace=False)
    version = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout
    major, minor = (int(part) for part in version.strip().lstrip("v").split(".")[:2])
    if (major, minor) < (20, 10):
        pytest.fail(f"node {version.strip()} is too old: {HINT}", pytrace=False)
    return executable


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/node/node_modules, installed with ``npm ci`` on first use (and after the lock
    file changes); a lock keeps concurrent test runs from installing over each other."""
    node()
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(f"npm not found: {HINT}", pytrace=False)
    wanted = hashlib.sha256(
        (NODE_DIR / "package.json").read_bytes() + (NODE_DIR / "package-lock.json").read_bytes()
    ).hexdigest()
    modules = NODE_DIR / "node_modules"
    stamp = modules / ".hub-installed"
    with open(NODE_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == wanted:
            return modules
        argv = [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        done = subprocess.run(
            argv, cwd=NODE_DIR, capture_output=True, text=True, timeout=600, check=False
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            last = output.splitlines()[-1] if output else "no output"
            if NETWORK.search(output):
                pytest.fail(
                    "npm registry unreachable: `npm ci` in tests/node could not fetch its packages "
                    f"(needed once, then kept in tests/node/node_modules): {last}",
                    pytrace=False,
                )
            pytest.fail(f"npm ci in tests/node failed: {output[-2000:]}", pytrace=False)
        stamp.write_text(wanted)
    return modules
