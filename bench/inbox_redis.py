"""What a notify costs Redis, in instructions: ``hub/inbox.lua`` against a plain ``PUBLISH``.

Why this exists: on a shared 2-core VM the CPU a script costs Redis moves by 10-20% between
runs of ``bench/inbox.py`` (four processes share the cores), so a change worth a few percent of
a notify cannot be seen there. Instructions counted by callgrind hardly move: the same script,
arguments and Redis give the same count to within about 1% (what varies is how many commands
each read brings), whatever else the machine does. So each change to the
script is measured here first, then in ``bench/inbox.py`` for what it does to the rates.

A private ``redis-server`` runs under ``valgrind --tool=callgrind``; a redis-py pipeline sends
``--calls`` commands of each kind to one user (one subscriber on the user's channel, as a hub
would be), after ``--warm`` of the same kind, with the counters zeroed in between
(``callgrind_control``). Each row is the server's instructions per command: everything Redis
does for it (reading, the Lua run, the stream, the publish to the subscriber, the reply).
The last row is a plain notify in the script's batch form, ``NOTIFY_BATCH`` of them in one
call (what concurrent notifies become, ``hub.inbox.NotifyQueue``), per notify.

    .venv/bin/python bench/inbox_redis.py            # ~20 s
    .venv/bin/python bench/inbox_redis.py --json out.json
    git worktree add /tmp/before <rev> && .venv/bin/python bench/inbox_redis.py --tree /tmp/before

``--tree`` measures the script and argument layout of another checkout of the project (its
``hub/inbox.lua`` and ``notify_args``), for a before-and-after of a change.

Needs ``valgrind`` (Debian's package) and ``redis-server`` on PATH; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib.py sits next to this file

import msgpack
import redis
from benchlib import (
    HOST,
    REPO,
    BenchError,
    command_line,
    cpu_info,
    format_table,
    free_port,
    write_json,
)

Json = dict[str, Any]
PAYLOAD = {"title": "New message", "from": "alice", "unread": 3}
USER = "alice"


@contextlib.contextmanager
def callgrind_redis(tmp: Path) -> Iterator[tuple[redis.Redis, subprocess.Popen[bytes], Path]]:
    """A private redis-server under callgrind, collecting from the start (zeroed before each
    measurement), and a client of it."""
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is needed (apt-get install valgrind redis-server)")
    port = free_port()
    out = tmp / "callgrind.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "redis-server",
         "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(host=HOST, port=port)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("redis-server under valgrind did not start") from None
                time.sleep(0.2)
        yield client, proc, out
    finally:
        client.close()
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        if proc.poll() is None:
            proc.kill()


def counted(proc: subprocess.Popen[bytes], out: Path) -> int:
    """Instructions since the last zeroing: a dump, read back from its totals line."""
    for old in out.parent.glob(out.name + "*"):
        old.unlink()
    subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for dump in out.parent.glob(out.name + "*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.1)
    raise BenchError("callgrind wrote no dump")


def run(client: redis.Redis, command: list[Any], n: int) -> None:
    """``command`` ``n`` times, pipelined; every reply must be a success."""
    pipe = client.pipeline(transaction=False)
    for _ in range(n):
        pipe.execute_command(*command)
    for reply in pipe.execute(raise_on_error=False):
        if isinstance(reply, Exception):
            raise BenchError(f"{command[0]} failed: {reply}")


def batched(names: Any, envelope: bytes, n: int) -> list[Any]:
    """``EVALSHA`` of the batch form with ``n`` plain notifies to the user, laid out as
    docs/inbox.md says (each notify's keys, then ``many``, the shared arguments, the layout
    and each notify's envelope and epoch candidate)."""
    from hub.inbox import NOTIFY_SCRIPT, notify_args

    keys: list[Any] = []
    args: list[Any] = []
    for i in range(n):
        one = notify_args(names, USER, envelope, epoch=b"e%07d" % i)
        count, (env, size, ttl, candidate, flag) = one[0], one[1 + one[0] :]
        keys += one[1 : 1 + count]
        args += [env, candidate]
    return ["EVALSHA", NOTIFY_SCRIPT.sha, len(keys), *keys, "many", size, ttl, flag, "p" * n, *args]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="inbox_redis.py", description="Redis instructions per notify (callgrind)."
    )
    ap.add_argument("--calls", type=int, default=3000, help="measured commands per kind (3000)")
    ap.add_argument("--warm", type=int, default=2000, help="commands before measuring (2000)")
    ap.add_argument("--tree", type=Path, default=REPO, help="the checkout to measure (this one)")
    ap.add_argument("--json", type=Path, help="write meta, results, table")
    args = ap.parse_args(argv)
    if not 100 <= args.calls <= 100_000 or not 0 <= args.warm <= 100_000:
        ap.error("--calls must be in 100..100000 and --warm in 0..100000")
    tree = args.tree.resolve()
    if not (tree / "hub" / "inbox.lua").is_file():
        ap.error(f"--tree: no hub/inbox.lua under {tree}")
    sys.path.insert(0, str(tree))
    import hub
    import hub.inbox
    from hub.inbox import NOTIFY_SCRIPT, notify_args
    from hub.redis.wire import Names

    batch_size = getattr(hub.inbox, "NOTIFY_BATCH", 0)  # none in trees before the batch form

    rev = subprocess.run(
        ["git", "-C", str(tree), "describe", "--always", "--dirty"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip

    meta = {
        "command": command_line(),
        "python": platform.python_version(),
        "hub": f"{hub.__version__} ({rev or 'unknown'}, {tree})",
        "cpu": cpu_info(),
        "calls": args.calls,
    }
    print(f"command:  {meta['command']}")
    print(f"hub:      {meta['hub']}   python {meta['python']}   cpu: {meta['cpu']}")
    names = Names("hub")
    envelope = msgpack.packb({"data": PAYLOAD})
    channel = names.user(USER)

    def notify(**fields: Any) -> list[Any]:
        return ["EVALSHA", NOTIFY_SCRIPT.sha, *notify_args(names, USER, envelope, **fields)]

    results: Json = {}
    with tempfile.TemporaryDirectory(prefix="hub-bench-inbox-redis-") as tmp:
        with callgrind_redis(Path(tmp)) as (client, proc, out):
            floor = client.script_load("return 1")
            client.script_load(NOTIFY_SCRIPT.text)
            plain = notify()
            keys = int(plain[2])
            kinds = {
                "PUBLISH of the envelope (a plain per-user send)": ["PUBLISH", channel, envelope],
                "EVALSHA of 'return 1', a plain notify's keys and arguments": [
                    "EVALSHA", floor, *plain[2:]
                ],
                f"notify, plain ({keys} keys, {len(plain) - 3 - keys} arguments)": plain,
                "notify with a ttl": notify(ttl=3600),
                "notify with a collapse key": notify(collapse_key="badge"),
            }  # fmt: skip
            batch = batched(names, envelope, batch_size) if batch_size else None
            listener = client.pubsub()  # a subscriber on the user's channel, as a hub is
            listener.subscribe(channel)
            try:
                for label, command in kinds.items():
                    print(f"  .. {label}", flush=True)
                    run(client, command, args.warm)
                    zero = ["callgrind_control", "-z", str(proc.pid)]
                    subprocess.run(zero, capture_output=True, check=True)
                    run(client, command, args.calls)
                    results[label] = round(counted(proc, out) / args.calls)
                if batch is not None:  # what hub.inbox.NotifyQueue sends for concurrent ones
                    label = f"notify, plain, {batch_size} in one call (batch form), each"
                    print(f"  .. {label}", flush=True)
                    calls = max(1, args.calls // batch_size)
                    run(client, batch, max(1, args.warm // batch_size))
                    zero = ["callgrind_control", "-z", str(proc.pid)]
                    subprocess.run(zero, capture_output=True, check=True)
                    run(client, batch, calls)
                    results[label] = round(counted(proc, out) / (calls * batch_size))
            finally:
                listener.close()
    publish = results["PUBLISH of the envelope (a plain per-user send)"]
    table = [("Redis instructions per command", "count", "x PUBLISH")]
    for label, count in results.items():
        table.append((label, f"{count:,}", f"{count / publish:.1f}"))
    print(format_table(table, right={1, 2}))
    if args.json:
        write_json(args.json, {"meta": meta, "results": results, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
