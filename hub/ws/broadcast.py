"""``broadcast()``: one message to many connections, encoded once per wire format.

Uncompressed connections share one frame; deflate connections that agreed to
``server_no_context_takeover`` with the same settings share one compressed frame. Only
connections that keep compression context get a frame of their own.
"""

from __future__ import annotations

from collections.abc import Iterable

from .connection import Data, ServerConnection
from .deflate import compress_message
from .exceptions import ConcurrencyError
from .frames import Opcode, encode_frame
from .protocol import CLOSED, OPEN

__all__ = ["broadcast", "encode_once"]


def broadcast(
    connections: Iterable[ServerConnection], message: Data, raise_exceptions: bool = False
) -> None:
    """Send ``message`` to every open connection without waiting for any of them.

    Connections that are not open are skipped without a word, as websockets does: a set of
    connections always holds some that are closing, and that is not a failure. Connections in
    the middle of sending a fragmented message, or whose transport refuses the write, are
    skipped with a warning on the connection's logger; with ``raise_exceptions`` those two are
    raised together as an ``ExceptionGroup`` instead. Slow connections are not skipped: their
    write buffers grow (the hub applies its own limit).
    """
    if isinstance(message, str):
        opcode, data = Opcode.TEXT, message.encode()
    elif isinstance(message, (bytes, bytearray, memoryview)):
        opcode, data = Opcode.BINARY, bytes(message)
    else:
        raise TypeError("data must be str or bytes-like")

    errors: list[Exception] = []
    frames = encode_once(opcode, data)
    for connection in connections:
        protocol = connection.protocol
        if protocol.state is not OPEN:
            continue
        if connection._fragmented is not None:
            if raise_exceptions:
                errors.append(ConcurrencyError("sending a fragmented message"))
            else:
                connection.logger.warning("skipped broadcast: sending a fragmented message")
            continue
        connection._write(frames.for_connection(connection))
        if protocol.state is CLOSED:  # the transport refused the write
            cause = protocol.close_exc_override
            if raise_exceptions:
                error = RuntimeError("failed to write message")
                error.__cause__ = cause
                errors.append(error)
            else:
                connection.logger.warning(
                    "skipped broadcast: failed to write message: %s: %s",
                    type(cause).__name__,
                    cause,
                )
    if errors:
        raise ExceptionGroup("skipped broadcast", errors)


class encode_once:
    """Frames of one message, built lazily, at most once per wire format."""

    __slots__ = ("_compressed", "_plain", "data", "opcode")

    def __init__(self, opcode: int, data: bytes) -> None:
        self.opcode = opcode
        self.data = data
        self._plain: bytes | None = None
        # Made when a deflate connection first needs it: most messages go out plain only.
        self._compressed: dict[tuple[int, int, int], bytes] | None = None

    def for_connection(self, connection: ServerConnection) -> bytes:
        deflate = connection.protocol.deflate
        if deflate is None or not deflate.should_compress(len(self.data)):
            frame = self._plain
            if frame is None:  # made on first use, shared by every plain recipient
                frame = self._plain = encode_frame(self.opcode, self.data)
            return frame
        key = deflate.wire_key
        if key is None:  # this connection keeps context: it needs its own compression
            return connection.protocol.encode_data(self.opcode, self.data)
        compressed = self._compressed
        if compressed is None:
            compressed = self._compressed = {}
        frame = compressed.get(key)
        if frame is None:
            payload = compress_message(self.data, *key)
            frame = compressed[key] = encode_frame(self.opcode, payload, rsv1=True)
        return frame

    def queue_within(self, connection: ServerConnection, budget: int) -> int:
        """Queue this message's frame on ``connection`` as ``connection.write_frame`` would,
        unless that takes its pending bytes past ``budget`` (a frame always goes to an empty
        buffer). Returns the bytes queued; 0 when the connection is not writable; minus the
        pending bytes with the frame when over the budget, nothing queued (the caller's policy).

        The fan-out's loop to many connections, in one call per connection: the checks of
        ``writable``, :meth:`for_connection` and ``pending_bytes`` without their calls (a
        broadcast to 100,000 pays each of them 100,000 times), then ``write_frame`` itself.
        """
        protocol = connection.protocol
        if protocol.state is not OPEN or connection._fragmented is not None:
            return 0
        frame = self._plain if protocol.deflate is None else None
        if frame is None:
            frame = self.for_connection(connection)
        size = len(frame)
        # pending_bytes, read without its call:
        pending = connection.transport.get_write_buffer_size()
        if connection._wbuf is not None:
            pending += connection._wsize
        if pending and pending + size > budget:
            return -(pending + size)
        connection._write(frame)
        return size
