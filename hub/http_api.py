"""HTTP endpoints served on the WebSocket port, before the upgrade (via ``process_request``).

``/healthz`` (alive), ``/readyz`` (broker usable), ``/metrics`` (Prometheus), ``/hub.js`` (the
browser client), ``GET /api/stats`` (this process's counts), ``/`` (a demo page, dev mode only),
and the API for backends: ``POST /api/publish|broadcast|send|disconnect|history|presence|``
``presence_stats`` with a JSON body and an API key in ``Authorization: apikey <key>`` or
``X-API-Key``. Errors are JSON with a fitting status. With ``admin = true``: ``/admin`` (the admin
page and its script, which hold no data) and ``GET /admin/api/overview|user`` behind the API key.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .codec import check_sender, loads_strict
from .errors import BadRequest, ErrorCode, HubUnavailable, ReplyError
from .metrics import CONTENT_TYPE_LATEST
from .notify import inbox_read_args, notify_api
from .presence import PresenceUnavailable
from .rules import (
    DISCONNECT_CODE,
    check_channel,
    disconnect_problem,
    history_limit,
    history_result,
    parse_history,
    user_problem,
)
from .ws import Headers, MultipleValuesError, Request, Response

if TYPE_CHECKING:
    from .admin import Admin
    from .node import Node

__all__ = ["HttpApi"]

log = logging.getLogger("hub.http")


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@contextmanager
def _data_refused() -> Iterator[None]:
    """The node refuses ``data`` msgpack cannot carry (hub.codec.check_data): a 400 naming the
    field."""
    try:
        yield
    except BadRequest as exc:
        reason = exc.message.removeprefix("data ")
        raise ApiError(400, f"invalid field: data ({reason})") from None


def _json(status: int, obj: Any) -> Response:
    body = json.dumps(obj, separators=(",", ":")).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(status, "", headers, body)


def _query(request: Request) -> dict[str, Any]:
    """A GET's fields from its query string: each name once; digits become integers."""
    pairs = urllib.parse.parse_qsl(urllib.parse.urlsplit(request.path).query)
    body: dict[str, Any] = {}
    for name, value in pairs:
        if name in body:
            raise ApiError(400, f"invalid query: {name[:40]} given twice")
        body[name] = int(value) if value.isdigit() and len(value) < 20 else value
    return body


def _text(status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> Response:
    body = text.encode()
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(status, "", headers, body)


class StaticFile:
    """A file shipped in ``hub/static``, read once: served with an ETag so browsers revalidate
    cheaply (304) and a short max-age so a new release is picked up within minutes."""

    __slots__ = ("body", "content_type", "etag")

    def __init__(self, name: str, content_type: str) -> None:
        self.body = importlib.resources.files("hub").joinpath("static", name).read_bytes()
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:20] + '"'

    def response(self, request: Request, max_age: int) -> Response:
        headers = Headers([("ETag", self.etag), ("Cache-Control", f"public, max-age={max_age}")])
        if request.headers.get("If-None-Match") == self.etag:
            headers["Content-Length"] = "0"
            return Response(304, "", headers, b"")
        headers["Content-Type"] = self.content_type
        headers["Content-Length"] = str(len(self.body))
        headers["X-Content-Type-Options"] = "nosniff"
        return Response(200, "", headers, self.body)


#: Seconds a browser may use /hub.js without asking again.
CLIENT_MAX_AGE = 600

#: On every admin response: nothing cached, no framing (the page has a disconnect button), and
#: nothing but the hub's own script and style, so an injected name cannot run or load anything.
ADMIN_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    ),
)


