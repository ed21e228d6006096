"""Build, once, the Autobahn fuzzingclient (``wstest``) that ``scripts/autobahn.py`` runs.

Why the project does this itself: the suite is on PyPI (``autobahntestsuite``), but as Python 2
code whose pinned dependencies (Twisted 19, cryptography 3, ...) no longer install. So we make a
venv of its own from the package registry, install the three Autobahn packages without their
dependency pins beside current ones, convert the suite with lib2to3 and apply the handful of edits
2to3 cannot make (``EDITS`` below; each one checks that its anchor text is there as often as
expected, so a changed upstream release fails loudly, not silently).

The venv is cached in ``$HUB_AUTOBAHN_CACHE``, else ``$XDG_CACHE_HOME/hub-autobahn``, else
``~/.cache/hub-autobahn``, in a folder named after a hash of everything that shapes it, so a changed
pin or edit builds a new one. A file lock makes two concurrent first uses build it once, and a
marker written last, plus a check that the key files exist, means a half-built or damaged venv is
rebuilt rather than trusted.

    python scripts/wstest_setup.py            # build if needed, print the venv's path
    python scripts/wstest_setup.py --rebuild  # throw the cached venv away and build it again

Every failure is one line on stderr (exit 2); the full pip / 2to3 output stays in ``build.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tokenize
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMPAT = HERE / "wstest_compat.py"
COMPAT_NAME = "_hubcompat"  # the compat module's name inside autobahntestsuite

# Installed with their dependencies; the versions this port was checked with.
REQUIREMENTS = (
    "Twisted[tls]==26.10.0",
    "wsaccel==0.6.7",
    "Jinja2==3.1.6",
    "six==1.17.0",
    "setuptools<81",  # the suite imports pkg_resources
)
# Installed without dependencies (theirs are the Python-2-era pins). autobahn 0.10.9 is the API the
# suite was written against and already runs on Python 3.
NO_DEPS = ("autobahntestsuite==25.10.1", "autobahn==0.10.9", "txaio==2.1.0")
CASE_COUNT = 517
MARKER = ".hub-wstest.json"
PIP_TIMEOUT = 1200.0
LOCK_WAIT = 1800.0

DEFAULT_INDEX = "https://pypi.org/simple"


class SetupError(RuntimeError):
    """wstest could not be built; the message is one line saying why and what to do."""


Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# the edits 2to3 cannot make, as (file under site-packages, old text, new text, occurrences)

_SEND_WRAPPERS = """   ## hub port: the cases pass str payloads (Python 2 byte strings); send bytes.
   def sendFrame(self, opcode, payload=b'', *args, **kwargs):
      if 'mask' in kwargs:
         kwargs['mask'] = tobytes(kwargs['mask'])
      return super().sendFrame(opcode, tobytes(payload), *args, **kwargs)

   def sendMessage(self, payload, *args, **kwargs):
      return super().sendMessage(tobytes(payload), *args, **kwargs)

   def sendMessageFrame(self, payload, *args, **kwargs):
      return super().sendMessageFrame(tobytes(payload), *args, **kwargs)

   def sendMessageFrameData(self, payload, *args, **kwargs):
      return super().sendMessageFrameData(tobytes(payload), *args, **kwargs)

   def sendPing(self, payload=None):
      return super().sendPing(tobytes(payload))

   def sendPong(self, payload=None):
      return super().sendPong(tobytes(payload))

   def sendData(self, data, *args, **kwargs):
      return super().sendData(tobytes(data), *args, **kwargs)

   def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
      return super().sendCloseFrame(code, tobytes(reasonUtf8), isReply)

