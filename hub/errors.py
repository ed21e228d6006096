"""The hub's errors: reply error codes and connection close codes, one table each.

Reply errors answer one command and leave the connection open. Close codes end the connection;
the 4000-4499 range tells clients to reconnect, 4500-4999 not to (docs/protocol.md).
"""

from __future__ import annotations

import enum

__all__ = [
    "BadEnvelope",
    "BadRequest",
    "BadSignature",
    "ClientError",
    "CloseCode",
    "ErrorCode",
    "HubError",
    "HubUnavailable",
    "ProxyDisconnect",
    "ProxyFailed",
    "ProxyRefused",
    "RedisUnavailable",
    "ReplyError",
    "may_reconnect",
]


class HubError(Exception):
    """Base of the hub's own exceptions (the WebSocket core has its own, in hub.ws)."""


class ErrorCode(enum.IntEnum):
    INTERNAL = 100
    UNAUTHORIZED = 101
    UNKNOWN_CHANNEL = 102
    PERMISSION_DENIED = 103
    UNKNOWN_OP = 104
    ALREADY_SUBSCRIBED = 105
    LIMIT_EXCEEDED = 106
    BAD_REQUEST = 107
    NOT_ENABLED = 108
    NOT_SUBSCRIBED = 109
    TOO_LARGE = 110
    UNAVAILABLE = 111
    RATE_LIMITED = 112  # too many commands; slow down (the connection closes if it goes on)
    BACKEND_FAILED = 113  # a proxy's backend did not answer properly (docs/proxy.md); not done


class HubUnavailable(HubError):
    """The broker cannot deliver right now (e.g. Redis is down); retry later."""


class RedisUnavailable(HubUnavailable):
    """Redis is unreachable or did not answer in time (``hub.redis``: the pub/sub link, the
    broker's publishes and history reads); the HTTP API answers 503."""


class ReplyError(HubError):
    """A command failed; the client gets ``{"id": ..., "error": {"code", "message"}}``."""

    code: ErrorCode | int = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message


class BadRequest(ReplyError):
    code = ErrorCode.BAD_REQUEST


class ProxyFailed(ReplyError):
    """The backend of a proxy is down, slower than ``proxy_timeout``, or answered something
    other than the contract (docs/proxy.md): the command is not carried out. ``reason`` is the
    label of ``hub_proxy_errors_total``."""

    code = ErrorCode.BACKEND_FAILED

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProxyRefused(ReplyError):
    """The backend answered ``{"error": {"code", "message"}}``: the client gets that error."""


class ProxyDisconnect(HubError):
    """The backend answered ``{"disconnect": {"code", "reason"}}``: close the connection so."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class CloseCode(enum.IntEnum):
    """Every close code a hub sends: the one list the docs' close-code table is checked against
    (tests/test_docs.py), and hub.js's reconnect rule with it. RFC 6455 codes come from the
    WebSocket core (a malformed frame, bad UTF-8, a message over ``max_message_size``)."""

    SHUTDOWN = 1001  # server shutting down or restarting: reconnect
    PROTOCOL_ERROR = 1002  # a malformed frame: a broken client, reconnecting repeats it
    INVALID_DATA = 1007  # invalid UTF-8 in a text message
    MESSAGE_TOO_BIG = 1009  # a message over max_message_size
    INTERNAL = 1011  # the hub failed, or no pong came in time
    SLOW_CONSUMER = 4000  # could not keep up; reconnect and recover
    TOKEN_EXPIRED = 4002  # reconnect with a fresh token
    DISCONNECT_RECONNECT = 4003  # the backend disconnected this user, reconnect allowed
    # The connect proxy's backend is down, too slow, answered 5xx / another status or outside
    # the contract: the client is not at fault, so it retries with backoff (docs/proxy.md).
    BACKEND_UNAVAILABLE = 4004
    UNAUTHORIZED = 4500  # no valid credentials (or the connect proxy refused them)
    BAD_REQUEST = 4502  # repeated protocol abuse
    DISCONNECTED = 4503  # the backend disconnected this user for good
    RATE_LIMITED = 4504  # kept sending commands past the rate limit

    @property
    def reconnect(self) -> bool:
        """4000-4499 and 1001/1011: reconnect with backoff; 4500 and up, and the codes of a
        client that broke the protocol or the size limit: do not (it would only happen again)."""
        return may_reconnect(self.value)


#: Standard close codes after which reconnecting cannot help: the peer found the client's frames
#: or data unacceptable (protocol error, unsupported or invalid data, policy, size, extension).
_FINAL_STANDARD_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})


def may_reconnect(code: int) -> bool:
    """The clients' rule (hub.client, and hub.js's ``mayReconnect``, checked against this):
    4500-4999 and the standard codes a retry would only repeat mean stop; everything else
    (1000, 1001, 1006, 1011, 4000-4499, a failed handshake) means reconnect with backoff."""
    if 4500 <= code <= 4999:
        return False
    return code not in _FINAL_STANDARD_CODES


class ClientError(HubError):
    """A command sent by ``hub.client`` failed. ``code`` is the hub's error code (an
    ``ErrorCode`` value such as 103), or ``"timeout"``, ``"disconnected"`` (the connection
    closed before the reply; nothing is resent) or ``"unsubscribed"``."""

    def __init__(self, code: int | str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BadEnvelope(HubError):
    """A payload from Redis that the hub drops: not msgpack, not a map, or a field of the wrong
    type (``hub.redis.wire``); counted in ``hub_bridge_malformed_total``."""


class BadSignature(BadEnvelope):
    """With ``redis_signing_key`` set: a payload from Redis without a valid signature; counted in
    ``hub_bridge_bad_signatures_total``."""
