"""``bench/scale.py`` at 200 connections, both implementations, so the benchmark cannot rot:
real ``hub serve --workers 2`` and websockets processes, a private Redis, raw clients from two
loopback source addresses. Only completeness is checked (every connection subscribed, reached
by the broadcast, closed by nobody), never a speed: timed assertions do not belong in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_scale_bench_runs_both_implementations_at_200_connections(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    argv = [sys.executable, str(REPO / "bench" / "scale.py"), "-n", "200", "--workers", "2"]
    argv += ["--idle-seconds", "1", "--json", str(out)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=110, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"hub", "baseline"}
    for impl, r in results.items():
        assert "error" not in r, (impl, r)
        assert (r["connected"], r["failed"], r["closed_during_idle"]) == (200, 0, 0), (impl, r)
        assert r["broadcast_received"] == 200, (impl, r)
        assert r["kib_per_conn"] > 0 and r["connects_per_s"] > 0, (impl, r)
    assert "connects/s" in run.stdout and "hub: connect [" in run.stderr
