"""The sans-I/O WebSocket server: bytes in, events and bytes out. No sockets, no asyncio.

Feed received bytes with :meth:`ServerProtocol.receive_data`, collect parsed requests and frames
with :meth:`events_received`, answer the handshake with :meth:`accept` / :meth:`reject` and
:meth:`send_response`, send with ``send_*``, and write out :meth:`data_to_send` (an empty bytes
object there means "half-close the connection"). Parsing is a generator that reads top-down;
:meth:`_step` is the one place where protocol errors become close codes.
"""

from __future__ import annotations

import base64
import codecs
import enum
import hashlib
import http
import logging
from collections.abc import Callable, Generator, Sequence
from typing import Any

from .deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from .exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidHeader,
    InvalidMethod,
    InvalidOrigin,
    InvalidState,
    InvalidUpgrade,
    InvalidUTF8,
    InvalidVersion,
    InvalidWebSocketVersion,
    NegotiationError,
    PayloadTooBig,
    ProtocolError,
)
from .frames import (
    CTRL_OPCODES,
    Close,
    CloseCode,
    Frame,
    Opcode,
    apply_mask,
    encode_frame,
    is_valid_close_code,
    read_header,
)
from .headers import Headers, build_extensions, parse_extensions, parse_tokens, parse_upgrade
from .http11 import Limits, Request, Response, parse_request
from .streams import StreamReader

__all__ = ["Event", "ServerProtocol", "State", "accept_key"]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Event = Request | Frame

OP_CONT, OP_TEXT, OP_BINARY = Opcode.CONT, Opcode.TEXT, Opcode.BINARY
OP_CLOSE, OP_PING, OP_PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class State(enum.IntEnum):
    CONNECTING = 0
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


CONNECTING, OPEN, CLOSING, CLOSED = State.CONNECTING, State.OPEN, State.CLOSING, State.CLOSED


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def _values(headers: Headers, name: str, parse: Callable[[str, str], list[Any]]) -> list[Any]:
    """All items of a list-valued header, across repeated header lines."""
    return [item for value in headers.get_all(name) for item in parse(value, name)]


def _invalid_utf8(exc: UnicodeDecodeError, offset: int = 0) -> InvalidUTF8:
    """The close reason for bad UTF-8, worded as websockets words it ("invalid start byte at
    position 2"): the decoder's own reason and where in the frame's data it failed."""
    return InvalidUTF8(f"{exc.reason} at position {offset + exc.start}")


SelectSubprotocol = Callable[["ServerProtocol", Sequence[str]], "str | None"]


