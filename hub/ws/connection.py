"""The asyncio side of a connection: a thin ``asyncio.Protocol`` over :class:`ServerProtocol`.

Built for fan-out: attributes live in ``__slots__`` and most are created on first use, so an idle
connection stays small; frames written during one event-loop turn go out in one ``write`` call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from .exceptions import ConcurrencyError, ConnectionClosedOK, InvalidState
from .frames import Opcode
from .headers import Headers
from .http11 import Request, Response
from .keepalive import FRAME as KEEPALIVE_FRAME
from .keepalive import PAYLOAD as KEEPALIVE_PAYLOAD
from .protocol import CLOSED, CONNECTING, OPEN, ServerProtocol, State

if TYPE_CHECKING:
    from .server import Server

__all__ = ["ConnectionOptions", "Data", "ServerConnection", "WriteCoalescer", "hold_writes"]

Data = str | bytes
OP_TEXT, OP_BINARY, OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
OP_PING, OP_PONG, OP_CLOSE = Opcode.PING, Opcode.PONG, Opcode.CLOSE
_KEEPALIVE_INT = int.from_bytes(KEEPALIVE_PAYLOAD)
#: struct linger {l_onoff = 1, l_linger = 0}: close() then sends RST and drops the send queue.
_LINGER_RESET = struct.pack("ii", 1, 0)


class WriteCoalescer:
    """Counts event-loop turns and flushes, at the end of a turn, what connections buffered.

    The first frame a connection gets in a turn goes to the kernel at once (lowest latency, and
    no second pass over the connection); frames that follow in the same turn are buffered and
    leave together in one ``send`` when the turn ends. A burst of ten broadcasts in one turn
    costs each recipient two syscalls, not ten.

    A caller that is about to write many frames at once (the hub's fan-out of a burst read
    from Redis) can :meth:`hold` the first-frame shortcut: every frame is buffered until
    :meth:`release`, so a connection that gets several of them costs one ``send``, not two.
    There is one coalescer per event loop, shared by every server on it.
    """

    __slots__ = ("held", "holds", "pending", "scheduled", "turn")

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteCoalescer] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self.pending: list[ServerConnection] = []
        self.scheduled = False
        self.held = False
        self.holds = 0  # nested hold_writes() blocks still open
        self.turn = 0

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> WriteCoalescer:
        """The coalescer of ``loop`` (made on first use)."""
        coalescer = cls._by_loop.get(loop)
        if coalescer is None:
            coalescer = cls._by_loop[loop] = cls()  # holds no reference to the loop
        return coalescer

    def hold(self) -> None:
        """Buffer every frame written from now until :meth:`release`."""
        self.held = True

    def release(self) -> None:
        """Write what was buffered, one ``send`` per connection, and stop holding."""
        self.held = False
        self._write_pending()

    def touch(self) -> None:
        """Make sure this turn ends with a flush (and so with a new turn number)."""
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def add(self, connection: ServerConnection) -> None:
        self.pending.append(connection)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        self.turn += 1
        self._write_pending()

    def _write_pending(self) -> None:
        pending, self.pending = self.pending, []
        for connection in pending:
            connection._flush()


@contextmanager
def hold_writes(loop: asyncio.AbstractEventLoop | None = None) -> Iterator[None]:
    """Buffer every frame written to any connection of ``loop`` (the running one by default)
    inside the block; at its end each connection's frames leave in one ``send``.

    For a caller about to write many frames at once (a fan-out of several messages): a
    connection that gets several of them costs one syscall, not one per frame. Blocks nest; the
    outermost one writes.
    """
    coalescer = WriteCoalescer.of(loop or asyncio.get_running_loop())
    coalescer.holds += 1
    coalescer.hold()
    try:
        yield
    finally:
        coalescer.holds -= 1
        if not coalescer.holds:
            coalescer.release()


class ConnectionOptions:
    """The per-connection settings of ``serve()``: keepalive, close timeout, queue and buffer
    limits.

    Every connection of a server points at the server's one instance; a connection given other
    values (``ServerConnection(..., close_timeout=...)``, ``connection.close_timeout = None``)
    gets its own copy, so the common case costs one pointer per connection.
    """

    __slots__ = (
        "close_timeout",
        "max_pending",
        "max_queue_high",
        "max_queue_low",
        "ping_interval",
        "ping_timeout",
        "read_limit",
        "write_limit_high",
        "write_limit_low",
    )

    def __init__(
        self,
        *,
        ping_interval: float | None = 20,
        ping_timeout: float | None = 20,
        close_timeout: float | None = 10,
        max_queue: int | tuple[int | None, int | None] | None = 16,
        write_limit: int | tuple[int, int | None] = 2**15,
        read_limit: int | None = None,
        max_pending: int | None = None,
    ) -> None:
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        high, low = max_queue if isinstance(max_queue, tuple) else (max_queue, None)
        if low is None and high is not None:
            low = high // 4
        self.max_queue_high = high
        self.max_queue_low = low
        high, low = write_limit if isinstance(write_limit, tuple) else (write_limit, None)
        self.write_limit_high = high
        self.write_limit_low = low
        self.read_limit = read_limit
        self.max_pending = max_pending

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConnectionOptions) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> ConnectionOptions:
        clone = ConnectionOptions.__new__(ConnectionOptions)
        for name in self.__slots__:
            setattr(clone, name, getattr(self, name))
        return clone

    @property
    def max_queue(self) -> tuple[int | None, int | None]:
        return self.max_queue_high, self.max_queue_low


DEFAULT_OPTIONS = ConnectionOptions()
_UNSET: Any = object()


class _Fragments(list):  # type: ignore[type-arg]
    """A fragmented message in the receive queue: its frames so far, in order.

    ``recv()`` waits until ``complete`` and joins them; ``recv_streaming()`` hands each frame out
    as it arrives. An unfragmented message is queued as a plain ``str`` / ``bytes``.
    """

    __slots__ = ("complete",)


class ServerConnection(asyncio.Protocol):
    """A WebSocket connection on the server: what the connection handler receives.

    ``ServerConnection(protocol, server, *, ping_interval=..., ping_timeout=...,
    close_timeout=..., max_queue=..., write_limit=...)`` is how ``serve()`` builds it, so a
    ``create_connection=`` factory can subclass it and pass the arguments through. Options left
    out are the server's. Connections accept attributes of their own (``websocket.user = ...``);
    the attribute dictionary is made on the first one.
    """

    __slots__ = (
        "__dict__",
        "_close_timer",
        "_closed_waiter",
        "_discard",
        "_drain_waiter",
        "_fragmented",
        "_fragments",
        "_id",
        "_ka_bucket",
        "_ka_sent",
        "_messages",
        "_opts",
        "_pings",
        "_queued_size",
        "_reading_paused",
        "_recv_busy",
        "_recv_waiter",
        "_turn",
        "_wbuf",
        "_write_paused",
        "_wsize",
        "latency",
        "protocol",
        "request",
        "response",
        "server",
        "transport",
        "username",
    )

    def __init__(
        self,
        protocol: ServerProtocol,
        server: Server | None = None,
        *,
        ping_interval: float | None = _UNSET,
        ping_timeout: float | None = _UNSET,
        close_timeout: float | None = _UNSET,
        max_queue: int | tuple[int | None, int | None] | None = _UNSET,
        write_limit: int | tuple[int, int | None] = _UNSET,
    ) -> None:
        self.server = server  # type: ignore[assignment]
        self.protocol = protocol
        base = DEFAULT_OPTIONS if server is None else server.options
        given = {
            name: value
            for name, value in (
                ("ping_interval", ping_interval),
                ("ping_timeout", ping_timeout),
                ("close_timeout", close_timeout),
                ("max_queue", max_queue),
                ("write_limit", write_limit),
            )
            if value is not _UNSET
        }
        if given:
            opts = ConnectionOptions(
                ping_interval=given.get("ping_interval", base.ping_interval),
                ping_timeout=given.get("ping_timeout", base.ping_timeout),
                close_timeout=given.get("close_timeout", base.close_timeout),
                max_queue=given.get("max_queue", base.max_queue),
                write_limit=given.get("write_limit", (base.write_limit_high, base.write_limit_low)),
                read_limit=base.read_limit,
                max_pending=base.max_pending,
            )
            self._opts = base if opts == base else opts
        else:
            self._opts = base
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.request: Request | None = None
        self.response: Response | None = None
        self.latency = 0.0
        self.username: str | None = None
        self._id: uuid.UUID | None = None
        # hub.ws.keepalive: the bucket we are pinged from, and when our ping left (0: none waits)
        self._ka_bucket: set[ServerConnection] | None = None
        self._ka_sent = 0.0
        self._close_timer: asyncio.TimerHandle | None = None
        self._messages: deque[Data | _Fragments] | None = None
        self._queued_size = 0  # of the complete messages queued; kept only with read_limit
        self._fragments: _Fragments | None = None
        self._recv_waiter: asyncio.Future[None] | None = None
        self._recv_busy = False
        self._reading_paused = False
        self._discard = False  # after close(): drop what a full queue cannot take
        self._closed_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._pings: dict[bytes, tuple[asyncio.Future[float], float]] | None = None
        self._wbuf: list[bytes] | None = None
        self._wsize = 0
        self._turn = -1  # the coalescer turn of our last direct write
        # Set while a fragmented message is being sent: other sends wait for it (no frame may
        # come between the fragments of a message), broadcast() skips the connection.
        self._fragmented: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<ServerConnection {self.remote_address} {self.state.name}>"

    # -- attributes ----------------------------------------------------------------------------

    @property
    def id(self) -> uuid.UUID:
        if self._id is None:
            self._id = uuid.uuid4()
        return self._id

    @property
    def logger(self) -> logging.LoggerAdapter[Any]:
        """The server's logger, with this connection as ``websocket`` in each record's extras
        (made on use: an idle connection does not hold one)."""
        server = self.server
        base = logging.getLogger("hub.ws.server") if server is None else server.logger
        return logging.LoggerAdapter(base, {"websocket": self})

    def _options(self) -> ConnectionOptions:
        """Our own copy of the options, made the first time one of them is changed."""
        server = self.server
        if self._opts is DEFAULT_OPTIONS or (server is not None and self._opts is server.options):
            self._opts = self._opts.copy()
        return self._opts

    @property
    def close_timeout(self) -> float | None:
        return self._opts.close_timeout

    @close_timeout.setter
    def close_timeout(self, value: float | None) -> None:
        self._options().close_timeout = value

    @property
    def ping_interval(self) -> float | None:
        return self._opts.ping_interval

    @ping_interval.setter
    def ping_interval(self, value: float | None) -> None:
        self._options().ping_interval = value

    @property
    def ping_timeout(self) -> float | None:
        return self._opts.ping_timeout

    @ping_timeout.setter
    def ping_timeout(self, value: float | None) -> None:
        self._options().ping_timeout = value

    @property
    def state(self) -> State:
        return self.protocol.state

    @property
    def path(self) -> str:
        return self.request.path if self.request is not None else ""

    @property
    def request_headers(self) -> Headers:
        return self.request.headers if self.request is not None else Headers()

    @property
    def response_headers(self) -> Headers:
        return self.response.headers if self.response is not None else Headers()

    @property
    def subprotocol(self) -> str | None:
        return self.protocol.subprotocol

    @property
    def remote_address(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("peername")

    @property
    def local_address(self) -> Any:
        return None if self.transport is None else self.transport.get_extra_info("sockname")

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code

    @property
    def close_reason(self) -> str | None:
        return self.protocol.close_reason

    @property
    def closed(self) -> bool:
        return self.protocol.state is CLOSED

    @property
    def open(self) -> bool:
        return self.protocol.state is OPEN

    def respond(self, status: int, text: str) -> Response:
        """Build a plain-text HTTP response for ``process_request`` to return."""
        return self.protocol.reject(status, text)

    async def __aenter__(self) -> ServerConnection:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        """Close with 1000, or 1011 when the block raised."""
        await self.close(1000 if exc_type is None else 1011)

    # -- the sink: pre-encoded frames, for fan-out ---------------------------------------------
    #
    # A fan-out encodes a message once and writes the same bytes to many connections; these are
    # the calls it needs, so nothing outside hub.ws reads a connection's or a protocol's state.

    @property
    def frame_key(self) -> tuple[int, ...] | None:
        """What this connection's data frames can be shared by: connections with equal keys take
        the same bytes for the same message (``()`` uncompressed, else the deflate parameters
        of a ``no_context_takeover`` agreement). None when it keeps compression context: its
        frames are its own (``encode_once.for_connection`` builds them)."""
        deflate = self.protocol.deflate
        return () if deflate is None else deflate.wire_key

    @property
    def pending_bytes(self) -> int:
        """Bytes written to this connection and not yet handed to the kernel: those buffered in
        this turn, and those the transport still holds."""
        transport = self.transport
        # _wsize counts this turn's buffer only while there is one (it is not reset on flush).
        buffered = self._wsize if self._wbuf is not None else 0
        return buffered + (0 if transport is None else transport.get_write_buffer_size())

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_frame` may be called: open, and not in the middle of sending a
        fragmented message."""
        return self.protocol.state is OPEN and self._fragmented is None

    def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection: send a close frame with ``code`` and half-close, without
        waiting for the closing handshake (the close timeout resets a peer that never answers).
        For a peer given up on, from synchronous code. A no-op unless open."""
        if self.protocol.state is OPEN:
            self._fail(code, reason)

    @property
    def closing_code(self) -> int:
        """The close code of whichever side closed first; 1006 when neither sent one."""
        protocol = self.protocol
        rcvd, sent = protocol.close_rcvd, protocol.close_sent
        if rcvd is not None and (sent is None or protocol.close_rcvd_then_sent):
            return rcvd.code
        if sent is not None:
            return sent.code
        return 1006

    def _check_pending(self) -> None:
        """``max_pending``: what the core itself writes (pongs, close frames, ``send()``) counts
        against the same budget as the frames a fan-out writes. Past it, the server's
        ``on_max_pending(connection)`` decides, or the connection fails with 1008. Reading
        pauses long before, at ``write_limit``, so a peer that sends pings and never reads
        cannot make it grow by more than one read's worth of pongs."""
        limit = self._opts.max_pending
        if limit is None or self.protocol.state is not OPEN or self.pending_bytes <= limit:
            return
        hook = None if self.server is None else self.server.on_max_pending
        if hook is None:
            self.fail(1008, "outbound buffer full")
        else:
            hook(self)

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not always an asyncio.Transport subclass (uvloop's are not).
        self.transport = cast(asyncio.Transport, transport)
        opts = self._opts
        transport.set_write_buffer_limits(opts.write_limit_high, opts.write_limit_low)
        server = self.server
        if server is None:
            return  # built by hand, outside a server: nothing to register or time
        server._register(self)
        server._await_handshake(self)  # open_timeout: one timer for all (Server)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        if self._ka_sent and protocol.is_lone_pong(data, _KEEPALIVE_INT):
            self._on_pong(KEEPALIVE_PAYLOAD)  # the keepalive's answer, without the parser
            return
        try:
            protocol.receive_data(data)
            if protocol.events:
                self._process_events()
            if protocol.writes:
                self._send_protocol_data()
                if self._opts.max_pending is not None:
                    self._check_pending()
        except Exception as exc:
            # A bug of ours: drop this connection (its handler sees ConnectionClosedError with
            # the bug as the cause), never the others, and say so in the log.
            self.logger.error("unexpected internal error", exc_info=True)
            protocol.io_failed(exc)
            self.abort()
            return
        if protocol.pending_failure is not None:
            # Let the handler see the messages that came before the bad frame, then fail.
            self.server.loop.call_soon(self._apply_pending_failure)

    def _apply_pending_failure(self) -> None:
        self.protocol.apply_pending_failure()
        self._send_protocol_data()

    def eof_received(self) -> bool:
        self.protocol.receive_eof()
        if self.protocol.events:
            self._process_events()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        protocol = self.protocol
        cause = protocol.close_exc_override
        protocol.receive_eof()
        if exc is not None and cause is None:  # a reset, say: the cause callers see, as there
            protocol.close_exc_override = exc
        protocol.state = CLOSED
        self._wbuf = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        if self._ka_bucket is not None:
            self._ka_bucket.discard(self)
            self._ka_bucket = None
        for waiter in (self._recv_waiter, self._drain_waiter, self._closed_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._closed_waiter is None:
            self._closed_waiter = self.server.loop.create_future()
            self._closed_waiter.set_result(None)
        if self._pings:
            for future, _ in self._pings.values():
                if not future.done():
                    future.set_exception(protocol.close_exc)
                    future.exception()  # nobody may be waiting for a keepalive ping
            self._pings = None
        self.server._unregister(self)

    def pause_writing(self) -> None:
        # Stop reading as well: the core answers pings (and close frames) by itself, so a peer
        # that sends them without reading would grow our write buffer with pongs for ever.
        # Left unread, its data waits in the kernel and TCP pushes back on it.
        self._write_paused = True
        if not self._reading_paused and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._reading_paused and not self.transport.is_closing():
            self.transport.resume_reading()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- incoming events -----------------------------------------------------------------------

    def _process_events(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                self.request = event
                self.server._start_handler(self, event)
                continue
            opcode = event.opcode
            if opcode is OP_TEXT or opcode is OP_BINARY or opcode is OP_CONT:
                if self._discard and self._queue_full():
                    # Sent after our close frame, with the queue full: dropped (RFC 6455
                    # 7.1.2 lets us), since pausing would keep the peer's close frame unread.
                    continue
                fragments = self._fragments
                piece = event.data if event.text is None else event.text
                if fragments is None:
                    if event.fin:
                        self._deliver(piece)
                    else:  # queued now, so recv_streaming() can hand out its frames as they come
                        fragments = self._fragments = _Fragments((piece,))
                        fragments.complete = False
                        self._deliver(fragments)
                else:
                    fragments.append(piece)
                    if event.fin:
                        fragments.complete = True
                        self._fragments = None
                        if self._opts.read_limit is not None:
                            self._queued_size += sum(map(len, fragments))
                            self._maybe_pause_reading()
                    waiter = self._recv_waiter
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
            elif opcode is OP_PONG:
                self._on_pong(event.data)

    def _deliver(self, message: Data | _Fragments) -> None:
        messages = self._messages
        if messages is None:
            messages = self._messages = deque()
        messages.append(message)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        opts = self._opts
        high = opts.max_queue_high
        if (
            high is not None
            and len(messages) >= high
            and not self._reading_paused
            and not self._discard  # closing: read on (and drop) until the peer's close frame
        ):
            self._reading_paused = True
            self.transport.pause_reading()
        if opts.read_limit is not None and type(message) is not _Fragments:
            self._queued_size += len(message)
            self._maybe_pause_reading()

    def _queue_full(self) -> bool:
        """Whether the messages waiting for ``recv()`` reached ``max_queue`` or ``read_limit``."""
        opts = self._opts
        messages = self._messages
        high = opts.max_queue_high
        if high is not None and messages is not None and len(messages) >= high:
            return True
        return opts.read_limit is not None and self._queued_size >= opts.read_limit

    def _maybe_pause_reading(self) -> None:
        """``read_limit``: stop reading while the complete messages waiting for ``recv()`` add
        up to that many bytes (characters for text). A message still arriving is not counted, so
        a message larger than the limit can always complete."""
        limit = self._opts.read_limit
        if (
            limit is not None
            and self._queued_size >= limit
            and not self._reading_paused
            and not self._discard
        ):
            self._reading_paused = True
            self.transport.pause_reading()

    # -- receiving -----------------------------------------------------------------------------

    def _new_recv_waiter(self) -> asyncio.Future[None]:
        """A future set when something new is queued (a message or a frame), or the connection
        ends; the caller clears ``_recv_waiter`` once done with it."""
        if self.protocol.state is CLOSED:
            raise self.protocol.close_exc
        waiter = self._recv_waiter = self.server.loop.create_future()
        return waiter

    async def _wait_for_message(self) -> None:
        """Wait until something new is queued (a message or a frame), or the connection ends."""
        try:
            await self._new_recv_waiter()
        finally:
            self._recv_waiter = None

    def _popleft(self) -> Data | _Fragments:
        messages = self._messages
        assert messages
        message = messages.popleft()
        opts = self._opts
        if opts.read_limit is not None:
            self._queued_size -= (
                sum(map(len, message)) if type(message) is _Fragments else len(message)
            )
        if (
            self._reading_paused
            and (opts.max_queue_high is None or len(messages) <= (opts.max_queue_low or 0))
            and (opts.read_limit is None or self._queued_size <= opts.read_limit // 4)
        ):
            self._reading_paused = False
            if not self._write_paused:
                self.transport.resume_reading()
        if not messages:
            # An empty deque keeps a block of 64 slots (about 600 bytes): most connections of a
            # fan-out send a command or two and then only listen.
            self._messages = None
        return message

    def recv(self, decode: bool | None = None) -> Coroutine[Any, Any, Data]:
        """Receive the next message: ``str`` for text, ``bytes`` for binary.

        ``decode=False`` returns text as UTF-8 bytes, ``decode=True`` decodes binary as UTF-8.
        Cancelling is safe: no message is lost. Raises :class:`ConnectionClosed` at the end.
        (A coroutine, awaited like ``async def recv``; written so that ``async for`` shares it
        and an idle connection waits in one coroutine frame, not three.)
        """
        return self._receive(decode, False)

    def __anext__(self) -> Coroutine[Any, Any, Data]:
        return self._receive(None, True)

    async def _receive(self, decode: bool | None, iterating: bool) -> Data:
        """``recv()``; for ``async for`` (``iterating``), the end on 1000/1001 stops quietly."""
        if self._recv_busy:
            raise ConcurrencyError(
                "cannot call recv while another coroutine is already running recv or recv_streaming"
            )
        messages = self._messages
        while not messages or (type(messages[0]) is _Fragments and not messages[0].complete):
            protocol = self.protocol
            if protocol.state is CLOSED:
                exc = protocol.close_exc
                if iterating and isinstance(exc, ConnectionClosedOK):
                    raise StopAsyncIteration
                try:
                    raise exc
                finally:
                    # The traceback holds this frame: without the local, the frame, the
                    # exception and the connection are no cycle, and go when the caller is done.
                    del exc
            self._recv_busy = True
            waiter = self._recv_waiter = self.server.loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
                self._recv_busy = False
            messages = self._messages
        message = self._popleft()
        if type(message) is _Fragments:
            message = ("" if isinstance(message[0], str) else b"").join(message)
        return message if decode is None else _convert(message, decode)

    async def recv_streaming(self, decode: bool | None = None) -> AsyncIterator[Data]:
        """Receive the next message frame by frame, as each frame arrives.

        Yields ``str`` for text and ``bytes`` for binary (``decode`` converts as in
        :meth:`recv`). Once a frame was handed out, the rest of the message belongs to this
        iterator: if it is cancelled or left early, later calls to ``recv()`` or
        ``recv_streaming()`` raise :class:`ConcurrencyError`.
        """
        if self._recv_busy:
            raise ConcurrencyError(
                "cannot call recv_streaming while another coroutine is already running recv or "
                "recv_streaming"
            )
        self._recv_busy = True
        finished = True  # nothing handed out yet: giving up leaves the connection usable
        try:
            while not self._messages:
                await self._wait_for_message()
            head = self._messages[0]
            if type(head) is not _Fragments:
                self._popleft()
                yield head if decode is None else _convert(head, decode)
                return
            given = 0
            while True:
                while given < len(head):
                    piece = head[given]
                    given += 1
                    finished = False
                    yield piece if decode is None else _convert(piece, decode)
                if head.complete:
                    break
                await self._wait_for_message()
            self._popleft()
            finished = True
        finally:
            # A message half handed out stays this iterator's: later receivers must not see
            # its remaining frames as a message of their own. A closed connection has no more.
            if finished or self.protocol.state is CLOSED:
                self._recv_busy = False

    def __aiter__(self) -> ServerConnection:
        """``async for message in connection``: messages until the connection closes, ending
        quietly on 1000/1001 (raising :class:`ConnectionClosedError` otherwise)."""
        return self

    # -- sending -------------------------------------------------------------------------------

    def _check_sendable(self) -> None:
        state = self.protocol.state
        if state is not OPEN:
            if state is CONNECTING:
                raise InvalidState("connection is not open yet")
            raise self.protocol.close_exc

    def _check_written(self) -> None:
        """Raise :class:`ConnectionClosed` if the write just made failed (see ``_write``)."""
        if self.protocol.state is CLOSED:
            raise self.protocol.close_exc

    async def send(
        self,
        message: Data | Iterable[Data] | AsyncIterable[Data],
        text: bool | None = None,
    ) -> None:
        """Send a message: ``str`` as text, bytes-like as binary, an (async) iterable of either as
        one fragmented message, each fragment sent as soon as it is produced.

        ``text=True`` sends bytes as a text frame (they must be UTF-8), ``text=False`` sends a
        ``str`` as a binary frame. While a fragmented message is being sent, other sends wait
        for it to end: no frame of another message goes between its fragments.
        """
        while self._fragmented is not None:
            await asyncio.shield(self._fragmented)
        # max_pending: one message always goes through to an empty buffer (a big reply).
        before = 0 if self._opts.max_pending is None else self.pending_bytes
        if isinstance(message, str):
            self._check_sendable()
            opcode = OP_BINARY if text is False else OP_TEXT
            self._write(self.protocol.encode_data(opcode, message.encode()))
        elif isinstance(message, (bytes, bytearray, memoryview)):
            self._check_sendable()
            opcode = OP_TEXT if text else OP_BINARY
            self._write(self.protocol.encode_data(opcode, bytes(message)))
        elif isinstance(message, Mapping):
            raise TypeError("data is a dict-like object")
        elif isinstance(message, Iterable):
            await self._send_fragments(_aiter_sync(message), text)
            return
        elif isinstance(message, AsyncIterable):
            await self._send_fragments(aiter(message), text)
            return
        else:
            raise TypeError("data must be str, bytes-like, or an iterable")
        self._check_written()
        if before:
            self._check_pending()
        if self._write_paused:
            await self._drain()

    async def _send_fragments(self, fragments: AsyncIterator[Data], text: bool | None) -> None:
        try:
            piece = await anext(fragments)
        except StopAsyncIteration:
            return
        if isinstance(piece, str):
            is_str = True
        elif isinstance(piece, (bytes, bytearray, memoryview)):
            is_str = False
        else:
            raise TypeError("iterable must contain bytes or str")
        opcode = (
            (OP_BINARY if text is False else OP_TEXT)
            if is_str
            else (OP_TEXT if text else OP_BINARY)
        )
        while self._fragmented is not None:  # another message started while we waited
            await asyncio.shield(self._fragmented)
        self._check_sendable()
        done = self._fragmented = self.server.loop.create_future()
        encode = self.protocol.encode_data
        try:
            while True:
                self._check_sendable()
                self._write(encode(opcode, _to_bytes(piece), False))
                self._check_written()
                opcode = OP_CONT
                if self._write_paused:
                    await self._drain()
                try:
                    piece = await anext(fragments)
                except StopAsyncIteration:
                    break
                if not isinstance(piece, (str, bytes, bytearray, memoryview)) or (
                    isinstance(piece, str) is not is_str
                ):
                    raise TypeError("iterable must contain uniform types")
            # The message ends with an empty final frame, as websockets ends it: each fragment
            # left when it was produced, so the last one is not known to be last until now.
            self._check_sendable()
            self._write(encode(OP_CONT, b"", True))
            self._check_written()
        except BaseException:
            # Half a message is on the wire and cannot be finished: the connection is unusable.
            if self.protocol.state is OPEN:
                self._fail(1011, "error in fragmented message")
            raise
        finally:
            self._fragmented = None
            done.set_result(None)
        if self._write_paused:
            await self._drain()

    async def _drain(self) -> None:
        self._flush()
        while self._write_paused and self.protocol.state is not CLOSED:
            waiter = self._drain_waiter = self.server.loop.create_future()
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self.protocol.state is CLOSED:
            raise self.protocol.close_exc

    async def ping(self, data: Data | None = None) -> asyncio.Future[float]:
        """Send a ping; the returned future resolves to the latency when the pong arrives."""
        if data is not None:
            data = _control_payload(data)
        pings = self._pings
        if pings is None:
            pings = self._pings = {}
        if data is None:
            data = _ping_payload()
            while data in pings or data == KEEPALIVE_PAYLOAD:
                data = _ping_payload()
        elif data in pings or (data == KEEPALIVE_PAYLOAD and self._ka_sent):
            raise ConcurrencyError("already waiting for a pong with the same data")
        self._check_sendable()
        self.protocol.send_ping(data)
        self._send_protocol_data()
        self._check_written()
        self._check_pending()
        loop = self.server.loop
        future: asyncio.Future[float] = loop.create_future()
        pings[data] = (future, loop.time())
        return future

    async def pong(self, data: Data = b"") -> None:
        """Send an unsolicited pong (a one-way heartbeat)."""
        payload = _control_payload(data)
        self._check_sendable()
        self.protocol.send_pong(payload)
        self._send_protocol_data()
        self._check_written()
        self._check_pending()

    def _on_pong(self, data: bytes) -> None:
        # A pong acknowledges its ping and every ping sent before it, keepalive or ours.
        keepalive_sent = self._ka_sent
        if keepalive_sent and data == KEEPALIVE_PAYLOAD:
            self._ka_sent = 0.0
            now = self.server.loop.time()
            self.latency = now - keepalive_sent
            if self._pings:
                self._acknowledge(lambda key, sent_at: sent_at <= keepalive_sent, now)
            return
        pings = self._pings
        if not pings or data not in pings:
            return
        now = self.server.loop.time()
        for key in list(pings):
            future, sent_at = pings.pop(key)
            if not future.done():
                future.set_result(now - sent_at)
            if key == data:
                self.latency = now - sent_at
                if keepalive_sent and keepalive_sent <= sent_at:
                    self._ka_sent = 0.0
                break

    def _acknowledge(self, answered: Any, now: float) -> None:
        """Resolve the pings for which ``answered(data, sent_at)`` holds, with their latency."""
        pings = self._pings
        assert pings is not None
        for key, (future, sent_at) in list(pings.items()):
            if answered(key, sent_at):
                del pings[key]
                if not future.done():
                    future.set_result(now - sent_at)

    # -- closing -------------------------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Perform the closing handshake and wait until the TCP connection is closed."""
        protocol = self.protocol
        if protocol.state is OPEN:
            if self._fragmented is not None:
                protocol.fail(1011, "close during fragmented message")
            else:
                protocol.send_close(code, reason)
            self._send_protocol_data()
            self._arm_close_timer()
            self._discard = True
            if self._reading_paused:  # the peer's close frame may wait behind a full queue
                self._reading_paused = False
                self.transport.resume_reading()
        elif protocol.state is CONNECTING:
            self.transport.close()
        await self.wait_closed()

    def close_now(self, code: int, reason: str = "") -> None:
        """Send a close frame and end the TCP connection without waiting for the peer's: for a
        peer that must not hold the connection a moment longer (refused credentials). It still
        learns why from the close code."""
        if self.protocol.state is OPEN:
            self._fail(code, reason)
        if self.transport is not None and not self.transport.is_closing():
            self._flush()  # what this turn queued (replies, the close frame) goes first
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed, whatever closed it."""
        waiter = self._closed_waiter
        if waiter is None:
            waiter = self._closed_waiter = self.server.loop.create_future()
        await asyncio.shield(waiter)

    def abort(self) -> None:
        """Reset the TCP connection now, dropping whatever is still queued for the peer.

        For a peer the server gives up on (too slow, no pong, no closing handshake). A plain
        close, even ``transport.abort()``, only discards what asyncio buffered: the kernel keeps
        the orphaned socket with its unsent data (up to ``tcp_wmem`` max, 4 MB by default) and
        the FIN behind it, and a peer that stopped reading advertises a zero window, so neither
        leaves while it keeps the window shut. With ``SO_LINGER`` on and a zero timeout,
        ``close`` sends a RST and frees the socket at once; the peer sees the connection reset.
        A no-op once closed.
        """
        transport = self.transport
        if transport is None:
            return
        self._wbuf = None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except (OSError, ValueError):
                pass  # already closed (uvloop's socket says so with ValueError), or not TCP
        transport.abort()

    def _fail(self, code: int, reason: str) -> None:
        self.protocol.fail(code, reason)
        self._send_protocol_data()

    def _arm_close_timer(self) -> None:
        timeout = self._opts.close_timeout
        if self._close_timer is None and timeout is not None and self.protocol.state is not CLOSED:
            self._close_timer = self.server.loop.call_later(timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if self.protocol.state is not CLOSED:
            self.protocol.io_failed(TimeoutError("timed out waiting for the peer to close"))
        # The peer is gone or not reading, and the close frame may sit behind an unread send
        # queue: reset rather than close.
        self.abort()

    def _open_timed_out(self) -> None:
        """Close (a FIN), not reset as :meth:`abort` does: nothing was written to the peer yet
        (answering the request ends its timeout), so no unsent data can keep the orphaned socket
        alive; the kernel forgets it within ``tcp_fin_timeout`` whatever the peer does. The peer
        reads EOF, as from websockets, and the descriptor is freed at once either way."""
        if self.protocol.state is CONNECTING:
            self.logger.debug("opening handshake timed out")
            self._wbuf = None
            self.transport.abort()

    # -- keepalive -----------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        interval = self._opts.ping_interval
        if interval is not None:
            keepalive = self.server._keepalive(interval, self._opts.ping_timeout)
            self._ka_bucket = keepalive.add(self)

    def _keepalive_ping(self, now: float) -> None:
        """Our turn in the keepalive (``hub.ws.keepalive``): the shared ping frame, unless the
        last one is still waiting for its pong."""
        if self._ka_sent or self.protocol.state is not OPEN:
            return
        self._ka_sent = now
        self._write(KEEPALIVE_FRAME)

    def _keepalive_timed_out(self) -> None:
        self._ka_sent = 0.0
        if self.protocol.state is OPEN:
            self.logger.debug("keepalive ping timeout; closing connection")
            self._fail(1011, "keepalive ping timeout")

    # -- writing -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        buf = self._wbuf
        if buf is None:
            coalescer = self.server._coalescer
            if self._turn != coalescer.turn and not coalescer.held:
                # First frame this turn: straight to the kernel.
                self._turn = coalescer.turn
                coalescer.touch()
                transport = self.transport
                if not transport.is_closing():
                    try:
                        transport.write(data)
                    except Exception as exc:
                        self._write_failed(exc)
                return
            self._wbuf = [data]
            self._wsize = len(data)
            coalescer.add(self)
        else:
            buf.append(data)
            self._wsize += len(data)
            if self._wsize >= self._opts.write_limit_high:
                self._flush()

    #: ``write_frame(frame)``: queue complete frame bytes (``encode_once.for_connection``), never
    #: waiting; the first frame of a turn goes to the kernel at once, later ones leave together
    #: at the turn's end (or the end of a :func:`hold_writes` block). Only while
    #: :attr:`writable`; the caller keeps its own limit on :attr:`pending_bytes`, since a slow
    #: reader's buffer grows otherwise. The same function as the core's own writes, so a
    #: fan-out pays no extra call per recipient.
    write_frame = _write

    def _flush(self) -> None:
        buf = self._wbuf
        if buf is None:
            return
        self._wbuf = None
        transport = self.transport
        if transport.is_closing():
            return
        try:
            transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
        except Exception as exc:
            self._write_failed(exc)
        # From here the coalescer's entry for us is stale; the next _write registers again.

    def _write_failed(self, exc: Exception) -> None:
        """The transport refused a write (e.g. after ``write_eof()``): nothing more can be sent,
        so the connection is closed at once, with ``exc`` as the cause callers see."""
        if self.protocol.state is not CLOSED:
            self.logger.debug("! error while sending data", exc_info=exc)
            self.protocol.io_failed(exc)
        self.abort()

    def _send_protocol_data(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self._write(data)
            else:
                self._write_eof()

    def _write_eof(self) -> None:
        self._flush()
        transport = self.transport
        if transport.is_closing():
            return
        if self.protocol.state is CONNECTING or self.protocol.handshake_exc is not None:
            transport.close()  # an HTTP answer: flush it and hang up
        elif transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                # A reset that arrived after the close frame left but before the half-close
                # (ENOTCONN): the peer is gone, there is nothing left to say to it.
                transport.abort()
                return
            self._arm_close_timer()
        else:
            transport.close()


async def _aiter_sync(iterable: Iterable[Data]) -> AsyncIterator[Data]:
    for item in iterable:
        yield item


def _to_bytes(data: Data) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)


def _convert(message: Data, decode: bool) -> Data:
    """``decode=True``: bytes become str; ``decode=False``: str becomes bytes."""
    if decode and isinstance(message, bytes):
        return message.decode()
    if not decode and isinstance(message, str):
        return message.encode()
    return message


def _ping_payload() -> bytes:
    """Four random bytes to tell our pings apart (not a secret: ``random`` is enough)."""
    return random.getrandbits(32).to_bytes(4, "big")


def _control_payload(data: Data) -> bytes:
    """The payload of a ping or pong: ``str`` is encoded, anything else must be bytes-like."""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise TypeError("data must be str or bytes-like")
