"""hub.js outside the browser: Node's own test runner (``node --test``, tests/node/*.test.mjs)
against a real ``hub serve``, with the ``ws`` package and with the runtime's global WebSocket;
``tsc --noEmit`` on a usage file against hub.d.ts; and hub.js's close-code rule against
hub.errors.may_reconnect.

The Node dependencies (ws, typescript) come from tests/node/node_modules (tests/nodefix.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

from hubproc import HubProcess
from nodefix import NODE_DIR, node

from hub.errors import may_reconnect

ROOT = Path(__file__).resolve().parent.parent
HUB_JS = ROOT / "hub" / "static" / "hub.js"

CONFIG = """
[namespaces.chat]
publish = true

[namespaces.feed]
history_size = 1000
history_ttl = 600
"""


def test_hub_js_close_code_rule_is_hub_errors_rule() -> None:
    """hub.js's mayReconnect and hub.errors.may_reconnect agree on every code 1000-4999."""
    script = (
        f"import {{ mayReconnect }} from {json.dumps(HUB_JS.as_uri())};\n"
        "const stop = [];\n"
        "for (let code = 1000; code < 5000; code++) if (!mayReconnect(code)) stop.push(code);\n"
        "console.log(JSON.stringify(stop));\n"
    )
    done = subprocess.run(
        [node(), "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [c for c in range(1000, 5000) if not may_reconnect(c)]


def test_node_test_runner_against_a_real_hub(
    node_modules: Path, hubs: Callable[..., HubProcess]
) -> None:
    hub = hubs(CONFIG)
    executable = node()
    major = int(
        subprocess.run([executable, "--version"], capture_output=True, text=True)
        .stdout.strip()
        .lstrip("v")
        .split(".")[0]
    )
    argv = [executable]
    if major < 22:
        argv.append("--experimental-websocket")  # the global WebSocket (on by default from 22)
    files = sorted(p.name for p in NODE_DIR.glob("*.test.mjs"))
    assert len(files) >= 3, files
    argv += ["--test", "--test-reporter=tap", *files]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HUB_")},
        "HUB_WS_URL": f"ws://127.0.0.1:{hub.port}/ws",
        "HUB_HTTP_URL": hub.base,
        "NODE_NO_WARNINGS": "1",
    }
    done = subprocess.run(
        argv, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = done.stdout + done.stderr
    counts = dict(re.findall(r"^# (pass|fail|cancelled) (\d+)$", output, re.M))
    assert done.returncode == 0 and counts.get("fail") == "0", output[-6000:]
    assert counts.get("cancelled") == "0" and int(counts.get("pass", 0)) >= 10, output[-3000:]


def test_hub_d_ts_type_checks_a_usage_file(node_modules: Path) -> None:
    """tsc --noEmit (strict): hub.d.ts on its own (tsconfig.dts.json), and tests/node/usage.ts
    resolving @hub/client through the package's own exports and types, as an app's build
    would (tsconfig.json; the libraries' declarations are not re-checked there)."""
    tsc = node_modules / ".bin" / "tsc"
    for config in ("tsconfig.dts.json", "tsconfig.json"):
        done = subprocess.run(
            [str(tsc), "-p", str(NODE_DIR / config)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"{config}: {done.stdout}{done.stderr}"
