"""``serve()`` and :class:`Server`: accept TCP connections, run the opening handshake, hand each
connection to the handler, and shut down cleanly."""

from __future__ import annotations

import asyncio
import http
import inspect
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, cast

from .connection import ConnectionOptions, ServerConnection, WriteCoalescer
from .deflate import ServerPerMessageDeflateFactory
from .exceptions import ConnectionClosed
from .headers import Headers, HeadersLike
from .http11 import Limits, Request, Response
from .keepalive import Keepalive, KeepaliveKey
from .legacy import WebSocketServerProtocol, overrides_select
from .protocol import CONNECTING, OPEN, ServerProtocol

__all__ = ["Server", "WebSocketServer", "WebSocketServerProtocol", "serve", "unix_serve"]

VERSION = "0.1"
USER_AGENT = f"Python/{sys.version_info.major}.{sys.version_info.minor} hub.ws/{VERSION}"

Handler = Callable[..., Awaitable[Any]]
ProcessRequest = Callable[..., Any]
ProcessResponse = Callable[[ServerConnection, Request, Response], Any]


def _takes_legacy_path(func: Callable[..., Any]) -> bool:
    """True for the older ``(path, request_headers)`` hook signature (first parameter ``path``)."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "path"


def _handler_wants_path(handler: Handler) -> bool:
    """True for the older two-argument handler ``(websocket, path)``."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 2


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


_NONE = object()
#: Sockets past ``socket_limit`` that may wait for their 503 at once; beyond, they are reset.
OVER_LIMIT_WAITING = 32
#: Seconds between two log lines saying the server is at its socket limit.
OVER_LIMIT_LOG_EVERY = 60.0


