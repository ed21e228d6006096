"""``bench/inbox_redis.py`` at a few hundred calls, so the benchmark cannot rot: a private
``redis-server`` under callgrind, the shipped ``hub/inbox.lua``. Instruction counts are
deterministic, but no figure is asserted beyond what holds for any correct script: a notify
stores and publishes, so it costs Redis more than the PUBLISH and the empty script inside it,
and one of a batch shares the call, so it costs less than one alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_inbox_redis_bench_counts_each_kind_of_notify(tmp_path: Path) -> None:
    assert shutil.which("valgrind"), "valgrind is needed: apt-get install valgrind"
    out = tmp_path / "inbox_redis.json"
    argv = [sys.executable, str(REPO / "bench" / "inbox_redis.py"), "--calls", "200"]
    argv += ["--warm", "100", "--json", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())["results"]
    publish, floor, plain, ttl, collapse, batched = results.values()
    assert 0 < publish < floor < plain, results
    assert plain < ttl and plain < collapse, results
    # A notify in the batch form still stores and publishes; it shares only the call.
    assert publish < batched < plain, results
    assert "notify, plain (2 keys, 5 arguments)" in results, results
