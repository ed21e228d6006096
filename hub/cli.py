"""The ``hub`` command line: ``serve``, ``token``, ``publish``, ``notify``, ``check-config``.

``hub`` alone is ``hub serve``: an in-memory hub on ws://127.0.0.1:8765/ws. It needs credentials
(``HUB_TOKEN_SECRET``...) or dev mode chosen with ``--insecure``; it never guesses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

from . import __version__
from .config import ConfigError, Settings, check_serving, load_settings, summary
from .tokens import mint_token

log = logging.getLogger("hub")

#: ``hub --help`` is read in a terminal: plain text, not the docstrings' reStructuredText.
DESCRIPTION = (
    "A real-time pub/sub hub: serve WebSocket clients, mint development tokens, publish. "
    "hub alone is hub serve."
)


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "redis_url": getattr(args, "redis", None),
        "workers": getattr(args, "workers", None),
    }
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    settings = load_settings(getattr(args, "config", None), overrides=overrides)
    check_serving(settings)
    return settings


async def _serve(settings: Settings, limit_before: int) -> None:
    """One process, no supervisor (``--workers 1``, the default): SIGTERM/SIGINT drain it.
    ``limit_before`` is the open-file limit the process started with, for the log."""
    from .app import Hub
    from .fdlimit import plan, quiet_accept_errors
    from .runtime import tune_gc

    hub = Hub(settings)
    loop = asyncio.get_running_loop()
    quiet_accept_errors(loop)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    capacity = plan(limit_before)
    await hub.start(capacity)
    tune_gc()
    log.info("%s", capacity.describe())
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("hub %s ready: ws://%s:%d/ws  %s", __version__, host, hub.port, summary(settings))
    if settings.insecure:
        log.info("dev mode (no auth, loopback only): open http://%s:%d/", host, hub.port)
    try:
        await stop
    finally:
        log.info("shutting down (draining for up to %gs)", settings.drain_seconds)
        await hub.drain()


def cmd_serve(args: argparse.Namespace) -> int:
    from .fdlimit import raise_limit

    # First of all: the supervisor's workers inherit the raised limit.
    before, _ = raise_limit()
    settings = _settings(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    if settings.workers > 1:
        from workers.supervisor import Supervisor

        return Supervisor(settings, reload=lambda: _settings(args)).run()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, before))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    secret = args.secret or settings.token_secret
    if not secret:
        print(
            "hub: token: no secret (pass --secret or set HUB_TOKEN_SECRET);"
            " dev mode needs no token: connect with ?user=<id>",
            file=sys.stderr,
        )
        return 2
    channels = args.channels.split(",") if args.channels else None
    print(mint_token(args.user, secret, ttl=args.ttl or None, channels=channels))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError:
        data = args.data  # not JSON: publish it as a string
    settings = load_settings(args.config)
    if args.redis:
        return _publish_redis(args, settings, data)
    url = args.http or f"http://{settings.host}:{settings.port}"
    if args.user:
        path, body = "/api/send", {"user": args.user, "data": data}
    elif args.channel is None:
        path, body = "/api/broadcast", {"data": data}
    else:
        path, body = "/api/publish", {"channel": args.channel, "data": data}
    return _post("publish", url, path, body, args.api_key or settings.api_key)


def _post(command: str, url: str, path: str, body: Any, key: str | None) -> int:
    """POST ``body`` to the HTTP API and print the answer (or the error, exit status 1)."""
    request = urllib.request.Request(
        url.rstrip("/") + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    if key:
        request.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
    except urllib.error.HTTPError as exc:
        print(f"hub: {command}: http {exc.code}: {exc.read().decode().strip()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"hub: {command}: cannot reach {url}: {exc.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    """``hub notify USER DATA``: store a notification in the user's inbox (``/api/notify``)."""
    try:
        data = json.loads(args.data)
    except ValueError:
        data = args.data  # not JSON: a string
    settings = load_settings(args.config)
    body: dict[str, Any] = {"user": args.user, "data": data}
    for name in ("id", "collapse_key", "ttl", "fallback_after"):
        value = getattr(args, name)
        if value is not None:
            body[name] = value
    if args.redis:
        from .redis.publisher import Publisher

        try:
            with Publisher(
                args.redis, prefix=settings.redis_prefix, signing_key=settings.redis_signing_key
            ) as publisher:
                fields = {k: v for k, v in body.items() if k not in ("user", "data")}
                done = publisher.notify(
                    args.user,
                    data,
                    inbox_size=settings.inbox_size,
                    inbox_ttl=settings.inbox_ttl,
                    **fields,
                )
        except ValueError as exc:
            print(f"hub: notify: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # redis-py raises several families for an unreachable server
            print(f"hub: notify: redis {args.redis}: {exc}", file=sys.stderr)
            return 1
        result = {"seq": done.seq, "epoch": done.epoch, "duplicate": done.duplicate}
        print(json.dumps({"result": result}, separators=(",", ":")))  # the HTTP API's shape
        return 0
    url = args.http or f"http://{settings.host}:{settings.port}"
    return _post("notify", url, "/api/notify", body, args.api_key or settings.api_key)


def _publish_redis(args: argparse.Namespace, settings: Settings, data: Any) -> int:
    from .redis.publisher import Publisher

    try:
        publisher = Publisher(
            args.redis, prefix=settings.redis_prefix, signing_key=settings.redis_signing_key
        )
        try:
            if args.user:
                receivers = publisher.send_to_user(args.user, data)
            elif args.channel is None:
                receivers = publisher.broadcast(data)
            else:
                # The channel's namespace may keep history: publish as the hub itself would.
                ns = settings.namespace(args.channel)
                receivers = publisher.publish(
                    args.channel, data, history_size=ns.history_size, history_ttl=ns.history_ttl
                )
        finally:
            publisher.close()
    except Exception as exc:  # redis-py raises several families for an unreachable server
        print(f"hub: publish: redis {args.redis}: {exc}", file=sys.stderr)
        return 1
    # The HTTP API's answer, so that one command prints one shape whichever way it publishes.
    result: dict[str, Any] = {}
    if getattr(receivers, "offset", None) is not None:
        result.update(offset=receivers.offset, epoch=receivers.epoch)  # type: ignore[attr-defined]
    print(json.dumps({"result": result}, separators=(",", ":")))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    # The ready line's own words (config.summary), so what check-config promises is what the
    # log of ``hub serve`` then shows.
    print(
        f"config ok: {settings.host}:{settings.port}  {summary(settings)}  "
        f"namespaces: {len(settings.namespaces)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hub", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"hub {__version__}")
    sub = parser.add_subparsers(dest="command")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="FILE", help="TOML settings file (or HUB_CONFIG)")

    p = sub.add_parser("serve", help="run the hub (the default command)")
    with_config(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--redis", metavar="URL", help="join other processes through Redis")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N processes on one port (SO_REUSEPORT), joined through Redis; needs --redis",
    )
    p.add_argument("--insecure", action="store_true", help="dev mode: no auth (loopback only)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="mint a connection token (development)")
    with_config(p)
    p.add_argument("--user", required=True)
    p.add_argument("--secret")
    p.add_argument("--ttl", type=float, default=3600, help="seconds; 0 for no expiry")
    p.add_argument("--channels", help="comma-separated channel patterns for the channels claim")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("publish", help="publish through the HTTP API")
    with_config(p)
    p.add_argument("channel", nargs="?", help="channel (omit to broadcast)")
    p.add_argument("data", help="JSON value (or plain text)")
    p.add_argument("--user", help="send to this user instead of a channel")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--http", metavar="URL", help="hub base url (default from settings)")
    target.add_argument("--redis", metavar="URL", help="publish through Redis instead of HTTP")
    p.add_argument("--api-key")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("notify", help="store a notification in a user's inbox (HTTP API)")
    with_config(p)
    p.add_argument("user")
    p.add_argument("data", help="JSON value (or plain text)")
    p.add_argument("--id", help="the backend's id: a retry with it stores nothing")
    p.add_argument("--collapse-key", help="replaces the user's older entry with this key")
    p.add_argument("--ttl", type=float, help="seconds after which it is never delivered")
    p.add_argument("--fallback-after", type=float, help="seconds before the offline fallback")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--http", metavar="URL", help="hub base url (default from settings)")
    target.add_argument("--redis", metavar="URL", help="notify through Redis instead of HTTP")
    p.add_argument("--api-key")
    p.set_defaults(func=cmd_notify)

    p = sub.add_parser("check-config", help="validate settings and exit")
    with_config(p)
    p.add_argument("--insecure", action="store_true", help="check them for dev mode")
    p.set_defaults(func=cmd_check_config)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    func = getattr(args, "func", cmd_serve)
    try:
        return int(func(args))
    except ConfigError as exc:
        print(f"hub: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