class ServerProtocol:
    """A WebSocket server connection's protocol state, from the first request byte to EOF."""

    __slots__ = (
        "_msg_compressed",
        "_msg_decoder",
        "_msg_opcode",
        "_msg_size",
        "_out_compressed",
        "_select",
        "available_extensions",
        "available_subprotocols",
        "between_frames",
        "close_exc_override",
        "close_rcvd",
        "close_rcvd_then_sent",
        "close_sent",
        "debug",
        "defer_failures",
        "deflate",
        "eof_sent",
        "events",
        "handshake_exc",
        "limits",
        "logger",
        "max_size",
        "origins",
        "parser",
        "pending_failure",
        "reader",
        "state",
        "subprotocol",
        "writes",
    )

    def __init__(
        self,
        *,
        origins: Sequence[str | None] | None = None,
        extensions: Sequence[ServerPerMessageDeflateFactory] | None = None,
        subprotocols: Sequence[str] | None = None,
        select_subprotocol: SelectSubprotocol | None = None,
        state: State = CONNECTING,
        max_size: int | None = 2**20,
        limits: Limits | None = None,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        defer_failures: bool = False,
    ) -> None:
        self.origins = origins
        self.available_extensions = extensions or []
        self.available_subprotocols = subprotocols
        self._select = select_subprotocol
        self.state = state
        self.max_size = max_size
        self.limits = limits or Limits()
        self.logger = logger or logging.getLogger("hub.ws.server")
        self.debug = self.logger.isEnabledFor(logging.DEBUG)

        self.reader = StreamReader()
        self.between_frames = False  # the parser waits for the first byte of a frame
        self.events: list[Event] = []
        self.writes: list[bytes] = []
        self.eof_sent = False

        self.deflate: PerMessageDeflate | None = None
        self.subprotocol: str | None = None
        self.handshake_exc: Exception | None = None

        self.close_rcvd: Close | None = None
        self.close_sent: Close | None = None
        self.close_rcvd_then_sent: bool | None = None
        self.close_exc_override: Exception | None = None
        # With defer_failures, a protocol error found right behind complete messages waits here
        # until the I/O layer calls apply_pending_failure(), so the application can answer those
        # messages first (what a peer expects when it pipelines a message and a bad frame).
        self.defer_failures = defer_failures
        self.pending_failure: tuple[int, str] | None = None

        # Incoming message being assembled (opcode of its first frame, compressed, size so far).
        self._msg_opcode: Opcode | None = None
        self._msg_compressed = False
        self._msg_size = 0
        self._msg_decoder: codecs.IncrementalDecoder | None = None
        self._out_compressed = False

        self.parser: Generator[None, None, None] | None = self._parse()
        self._step()

    # -- public state --------------------------------------------------------------------------

    @property
    def close_code(self) -> int | None:
        if self.state is not CLOSED:
            return None
        return CloseCode.ABNORMAL_CLOSURE if self.close_rcvd is None else self.close_rcvd.code

    @property
    def close_reason(self) -> str | None:
        if self.state is not CLOSED:
            return None
        return "" if self.close_rcvd is None else self.close_rcvd.reason

    @property
    def extensions(self) -> list[PerMessageDeflate]:
        """Extensions in use (permessage-deflate is the only one there is)."""
        return [] if self.deflate is None else [self.deflate]

    @property
    def close_exc(self) -> ConnectionClosed:
        """The exception to raise when the connection is used after closing."""
        rcvd, sent = self.close_rcvd, self.close_sent
        ok = (
            rcvd is not None
            and sent is not None
            and rcvd.code in (1000, 1001)
            and sent.code in (1000, 1001)
        )
        cls = ConnectionClosedOK if ok else ConnectionClosedError
        exc = cls(rcvd, sent, self.close_rcvd_then_sent)
        exc.__cause__ = self.close_exc_override
        return exc

    # -- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the network."""
        if self.reader.eof or self.parser is None:
            return  # after a failure or a close frame, input is discarded unread
        self.reader.buffer += data
        self._step()

    def is_lone_pong(self, data: bytes, payload: int) -> bool:
        """Whether ``data`` is exactly one masked pong whose 4-byte payload is ``payload`` (big
        endian), arriving between frames of an open connection. Such a pong changes no state
        here (it is only an event): an I/O layer may take it without running the parser, which
        is what an idle connection receives most (the answers to keepalive pings)."""
        return (
            len(data) == 10
            and data[0] == 0x8A  # FIN, no RSV bit, pong
            and data[1] == 0x84  # masked, 4 bytes
            and self.between_frames
            and self.state is OPEN
            and not self.reader.buffer
            and int.from_bytes(data[2:6]) ^ int.from_bytes(data[6:10]) == payload
        )

    def receive_eof(self) -> None:
        """The peer closed its side of the TCP connection."""
        if self.reader.eof:
            return
        self.reader.feed_eof()
        self._step()
        self.state = CLOSED
        self.parser = None

    def io_failed(self, exc: BaseException) -> None:
        """The I/O layer gave up on the connection (a write failed, a timeout fired, a bug).

        ``exc`` becomes the cause of the :class:`ConnectionClosed` raised from here on; nothing is
        parsed or sent any more, and the connection counts as closed at once (the transport is
        being aborted, so no close frame can follow).
        """
        if self.close_exc_override is None:
            self.close_exc_override = exc
        self.state = CLOSED
        self.parser = None
        self.reader.discard()
        self.reader.feed_eof()
        self.writes = []
        self.eof_sent = True

    def events_received(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def data_to_send(self) -> list[bytes]:
        writes, self.writes = self.writes, []
        return writes

    def close_expected(self) -> bool:
        """True when the peer should close the TCP connection soon (the I/O layer may time it)."""
        return self.state is CLOSING or self.handshake_exc is not None

    # -- handshake -----------------------------------------------------------------------------

    def accept(self, request: Request) -> Response:
        """Validate a handshake request and build the 101 answer (or an error response)."""
        try:
            key, extensions_header, protocol_header = self._process_request(request)
        except InvalidHandshake as exc:
            self.handshake_exc = exc
            if self.debug:
                self.logger.debug("! invalid handshake", exc_info=True)
            response = self.reject(exc.status, f"failed to open a websocket connection: {exc}.\n")
            if exc.status == http.HTTPStatus.UPGRADE_REQUIRED:
                response.headers["Upgrade"] = "websocket"
            elif isinstance(exc, InvalidWebSocketVersion):
                response.headers["Sec-WebSocket-Version"] = "13"
            elif isinstance(exc, InvalidMethod):
                response.headers["Allow"] = "GET"
            return response
        except Exception as exc:
            self.handshake_exc = exc
            self.logger.error("opening handshake failed", exc_info=True)
            return self.reject(
                http.HTTPStatus.INTERNAL_SERVER_ERROR,
                "failed to open a websocket connection.\nsee server log for more information.\n",
            )
        headers = Headers()
        headers["Upgrade"] = "websocket"
        headers["Connection"] = "Upgrade"
        headers["Sec-WebSocket-Accept"] = accept_key(key)
        if extensions_header is not None:
            headers["Sec-WebSocket-Extensions"] = extensions_header
        if protocol_header is not None:
            headers["Sec-WebSocket-Protocol"] = protocol_header
        return Response(101, "Switching Protocols", headers)

    def _process_request(self, request: Request) -> tuple[str, str | None, str | None]:
        if request.method != "GET":
            raise InvalidMethod(f"method {request.method} not allowed")
        if request.version != "HTTP/1.1":
            raise InvalidVersion(f"unsupported http version: {request.version}")
        headers = request.headers

        upgrade = _values(headers, "Upgrade", parse_upgrade)
        if not any(u.lower() == "websocket" for u in upgrade):
            raise InvalidUpgrade("Upgrade", ", ".join(upgrade) if upgrade else None)
        connection = _values(headers, "Connection", parse_tokens)
        if not any(c.lower() == "upgrade" for c in connection):
            raise InvalidUpgrade("Connection", ", ".join(connection) if connection else None)

        keys = headers.get_all("Sec-WebSocket-Key")
        if len(keys) != 1:
            raise InvalidHeader("Sec-WebSocket-Key", None if not keys else "multiple values")
        key = keys[0]
        try:
            raw_key = base64.b64decode(key.encode(), validate=True)
        except ValueError:
            raise InvalidHeader("Sec-WebSocket-Key", key)
        if len(raw_key) != 16:
            raise InvalidHeader("Sec-WebSocket-Key", key)

        versions = headers.get_all("Sec-WebSocket-Version")
        if len(versions) != 1:
            raise InvalidWebSocketVersion(
                "Sec-WebSocket-Version", None if not versions else "multiple values"
            )
        if versions[0].strip() != "13":
            raise InvalidWebSocketVersion("Sec-WebSocket-Version", versions[0])

        if self.origins is not None:
            origins = headers.get_all("Origin")
            if len(origins) > 1:
                raise InvalidOrigin("multiple values")
            origin = origins[0] if origins else None
            if origin not in self.origins:
                raise InvalidOrigin(origin)

        extensions_header = self._negotiate_extensions(headers)
        protocol_header = self._negotiate_subprotocol(headers)
        return key, extensions_header, protocol_header

    def _negotiate_extensions(self, headers: Headers) -> str | None:
        offers = _values(headers, "Sec-WebSocket-Extensions", parse_extensions)
        if not offers or not self.available_extensions:
            return None
        accepted: list[tuple[str, list[tuple[str, str | None]]]] = []
        extensions: list[PerMessageDeflate] = []
        for name, params in offers:
            for factory in self.available_extensions:
                if factory.name != name:
                    continue
                try:
                    response_params, extension = factory.accept(params, extensions)
                except NegotiationError:
                    continue
                accepted.append((name, response_params))
                extensions.append(extension)
                break
        if not accepted:
            return None
        self.deflate = extensions[0]
        return build_extensions(accepted)

    def _negotiate_subprotocol(self, headers: Headers) -> str | None:
        offered = _values(headers, "Sec-WebSocket-Protocol", parse_tokens)
        select = self._select
        self.subprotocol = (
            self.select_subprotocol(offered) if select is None else select(self, offered)
        )
        return self.subprotocol

    def select_subprotocol(self, subprotocols: Sequence[str]) -> str | None:
        """Default choice: the client's most preferred subprotocol that the server supports.

        Without server subprotocols, none is selected; when the client offers some and none is
        supported, the handshake fails with 400 rather than silently speaking another protocol.
        """
        if not self.available_subprotocols or not subprotocols:
            return None
        for subprotocol in subprotocols:
            if subprotocol in self.available_subprotocols:
                return subprotocol
        expected = ", ".join(self.available_subprotocols)
        raise NegotiationError(f"no supported subprotocol; expected one of {expected}")

    def reject(self, status: int | http.HTTPStatus, text: str) -> Response:
        """Build an HTTP error response with a plain-text body."""
        body = text.encode()
        headers = Headers()
        headers["Connection"] = "close"
        headers["Content-Length"] = str(len(body))
        headers["Content-Type"] = "text/plain; charset=utf-8"
        return Response(int(status), "", headers, body)

    def send_response(self, response: Response) -> None:
        """Send the handshake answer. A 101 opens the connection; anything else ends it."""
        if self.state is not CONNECTING:
            raise InvalidState(f"cannot send a response in state {self.state.name}")
        if response.status_code == 101:
            self.writes.append(response.serialize())
            self.state = OPEN
            self._step()  # frames the client sent early were buffered while we decided
        else:
            if "Content-Length" not in response.headers:
                response.headers["Content-Length"] = str(len(response.body))
            if "Connection" not in response.headers:
                response.headers["Connection"] = "close"
            self.writes.append(response.serialize())
            if self.handshake_exc is None:
                self.handshake_exc = InvalidHandshake(f"rejected with http {response.status_code}")
            self.send_eof()
            self.reader.discard()
            self.parser = None

    # -- sending frames ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state is not OPEN:
            raise InvalidState(f"connection is {self.state.name.lower()}")

    def send_text(self, data: bytes, fin: bool = True) -> None:
        self._check_open()
        self._send_data(OP_TEXT, data, fin)

    def send_binary(self, data: bytes, fin: bool = True) -> None:
        self._check_open()
        self._send_data(OP_BINARY, data, fin)

    def send_continuation(self, data: bytes, fin: bool) -> None:
        self._check_open()
        self._send_data(OP_CONT, data, fin)

    def _send_data(self, opcode: Opcode, data: bytes, fin: bool) -> None:
        self.writes.append(self.encode_data(opcode, data, fin))

    def encode_data(self, opcode: int, data: bytes, fin: bool = True) -> bytes:
        """Serialise a data frame for this connection (compressing when negotiated)."""
        deflate = self.deflate
        if deflate is None:
            return encode_frame(opcode, data, fin=fin)
        if opcode != OP_CONT:  # first frame decides whether the message is compressed
            self._out_compressed = deflate.should_compress(len(data)) or not fin
        if not self._out_compressed:
            return encode_frame(opcode, data, fin=fin)
        whole = opcode != OP_CONT and fin
        return encode_frame(
            opcode, deflate.compress(data, fin, whole), fin=fin, rsv1=opcode != OP_CONT
        )

    def send_ping(self, data: bytes) -> None:
        if self.state is not OPEN and self.state is not CLOSING:
            raise InvalidState(f"connection is {self.state.name.lower()}")
        self.writes.append(encode_frame(OP_PING, data))

    def send_pong(self, data: bytes) -> None:
        if self.state is not OPEN and self.state is not CLOSING:
            raise InvalidState(f"connection is {self.state.name.lower()}")
        self.writes.append(encode_frame(OP_PONG, data))

    def send_close(self, code: int | None = None, reason: str = "") -> None:
        """Start the closing handshake."""
        self._check_open()
        if code is None:
            if reason:
                raise ProtocolError("cannot send a reason without a code")
            close = Close(CloseCode.NO_STATUS_RCVD)
        else:
            if not is_valid_close_code(code):
                raise ProtocolError(f"invalid close code {code}")
            close = Close(code, reason)
            if len(close.serialize()) > 125:
                raise ProtocolError("close reason too long")
        self.writes.append(encode_frame(OP_CLOSE, close.serialize()))
        self.close_sent = close
        self.state = CLOSING

    def fail(self, code: int, reason: str = "") -> None:
        """Fail the connection: send a close frame if still possible, then end the TCP stream."""
        if self.state is OPEN:
            close = Close(code, reason)
            if len(close.serialize()) > 125:
                close = Close(code, reason.encode()[:120].decode(errors="ignore"))
            self.writes.append(encode_frame(OP_CLOSE, close.serialize()))
            self.close_sent = close
            self.state = CLOSING
        if not self.eof_sent:
            self.send_eof()
        self.reader.discard()
        self.parser = None

    def send_eof(self) -> None:
        if not self.eof_sent:
            self.eof_sent = True
            self.writes.append(b"")

    # -- parsing -------------------------------------------------------------------------------

    def _step(self) -> None:
        """Advance the parser; the one place that turns errors into close codes."""
        parser = self.parser
        if parser is None:
            return
        try:
            next(parser)
        except StopIteration:
            self.parser = None
        except InvalidHandshake as exc:
            self.parser = None
            self.handshake_exc = exc
            if self.debug:
                self.logger.debug("! invalid request", exc_info=True)
            if isinstance(exc.__cause__, EOFError):  # closed before a full request: no answer
                self.send_eof()
                return
            response = self.reject(exc.status, f"invalid http request: {exc}.\n")
            self.send_response(response)
        except EOFError as exc:  # TCP ended mid-frame or without a closing handshake
            self.parser = None
            # Kept without its traceback, which says nothing here and whose frames hold this
            # protocol and its connection: a cycle that only the collector would free.
            self.close_exc_override = exc.with_traceback(None)
            self.send_eof()
        except InvalidUTF8 as exc:
            self._fail_with(CloseCode.INVALID_DATA, exc)
        except ProtocolError as exc:
            self._fail_with(CloseCode.PROTOCOL_ERROR, exc)
        except PayloadTooBig as exc:
            self._fail_with(CloseCode.MESSAGE_TOO_BIG, exc)
        except Exception as exc:
            self.logger.error("parser failed", exc_info=True)
            self._fail_with(CloseCode.INTERNAL_ERROR, exc)

    def _fail_with(self, code: int, exc: Exception) -> None:
        if self.debug:
            self.logger.debug("! failing connection with code %d: %s", code, exc)
        self.close_exc_override = exc
        if self.defer_failures and self.state is OPEN and self.events:
            self.pending_failure = (code, str(exc))
            self.reader.discard()
            self.parser = None
            return
        self.fail(code, str(exc))

    def apply_pending_failure(self) -> None:
        """Fail the connection for a protocol error that was deferred (see ``defer_failures``)."""
        pending = self.pending_failure
        if pending is not None:
            self.pending_failure = None
            self.fail(*pending)

    def _parse(self) -> Generator[None, None, None]:
        reader = self.reader
        if self.state is CONNECTING:
            # Not in a local: this generator lives as long as the connection.
            self.events.append((yield from parse_request(reader, self.limits)))
            while self.state is CONNECTING:  # until accepted: keep early bytes buffered
                yield
        while True:
            self.between_frames = True
            at_eof = yield from reader.at_eof()
            self.between_frames = False
            if at_eof:
                if self.state is OPEN or self.close_rcvd is None:
                    raise EOFError("connection closed without a closing handshake")
                return
            frame = yield from self._read_frame()
            if frame.opcode is not OP_CLOSE:
                self.events.append(frame)
            else:
                self._on_close(frame)
                # Nothing may follow a close frame; drop whatever does.
                while True:
                    reader.discard()
                    if (yield from reader.at_eof()):
                        return

    def _read_frame(self) -> Generator[None, None, Frame]:
        reader = self.reader
        max_size = self.max_size
        remaining = None if max_size is None else max_size - self._msg_size
        h = yield from read_header(reader, expect_mask=True, max_size=None)
        opcode = h.opcode

        # Validate reserved bits and message sequencing before reading the payload.
        if h.rsv2 or h.rsv3:
            raise ProtocolError("reserved bits must be 0")
        if opcode in CTRL_OPCODES:
            if h.rsv1:
                raise ProtocolError("reserved bits must be 0")
            data = yield from reader.read_exact(h.length)
            assert h.mask is not None
            data = apply_mask(data, h.mask)
            if opcode is OP_PING and self.state is OPEN:
                self.send_pong(data)  # RFC 6455 5.5.2: answer with the same payload
            return Frame(opcode, data)  # a close frame is handled by the parse loop

        if opcode is OP_CONT:
            if self._msg_opcode is None:
                raise ProtocolError("unexpected continuation frame")
            if h.rsv1:
                raise ProtocolError("reserved bits must be 0")
        else:
            if self._msg_opcode is not None:
                raise ProtocolError("expected a continuation frame")
            if h.rsv1 and self.deflate is None:
                raise ProtocolError("reserved bits must be 0")
            self._msg_opcode = opcode
            self._msg_compressed = h.rsv1
            self._msg_size = 0
            remaining = max_size
            if opcode is OP_TEXT:
                self._msg_decoder = _utf8_decoder()

        compressed = self._msg_compressed
        # Deflate never grows data by more than a few bytes per 16 KiB block, so a compressed
        # frame far larger than the limit is refused from its header too.
        slack = (remaining >> 10) + 64 if compressed and remaining is not None else 0
        if remaining is not None and h.length > remaining + slack:
            raise PayloadTooBig(
                f"message of at least {self._msg_size + h.length} bytes exceeds limit of "
                f"{max_size} bytes"
            )
        decoder = self._msg_decoder
        assert h.mask is not None
        if decoder is not None and not compressed and len(reader.buffer) < h.length:
            # Validate text as it trickles in, so invalid UTF-8 fails before the frame ends.
            data, text = yield from self._read_text_streaming(h.length, h.mask, decoder, h.fin)
        else:
            data = apply_mask((yield from reader.read_exact(h.length)), h.mask)
            if compressed:
                data = self.deflate.decompress(data, h.fin, remaining)  # type: ignore[union-attr]
            text = None
            if decoder is not None:
                try:
                    text = decoder.decode(data, h.fin)
                except UnicodeDecodeError as exc:
                    raise _invalid_utf8(exc)
        self._msg_size += len(data)
        if h.fin:
            self._msg_opcode = None
            self._msg_decoder = None
        return Frame(opcode, data, h.fin, text=text)

    def _read_text_streaming(
        self, length: int, mask: bytes, decoder: codecs.IncrementalDecoder, fin: bool
    ) -> Generator[None, None, tuple[bytes, str]]:
        reader = self.reader
        chunks: list[bytes] = []
        texts: list[str] = []
        got = 0
        while got < length:
            chunk = apply_mask((yield from reader.read_available(length - got)), mask, got)
            got += len(chunk)
            try:
                texts.append(decoder.decode(chunk, fin and got == length))
            except UnicodeDecodeError as exc:
                raise _invalid_utf8(exc, got - len(chunk))
            chunks.append(chunk)
        return b"".join(chunks), "".join(texts)

    def _on_close(self, frame: Frame) -> None:
        self.close_rcvd = Close.parse(frame.data)
        self.events.append(frame)
        if self.state is OPEN:
            # Echo the code (RFC 6455 5.5.1), then the server closes the TCP connection first.
            self.close_rcvd_then_sent = True
            close = self.close_rcvd
            self.close_sent = close
            self.writes.append(encode_frame(OP_CLOSE, close.serialize()))
            self.state = CLOSING
        elif self.close_rcvd_then_sent is None:
            self.close_rcvd_then_sent = False
        self.send_eof()
