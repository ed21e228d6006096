"""Echo server for the Autobahn conformance run (``scripts/autobahn.py``).

It uses only the public ``hub.ws`` API, so what Autobahn tests is what applications get. The only
setting changed from the defaults is ``max_size``: cases 9.* send messages up to 16 MiB (hub.ws
has no fragment-count limit to raise). ``--impl websockets`` runs the same echo on the
``websockets`` library, the reference the harness was validated against; there the fragment limit
(``WEBSOCKETS_MAX_FRAGMENTS``, default 4096) is raised to 131,072 for 9.3.* / 9.4.*.

    python scripts/echo_server.py [--host 127.0.0.1] [--port 9001] [--impl hub|websockets]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

MAX_SIZE = 2**24  # 16 MiB: the largest Autobahn message (9.1.6 / 9.2.6) must fit
MAX_FRAGMENTS = 2**17  # 9.3.1 / 9.4.1: a 4 MiB message in 64-byte fragments
IMPLS = ("hub", "websockets")

Serve = Callable[..., Any]


def load_serve(impl: str) -> Serve:
    """Import ``serve`` lazily, so ``--impl websockets`` works before ``hub.ws`` exists."""
    if impl == "hub":
        # Run from a checkout without `pip install -e .`: the repo root holds the `hub` package.
        root = str(Path(__file__).resolve().parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)
        from hub.ws import serve

        return serve
    if impl == "websockets":
        # websockets >= 16 also caps a message at 4096 fragments (read from the environment at
        # import); 9.3.1/9.4.1 send 4 MiB in 64-byte frames, and a limit of 2**16 still failed them.
        os.environ.setdefault("WEBSOCKETS_MAX_FRAGMENTS", str(MAX_FRAGMENTS))
        from websockets.asyncio.server import serve as ws_serve

        return ws_serve
    raise ValueError(f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}")


def make_handler(broken: bool) -> Callable[[Any], Awaitable[None]]:
    """Echo every message back with its type kept; ``broken`` corrupts it to prove failures show."""

    async def echo(ws: Any) -> None:
        async for message in ws:
            if broken:
                message = message + ("!" if isinstance(message, str) else b"!")
            await ws.send(message)

    return echo


async def main_async(host: str, port: int, impl: str, broken: bool) -> None:
    """Serve until SIGINT/SIGTERM, printing one ready line once the socket listens."""
    serve = load_serve(impl)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(make_handler(broken), host, port, max_size=MAX_SIZE):
        extra = " BROKEN (appends one byte per message)" if broken else ""
        print(f"echo_server: impl={impl} listening on ws://{host}:{port}{extra}", flush=True)
        await stop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001)
    ap.add_argument("--impl", choices=IMPLS, default="hub", help="default: hub (hub.ws)")
    # Hidden: a deliberately wrong echo, used to check that the harness can fail at all.
    ap.add_argument("--broken", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args.host, args.port, args.impl, args.broken))
    return 0


if __name__ == "__main__":
    sys.exit(main())