"""

_C = f"from autobahntestsuite import {COMPAT_NAME}"
EDITS: tuple[tuple[str, str, str, int], ...] = (
    # Case.compare compared Python 2 pickles; compare normalised events instead
    (
        "autobahntestsuite/case/case.py",
        "import pickle\n",
        f"import pickle\nfrom autobahntestsuite.{COMPAT_NAME} import events_equal\n",
        1,
    ),
    (
        "autobahntestsuite/case/case.py",
        "return pickle.dumps(obj1) == pickle.dumps(obj2)",
        "return events_equal(obj1, obj2)",
        1,
    ),
    # 6.x.x: the UTF-8 validator takes octets; lone surrogates are test data, not errors
    (
        "autobahntestsuite/case/case6_x_x.py",
        "res = v.validate(vss[:i])",
        "res = v.validate(binascii.tobytes(vss[:i]))",
        1,
    ),
    (
        "autobahntestsuite/case/case6_x_x.py",
        'chr(i).encode("utf-8")',
        'chr(i).encode("utf-8", "surrogatepass")',
        4,
    ),
    (
        "autobahntestsuite/case/case6_x_x.py",
        'chr(j).encode("utf-8")',
        'chr(j).encode("utf-8", "surrogatepass")',
        1,
    ),
    ("autobahntestsuite/case/case6_x_x.py", ".tostring()", ".tobytes()", 6),
    # 10.1.1: the fragment count is an integer
    (
        "autobahntestsuite/case/case10_1_1.py",
        "len(self.payload) / self.p.autoFragmentSize",
        "len(self.payload) // self.p.autoFragmentSize",
        1,
    ),
    # 9.9.1 is imported (though not run): zope's class advice `implements` is gone
    (
        "autobahntestsuite/case/case9_9_1.py",
        "from zope.interface import implements",
        "from zope.interface import implementer",
        1,
    ),
    (
        "autobahntestsuite/case/case9_9_1.py",
        "class FrameProducer:\n\n   implements(interfaces.IPushProducer)\n",
        "@implementer(interfaces.IPushProducer)\nclass FrameProducer:\n",
        1,
    ),
    # fuzzing.py: the protocol and report machinery
    (
        "autobahntestsuite/fuzzing.py",
        "import os, json, binascii, time, textwrap, pkg_resources\n",
        f"import os, json, time, textwrap, pkg_resources\n{_C} as binascii\n"
        f"from autobahntestsuite.{COMPAT_NAME} import tobytes, jsonable\n",
        1,
    ),
    (
        "autobahntestsuite/fuzzing.py",
        'def binLogData(data, maxlen = 64):\n   ellipses = " ..."',
        'def binLogData(data, maxlen = 64):\n   data = tobytes(data)\n   ellipses = " ..."',
        1,
    ),
    (
        "autobahntestsuite/fuzzing.py",
        'def asciiLogData(data, maxlen = 64, replace = False):\n   ellipses = " ..."',
        "def asciiLogData(data, maxlen = 64, replace = False):\n"
        '   data = tobytes(data)\n   ellipses = b" ..."',
        1,
    ),
    ("autobahntestsuite/fuzzing.py", "p = ''.join(payload)", "p = b''.join(payload)", 1),
    (
        "autobahntestsuite/fuzzing.py",
        "   def executeContinueLater(self, fun, tag):",
        _SEND_WRAPPERS + "   def executeContinueLater(self, fun, tag):",
        1,
    ),
    (
        "autobahntestsuite/fuzzing.py",
        '      agent = caseResults["agent"]\n      case = caseResults["id"]\n',
        '      caseResults = jsonable(caseResults)\n      agent = caseResults["agent"]\n'
        '      case = caseResults["id"]\n',
        1,
    ),
    (
        "autobahntestsuite/fuzzing.py",
        "f = open(os.path.join(outdir, report_filename), 'w')",
        "f = open(os.path.join(outdir, report_filename), 'w', encoding='utf-8')",
        4,
    ),
    (
        "autobahntestsuite/fuzzing.py",
        '(c[0], case[c[0]], c[1])).encode("utf-8"))',
        "(c[0], case[c[0]], c[1])))",
        1,
    ),
    (
        "autobahntestsuite/fuzzing.py",
        "(2+4+len(prefix))*\" \", ll.encode('utf8')))",
        '(2+4+len(prefix))*" ", ll))',
        1,
    ),
    # other modules wstest imports
    ("autobahntestsuite/serializer.py", "import binascii\n", f"{_C} as binascii\n", 1),
    (
        "autobahntestsuite/broadcast.py",
        "import os, socket, binascii\n",
        f"import os, socket\n{_C} as binascii\n",
        1,
    ),
    # wstest's "serializer" mode needs WAMP test deps we do not install; the other modes load
    (
        "autobahntestsuite/wstest.py",
        "from . import serializer\n",
        "try:\n   from . import serializer\nexcept ImportError:  # only -m serializer needs it\n"
        "   serializer = None\n",
        1,
    ),
    # autobahn 0.10.9: true division in sendFrame's payload_len path, used only by fuzzing
    (
        "autobahn/websocket/protocol.py",
        "range(payload_len / len(payload))",
        "range(payload_len // len(payload))",
        1,
    ),
)
# Case modules whose Python 2 literals hold raw UTF-8 (they must keep meaning those octets).
NON_ASCII_CASE_FILES = 4


def cache_key() -> str:
    """A hash of every input that shapes the venv: pins, edits, compat module, this version."""
    h = hashlib.sha256()
    h.update(json.dumps([REQUIREMENTS, NO_DEPS, EDITS, COMPAT_NAME, CASE_COUNT]).encode())
    h.update(COMPAT.read_bytes())
    h.update(b"port-logic-1")  # bump when the conversion steps below change meaning
    return h.hexdigest()[:12]


def cache_root() -> Path:
    if env := os.environ.get("HUB_AUTOBAHN_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hub-autobahn"


def venv_path() -> Path:
    return cache_root() / f"wstest-{cache_key()}"


# ---------------------------------------------------------------------------------------------
# checking a cached venv


def required_files(venv: Path, site: str) -> list[Path]:
    sp = venv / site
    return [
        venv / "bin" / "python",
        venv / "bin" / "wstest",
        sp / "autobahntestsuite" / f"{COMPAT_NAME}.py",
        sp / "autobahntestsuite" / "wstest.py",
        sp / "autobahntestsuite" / "fuzzing.py",
        sp / "autobahn" / "websocket" / "protocol.py",
        sp / "twisted" / "__init__.py",
        sp / "pkg_resources" / "__init__.py",
    ]


def problem(venv: Path) -> str | None:
    """Why ``venv`` cannot be trusted, or None when it is complete."""
    try:
        marker = json.loads((venv / MARKER).read_text())
    except FileNotFoundError:
        return "no completion marker"
    except (OSError, ValueError):
        return "unreadable completion marker"
    if not isinstance(marker, dict) or marker.get("key") != cache_key():
        return "completion marker of another build"
    site = marker.get("site")
    if not isinstance(site, str) or site.startswith("/") or ".." in site:
        return "completion marker without its site-packages path"
    for path in required_files(venv, site):
        if not path.is_file():
            return f"{path.relative_to(venv)} is missing"
    return None


# ---------------------------------------------------------------------------------------------
# building


def base_python() -> str:
    """A Python 3.10-3.12 (lib2to3 left the standard library in 3.13) to base the venv on."""
    env = os.environ.get("HUB_AUTOBAHN_PYTHON")
    candidates = [env] if env else [sys.executable, "python3.12", "python3.11", "python3.10"]
    probe = "import sys, lib2to3; assert (3, 10) <= sys.version_info[:2] <= (3, 12)"
    for cand in candidates:
        exe = cand if os.sep in cand else shutil.which(cand)
        if exe is None:
            continue
        ok = subprocess.run([exe, "-c", probe], capture_output=True, check=False)
        if ok.returncode == 0:
            return exe
    raise SetupError(
        "autobahn: wstest needs a Python 3.10-3.12 with lib2to3 to build "
        f"(tried {', '.join(candidates)}); install one or set HUB_AUTOBAHN_PYTHON"
    )


def run_logged(cmd: list[str], log_path: Path, what: str, timeout: float) -> None:
    """Run ``cmd`` appending its output to ``log_path``; a failure is one line naming the log."""
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            proc = subprocess.run(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SetupError(
                f"autobahn: {what} still running after {timeout:.0f} s, stopped (log: {log_path})"
            ) from None
    if proc.returncode != 0:
        raise SetupError(f"autobahn: {what} failed (exit {proc.returncode}; log: {log_path})")


def index_urls(pip_output: str) -> list[str]:
    """The http(s) indexes pip says it looked in (none said: it used PyPI's default)."""
    m = re.search(r"^Looking in indexes: (.+)$", pip_output, re.MULTILINE)
    urls = [u.strip() for u in m.group(1).split(",")] if m else [DEFAULT_INDEX]
    return [u for u in urls if u.startswith(("http://", "https://"))]


def unreachable(url: str) -> str | None:
    """Why the index at ``url`` cannot be reached, or None if it answers (any HTTP status)."""
    probe = url.rstrip("/") + "/pip/"  # a small page; the index root lists every project
    try:
        with urllib.request.urlopen(urllib.request.Request(probe, method="HEAD"), timeout=15):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return " ".join(str(reason).split())[:160]


def pip_install(python: Path, args: list[str], log_path: Path) -> None:
    """pip from the registry, telling "cannot reach the registry" apart from other failures."""
    start = log_path.stat().st_size if log_path.exists() else 0
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args]
    try:
        run_logged(cmd, log_path, "pip install", PIP_TIMEOUT)
    except SetupError:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            f.seek(start)
            output = f.read()
        for url in index_urls(output):
            if (why := unreachable(url)) is not None:
                raise SetupError(
                    f"autobahn: cannot reach the package registry at {url} ({why}) to build "
                    f"wstest; check the network or PIP_INDEX_URL (log: {log_path})"
                ) from None
        errors = [x.strip() for x in output.splitlines() if x.startswith("ERROR")]
        why = errors[-1] if errors else "see the log"
        raise SetupError(f"autobahn: pip install failed: {why[:200]} (log: {log_path})") from None


