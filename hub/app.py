"""The hub application: a :class:`Node` served over the WebSocket core on one port.

``/ws`` is the WebSocket endpoint (subprotocols ``hub.v1.json`` and ``hub.v1.msgpack``); every
other path is answered by :class:`HttpApi` before any upgrade.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from . import backend, ws
from .admin import Admin
from .broker import Broker
from .codec import BY_SUBPROTOCOL, JSON
from .config import Settings, check_serving, proxy_urls
from .errors import CloseCode, ProxyDisconnect, ProxyFailed, ProxyRefused
from .fdlimit import Capacity
from .http_api import HttpApi
from .inbox import Inbox, RedisInbox
from .limits import AddressBudget, address_key
from .node import Node
from .presence import Presence, RedisPresence
from .proxy import ProxyClient
from .redis.cluster import Router
from .session import Session
from .tokens import Credentials, TokenError, TokenExpired, TokenVerifier

__all__ = ["Hub"]

log = logging.getLogger("hub")

#: Seconds between two batches of 1001 closes while draining.
DRAIN_TICK = 0.05
#: Share of the drain period over which the batches are spread; the rest is for their closing
#: handshakes.
DRAIN_SPREAD = 0.8
#: At least this long (capped by the drain period) between "stop accepting" and the final close,
#: so requests on connections accepted just before are answered, not dropped unread.
DRAIN_GRACE = 0.5
#: Seconds between two copies of the pull-style metrics into the multiprocess files.
METRICS_REFRESH = 1.0


#: Hosts a page of the hub's own may be served from in dev mode (its Origin is checked against
#: the request's Host, which must be one of these: a DNS-rebinding name is not).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


class Hub:
    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        check_serving(settings)
        self.settings = settings
        presence: Presence | None = None
        inbox: Inbox | None = None
        if settings.redis_url:
            if broker is None:
                from .redis.broker import RedisBroker

                broker = RedisBroker(
                    settings.redis_url,
                    settings.redis_prefix,
                    signing_key=settings.redis_signing_key,
                )
            # The same Redis (or cluster, by the URL's scheme) and prefix as the broker.
            presence = RedisPresence(
                settings.redis_url, settings.redis_prefix, settings.presence_ttl
            )
            router = Router.from_url(
                settings.redis_url,
                socket_timeout=5.0,
                socket_connect_timeout=5.0,
                client_name=f"{settings.redis_prefix}-inbox",
            )
            inbox = RedisInbox(
                router,
                settings.redis_prefix,
                settings.inbox_size,
                settings.inbox_ttl,
                signing_key=settings.redis_signing_key,
            )
        self.node = Node(settings, broker, presence=presence, inbox=inbox)
        self.admin: Admin | None = None
        if settings.admin:
            self.admin = self.node.admin = Admin(self.node)
        self.api = HttpApi(
            self.node,
            settings.api_key,
            settings.insecure,
            self.admin,
            metrics_key=settings.metrics_key,
            metrics_elsewhere=bool(settings.metrics_port),
        )
        self.verifier: TokenVerifier | None = None
        if settings.token_secret or settings.token_public_key:
            self.verifier = TokenVerifier(
                settings.token_secret,
                settings.token_public_key,
                settings.token_algorithms,
                require_exp=settings.token_require_exp,
                max_lifetime=settings.token_max_lifetime,
                issuer=settings.token_issuer,
                audience=settings.token_audience,
            )
        self.node.verifier = self.verifier
        if proxy_urls(settings):
            self.node.proxy = ProxyClient(settings, self.node.metrics)
        self.auth_failures = AddressBudget(settings.auth_failures, settings.auth_failure_window)
        self.proxies = [ipaddress.ip_network(n, strict=False) for n in settings.trusted_proxies]
        self.server: ws.Server | None = None
        self.metrics_server: ws.Server | None = None
        self.draining = False
        self._sampler: asyncio.Task[None] | None = None

    async def start(self, capacity: Capacity | None = None, **serve_kwargs: Any) -> ws.Server:
        """Start the node and listen (host/port from settings unless ``sock`` is given).

        With ``capacity`` (``hub.fdlimit.plan()``), listen with its backlog and refuse sockets
        beyond its connections: the process never runs out of descriptors."""
        s = self.settings
        if capacity is not None:
            serve_kwargs.setdefault("backlog", capacity.backlog)
        if s.insecure:
            log.warning(
                "insecure dev mode: anonymous users, no api key; never expose this to a network"
            )
        await self.node.start()
        if self.admin is not None:
            self.admin.start()
        if "sock" not in serve_kwargs:
            serve_kwargs.setdefault("host", s.host)
            serve_kwargs.setdefault("port", s.port)
        self.server = await ws.serve(
            self._handler,
            process_request=self._process_request,
            process_response=self._process_response,
            subprotocols=list(BY_SUBPROTOCOL),
            # Browsers always send Origin; clients that send none are not browsers.
            origins=[*s.allowed_origins, None] if s.allowed_origins else None,
            max_size=s.max_message_size,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            open_timeout=s.handshake_timeout,
            # Pongs, close frames and replies count in the same budget as pushes.
            max_pending=s.outbound_buffer,
            on_max_pending=self.node.fanout.overflowed,
            server_header=None,
            **serve_kwargs,
        )
        server = self.server
        if capacity is not None:
            server.socket_limit = capacity.connections
        metrics = self.node.metrics
        metrics.pull(metrics.connections_refused, lambda: server.refused)
        metrics.pull(metrics.handshake_failures.labels("timeout"), lambda: server.open_timeouts)
        if s.metrics_port:
            await self._serve_metrics()
        if self.node.metrics.multiprocess_dir is not None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_metrics())
        return self.server

    async def _serve_metrics(self) -> None:
        """``/metrics`` on a listener of its own (``metrics_host``:``metrics_port``), e.g. an
        address only the monitoring network reaches. Every worker binds it (``SO_REUSEPORT``):
        with multiprocess metrics any one of them reports the whole server."""
        s = self.settings
        api = self.api

        async def answer(
            connection: ws.ServerConnection, request: ws.Request
        ) -> ws.Response | None:
            if request.path.partition("?")[0] == "/metrics":
                return api.metrics(request)
            return connection.respond(404, "not found\n")

        async def never(connection: ws.ServerConnection) -> None:  # every request is answered
            await connection.close()

        self.metrics_server = await ws.serve(
            never,
            host=s.metrics_host or s.host,
            port=s.metrics_port,
            process_request=answer,
            server_header=None,
            reuse_port=s.workers > 1,
        )

    async def close(self) -> None:
        for server in (self.server, self.metrics_server):
            if server is not None:
                server.close()
                await server.wait_closed()
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if self.admin is not None:
            await self.admin.close()
        await self.node.close()
        if self.node.proxy is not None:
            await self.node.proxy.close()

    async def drain(self, seconds: float | None = None) -> None:
        """Shut down gently (SIGTERM, or the old worker in a rolling restart), then :meth:`close`.

        Stop accepting, answer ``/readyz`` (and new ``/ws`` upgrades on connections accepted
        earlier) with 503, and close the open connections with 1001 in batches spread over
        ``seconds`` (``drain_seconds`` by default): closing them all at once would make every
        client reconnect in the same instant, a thundering herd on the processes that remain.
        ``seconds=0`` closes everything at once, as :meth:`close` does.
        """
        self.draining = True
        server = self.server
        if server is None:
            await self.close()
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        period = max(0.0, self.settings.drain_seconds if seconds is None else seconds)
        # ws.Server.close() would also refuse requests already accepted; stop_accepting() keeps
        # answering those. (In a rolling restart the listening socket is shared with the
        # replacement worker, which goes on accepting from it.)
        server.stop_accepting()
        pending = list(server.connections)
        closing: list[asyncio.Task[None]] = []
        if pending and period > 0:
            steps = max(1, int(period * DRAIN_SPREAD / DRAIN_TICK))
            batch = -(-len(pending) // steps)
            for i in range(0, len(pending), batch):
                if i:
                    await asyncio.sleep(DRAIN_TICK)
                closing += [loop.create_task(_close_quietly(c)) for c in pending[i : i + batch]]
            await asyncio.wait(closing, timeout=max(started + period - loop.time(), DRAIN_TICK))
        grace = min(period, DRAIN_GRACE) - (loop.time() - started)
        if grace > 0:
            await asyncio.sleep(grace)
        await self.close()

    async def _sample_metrics(self) -> None:
        """Multiprocess metrics: keep this worker's share of the gauges current for any scrape."""
        while True:
            self.node.metrics.refresh()
            await asyncio.sleep(METRICS_REFRESH)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    # -- handshake -----------------------------------------------------------------------------

    async def _process_request(
        self, connection: ws.ServerConnection, request: ws.Request
    ) -> ws.Response | None:
        if self.draining:
            path = request.path.partition("?")[0]
            if path == "/readyz":
                return connection.respond(503, "draining\n")
            if path == "/ws":
                return connection.respond(503, "server draining\n")
        response = await self.api.handle(request)
        if response is None:
            return self._admit(connection, request)
        return response

    def _admit(self, connection: ws.ServerConnection, request: ws.Request) -> ws.Response | None:
        """Refuse a WebSocket upgrade the limits do not admit (None: go ahead). No await from
        the count to the answer: every socket, this one included, is already counted, so two
        handshakes can never both take the last place."""
        s, metrics = self.settings, self.node.metrics
        if s.insecure and not s.allowed_origins and not _own_origin(request):
            metrics.handshake_failures.labels("origin").inc()
            return connection.respond(403, "origin not allowed (dev mode: the hub's own page)\n")
        server = self.server
        assert server is not None
        if s.max_connections and server.socket_count > s.max_connections:
            metrics.handshake_failures.labels("connection_limit").inc()
            return connection.respond(503, "connection limit reached\n")
        address = connection.remote_address
        host = address[0] if isinstance(address, tuple) else address
        if s.max_connections_per_ip and server.sockets_from(host) > s.max_connections_per_ip:
            metrics.handshake_failures.labels("ip_connection_limit").inc()
            return _too_many(connection, "too many connections from this address\n", 10)
        failures = self.auth_failures
        if failures.tracking and failures.exhausted(self._source(host, request)):
            metrics.rate_limited.labels("auth").inc()
            return _too_many(connection, "too many failed authentications, retry later\n", 60)
        return None

    def _source(self, host: object, request: ws.Request) -> str:
        """Who a failed authentication is held against: the peer, or behind a trusted proxy the
        address it says it forwards for (the rightmost of X-Forwarded-For not itself a proxy;
        those to its left are whatever the client wrote). Without this, behind nginx every
        client would share the proxy's budget and one guesser could lock out everyone."""
        if not self._trusted(host):
            return address_key(host)
        hops = [h.strip() for v in request.headers.get_all("X-Forwarded-For") for h in v.split(",")]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return address_key(hop)[:64]
        return address_key(host)

    def _trusted(self, host: object) -> bool:
        try:
            ip = ipaddress.ip_address(str(host))
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def _process_response(
        self, connection: ws.ServerConnection, request: ws.Request, response: ws.Response
    ) -> None:
        """Count refused WebSocket handshakes by status (HTTP API answers are not handshakes)."""
        if response.status_code >= 400 and request.path.partition("?")[0] == "/ws":
            self.node.metrics.handshake_failures.labels(str(response.status_code)).inc()

    def _authenticate(self, request: ws.Request) -> Credentials | None:
        """The request's credentials; None: the connect proxy decides (no token was sent)."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        token = (query.get("token") or [None])[0]
        if token is None:
            values = request.headers.get_all("Authorization")
            if len(values) > 1:  # which one to believe? neither
                raise TokenError("more than one authorization header")
            auth = values[0] if values else None
            if auth is not None and auth[:7].lower() == "bearer ":
                token = auth[7:].strip()
        if token is not None and self.verifier is not None:
            return self.verifier.verify(token)
        if token is None and self.settings.connect_proxy:
            return None
        if self.settings.insecure:
            user = (query.get("user") or [None])[0] or f"anonymous-{uuid.uuid4().hex[:12]}"
            return Credentials(user[:200])
        raise TokenError("missing token")

    async def _handler(self, connection: ws.ServerConnection) -> None:
        assert connection.request is not None
        client_id = uuid.uuid4().hex
        channels: list[str] = []
        renew: Callable[[], Awaitable[float | None]] | None = None
        try:
            credentials = self._authenticate(connection.request)
            if credentials is None:
                credentials, channels, renew = await self._ask_backend(connection, client_id)
        except ProxyDisconnect as exc:
            connection.close_now(exc.code, exc.reason)
            return
        except ProxyFailed as exc:
            # The backend is down or broken, not the client: 4004 says retry with backoff.
            self.node.metrics.handshake_failures.labels("connect_proxy").inc()
            connection.close_now(CloseCode.BACKEND_UNAVAILABLE, exc.message[:100])
            return
        except (TokenError, ProxyRefused) as exc:
            # Closed at once (no closing handshake to wait for), and the address's budget of
            # failures pays for it: a guesser soon gets 429 before any token is looked at.
            expired = isinstance(exc, TokenExpired)
            self.node.metrics.handshake_failures.labels(
                "token_expired" if expired else "unauthorized"
            ).inc()
            address = connection.remote_address
            host = address[0] if isinstance(address, tuple) else address
            self.auth_failures.spend(self._source(host, connection.request))
            code = CloseCode.TOKEN_EXPIRED if expired else CloseCode.UNAUTHORIZED
            connection.close_now(code, "token expired" if expired else str(exc)[:100])
            return
        codec = BY_SUBPROTOCOL.get(connection.subprotocol or "", JSON)
        session = Session(self.node, connection, credentials, codec, client_id)
        session.expiry.renew = renew
        session.expiry.set(None, credentials.expires_at)
        path = connection.request.path
        # What the hub needs of the handshake is in the credentials, the session and ``path``
        # now; the request and response (headers and all, about 1.3 KB) would stay as long as
        # the connection, which for most connections is hours of listening.
        connection.request = connection.response = None
        await self.node.add_session(session)
        try:
            if "inbox=" in path:  # the connect option (hub.notify)
                await self.node.inbox.open_on_connect(session, path)
            del path
            channels += backend.server_side_channels(self.settings, credentials)
            await backend.server_side(session, channels)
            await session.run()
        finally:
            session.expiry.close()
            await self.node.remove_session(session)

    async def _ask_backend(
        self, connection: ws.ServerConnection, client_id: str
    ) -> tuple[Credentials, list[str], Callable[[], Awaitable[float | None]]]:
        """A connection without a token, let in (or not) by the connect proxy; and how to ask
        it again before the answer's ``expire_at`` (hub.expiry)."""
        proxy = self.node.proxy
        assert proxy is not None and connection.request is not None
        address = connection.remote_address
        host = str(address[0] if isinstance(address, tuple) else address)
        body = backend.connect_body(connection, self.settings, client_id, host)
        credentials, channels = await backend.connect(proxy, self.settings, body)

        async def renew() -> float | None:
            again, _ = await backend.connect(proxy, self.settings, body)
            if again.user != credentials.user:
                raise ProxyRefused("connect proxy answered another user")
            return again.expires_at

        return credentials, channels, renew


def _own_origin(request: ws.Request) -> bool:
    """Dev mode: a request without Origin (not a browser), or from a page of this hub itself,
    reached by a loopback name: any other site could otherwise act as anyone here."""
    origins = request.headers.get_all("Origin")
    if not origins:
        return True
    host = request.headers.get("Host", "")
    if len(origins) > 1 or not host:
        return False
    name = host if host.endswith("]") or ":" not in host else host.rpartition(":")[0]
    if name not in LOOPBACK_NAMES and not name.startswith("127."):
        return False
    return origins[0] in (f"http://{host}", f"https://{host}")


def _too_many(connection: ws.ServerConnection, text: str, retry_after: int) -> ws.Response:
    response = connection.respond(429, text)
    response.headers["Retry-After"] = str(retry_after)
    return response


async def _close_quietly(connection: ws.ServerConnection) -> None:
    """Close with 1001; a connection that fails meanwhile needs nothing more while draining."""
    try:
        await connection.close(1001, "going away")
    except Exception:
        connection.abort()
