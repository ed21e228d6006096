"""Run the Autobahn fuzzingclient against our echo server and report the outcome.

Why a wrapper: the suite (``wstest``) needs a Python 3 port of its own venv, which
``wstest_setup.py`` builds from the package registry on first use and caches; a server on a free
port and a scratch folder. This script does all of that, prints the summary plus every non-OK case
with what the report says, and exits non-zero when any case FAILED (including WRONG CODE / UNCLEAN
closing behaviour).

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
import importlib.util
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
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ECHO_SERVER = REPO / "scripts" / "echo_server.py"

PASS_BEHAVIORS = frozenset({"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"})
# Closing behaviours that are failures even when the message exchange itself matched.
FAIL_CLOSE_BEHAVIORS = frozenset({"FAILED", "WRONG CODE", "UNCLEAN"})
COUNT_KEYS = ("ok", "non_strict", "informational", "unimplemented", "failed")
# Category names for the summary, by the first component of a case id.
CATEGORIES = {
    "1": "Framing", "2": "Pings/Pongs", "3": "Reserved Bits", "4": "Opcodes",
    "5": "Fragmentation", "6": "UTF-8 Handling", "7": "Close Handling",
    "9": "Limits/Performance", "10": "Misc (auto-fragmentation)",
    "12": "WebSocket Compression (different payloads)",
    "13": "WebSocket Compression (different parameters)",
}  # fmt: skip
# quick: everything but the limits/performance (9.*) and compression (12.*, 13.*) groups.
QUICK_EXCLUDE = ("9.*", "12.*", "13.*")
SETUP_FILE = "wstest_setup.py"

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


def _load_setup() -> ModuleType:
    """``scripts/`` is not a package: load ``wstest_setup.py`` beside this file by its path."""
    name = "hub_wstest_setup"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(SETUP_FILE))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


setup = _load_setup()


def ensure_venv(log: Callable[[str], None] = print) -> Path:
    """The cached wstest venv, built from the package registry on first use (~1-2 min)."""
    try:
        return Path(setup.ensure_wstest(log))
    except setup.SetupError as exc:
        raise HarnessError(str(exc)) from None


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


def build_spec(mode: str, cases: Sequence[str], port: int, agent: str) -> dict[str, Any]:
    """The fuzzingclient spec for ``mode``: which cases, against which server, reports where."""
    if mode in ("quick", "full"):
        chosen, exclude = ["*"], list(QUICK_EXCLUDE) if mode == "quick" else []
    elif mode in ("compression", "cases"):
        chosen, exclude = list(COMPRESSION_SAMPLE) if mode == "compression" else list(cases), []
    else:
        raise HarnessError(f"autobahn: unknown mode {mode!r}; expected one of {MODES}")
    return {
        "outdir": "./reports/servers",
        "servers": [{"agent": agent, "url": f"ws://127.0.0.1:{port}"}],
        "cases": chosen,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }


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


def run_fuzzingclient(venv: Path, spec_path: Path, timeout: float) -> int:
    """wstest in its own process group (so a hung one is killed whole), output in wstest.log."""
    with open(spec_path.parent / "wstest.log", "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "wstest"), "-m", "fuzzingclient", "-s", str(spec_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=spec_path.parent,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise HarnessError(
                f"autobahn: wstest still running after {timeout:.0f} s, killed:\n"
                + tail(spec_path.parent / "wstest.log")
            )
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise


def summarize(cases: Sequence[CaseResult]) -> tuple[dict[str, int], str]:
    """Counts by behaviour (anything but the four passing ones is failed), per category too.

    The last line reads ``autobahn: N ok, N non-strict, N informational, N unimplemented,
    N failed``; per-case close behaviour is judged separately (``CaseResult.failing``).
    """
    kinds = dict(
        zip(("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"), COUNT_KEYS, strict=False)
    )
    total = dict.fromkeys(COUNT_KEYS, 0)
    per_cat: dict[str, dict[str, int]] = {}
    for c in cases:
        key = kinds.get(c.behavior, "failed")
        total[key] += 1
        cat = c.case_id.split(".")[0]
        per_cat.setdefault(cat, dict.fromkeys(COUNT_KEYS, 0))[key] += 1
    lines = []
    for cat in sorted(per_cat, key=int):
        counts = per_cat[cat]
        lines.append(
            f"{cat:<3} {CATEGORIES.get(cat, 'Misc'):<46} {sum(counts.values()):4d} cases: "
            + ", ".join(f"{n} {k.replace('_', '-')}" for k, n in counts.items())
        )
    lines.append("autobahn: " + ", ".join(f"{n} {k.replace('_', '-')}" for k, n in total.items()))
    return total, "\n".join(lines)


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
    venv = ensure_venv(log)
    if mode in ("cases", "compression"):
        check_patterns(list(cases) if mode == "cases" else COMPRESSION_SAMPLE, list_case_ids(venv))
    work = Path(tempfile.mkdtemp(prefix="hub-autobahn-"))
    agent = f"{impl}-broken" if broken else impl
    try:
        port = free_port()
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(build_spec(mode, cases, port, agent), indent=2))
        server_log = work / "server.log"
        server = start_server(impl, port, server_log, broken=broken)
        t0 = time.monotonic()
        try:
            returncode = run_fuzzingclient(
                venv, spec_path, WSTEST_TIMEOUT.get(mode, WSTEST_TIMEOUT["cases"])
            )
        finally:
            seconds = time.monotonic() - t0
            crashed = server.poll()
            stop_server(server)
        outdir = work / "reports" / "servers"
        if returncode != 0 or not (outdir / "index.json").is_file():
            raise HarnessError(
                f"autobahn: wstest exited with {returncode} without a report:\n"
                f"{tail(work / 'wstest.log')}"
            )
        all_cases = read_cases(outdir, agent)
        if not all_cases:
            raise HarnessError(f"autobahn: the report holds no case:\n{tail(work / 'wstest.log')}")
        counts, summary = summarize(all_cases)
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
