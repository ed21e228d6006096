"""A byte buffer that generator-based parsers read from.

Parsers are written top-down as generators: ``data = yield from reader.read_exact(n)``. When the
buffer holds too little, the reader yields and the protocol resumes the parser after the next
``feed_data``. This keeps parsing free of I/O and makes every split of the input equivalent.
"""

from __future__ import annotations

from collections.abc import Generator

__all__ = ["StreamReader"]


class StreamReader:
    __slots__ = ("buffer", "eof")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.eof = False

    def feed_data(self, data: bytes) -> None:
        if self.eof:
            raise EOFError("stream ended")
        self.buffer += data

    def feed_eof(self) -> None:
        self.eof = True

    def at_eof(self) -> Generator[None, None, bool]:
        """True once the buffer is empty and the stream ended; waits while it cannot tell."""
        while True:
            if self.buffer:
                return False
            if self.eof:
                return True
            yield

    def read_line(self, limit: int) -> Generator[None, None, bytes]:
        """Read up to and including ``\\n``; raise :class:`LineTooLong` past ``limit`` bytes."""
        start = 0
        while True:
            n = self.buffer.find(b"\n", start) + 1
            if n > 0:
                break
            start = len(self.buffer)
            if start > limit:
                raise LineTooLong(limit)
            if self.eof:
                raise EOFError(f"stream ends after {start} bytes, before end of line")
            yield
        if n > limit:
            raise LineTooLong(limit)
        line = bytes(self.buffer[:n])
        del self.buffer[:n]
        return line

    def read_exact(self, n: int) -> Generator[None, None, bytes]:
        """Read exactly ``n`` bytes."""
        while len(self.buffer) < n:
            if self.eof:
                raise EOFError(f"stream ends after {len(self.buffer)} bytes, expected {n} bytes")
            yield
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read_available(self, n: int) -> Generator[None, None, bytes]:
        """Read between 1 and ``n`` bytes: whatever is buffered, waiting only when nothing is."""
        while not self.buffer:
            if self.eof:
                raise EOFError(f"stream ends, expected {n} more bytes")
            yield
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def discard(self) -> None:
        self.buffer.clear()


class LineTooLong(ValueError):
    """A line exceeds its limit; the HTTP layer maps it to 414 or 431."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"line longer than {limit} bytes")
        self.limit = limit
