"""Just enough HTTP/1.1 for a WebSocket server: parse a request (with limits), build a response.

Requests with a ``Content-Length`` body are read too, so a process_request hook can serve a small
HTTP API on the same port without a second HTTP stack.
"""

from __future__ import annotations

import http
import re
from collections.abc import Generator
from dataclasses import dataclass, field

from .exceptions import InvalidMessage, InvalidVersion, SecurityError
from .headers import COMMON_NAMES, Headers, HeadersLike
from .streams import LineTooLong, StreamReader

__all__ = ["Limits", "Request", "Response", "parse_request"]


@dataclass(slots=True, frozen=True)
class Limits:
    """Bounds on what a client may send before the handshake completes."""

    max_line: int = 8192  # request line and each header line (414 / 431 past it)
    max_headers: int = 128  # number of header lines (431 past it)
    max_header_bytes: int = 16384  # all header lines together (431 past it)
    max_body: int = 1 << 20  # Content-Length of a request body (413 past it)


@dataclass(slots=True)
class Request:
    """An HTTP request. ``path`` is the request target (path and query string)."""

    path: str
    headers: Headers
    method: str = "GET"
    version: str = "HTTP/1.1"
    body: bytes = b""


_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}


@dataclass(slots=True)
class Response:
    """An HTTP response. ``Response(403, "Forbidden", b"no")`` (body third) is accepted as a
    shorthand, the way the ``websockets`` examples write it."""

    status_code: int
    reason_phrase: str = ""
    headers: Headers = field(default_factory=Headers)
    body: bytes = b""

    def __post_init__(self) -> None:
        self.status_code = int(self.status_code)
        if isinstance(self.headers, (bytes, bytearray, memoryview)):
            self.headers, self.body = Headers(), bytes(self.headers)
        elif not isinstance(self.headers, Headers):
            self.headers = Headers(self.headers)
        if isinstance(self.body, str):
            self.body = self.body.encode()
        if not self.reason_phrase:
            self.reason_phrase = _PHRASES.get(self.status_code, "")

    @classmethod
    def build(
        cls, status: int | http.HTTPStatus, headers: HeadersLike | None = None, body: bytes = b""
    ) -> Response:
        """Build from a ``(status, headers, body)`` tuple, the legacy process_request return."""
        return cls(int(status), "", Headers(headers) if headers is not None else Headers(), body)

    def serialize(self) -> bytes:
        head = f"HTTP/1.1 {self.status_code} {self.reason_phrase}\r\n"
        return head.encode() + self.headers.serialize() + self.body


# Every connection keeps its request, so the names and values that every handshake repeats map
# to shared string objects instead of fresh copies (a fixed table: clients cannot grow it).
_COMMON_VALUES = [
    "websocket", "Upgrade", "upgrade", "13", "keep-alive, Upgrade", "no-cache",
    "permessage-deflate; client_max_window_bits", "gzip, deflate", "gzip, deflate, br",
]  # fmt: skip
_NAMES = {n.encode(): n for n in COMMON_NAMES} | {
    n.lower().encode(): n.lower() for n in COMMON_NAMES
}
_VALUES = {v.encode(): v for v in _COMMON_VALUES}
_TOO_LARGE = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) (HTTP/\d\.\d)\r\n")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE = re.compile(rb"[\x09\x20-\x7e\x80-\xff]*")
#: A number in a header: ASCII digits only. ``str.isdigit`` and ``int`` also take other scripts'
#: digits ("\u00b2", "\u0663"), which no HTTP number may hold; 18 digits keep it far from huge.
_DECIMAL = re.compile(r"[0-9]{1,18}")


def parse_request(reader: StreamReader, limits: Limits) -> Generator[None, None, Request]:
    """Parse one request. Raises an :class:`InvalidHandshake` whose ``status`` is the answer."""
    try:
        line = yield from reader.read_line(limits.max_line)
    except LineTooLong:
        raise SecurityError("request line too long", http.HTTPStatus.REQUEST_URI_TOO_LONG)
    except EOFError as exc:
        raise InvalidMessage("connection closed before the request line") from exc
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise InvalidMessage(f"invalid request line: {line[:100]!r}")
    method, target, version = (g.decode("ascii", "surrogateescape") for g in match.groups())
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise InvalidVersion(f"unsupported http version: {version}")

    headers = Headers()
    total = 0
    while True:
        try:
            line = yield from reader.read_line(limits.max_line)
        except LineTooLong:
            raise SecurityError("header line too long", _TOO_LARGE)
        except EOFError as exc:
            raise InvalidMessage("connection closed inside the headers") from exc
        if line == b"\r\n":
            break
        total += len(line)
        if total > limits.max_header_bytes:
            raise SecurityError("headers too large", _TOO_LARGE)
        if len(headers._list) >= limits.max_headers:
            raise SecurityError("too many headers", _TOO_LARGE)
        if not line.endswith(b"\r\n"):
            raise InvalidMessage("header line does not end with crlf")
        name, sep, value = line[:-2].partition(b":")
        if not sep or _HEADER_NAME.fullmatch(name) is None:
            raise InvalidMessage(f"invalid header line: {line[:100]!r}")
        value = value.strip(b" \t")
        if _HEADER_VALUE.fullmatch(value) is None:
            raise InvalidMessage(f"invalid value in header {name.decode()}")
        key = _NAMES.get(name) or name.decode("ascii")
        headers[key] = _VALUES.get(value) or value.decode("latin-1")

    body = b""
    if "Transfer-Encoding" in headers:
        raise InvalidMessage("transfer-encoding is not supported; send content-length")
    length_values = headers.get_all("Content-Length")
    if length_values:
        if len(set(length_values)) != 1 or _DECIMAL.fullmatch(length_values[0]) is None:
            raise InvalidMessage("invalid content-length")
        length = int(length_values[0])
        if length > limits.max_body:
            raise SecurityError("request body too large", http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            body = yield from reader.read_exact(length)
        except EOFError as exc:
            raise InvalidMessage("connection closed inside the body") from exc
    return Request(target, headers, method, version, body)