def _read(path: Path) -> tuple[str, bool]:
    """A source file with LF line ends, and whether it had CRLF (most upstream files do)."""
    text = path.read_text(encoding="utf-8")
    with open(path, encoding="utf-8", newline="") as f:
        crlf = "\r\n" in f.read()
    return text, crlf


def _write(path: Path, text: str, crlf: bool) -> None:
    with open(path, "w", encoding="utf-8", newline="\r\n" if crlf else "\n") as f:
        f.write(text)


def apply_edits(site: Path) -> None:
    """Apply ``EDITS``; an anchor found a different number of times stops the build."""
    for rel, old, new, count in EDITS:
        path = site / rel
        text, crlf = _read(path)
        found = text.count(old)
        if found != count:
            raise SetupError(
                f"autobahn: port edit does not fit {rel}: expected {count} x {old[:40]!r}, "
                f"found {found} (has the upstream package changed?)"
            )
        _write(path, text.replace(old, new), crlf)


def escape_non_ascii(text: str) -> str:
    """Rewrite non-ASCII chars in plain (not u/b) literals as \\xNN escapes of their UTF-8.

    In Python 2 such a literal in a UTF-8 source was those octets; under the compat module's one
    code point per octet reading, the escapes denote the same octets in Python 3.
    """
    lines = text.splitlines(keepends=True)
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    for tok in reversed(tokens):  # back to front: earlier columns stay valid
        if tok.type != tokenize.STRING or tok.string.isascii():
            continue
        prefix = re.match(r"[A-Za-z]*", tok.string)
        if prefix and set(prefix.group(0).lower()) & {"u", "b"}:
            continue
        (row, col), (end_row, end_col) = tok.start, tok.end
        if row != end_row:
            raise SetupError("autobahn: port: multi-line non-ASCII literal, not handled")
        escaped = "".join(
            c if c.isascii() else "".join(f"\\x{o:02x}" for o in c.encode()) for c in tok.string
        )
        line = lines[row - 1]
        lines[row - 1] = line[:col] + escaped + line[end_col:]
    return "".join(lines)