class HttpApi:
    def __init__(
        self,
        node: Node,
        api_key: str | None,
        insecure: bool,
        admin: Admin | None = None,
        *,
        metrics_key: str | None = None,
        metrics_elsewhere: bool = False,
    ) -> None:
        self.node = node
        self.api_key = api_key
        self.insecure = insecure
        self.admin = admin
        self.admin_files: dict[str, StaticFile] = {}
        if admin is not None:
            self.admin_files = {
                "/admin": StaticFile("admin.html", "text/html; charset=utf-8"),
                "/admin/admin.js": StaticFile("admin.js", "text/javascript; charset=utf-8"),
                "/admin/admin.css": StaticFile("admin.css", "text/css; charset=utf-8"),
            }
        self.metrics_key = metrics_key
        #: ``/metrics`` is served on its own listener (``metrics_port``), not on this one.
        self.metrics_elsewhere = metrics_elsewhere
        self.routes: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            "/api/publish": self._publish,
            "/api/broadcast": self._broadcast,
            "/api/send": self._send,
            "/api/disconnect": self._disconnect,
            "/api/history": self._history,
            "/api/presence": self._presence,
            "/api/presence_stats": self._presence_stats,
            "/api/notify": self._notify,
            "/api/inbox": self._inbox,
        }
        #: Routes that also answer GET, their fields in the query string.
        self.readable = frozenset({"/api/inbox"})
        self.client_js = StaticFile("hub.js", "text/javascript; charset=utf-8")
        self.demo = StaticFile("index.html", "text/html; charset=utf-8") if insecure else None

    async def handle(self, request: Request) -> Response | None:
        """Answer an HTTP request, or return None for a WebSocket upgrade on ``/ws``."""
        try:
            return await self._handle(request)
        except MultipleValuesError as exc:  # two Content-Type or X-API-Key headers, say
            return self._error(400, f"more than one {exc.args[0]} header"[:100])

    async def _handle(self, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == "/ws":
            return None
        if path == "/healthz":
            return _text(200, "ok\n")
        if path == "/readyz":
            ready = self.node.ready
            return _text(200 if ready else 503, "ready\n" if ready else "not ready\n")
        if path == "/metrics":
            if self.metrics_elsewhere:
                return _json(404, {"error": {"message": "not found"}})
            return self.metrics(request)
        if path == "/hub.js":
            response = self.client_js.response(request, CLIENT_MAX_AGE)
            # A module script from another origin (the app's page) is fetched with CORS.
            response.headers["Access-Control-Allow-Origin"] = "*"
            return response
        if path == "/" and self.demo is not None:
            return self.demo.response(request, 0)
        if path == "/api/stats":
            return self._stats(request)
        if path == "/admin" or path.startswith("/admin/"):
            return await self._admin(request, path)
        route = self.routes.get(path)
        if route is None:
            return _json(404, {"error": {"message": "not found"}})
        readable = path in self.readable
        try:
            if request.method == "GET" and readable:
                self._check_key(request)
                body = _query(request)
            elif request.method != "POST":
                raise ApiError(405, "use GET or POST" if readable else "use POST")
            else:
                self._check_key(request)
                body = self._body(request)
            result = await route(body)
        except ApiError as exc:
            response = self._error(exc.status, exc.message)
            if exc.status == 405:
                response.headers["Allow"] = "GET, POST" if readable else "POST"
            return response
        except HubUnavailable as exc:
            what = "presence" if isinstance(exc, PresenceUnavailable) else "broker"
            return self._error(503, f"{what} unavailable")
        except MultipleValuesError:
            raise  # the client's fault: answered by handle()
        except Exception:
            log.exception("http api %s failed", path)
            return self._error(500, "internal error")
        return _json(200, {"result": result})

    def _error(self, status: int, message: str) -> Response:
        """An API error answer, counted by status (``hub_http_errors_total``)."""
        self.node.metrics.http_errors.labels(str(status)).inc()
        return _json(status, {"error": {"message": message}})

    def metrics(self, request: Request) -> Response:
        """``/metrics``, behind ``metrics_key`` when one is set (``Authorization: Bearer <key>``,
        what Prometheus sends for ``authorization: {credentials: ...}``)."""
        key = self.metrics_key
        if key is not None:
            auth = request.headers.get("Authorization") or ""
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), key.encode()
            ):
                response = self._error(401, "missing or invalid metrics key")
                response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
                return response
        return _text(200, self.node.metrics.render().decode(), CONTENT_TYPE_LATEST)

    def _stats(self, request: Request) -> Response:
        """This process's counts, for the demo page and quick checks (open in dev mode)."""
        try:
            if request.method != "GET":
                raise ApiError(405, "use GET")
            if not self.insecure:
                self._check_key(request)
        except ApiError as exc:
            response = self._error(exc.status, exc.message)
            if exc.status == 405:
                response.headers["Allow"] = "GET"
            return response
        registry = self.node.registry
        result = {
            "connections": len(registry),
            "subscriptions": registry.subscription_count,
            "channels": registry.channel_count,
            "users": registry.user_count,
        }
        response = _json(200, {"result": result})
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _admin(self, request: Request, path: str) -> Response:
        """The admin page's files (no data in them) and its API (behind the key); all 404 while
        the admin page is off."""
        if self.admin is None:
            return _json(404, {"error": {"message": "not found"}})
        try:
            if request.method != "GET":
                raise ApiError(405, "use GET")
            static = self.admin_files.get(path)
            if static is not None:
                response = static.response(request, 0)
                del response.headers["Cache-Control"]
            else:
                self._check_key(request)
                response = _json(200, {"result": await self._admin_api(self.admin, request, path)})
        except ApiError as exc:
            response = self._error(exc.status, exc.message)
            if exc.status == 405:
                response.headers["Allow"] = "GET"
        for name, value in ADMIN_HEADERS:
            response.headers[name] = value
        return response

    @staticmethod
    async def _admin_api(admin: Admin, request: Request, path: str) -> dict[str, Any]:
        if path == "/admin/api/overview":
            return admin.overview()
        if path == "/admin/api/user":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
            users = query.get("user", [])
            if len(users) != 1:
                raise ApiError(400, "invalid query: user (exactly one)")
            problem = user_problem(users[0])
            if problem:
                raise ApiError(400, f"invalid query: user ({problem})")
            found, everywhere = await admin.find_user(users[0])
            return {"user": users[0], "connections": found, "everywhere": everywhere}
        raise ApiError(404, "not found")

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            if self.insecure:
                return
            raise ApiError(403, "the http api is disabled: no api_key configured")
        given = request.headers.get("X-API-Key")
        auth = request.headers.get("Authorization")
        if given is None and auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "apikey":
                given = value.strip()
        if given is None:
            raise ApiError(401, "missing api key")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "invalid api key")

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        # Only application/json: a page on another site can POST text/plain or a form here
        # without asking (no CORS preflight), but not JSON, which this hub never allows.
        content_type = request.headers.get("Content-Type") or ""
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "expected content-type: application/json")
        try:
            body = loads_strict(request.body or b"{}")
        except ValueError:
            raise ApiError(400, "invalid json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a json object")
        return body

    @staticmethod
    def _field(body: dict[str, Any], name: str, kind: type | None = None) -> Any:
        if name not in body:
            raise ApiError(400, f"missing field: {name}")
        value = body[name]
        if kind is not None and (not isinstance(value, kind) or value in ("",)):
            raise ApiError(400, f"invalid field: {name}")
        return value

    def _channel(self, body: dict[str, Any]) -> str:
        """The body's ``channel``, checked by the rule client commands follow
        (``rules.check_channel``), so neither surface takes a name the other refuses."""
        channel = self._field(body, "channel")
        try:
            return check_channel(channel, self.node.settings.max_channel_length)
        except BadRequest as exc:
            raise ApiError(400, f"invalid field: channel ({exc.message})") from None

    async def _publish(self, body: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(body)
        meta = {}
        if "from" in body:
            try:
                meta["from"] = check_sender(body["from"])
            except BadRequest as exc:
                raise ApiError(400, f"invalid field: from ({exc.message})") from None
        with _data_refused():
            stored = await self.node.publish(
                channel, self._field(body, "data"), source="http", **meta
            )
        if stored is None:
            return {}
        return {"offset": stored[0], "epoch": stored[1]}

    async def _broadcast(self, body: dict[str, Any]) -> dict[str, Any]:
        with _data_refused():
            await self.node.broadcast(self._field(body, "data"))
        return {}

    def _user(self, body: dict[str, Any]) -> str:
        """The body's ``user``, checked by the one user-id rule (``rules.user_problem``)."""
        problem = user_problem(self._field(body, "user"))
        if problem is not None:
            raise ApiError(400, f"invalid field: user ({problem})")
        return body["user"]

    async def _send(self, body: dict[str, Any]) -> dict[str, Any]:
        user = self._user(body)
        with _data_refused():
            await self.node.send_to_user(user, self._field(body, "data"))
        return {}

    async def _disconnect(self, body: dict[str, Any]) -> dict[str, Any]:
        user = self._user(body)
        code = body.get("code", DISCONNECT_CODE)
        reason = body.get("reason", "")
        problem = disconnect_problem(user, code, reason)
        if problem is not None:  # "code must be ...": the field is the problem's first word
            raise ApiError(400, f"invalid field: {problem.partition(' ')[0]} ({problem})")
        await self.node.disconnect(user, code, reason)
        return {}

    def _presence_channel(self, body: dict[str, Any]) -> str:
        channel = self._channel(body)
        if not self.node.settings.namespace(channel).presence:
            raise ApiError(400, "presence is not enabled for this channel's namespace")
        return channel

    async def _presence(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"clients": await self.node.presence.clients(self._presence_channel(body))}

    async def _presence_stats(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.node.presence.stats(self._presence_channel(body))

    async def _notify(self, body: dict[str, Any]) -> dict[str, Any]:
        """One notification, or ``{"notifications": [...]}`` (hub.notify holds the rules)."""
        try:
            return await notify_api(self.node.inbox, body)
        except ReplyError as exc:
            status = 413 if exc.code == ErrorCode.TOO_LARGE else 400
            raise ApiError(status, exc.message) from None

    async def _inbox(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            user, since, device, limit = inbox_read_args(body)
        except ReplyError as exc:
            raise ApiError(400, exc.message) from None
        result = await self.node.inbox.read(user, since, device, limit)
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            raise ApiError(422, "the inbox holds data json cannot carry; read it over websocket")
        return result

    async def _history(self, body: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(body)
        ns = self.node.settings.namespace(channel)
        if not ns.history_size:
            raise ApiError(400, "history is not enabled on this channel")
        try:
            since, limit = parse_history(body)
        except ReplyError as exc:
            raise ApiError(400, f"invalid field: {exc.message}") from None
        offset = None if since is None else since[0]
        page = await self.node.history(channel, ns, since=offset, limit=history_limit(limit, ns))
        result = history_result(page, since)
        try:
            json.dumps(result)
        except (TypeError, ValueError):
            # Published through Redis with bytes (or other msgpack-only values) in data.
            raise ApiError(422, "history holds data json cannot carry; read it over websocket")
        return result
