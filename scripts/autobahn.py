"""Run the Autobahn fuzzingclient against our echo server and report the outcome.

Why a wrapper: the suite lives outside the repo (``../shared/autobahn`` or ``$HUB_AUTOBAHN_DIR``),
needs its own Python venv, a server on a free port and a scratch folder; this script does all of
that, prints the summary plus every non-OK case with what the report says, and exits non-zero when
any case FAILED (including WRONG CODE / UNCLEAN closing behaviour).

    python scripts/autobahn.py                      # quick set (247 cases, ~10 s)
    python scripts/autobahn.py --full               # all 517 cases (~8-17 min)
    python scripts/autobahn.py --compression        # 27 cases sampled from 12.* / 13.*, ~30 s
    python scripts/autobahn.py --cases 12.1.* 13.3.1
    python scripts/autobahn.py --impl websockets    # validate the harness on the reference library
    python scripts/autobahn.py --json out.json      # counts + non-OK cases as JSON

``run()`` is the importable entry point used by ``tests/test_autobahn.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ECHO_SERVER = REPO / "scripts" / "echo_server.py"
DEFAULT_SUITE = REPO.parent / "shared" / "autobahn"
DEFAULT_VENV = Path.home() / ".cache" / "hub-autobahn" / "venv"

PASS_BEHAVIORS = frozenset({"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"})
# Closing behaviours that are failures even when the message exchange itself matched.
FAIL_CLOSE_BEHAVIORS = frozenset({"FAILED", "WRONG CODE", "UNCLEAN"})
COUNT_KEYS = ("ok", "non_strict", "informational", "unimplemented", "failed")
SUMMARY_RE = re.compile(
    r"^autobahn: (\d+) ok, (\d+) non-strict, (\d+) informational, "
    r"(\d+) unimplemented, (\d+) failed$",
    re.M,
)

# Compression sample: every 12.N (payload kind) and 13.N (deflate parameters) sub-group, at small
# and medium sizes, unfragmented and in 256-byte fragments (sub-cases 11-15), plus two 128 KiB
# messages in larger fragments (16-18); the slowest cases are left to --full. ~30 s on websockets.
COMPRESSION_SAMPLE: tuple[str, ...] = (
    "12.1.1", "12.1.6", "12.1.11", "12.1.16",
    "12.2.5", "12.2.8",
    "12.3.3", "12.3.8",
    "12.4.2", "12.4.8",
    "12.5.4", "12.5.12",
    "13.1.1", "13.1.7",
    "13.2.2", "13.2.11",
    "13.3.3", "13.3.9",
    "13.4.4", "13.4.10",
    "13.5.2", "13.5.8",
    "13.6.5", "13.6.12",
    "13.7.5", "13.7.11", "13.7.18",
)  # fmt: skip

MODES = ("quick", "full", "compression", "cases")
# Guards against a hung wstest; generous: the full set takes 8-17 min on two cores.
WSTEST_TIMEOUT = {"quick": 600.0, "compression": 900.0, "cases": 3600.0, "full": 3 * 3600.0}
IMPLS = ("hub", "websockets")


class HarnessError(RuntimeError):
    """The conformance run could not be carried out (as opposed to: it ran and cases failed)."""


class SuiteNotFoundError(HarnessError):
    """The Autobahn suite folder is missing; CI always has it, so callers should fail, not skip."""


@dataclass
class CaseResult:
    """One case as the report describes it; ``expected``/``received`` are shortened for reading."""

    case_id: str
    behavior: str
    behavior_close: str
    remote_close_code: int | None
    duration_ms: int
    description: str = ""
    expectation: str = ""
    result: str = ""
    result_close: str = ""
    expected: str = ""
    received: str = ""

    @property
    def failing(self) -> bool:
        return self.behavior not in PASS_BEHAVIORS or self.behavior_close in FAIL_CLOSE_BEHAVIORS


@dataclass
class Result:
    """Outcome of one run: ``counts`` mirrors the summary line, ``non_ok`` every non-OK case."""

    impl: str
    mode: str
    counts: dict[str, int]
    summary: str
    non_ok: list[CaseResult]
    seconds: float
    cases_run: int
    wstest_returncode: int
    server_tracebacks: int = 0
    server_errors: list[str] = field(default_factory=list)
    report_dir: str | None = None

    @property
    def failing(self) -> list[CaseResult]:
        return [c for c in self.non_ok if c.failing]

    @property
    def ok(self) -> bool:
        return self.counts["failed"] == 0 and not self.failing

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["failing"] = [c.case_id for c in self.failing]
        return data


# ---------------------------------------------------------------------------------------------
# locating and preparing the suite


def find_suite() -> Path:
    """``$HUB_AUTOBAHN_DIR`` if set, else ``<repo>/../shared/autobahn``; fail clearly if absent."""
    env = os.environ.get("HUB_AUTOBAHN_DIR")
    suite = Path(env) if env else DEFAULT_SUITE
    if not (suite / "run_fuzzingclient.sh").is_file():
        where = f"$HUB_AUTOBAHN_DIR={env}" if env else f"{DEFAULT_SUITE} (the default)"
        raise SuiteNotFoundError(
            f"autobahn: suite not found: looked in {where} for run_fuzzingclient.sh; "
            "set HUB_AUTOBAHN_DIR to the folder holding the Autobahn fuzzingclient port"
        )
    return suite.resolve()


def venv_dir() -> Path:
    env = os.environ.get("AUTOBAHN_VENV")
    return Path(env) if env else DEFAULT_VENV


def ensure_venv(suite: Path, log: Callable[[str], None] = print) -> Path:
    """Build the suite's own venv on first use (setup_autobahn.sh is idempotent, ~30-60 s)."""
    venv = venv_dir()
    if (venv / "bin" / "wstest").exists():
        return venv
    log(f"autobahn: building the wstest venv in {venv} (once, ~30-60 s)")
    proc = subprocess.run(
        [str(suite / "setup_autobahn.sh"), str(venv)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (venv / "bin" / "wstest").exists():
        raise HarnessError(
            f"autobahn: setup_autobahn.sh failed (exit {proc.returncode}):\n"
            + (proc.stdout + proc.stderr)[-3000:]
        )
    return venv


# ---------------------------------------------------------------------------------------------
# the echo server


def free_port() -> int:
    """An unused port; the tiny bind/close race is acceptable for a local test run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    impl: str, port: int, log_path: Path, broken: bool = False, timeout: float = 20.0
) -> subprocess.Popen[bytes]:
    """Start ``echo_server.py`` and return once it accepts TCP connections."""
    cmd = [sys.executable, str(ECHO_SERVER), "--impl", impl, "--port", str(port)]
    if broken:
        cmd.append("--broken")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(
                f"autobahn: echo server (impl={impl}) exited with {proc.returncode} "
                f"before listening:\n{tail(log_path)}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.05)
    stop_server(proc)
    raise HarnessError(
        f"autobahn: echo server (impl={impl}) not listening on port {port} after {timeout:.0f} s:"
        f"\n{tail(log_path)}"
    )


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def tracebacks(log_path: Path) -> list[str]:
    """Every traceback in the server log, chained sections (``The above exception...``) joined."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    blocks: list[str] = []
    cur: list[str] | None = None
    for i, line in enumerate(lines):
        if cur is None:
            if not line.startswith("Traceback"):
                continue
            prev = lines[i - 1] if i else ""
            cur = [prev] if prev.strip() and not prev.startswith(" ") else []
        cur.append(line)
        if line.strip() and not line.startswith((" ", "Traceback", "During", "The above")):
            following = next((x for x in lines[i + 1 :] if x.strip()), "")
            if not following.startswith(("During", "The above")):
                blocks.append("\n".join(cur))
                cur = None
    if cur:
        blocks.append("\n".join(cur))
    return blocks


def is_expected_traceback(block: str) -> bool:
    """A handler ending in ConnectionClosed* is the normal outcome of a peer breaking the rules."""
    last = [x for x in block.splitlines() if x.strip()][-1]
    return "ConnectionClosed" in last


# ---------------------------------------------------------------------------------------------
# spec, run, report


_LIST_CASES = """
import json
from autobahntestsuite.case import (
    CaseBasename, CaseCategories, Cases, CaseSetname, CaseSubCategories)
from autobahntestsuite.caseset import CaseSet
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
print(json.dumps(cs.parseSpecCases({"cases": ["*"]})))
"""


def list_case_ids(venv: Path) -> list[str]:
    """All case ids the installed suite knows, asked from its own venv."""
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _LIST_CASES],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise HarnessError(f"autobahn: cannot list the suite's cases:\n{proc.stderr[-2000:]}")
    return list(json.loads(proc.stdout))


def check_patterns(patterns: Sequence[str], known: Sequence[str]) -> None:
    """wstest hangs (KeyError inside its reactor) on an unknown case id, so refuse those first.

    Patterns follow wstest: ``*`` matches anything, everything else is literal.
    """
    unmatched = []
    for pat in patterns:
        rx = re.compile(".*".join(map(re.escape, pat.split("*"))) + "$")
        if not any(rx.match(cid) for cid in known):
            unmatched.append(pat)
    if unmatched:
        raise HarnessError(
            f"autobahn: no case matches {', '.join(unmatched)} "
            f"(ids run from {known[0]} to {known[-1]}; globs like 12.1.* work)"
        )


def build_spec(
    suite: Path, mode: str, cases: Sequence[str], port: int, agent: str
) -> dict[str, Any]:
    """The fuzzingclient spec for ``mode``; quick/full start from the suite's own spec files."""
    if mode in ("quick", "full"):
        spec: dict[str, Any] = json.loads((suite / f"spec_{mode}.json").read_text())
    elif mode in ("compression", "cases"):
        chosen = list(COMPRESSION_SAMPLE) if mode == "compression" else list(cases)
        spec = {"cases": chosen, "exclude-cases": [], "exclude-agent-cases": {}}
    else:
        raise HarnessError(f"autobahn: unknown mode {mode!r}; expected one of {MODES}")
    spec["outdir"] = "./reports/servers"
    spec["servers"] = [{"agent": agent, "url": f"ws://127.0.0.1:{port}"}]
    return spec


def shorten_events(events: Any, width: int = 60) -> str:
    """Render report events compactly: payloads of many KiB would drown the message."""
    if not isinstance(events, list):
        return repr(events)[:width]
    parts = []
    for ev in events[:8]:
        if isinstance(ev, list) and ev:
            kind, *rest = ev
            shown = []
            for x in rest:
                if isinstance(x, str) and len(x) > 24:  # the report itself cuts at 64 chars
                    shown.append(f"{x[:16]!r}...")
                else:
                    shown.append(repr(x))
            parts.append(f"{kind}({', '.join(shown)})")
        else:
            parts.append(repr(ev)[:width])
    more = f" +{len(events) - 8} more" if len(events) > 8 else ""
    return "[" + ", ".join(parts) + more + "]"


def read_cases(outdir: Path, agent: str) -> list[CaseResult]:
    """Every case of ``agent`` from index.json, with details from its own report file if non-OK."""
    index = json.loads((outdir / "index.json").read_text(encoding="utf-8"))
    if agent not in index:
        raise HarnessError(f"autobahn: agent {agent!r} not in report (have {sorted(index)})")
    out = []
    for case_id, entry in index[agent].items():
        cr = CaseResult(
            case_id=case_id,
            behavior=entry.get("behavior", "?"),
            behavior_close=entry.get("behaviorClose", "?"),
            remote_close_code=entry.get("remoteCloseCode"),
            duration_ms=int(entry.get("duration", 0)),
        )
        if cr.behavior != "OK" or cr.behavior_close not in ("OK", "INFORMATIONAL"):
            fill_details(cr, outdir / entry.get("reportfile", ""))
        out.append(cr)
    out.sort(key=lambda c: tuple(int(x) for x in c.case_id.split(".")))
    return out


def fill_details(cr: CaseResult, path: Path) -> None:
    try:
        detail = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    cr.description = str(detail.get("description", "")).strip()
    cr.expectation = str(detail.get("expectation", "")).strip()
    cr.result = str(detail.get("result", ""))
    cr.result_close = str(detail.get("resultClose", ""))
    expected = detail.get("expected") or {}
    if isinstance(expected, dict):
        cr.expected = "; ".join(f"{k}: {shorten_events(v)}" for k, v in expected.items())
    close = detail.get("expectedClose") or {}
    if isinstance(close, dict) and close:
        cr.expected += (
            f"; close: closedByMe={close.get('closedByMe')} codes={close.get('closeCode')}"
            f" requireClean={close.get('requireClean')}"
        )
    cr.received = (
        shorten_events(detail.get("received"))
        + f"; remote close {detail.get('remoteCloseCode')} {detail.get('remoteCloseReason')!r}"
        + f", closedByMe={detail.get('closedByMe')}, wasClean={detail.get('wasClean')}"
        + (f" ({detail['wasNotCleanReason']})" if detail.get("wasNotCleanReason") else "")
    )


def run_fuzzingclient(
    suite: Path, venv: Path, spec_path: Path, timeout: float
) -> tuple[int, str, str]:
    """run_fuzzingclient.sh in its own process group, so a hung wstest can be killed whole."""
    proc = subprocess.Popen(
        ["bash", str(suite / "run_fuzzingclient.sh"), str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "AUTOBAHN_VENV": str(venv)},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise HarnessError(
            f"autobahn: wstest still running after {timeout:.0f} s, killed:\n"
            + tail(spec_path.parent / "wstest.log")
        )
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out.strip(), err


def run(
    mode: str = "quick",
    cases: Sequence[str] = (),
    impl: str = "hub",
    *,
    broken: bool = False,
    keep: bool = False,
    log: Callable[[str], None] = print,
) -> Result:
    """Run one conformance pass and return its parsed outcome (raises HarnessError if it can't)."""
    if impl not in IMPLS:
        raise HarnessError(f"autobahn: unknown impl {impl!r}; expected one of {IMPLS}")
    if mode not in MODES:
        raise HarnessError(f"autobahn: unknown mode {mode!r}; expected one of {MODES}")
    if mode == "cases" and not cases:
        raise HarnessError("autobahn: --cases needs at least one case id or glob")
    suite = find_suite()
    venv = ensure_venv(suite, log)
    if mode in ("cases", "compression"):
        check_patterns(list(cases) if mode == "cases" else COMPRESSION_SAMPLE, list_case_ids(venv))
    work = Path(tempfile.mkdtemp(prefix="hub-autobahn-"))
    agent = f"{impl}-broken" if broken else impl
    try:
        port = free_port()
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(build_spec(suite, mode, cases, port, agent), indent=2))
        server_log = work / "server.log"
        server = start_server(impl, port, server_log, broken=broken)
        t0 = time.monotonic()
        try:
            returncode, summary, stderr = run_fuzzingclient(
                suite, venv, spec_path, WSTEST_TIMEOUT.get(mode, WSTEST_TIMEOUT["cases"])
            )
        finally:
            seconds = time.monotonic() - t0
            crashed = server.poll()
            stop_server(server)
        match = SUMMARY_RE.search(summary)
        if match is None:
            raise HarnessError(
                f"autobahn: no summary line (run_fuzzingclient.sh exit {returncode}):\n"
                f"{summary}\n{stderr[-2000:]}\n{tail(work / 'wstest.log')}"
            )
        counts = dict(zip(COUNT_KEYS, map(int, match.groups()), strict=True))
        all_cases = read_cases(work / "reports" / "servers", agent)
        blocks = tracebacks(server_log)
        errors = ["\n".join(b.splitlines()[-25:]) for b in blocks if not is_expected_traceback(b)]
        if crashed is not None:
            errors.insert(0, f"echo server exited early with {crashed}:\n{tail(server_log)}")
        return Result(
            impl=agent,
            mode=mode,
            counts=counts,
            summary=summary,
            non_ok=[c for c in all_cases if c.behavior != "OK" or c.failing],
            seconds=round(seconds, 1),
            cases_run=len(all_cases),
            wstest_returncode=returncode,
            server_tracebacks=len(blocks),
            server_errors=errors[:50],
            report_dir=str(work) if keep else None,
        )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def format_result(res: Result) -> str:
    """Human-readable report: summary, then one block per non-OK case (failures marked)."""
    lines = [res.summary, ""]
    lines.append(
        f"autobahn: impl={res.impl} mode={res.mode}: {res.cases_run} cases in {res.seconds:.1f} s"
    )
    for c in res.non_ok:
        mark = "FAIL" if c.failing else "note"
        lines.append(
            f"  [{mark}] {c.case_id}: {c.behavior} / close {c.behavior_close}"
            f" (remote close code {c.remote_close_code}, {c.duration_ms} ms)"
        )
        for label, text in (
            ("case", c.description),
            ("expectation", c.expectation),
            ("result", c.result),
            ("close", c.result_close),
            ("expected", c.expected),
            ("observed", c.received),
        ):
            if text:
                lines.append(f"      {label}: {' '.join(text.split())}")
    if res.server_tracebacks:
        lines.append(
            f"autobahn: server log has {res.server_tracebacks} tracebacks, "
            f"{len(res.server_errors)} not ending in ConnectionClosed* (those are expected)"
        )
    for err in res.server_errors[:5]:
        lines.append("  server log:\n" + "\n".join("      " + x for x in err.splitlines()))
    if res.report_dir:
        lines.append(f"autobahn: report kept in {res.report_dir}/reports/servers/index.html")
    verdict = "PASS" if res.ok else f"FAIL ({len(res.failing)} failing cases)"
    lines.append(f"autobahn: {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the Autobahn fuzzingclient against hub.ws.")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--full", action="store_true", help="all 517 cases (~8-17 min)")
    group.add_argument("--compression", action="store_true", help="27 cases from 12.*/13.*")
    group.add_argument("--cases", nargs="+", metavar="ID", help="case ids or globs, e.g. 12.1.*")
    ap.add_argument("--impl", choices=IMPLS, default="hub", help="server under test (default hub)")
    ap.add_argument("--json", metavar="OUT", type=Path, help="write counts + non-OK cases here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder with the report")
    ap.add_argument("--broken", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    mode = "full" if args.full else "compression" if args.compression else "quick"
    if args.cases:
        mode = "cases"
    try:
        res = run(mode, args.cases or (), args.impl, broken=args.broken, keep=args.keep)
    except HarnessError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(format_result(res))
    if args.json:
        args.json.write_text(json.dumps(res.to_json(), indent=2) + "\n")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
