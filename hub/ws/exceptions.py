"""One exception hierarchy for the WebSocket core, rooted in :class:`WebSocketException`.

Names follow the ``websockets`` library so code written for it catches the same things here.
"""

from __future__ import annotations

import http
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .frames import Close

__all__ = [
    "ConcurrencyError",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "DuplicateParameter",
    "InvalidHandshake",
    "InvalidHeader",
    "InvalidHeaderFormat",
    "InvalidHeaderValue",
    "InvalidMessage",
    "InvalidOrigin",
    "InvalidParameterName",
    "InvalidParameterValue",
    "InvalidState",
    "InvalidUpgrade",
    "InvalidVersion",
    "NegotiationError",
    "PayloadTooBig",
    "ProtocolError",
    "SecurityError",
    "WebSocketException",
]


class WebSocketException(Exception):
    """Base class for every exception raised by :mod:`hub.ws`."""


class ConnectionClosed(WebSocketException):
    """Raised when using a connection that is closed (or closing).

    ``rcvd`` is the close frame received from the peer, ``sent`` the one we sent; either may be
    ``None`` when the TCP connection ended without one. ``rcvd_then_sent`` tells the order.
    """

    def __init__(
        self, rcvd: Close | None, sent: Close | None, rcvd_then_sent: bool | None = None
    ) -> None:
        self.rcvd = rcvd
        self.sent = sent
        self.rcvd_then_sent = rcvd_then_sent
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.rcvd is None and self.sent is None:
            return "no close frame received or sent"
        if self.rcvd is None:
            return f"sent {self.sent}; no close frame received"
        if self.sent is None:
            return f"received {self.rcvd}; no close frame sent"
        if self.rcvd_then_sent:
            return f"received {self.rcvd}; then sent {self.sent}"
        return f"sent {self.sent}; then received {self.rcvd}"

    @property
    def code(self) -> int:
        """Close code received from the peer (1006 when none was received)."""
        return 1006 if self.rcvd is None else self.rcvd.code

    @property
    def reason(self) -> str:
        return "" if self.rcvd is None else self.rcvd.reason


class ConnectionClosedOK(ConnectionClosed):
    """The connection closed normally (1000 or 1001 both ways)."""


class ConnectionClosedError(ConnectionClosed):
    """The connection closed with an error code, or without a closing handshake."""


class InvalidHandshake(WebSocketException):
    """The opening handshake failed. ``status`` is the HTTP status the server answers with."""

    status: http.HTTPStatus = http.HTTPStatus.BAD_REQUEST


class SecurityError(InvalidHandshake):
    """The request exceeds a size limit (request line, header size or count)."""

    def __init__(self, message: str, status: http.HTTPStatus) -> None:
        super().__init__(message)
        self.status = status


class InvalidMessage(InvalidHandshake):
    """The bytes received are not a well-formed HTTP/1.1 request."""


class InvalidVersion(InvalidHandshake):
    """The request is not HTTP/1.1."""

    status = http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED


class InvalidMethod(InvalidHandshake):
    """The request method is not GET."""

    status = http.HTTPStatus.METHOD_NOT_ALLOWED


class InvalidHeader(InvalidHandshake):
    """A header is missing or has a wrong value."""

    def __init__(self, name: str, value: str | None = None) -> None:
        self.name = name
        self.value = value
        if value is None:
            message = f"missing {name} header"
        elif value == "":
            message = f"empty {name} header"
        else:
            message = f"invalid {name} header: {value}"
        super().__init__(message)


class InvalidHeaderFormat(InvalidHeader):
    """A header value could not be parsed."""

    def __init__(self, name: str, error: str, header: str, pos: int) -> None:
        super().__init__(name, f"{error} at {pos} in {header}")


class InvalidHeaderValue(InvalidHeader):
    """A header value is syntactically valid but not acceptable."""


class InvalidOrigin(InvalidHeader):
    """The Origin header is not in the allowed list."""

    status = http.HTTPStatus.FORBIDDEN

    def __init__(self, origin: str | None) -> None:
        super().__init__("Origin", origin)


class InvalidUpgrade(InvalidHeader):
    """The Upgrade or Connection header does not ask for a WebSocket upgrade."""

    status = http.HTTPStatus.UPGRADE_REQUIRED


class InvalidWebSocketVersion(InvalidHeader):
    """Sec-WebSocket-Version is not 13."""


class NegotiationError(InvalidHandshake):
    """An extension or subprotocol negotiation failed."""


class DuplicateParameter(NegotiationError):
    """An extension parameter appears twice."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"duplicate parameter: {name}")


class InvalidParameterName(NegotiationError):
    """An extension parameter name is unknown."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"invalid parameter name: {name}")


class InvalidParameterValue(NegotiationError):
    """An extension parameter value is not acceptable."""

    def __init__(self, name: str, value: str | None) -> None:
        self.name = name
        self.value = value
        super().__init__(f"invalid value for parameter {name}: {value}")


class ProtocolError(WebSocketException):
    """The peer broke RFC 6455 / RFC 7692. Closes with 1002 (or 1007 for bad UTF-8)."""


class InvalidUTF8(ProtocolError):
    """A text message or close reason is not valid UTF-8. Closes with 1007."""


class PayloadTooBig(WebSocketException):
    """A message exceeds ``max_size``. Closes with 1009."""


class InvalidState(WebSocketException, AssertionError):
    """An operation is not allowed in the connection's current state."""


class ConcurrencyError(WebSocketException, RuntimeError):
    """Two coroutines used a connection in a way that cannot be shared (e.g. two ``recv()``)."""