def port_cases(site: Path) -> None:
    """Edits every case module needs: MRO, binascii returning str, raw UTF-8 literals."""
    escaped = 0
    for path in sorted((site / "autobahntestsuite" / "case").glob("*.py")):
        text, crlf = _read(path)
        new = text.replace("(object, Case, ),", "(Case, ),")  # MRO error in Python 3
        new = re.sub(r"^(\s*)import binascii\s*$", rf"\1{_C} as binascii", new, flags=re.MULTILINE)
        new = new.replace(
            "import copy, os, pkg_resources, hashlib, binascii",
            f"import copy, os, pkg_resources, hashlib\n{_C} as binascii",
        )
        escaped_text = escape_non_ascii(new)
        escaped += escaped_text != new
        if escaped_text != text:
            _write(path, escaped_text, crlf)
    if escaped != NON_ASCII_CASE_FILES:
        raise SetupError(
            f"autobahn: port: {escaped} case files with raw UTF-8 literals, "
            f"expected {NON_ASCII_CASE_FILES} (has the upstream package changed?)"
        )


_COUNT_CASES = """
from autobahntestsuite.case import (
    CaseBasename, CaseCategories, Cases, CaseSetname, CaseSubCategories)
from autobahntestsuite.caseset import CaseSet
cs = CaseSet(CaseSetname, CaseBasename, Cases, CaseCategories, CaseSubCategories)
print(len(cs.parseSpecCases({"cases": ["*"]})))
"""