class Server:
    """A running WebSocket server: what ``await serve(...)`` returns."""

    def __init__(
        self,
        handler: Handler,
        *,
        origins: Sequence[str | None] | None,
        extensions: Sequence[ServerPerMessageDeflateFactory],
        subprotocols: Sequence[str] | None,
        select_subprotocol: Callable[[ServerConnection, Sequence[str]], str | None] | None,
        process_request: ProcessRequest | None,
        process_response: ProcessResponse | None,
        extra_headers: HeadersLike | Callable[..., HeadersLike] | None,
        server_header: str | None,
        open_timeout: float | None,
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float | None,
        max_size: int | None,
        max_queue: int | tuple[int | None, int | None] | None,
        write_limit: int | tuple[int, int | None],
        read_limit: int | None,
        limits: Limits | None,
        logger: logging.Logger | logging.LoggerAdapter | None,
        create_connection: type[ServerConnection] | Callable[..., ServerConnection] | None,
        max_pending: int | None = None,
        on_max_pending: Callable[[ServerConnection], None] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self._handler_path = _handler_wants_path(handler)
        auth = getattr(handler, "_hub_process_request", None)  # set by @basic_auth(...)
        # Which calling convention each hook uses is decided once here, not per handshake.
        self.process_requests = [
            (p, _takes_legacy_path(p)) for p in (auth, process_request) if p is not None
        ]
        self.process_response = process_response
        self.origins = origins
        self.extensions = list(extensions)
        self.subprotocols = subprotocols
        self.select_subprotocol = select_subprotocol
        self.extra_headers = extra_headers
        self._extra_legacy = callable(extra_headers) and _takes_legacy_path(extra_headers)
        self.server_header = server_header
        self.open_timeout = open_timeout
        self.max_size = max_size
        # What every connection reads its keepalive, timeouts and limits from (one shared object).
        self.options = ConnectionOptions(
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            max_queue=max_queue,
            write_limit=write_limit,
            read_limit=read_limit,
            max_pending=max_pending,
        )
        #: Called when a connection's own writes take it past ``max_pending`` (see
        #: ``ServerConnection._check_pending``); None fails it with 1008.
        self.on_max_pending = on_max_pending
        self.create_connection = create_connection
        self.limits = limits or Limits()
        self.logger = logger or logging.getLogger("hub.ws.server")
        self._coalescer = WriteCoalescer.of(self.loop)
        # One keepalive timer per (ping_interval, ping_timeout) in use, for all connections.
        self._keepalives: dict[KeepaliveKey, Keepalive] = {}
        self._server: asyncio.Server | None = None
        self._all: set[ServerConnection] = set()
        self._handlers: set[asyncio.Task[None]] = set()  # running connection handlers
        self._hosts: dict[ServerConnection, object] = {}
        self._per_host: dict[object, int] = {}
        # Sockets beyond this many are refused: their request gets a 503, or, while
        # OVER_LIMIT_WAITING of them already wait for theirs, they are reset at once. The owner
        # sets it from the descriptors it can spare (hub.fdlimit); None: no limit.
        self.socket_limit: int | None = None
        self.refused = 0  # sockets refused for socket_limit, for a metric
        self.open_timeouts = 0  # connections dropped for open_timeout, for a metric
        self._over: set[ServerConnection] = set()
        # open_timeout: the deadline of each connection still in its opening handshake, oldest
        # first (one timeout for all: insertion order is deadline order), and one timer at the
        # first deadline instead of a timer per connection.
        self._opening: dict[ServerConnection, float] = {}
        self._opening_timer: asyncio.TimerHandle | None = None
        self._over_logged = float("-inf")
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None
        self._drained: asyncio.Event | None = None

    # -- connection lifecycle ------------------------------------------------------------------

    def _new_connection(self) -> ServerConnection:
        user_select = self.select_subprotocol
        select = None
        if user_select is not None:

            def select(protocol: ServerProtocol, subprotocols: Sequence[str]) -> str | None:
                return user_select(connection, subprotocols)

        protocol = ServerProtocol(
            origins=self.origins,
            extensions=self.extensions,
            subprotocols=self.subprotocols,
            select_subprotocol=select,
            max_size=self.max_size,
            limits=self.limits,
            logger=self.logger,
            defer_failures=True,
        )
        factory = self.create_connection
        if factory is None:
            connection = ServerConnection(protocol, self)
        else:  # called as websockets calls it, so a subclass can pass the options through
            opts = self.options
            connection = factory(
                protocol,
                self,
                ping_interval=opts.ping_interval,
                ping_timeout=opts.ping_timeout,
                close_timeout=opts.close_timeout,
                max_queue=opts.max_queue,
                write_limit=(opts.write_limit_high, opts.write_limit_low),
            )
            if overrides_select(connection):
                legacy = cast(WebSocketServerProtocol, connection)
                available = list(self.subprotocols or ())

                def select(protocol: ServerProtocol, subprotocols: Sequence[str]) -> str | None:
                    return legacy.select_subprotocol(subprotocols, available)

                protocol._select = select
        return connection

    def _keepalive(self, interval: float, timeout: float | None) -> Keepalive:
        """The keepalive that pings this server's connections with these settings."""
        return Keepalive.of(self._keepalives, self.loop, interval, timeout)

    def _register(self, connection: ServerConnection) -> None:
        limit = self.socket_limit
        over = limit is not None and len(self._all) >= limit
        self._all.add(connection)
        address = connection.remote_address
        host = address[0] if isinstance(address, tuple) else address
        self._hosts[connection] = host
        self._per_host[host] = self._per_host.get(host, 0) + 1
        if over:
            self._refuse(connection)

    def _refuse(self, connection: ServerConnection) -> None:
        """A socket past ``socket_limit``: answered 503 once its request is read (a client
        told why, not reset under its request), unless too many already wait for that."""
        self.refused += 1
        now = self.loop.time()
        if now - self._over_logged >= OVER_LIMIT_LOG_EVERY:
            self._over_logged = now
            self.logger.warning(
                "at the limit of %d sockets: refusing new connections", self.socket_limit
            )
        if len(self._over) >= OVER_LIMIT_WAITING:
            connection.abort()
        else:
            self._over.add(connection)

    def _await_handshake(self, connection: ServerConnection) -> None:
        """Start ``connection``'s open_timeout."""
        if self.open_timeout is None:
            return
        deadline = self.loop.time() + self.open_timeout
        self._opening[connection] = deadline
        if self._opening_timer is None:
            self._opening_timer = self.loop.call_at(deadline, self._open_timeouts)

    def _open_timeouts(self) -> None:
        """Drop the connections whose opening handshake outlived open_timeout."""
        self._opening_timer = None
        opening = self._opening
        now = self.loop.time()
        while opening:
            connection, deadline = next(iter(opening.items()))
            if deadline > now:
                self._opening_timer = self.loop.call_at(deadline, self._open_timeouts)
                return
            del opening[connection]
            self.open_timeouts += 1
            connection._open_timed_out()

    def _unregister(self, connection: ServerConnection) -> None:
        self._all.discard(connection)
        self._over.discard(connection)
        self._opening.pop(connection, None)
        host = self._hosts.pop(connection, _NONE)
        if host is not _NONE:
            left = self._per_host[host] - 1
            if left:
                self._per_host[host] = left
            else:
                del self._per_host[host]

    def _start_handler(self, connection: ServerConnection, request: Request) -> None:
        """Run the handshake and the handler of a connection whose request just arrived.

        The task is kept until it ends, so that :meth:`wait_closed` waits for handlers that
        outlive their connection (one that sleeps after ``close()``, for instance)."""
        # The task leaves the set in its own ``finally`` (a done callback would cost every
        # connection a callback list for its whole life).
        self._handlers.add(self.loop.create_task(self._run(connection, request)))

    async def _handshake(self, connection: ServerConnection, request: Request) -> Response:
        protocol = connection.protocol
        if self._closing:
            return protocol.reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down.\n")
        if connection in self._over:
            return protocol.reject(503, "connection limit reached\n")
        result = None
        if isinstance(connection, WebSocketServerProtocol):  # the older API's overridable hook
            result = await _maybe_await(connection.process_request(request.path, request.headers))
        for hook, legacy in self.process_requests:
            if result is not None:
                break
            if legacy:
                result = await _maybe_await(hook(request.path, request.headers))
            else:
                result = await _maybe_await(hook(connection, request))
        if result is not None:
            response = result if isinstance(result, Response) else Response.build(*result)
        else:
            response = protocol.accept(request)
        if self._closing and response.status_code == 101:
            return protocol.reject(http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down.\n")

        headers = response.headers
        if self.server_header is not None and "Server" not in headers:
            headers["Server"] = self.server_header
        extra = self.extra_headers
        if extra is not None:
            if callable(extra):
                if self._extra_legacy:
                    extra = extra(request.path, request.headers)
                else:
                    extra = extra(connection, request)
            for name, value in Headers(extra).raw_items():  # type: ignore[arg-type]
                if name.lower() == "server" and "Server" in headers:
                    del headers["Server"]
                headers[name] = value
        if self.process_response is not None:
            replaced = await _maybe_await(self.process_response(connection, request, response))
            if replaced is not None:
                response = replaced
        return response

    async def _run(self, connection: ServerConnection, request: Request) -> None:
        """Run one connection: handshake, then the handler, then the closing handshake."""
        try:
            protocol = connection.protocol
            try:
                response = await self._handshake(connection, request)
            except Exception:
                self.logger.error("opening handshake failed", exc_info=True)
                response = protocol.reject(
                    http.HTTPStatus.INTERNAL_SERVER_ERROR,
                    "failed to open a websocket connection.\n"
                    "see server log for more information.\n",
                )
            if connection.transport.is_closing() or protocol.state is not CONNECTING:
                return  # timed out or the client went away while we decided
            connection.response = response
            protocol.send_response(response)
            self._opening.pop(connection, None)
            connection._send_protocol_data()
            if protocol.state is not OPEN:
                return
            if protocol.events:  # frames that arrived right behind the request
                connection._process_events()
            connection._start_keepalive()
            path = request.path if self._handler_path else None
            # This frame lasts as long as the connection: it must not hold the handshake, which
            # the connection keeps as long as the application lets it (``connection.request``).
            del request, response
            try:
                if path is not None:
                    await self.handler(connection, path)
                else:
                    await self.handler(connection)
            except ConnectionClosed as exc:
                # The peer went away while the handler used the connection: not a server error.
                if self.logger.isEnabledFor(logging.DEBUG):
                    self.logger.debug("connection handler ended: %s", exc)
                code = 1000
            except Exception:
                self.logger.error("connection handler failed", exc_info=True)
                code = 1011
            else:
                code = 1000
            try:
                await connection.close(code)
            except Exception:
                self.logger.error("closing handshake failed", exc_info=True)
                connection.abort()
        finally:
            self._handlers.discard(asyncio.current_task())  # type: ignore[arg-type]

    # -- public API ----------------------------------------------------------------------------

    @property
    def connections(self) -> set[ServerConnection]:
        """Open connections (the opening handshake is complete, the closing one not started)."""
        return {c for c in self._all if c.protocol.state is OPEN}

    websockets = connections

    @property
    def socket_count(self) -> int:
        """Every TCP connection this server holds, whatever its state (opening handshake, plain
        HTTP, open, closing): what a connection limit must count, since each costs memory and a
        file descriptor. It includes the connection whose request is being decided."""
        return len(self._all)

    def sockets_from(self, host: object) -> int:
        """How many of :attr:`socket_count` come from ``host`` (the peer address's host part)."""
        return self._per_host.get(host, 0)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._server is None else tuple(self._server.sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def start_serving(self) -> None:
        assert self._server is not None
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve_forever()
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    def stop_accepting(self) -> None:
        """Close the listening sockets only: requests on connections already accepted are still
        answered and open connections stay open (for a graceful drain)."""
        if self._server is not None:
            self._server.close()

    def close(self, close_connections: bool = True) -> asyncio.Task[None]:
        """Stop accepting connections; close open ones with 1001 unless told not to.

        Handshakes still in flight are answered with HTTP 503. Returns a task, so both
        ``server.close()`` and ``await server.close()`` work.
        """
        if self._close_task is None:
            self._close_task = self.loop.create_task(self._close(close_connections))
        return self._close_task

    async def _close(self, close_connections: bool) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        # A connection that has sent nothing yet is dropped; one with part of a request gets its
        # 503 when the rest arrives (within open_timeout).
        for connection in list(self._all):
            protocol = connection.protocol
            if (
                protocol.state is CONNECTING
                and not protocol.reader.buffer
                and not connection.request
            ):
                connection.transport.close()
        if close_connections:
            open_connections = [c for c in self._all if c.protocol.state is OPEN]
            if open_connections:
                await asyncio.gather(
                    *(c.close(1001) for c in open_connections), return_exceptions=True
                )
        if self._server is not None:
            await self._server.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the server is closed, all TCP connections ended and all handlers returned."""
        if self._close_task is not None:
            await asyncio.shield(self._close_task)
        elif self._server is not None:
            await self._server.wait_closed()
        while True:
            tasks = [task for task in self._handlers if not task.done()]
            waiters = [c.wait_closed() for c in self._all]
            if not tasks and not waiters:
                break
            await asyncio.gather(*tasks, *waiters, return_exceptions=True)
        await asyncio.sleep(0)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


WebSocketServer = Server  # the older API's name for it


class serve:
    """Start a WebSocket server; await it for a :class:`Server`, or use it with ``async with``.

    Keyword arguments not listed are passed to ``loop.create_server`` (``sock``, ``ssl``,
    ``reuse_port``, ``backlog``, ``family``, ``start_serving``...).
    """

    def __init__(
        self,
        handler: Handler,
        host: str | Sequence[str] | None = None,
        port: int | None = None,
        *,
        origins: Sequence[str | None] | None = None,
        extensions: Sequence[ServerPerMessageDeflateFactory] | None = None,
        compression: str | None = "deflate",
        subprotocols: Sequence[str] | None = None,
        select_subprotocol: Callable[[ServerConnection, Sequence[str]], str | None] | None = None,
        process_request: ProcessRequest | None = None,
        process_response: ProcessResponse | None = None,
        extra_headers: HeadersLike | Callable[..., HeadersLike] | None = None,
        server_header: str | None = USER_AGENT,
        open_timeout: float | None = 10,
        ping_interval: float | None = 20,
        ping_timeout: float | None = 20,
        close_timeout: float | None = 10,
        max_size: int | None = 2**20,
        max_queue: int | tuple[int | None, int | None] | None = 16,
        write_limit: int | tuple[int, int | None] = 2**15,
        read_limit: int | None = None,
        limits: Limits | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        create_connection: type[ServerConnection] | Callable[..., ServerConnection] | None = None,
        create_protocol: type[ServerConnection] | Callable[..., ServerConnection] | None = None,
        max_pending: int | None = None,
        on_max_pending: Callable[[ServerConnection], None] | None = None,
        unix: bool = False,
        path: str | None = None,
        **kwargs: Any,
    ) -> None:
        if compression == "deflate":
            exts = list(extensions or [])
            if not any(isinstance(e, ServerPerMessageDeflateFactory) for e in exts):
                exts.append(ServerPerMessageDeflateFactory())
        elif compression is None:
            exts = list(extensions or [])
        else:
            raise ValueError(f"unsupported compression: {compression}")
        if subprotocols is not None:
            _check_subprotocols(subprotocols)
        if create_protocol is not None:  # the older API's name for the same factory
            if create_connection is not None:
                raise TypeError("create_protocol and create_connection are the same; pass one")
            create_connection = create_protocol
        if kwargs.get("ssl") is not None:
            # The TLS handshake is part of opening, the TLS shutdown part of closing: bound
            # them like the rest (asyncio would wait 60 s / 30 s).
            kwargs.setdefault("ssl_handshake_timeout", open_timeout)
            kwargs.setdefault("ssl_shutdown_timeout", close_timeout)
        self._options = dict(
            origins=origins,
            extensions=exts,
            subprotocols=subprotocols,
            select_subprotocol=select_subprotocol,
            process_request=process_request,
            process_response=process_response,
            extra_headers=extra_headers,
            server_header=server_header,
            open_timeout=open_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            close_timeout=close_timeout,
            max_size=max_size,
            max_queue=max_queue,
            write_limit=write_limit,
            read_limit=read_limit,
            limits=limits,
            logger=logger,
            create_connection=create_connection,
            max_pending=max_pending,
            on_max_pending=on_max_pending,
        )
        self._handler = handler
        self._host, self._port, self._unix, self._path = host, port, unix, path
        self._kwargs = kwargs
        self._server: Server | None = None

    async def _create(self) -> Server:
        server = Server(self._handler, **self._options)  # type: ignore[arg-type]
        loop = server.loop
        if self._unix:
            aserver = await loop.create_unix_server(
                server._new_connection, self._path, **self._kwargs
            )
        else:
            aserver = await loop.create_server(
                server._new_connection, self._host, self._port, **self._kwargs
            )
        server._server = aserver
        self._server = server
        return server

    def __await__(self) -> Generator[Any, None, Server]:
        return self._create().__await__()

    async def __aenter__(self) -> Server:
        return await self._create()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def _check_subprotocols(subprotocols: object) -> None:
    """``subprotocols`` must be a list of names: a lone string would match by substring."""
    if isinstance(subprotocols, str):
        raise TypeError("subprotocols must be a list, not a str")
    if not isinstance(subprotocols, Sequence):
        raise TypeError("subprotocols must be a list")


def unix_serve(handler: Handler, path: str | None = None, **kwargs: Any) -> serve:
    """Like :func:`serve`, on a Unix socket at ``path``."""
    return serve(handler, unix=True, path=path, **kwargs)
