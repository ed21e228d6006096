"""The asyncio side of a connection: a thin ``asyncio.Protocol`` over :class:`ServerProtocol`.

Built for fan-out: attributes live in ``__slots__`` and most are created on first use, so an idle
connection stays small; frames written during one event-loop turn go out in one ``write`` call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

from .exceptions import ConcurrencyError, ConnectionClosedOK, InvalidState
from .frames import Opcode
from .headers import Headers
from .http11 import Request, Response
from .protocol import CLOSED, CONNECTING, OPEN, ServerProtocol, State

if TYPE_CHECKING:
    from .server import Server

__all__ = ["Data", "ServerConnection", "WriteCoalescer"]

Data = str | bytes
OP_TEXT, OP_BINARY, OP_CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
OP_PING, OP_PONG, OP_CLOSE = Opcode.PING, Opcode.PONG, Opcode.CLOSE
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

    __slots__ = ("held", "pending", "scheduled", "turn")

    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteCoalescer] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self) -> None:
        self.pending: list[ServerConnection] = []
        self.scheduled = False
        self.held = False
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


class ServerConnection(asyncio.Protocol):
    """A WebSocket connection on the server: what the connection handler receives."""

    __slots__ = (
        "_close_timer",
        "_closed_waiter",
        "_drain_waiter",
        "_fragments",
        "_id",
        "_messages",
        "_pings",
        "_reading_paused",
        "_recv_busy",
        "_recv_waiter",
        "_sending_fragments",
        "_task",
        "_timer",
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

    def __init__(self, server: Server, protocol: ServerProtocol) -> None:
        self.server = server
        self.protocol = protocol
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.request: Request | None = None
        self.response: Response | None = None
        self.latency = 0.0
        self.username: str | None = None
        self._id: uuid.UUID | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # open timeout, then keepalive
        self._close_timer: asyncio.TimerHandle | None = None
        self._messages: deque[Data] | None = None
        self._fragments: list[Any] | None = None
        self._recv_waiter: asyncio.Future[None] | None = None
        self._recv_busy = False
        self._reading_paused = False
        self._closed_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._pings: dict[bytes, tuple[asyncio.Future[float], float]] | None = None
        self._wbuf: list[bytes] | None = None
        self._wsize = 0
        self._turn = -1  # the coalescer turn of our last direct write
        self._sending_fragments = False

    def __repr__(self) -> str:
        return f"<ServerConnection {self.remote_address} {self.state.name}>"

    # -- attributes ----------------------------------------------------------------------------

    @property
    def id(self) -> uuid.UUID:
        if self._id is None:
            self._id = uuid.uuid4()
        return self._id

    @property
    def logger(self) -> logging.Logger | logging.LoggerAdapter:
        return self.server.logger

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

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport; not always an asyncio.Transport subclass (uvloop's are not).
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        transport.set_write_buffer_limits(server.write_limit)
        server._register(self)
        if server.open_timeout is not None:
            self._timer = server.loop.call_later(server.open_timeout, self._open_timed_out)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        if protocol.events:
            self._process_events()
        if protocol.writes:
            self._send_protocol_data()
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
        protocol.receive_eof()
        protocol.state = CLOSED
        self._wbuf = None
        for timer in (self._timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._timer = self._close_timer = None
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
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- incoming events -----------------------------------------------------------------------

    def _process_events(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                self.request = event
                self._task = self.server.loop.create_task(self.server._run(self, event))
                continue
            opcode = event.opcode
            if opcode is OP_TEXT or opcode is OP_BINARY or opcode is OP_CONT:
                fragments = self._fragments
                piece = event.data if event.text is None else event.text
                if event.fin and fragments is None:
                    self._deliver(piece)
                elif fragments is None:
                    self._fragments = [piece]
                else:
                    if piece:
                        fragments.append(piece)
                    if event.fin:
                        self._fragments = None
                        self._deliver(("" if isinstance(piece, str) else b"").join(fragments))
            elif opcode is OP_PONG:
                self._on_pong(event.data)

    def _deliver(self, message: Data) -> None:
        messages = self._messages
        if messages is None:
            messages = self._messages = deque()
        messages.append(message)
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        high = self.server.max_queue_high
        if high is not None and len(messages) >= high and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    # -- receiving -----------------------------------------------------------------------------

    async def recv(self, decode: bool | None = None) -> Data:
        """Receive the next message: ``str`` for text, ``bytes`` for binary.

        ``decode=False`` returns text as UTF-8 bytes, ``decode=True`` decodes binary as UTF-8.
        Cancelling is safe: no message is lost. Raises :class:`ConnectionClosed` at the end.
        """
        if self._recv_busy:
            raise ConcurrencyError(
                "cannot call recv while another coroutine is already running recv"
            )
        messages = self._messages
        while not messages:
            if self.protocol.state is CLOSED:
                raise self.protocol.close_exc
            self._recv_busy = True
            waiter = self._recv_waiter = self.server.loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
                self._recv_busy = False
            messages = self._messages
        message = messages.popleft()
        if self._reading_paused and len(messages) <= self.server.max_queue_low:
            self._reading_paused = False
            self.transport.resume_reading()
        if decode is None:
            return message
        if decode and isinstance(message, bytes):
            return message.decode()
        if not decode and isinstance(message, str):
            return message.encode()
        return message

    def __aiter__(self) -> AsyncIterator[Data]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Data]:
        """Yield messages until the connection closes; end quietly on 1000/1001."""
        try:
            while True:
                yield await self.recv()
        except ConnectionClosedOK:
            return

    # -- sending -------------------------------------------------------------------------------

    def _check_sendable(self) -> None:
        state = self.protocol.state
        if state is not OPEN:
            if state is CONNECTING:
                raise InvalidState("connection is not open yet")
            raise self.protocol.close_exc

    async def send(self, message: Data | Iterable[Data] | AsyncIterable[Data]) -> None:
        """Send a message: ``str`` as text, bytes-like as binary, an (async) iterable of either as
        one fragmented message."""
        if isinstance(message, str):
            self._check_sendable()
            self._write(self.protocol.encode_data(OP_TEXT, message.encode()))
        elif isinstance(message, (bytes, bytearray, memoryview)):
            self._check_sendable()
            self._write(self.protocol.encode_data(OP_BINARY, bytes(message)))
        elif isinstance(message, Mapping):
            raise TypeError("data is a dict-like object")
        elif isinstance(message, Iterable):
            await self._send_fragments(_aiter_sync(message))
        elif isinstance(message, AsyncIterable):
            await self._send_fragments(aiter(message))
        else:
            raise TypeError("data must be str, bytes-like, or an iterable")
        if self._write_paused:
            await self._drain()

    async def _send_fragments(self, fragments: AsyncIterator[Data]) -> None:
        if self._sending_fragments:
            raise ConcurrencyError("cannot send while another coroutine sends a fragmented message")
        try:
            first = await anext(fragments)
        except StopAsyncIteration:
            return
        if isinstance(first, str):
            opcode, text = OP_TEXT, True
        elif isinstance(first, (bytes, bytearray, memoryview)):
            opcode, text = OP_BINARY, False
        else:
            raise TypeError("iterable must contain bytes or str")
        self._check_sendable()
        self._sending_fragments = True
        encode = self.protocol.encode_data
        pending: Data = first
        try:
            async for fragment in fragments:
                if isinstance(fragment, str) != text:
                    raise TypeError("iterable must contain uniform types")
                self._check_sendable()
                self._write(encode(opcode, _to_bytes(pending), False))
                opcode = OP_CONT
                pending = fragment
                if self._write_paused:
                    await self._drain()
            self._check_sendable()
            self._write(encode(opcode, _to_bytes(pending), True))
        except TypeError:
            self._fail(1011, "error in fragmented message")
            raise
        finally:
            self._sending_fragments = False

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
        if isinstance(data, str):
            data = data.encode()
        pings = self._pings
        if pings is None:
            pings = self._pings = {}
        if data is None:
            data = os.urandom(4)
            while data in pings:
                data = os.urandom(4)
        elif data in pings:
            raise ConcurrencyError("already waiting for a pong with the same data")
        self._check_sendable()
        self.protocol.send_ping(bytes(data))
        self._send_protocol_data()
        loop = self.server.loop
        future: asyncio.Future[float] = loop.create_future()
        pings[bytes(data)] = (future, loop.time())
        return future

    async def pong(self, data: Data = b"") -> None:
        """Send an unsolicited pong (a one-way heartbeat)."""
        self._check_sendable()
        self.protocol.send_pong(data.encode() if isinstance(data, str) else bytes(data))
        self._send_protocol_data()

    def _on_pong(self, data: bytes) -> None:
        pings = self._pings
        if not pings or data not in pings:
            return
        now = self.server.loop.time()
        # A pong acknowledges its ping and every ping sent before it.
        for key in list(pings):
            future, sent_at = pings.pop(key)
            if not future.done():
                future.set_result(now - sent_at)
            if key == data:
                self.latency = now - sent_at
                break

    # -- closing -------------------------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Perform the closing handshake and wait until the TCP connection is closed."""
        protocol = self.protocol
        if protocol.state is OPEN:
            if self._sending_fragments:
                protocol.fail(1011, "close during fragmented message")
            else:
                protocol.send_close(code, reason)
            self._send_protocol_data()
            self._arm_close_timer()
        elif protocol.state is CONNECTING:
            self.transport.close()
        await self.wait_closed()

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
        timeout = self.server.close_timeout
        if self._close_timer is None and timeout is not None:
            self._close_timer = self.server.loop.call_later(timeout, self._abort)

    def _abort(self) -> None:
        # The closing handshake did not finish within close_timeout: the peer is gone or not
        # reading, and the close frame may sit behind an unread send queue.
        self._close_timer = None
        self.abort()

    def _open_timed_out(self) -> None:
        self._timer = None
        if self.protocol.state is CONNECTING:
            self.logger.debug("opening handshake timed out")
            self.abort()

    # -- keepalive -----------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        interval = self.server.ping_interval
        if interval is not None:
            self._timer = self.server.loop.call_later(interval, self._keepalive)

    def _keepalive(self) -> None:
        self._timer = None
        if self.protocol.state is not OPEN:
            return
        pings = self._pings
        if pings is None:
            pings = self._pings = {}
        data = os.urandom(4)
        loop = self.server.loop
        future: asyncio.Future[float] = loop.create_future()
        pings[data] = (future, loop.time())
        self.protocol.send_ping(data)
        self._send_protocol_data()
        server = self.server
        if server.ping_timeout is not None:
            self._timer = loop.call_later(server.ping_timeout, self._keepalive_timed_out, future)
        future.add_done_callback(self._keepalive_answered)

    def _keepalive_answered(self, future: asyncio.Future[float]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.protocol.state is OPEN:
            interval = self.server.ping_interval
            assert interval is not None
            delay = max(interval - future.result(), 0.0)
            self._timer = self.server.loop.call_later(delay, self._keepalive)

    def _keepalive_timed_out(self, future: asyncio.Future[float]) -> None:
        self._timer = None
        if not future.done() and self.protocol.state is OPEN:
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
                    transport.write(data)
                return
            self._wbuf = [data]
            self._wsize = len(data)
            coalescer.add(self)
        else:
            buf.append(data)
            self._wsize += len(data)
            if self._wsize >= self.server.write_limit:
                self._flush()

    def _flush(self) -> None:
        buf = self._wbuf
        if buf is None:
            return
        self._wbuf = None
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
        # From here the coalescer's entry for us is stale; the next _write registers again.

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
            transport.write_eof()
            self._arm_close_timer()
        else:
            transport.close()


async def _aiter_sync(iterable: Iterable[Data]) -> AsyncIterator[Data]:
    for item in iterable:
        yield item


def _to_bytes(data: Data) -> bytes:
    return data.encode() if isinstance(data, str) else bytes(data)