def build(venv: Path, log: Log) -> None:
    """Make ``venv`` from nothing; the marker is written last, so an interrupted build shows."""
    log_path = venv.parent / "build.log"
    log_path.write_text(f"building {venv} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    exe = base_python()
    run_logged([exe, "-m", "venv", str(venv)], log_path, "python -m venv", 300)
    python = venv / "bin" / "python"
    pip_install(python, [*REQUIREMENTS], log_path)
    pip_install(python, ["--no-deps", *NO_DEPS], log_path)
    sp = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site = Path(sp)
    ats = site / "autobahntestsuite"
    cmd = [str(python), "-W", "ignore", "-m", "lib2to3", "-w", "-n", "--no-diffs", str(ats)]
    run_logged(cmd, log_path, "2to3", 600)
    shutil.copyfile(COMPAT, ats / f"{COMPAT_NAME}.py")
    port_cases(site)
    apply_edits(site)
    run_logged([str(python), "-m", "compileall", "-q", str(ats)], log_path, "compileall", 300)
    count = subprocess.run(
        [str(python), "-c", _COUNT_CASES], capture_output=True, text=True, check=False
    )
    if count.returncode != 0 or count.stdout.strip() != str(CASE_COUNT):
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(count.stdout + count.stderr)
        raise SetupError(
            f"autobahn: the ported suite does not list its {CASE_COUNT} cases (log: {log_path})"
        )
    marker = {"key": cache_key(), "site": str(site.relative_to(venv)), "built": time.time()}
    (venv / MARKER).write_text(json.dumps(marker) + "\n")


@contextlib.contextmanager
def build_lock(root: Path, log: Log) -> Iterator[None]:
    """An exclusive lock on ``root/build.lock``; the kernel drops it if the holder dies."""
    with open(root / "build.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"autobahn: waiting for another process building wstest in {root}")
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise SetupError(
                            f"autobahn: {root}/build.lock still held after {LOCK_WAIT:.0f} s"
                        ) from None
                    time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_wstest(log: Log = print, rebuild: bool = False) -> Path:
    """The venv holding a working ``wstest``, built on first use (~1-2 min, then cached)."""
    venv = venv_path()
    if not rebuild and problem(venv) is None:
        return venv
    root = venv.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SetupError(f"autobahn: cannot create the cache folder {root}: {exc}") from None
    with build_lock(root, log):
        why = "rebuild asked for" if rebuild else problem(venv)
        if why is None:  # another process built it while we waited
            return venv
        if venv.exists():
            log(f"autobahn: cached wstest in {venv} not usable ({why}); rebuilding")
            shutil.rmtree(venv)
        log(f"autobahn: building wstest in {venv} from the package registry (once, ~1-2 min)")
        try:
            build(venv, log)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
    log(f"autobahn: wstest ready in {venv}")
    return venv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the cached Autobahn wstest venv.")
    ap.add_argument("--rebuild", action="store_true", help="discard the cached venv first")
    args = ap.parse_args(argv)
    try:
        venv = ensure_wstest(log=print, rebuild=args.rebuild)
    except SetupError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(venv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
