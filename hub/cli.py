"""The ``hub`` command line.

Until the hub proper lands, ``hub serve`` runs a demo on the WebSocket core: every message a
client sends is echoed back, and ``/healthz`` answers ``OK``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import logging
import signal
import sys

from . import __version__
from .ws import Request, Response, ServerConnection, serve

log = logging.getLogger("hub")


async def _echo(connection: ServerConnection) -> None:
    async for message in connection:
        await connection.send(message)


def _health(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with serve(_echo, host, port, process_request=_health) as server:
        bound = server.sockets[0].getsockname()
        log.info("hub %s listening on ws://%s:%d (echo demo)", __version__, bound[0], bound[1])
        await stop
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hub {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_serve = sub.add_parser("serve", help="run the server")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    if args.command in (None, "serve"):
        host = getattr(args, "host", "127.0.0.1")
        port = getattr(args, "port", 8765)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(host, port))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
