"""The same servers on uvloop's event loop, which ``hub serve --workers N`` uses when uvloop is
installed: uvloop's transports are not asyncio's classes and differ in small ways, so the
WebSocket core's interop suite and the hub's end-to-end suite run again on it, in a child pytest
with ``HUB_TEST_LOOP=uvloop`` (tests/wshelp.py ``run``). The worker tests already run on uvloop,
since it is installed with the test extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import uvloop

TESTS = Path(__file__).resolve().parent


def test_interop_and_hub_suites_pass_on_uvloop() -> None:
    env = {**os.environ, "HUB_TEST_LOOP": "uvloop"}
    suites = [str(TESTS / name) for name in ("test_interop.py", "test_hub.py", "test_bridge.py")]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *suites],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
    assert uvloop.__version__
