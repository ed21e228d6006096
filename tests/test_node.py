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
from procfix import hub_serve

from hub.errors import may_reconnect
from hub.tokens import mint_token

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


REFRESH_SCRIPT = """
import WebSocket from "ws";
import { Hub } from %s;
const tokens = JSON.parse(process.env.TOKENS);
const subTokens = JSON.parse(process.env.SUB_TOKENS);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let asked = 0;
let subAsked = 0;
const hub = new Hub(process.env.URL, {
  WebSocket,
  getToken: async () => tokens[Math.min(asked++, tokens.length - 1)],
});
const messages = [];
const errors = [];
hub.on("message", (d) => messages.push([d.channel, d.data]));
hub.on("error", (d) => errors.push(String(d.error)));
hub.connect();
await hub.subscribe("private:r", {
  getToken: async () => subTokens[Math.min(subAsked++, subTokens.length - 1)],
});
await sleep(5000); // past the first connection and subscription tokens' exp
for (const channel of ["news:daily", "private:r"]) {
  const response = await fetch(process.env.HTTP + "/api/publish", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-API-Key": process.env.KEY },
    body: JSON.stringify({ channel, data: channel }),
  });
  if (response.status !== 200) throw new Error(await response.text());
}
for (let i = 0; i < 500 && messages.length < 2; i++) await sleep(10);
const opens = hub.connections;
console.log(JSON.stringify({ asked, subAsked, opens, code: hub.closeCode, messages, errors }));
hub.close();
"""


def test_hub_js_refreshes_tokens_and_follows_server_side_subscriptions(
    node_modules: Path, tmp_path: Path
) -> None:
    """hub.js with getToken answers the hub's refresh pushes (the connection's and a
    subscription token's): the same connection outlives both first tokens, no 4002; and it
    takes the channel the server subscribed it to (token claim) without subscribing itself."""
    secret, key = (
        "node-refresh-secret-0123456789abcdef0123",
        "node-refresh-api-key-0123456789abcdef01",
    )
    toml = f"""
    token_secret = "{secret}"
    api_key = "{key}"
    [namespaces.news]
    server_side = true
    [namespaces.private]
    subscribe = "token"
    """
    claims = {"channels": ["news:daily"]}
    with hub_serve(tmp_path, toml) as hub:
        # Minted now, not before the hub starts: the short ones must have seconds left.
        tokens = [mint_token("ann", secret, ttl=4, **claims), mint_token("ann", secret, **claims)]
        sub_tokens = [
            mint_token("ann", secret, ttl=4, channel="private:r"),
            mint_token("ann", secret, channel="private:r"),
        ]
        done = subprocess.run(
            [node(), "--input-type=module", "-e", REFRESH_SCRIPT % json.dumps(HUB_JS.as_uri())],
            cwd=NODE_DIR,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("HUB_")},
                "URL": f"ws://127.0.0.1:{hub.port}/ws",
                "HTTP": f"http://127.0.0.1:{hub.port}",
                "KEY": key,
                "TOKENS": json.dumps(tokens),
                "SUB_TOKENS": json.dumps(sub_tokens),
                "NODE_NO_WARNINGS": "1",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["asked"], result["subAsked"]) == (2, 2), result
    assert (result["opens"], result["code"], result["errors"]) == (1, None, []), result
    assert sorted(result["messages"]) == [["news:daily", "news:daily"], ["private:r", "private:r"]]
