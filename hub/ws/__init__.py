"""hub.ws: the hub's own WebSocket core (RFC 6455 + RFC 7692), with the server API of the
``websockets`` library: ``import hub.ws as websockets`` runs code written for it.

Layers: sans-I/O below (``frames``, ``http11``, ``headers``, ``deflate``, ``protocol``), asyncio
above (``connection``, ``server``, ``broadcast``, ``auth``).
"""

from __future__ import annotations

from .auth import BasicAuth, basic_auth
from .broadcast import broadcast
from .connection import Data, ServerConnection
from .deflate import PerMessageDeflate, ServerPerMessageDeflateFactory
from .exceptions import (
    ConcurrencyError,
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    DuplicateParameter,
    InvalidHandshake,
    InvalidHeader,
    InvalidHeaderFormat,
    InvalidHeaderValue,
    InvalidMessage,
    InvalidMethod,
    InvalidOrigin,
    InvalidParameterName,
    InvalidParameterValue,
    InvalidState,
    InvalidUpgrade,
    InvalidUTF8,
    InvalidVersion,
    InvalidWebSocketVersion,
    NegotiationError,
    PayloadTooBig,
    ProtocolError,
    SecurityError,
    WebSocketException,
)
from .frames import Close, CloseCode, Frame, Opcode
from .headers import Headers, HeadersLike, MultipleValuesError
from .http11 import Limits, Request, Response
from .legacy import WebSocketServerProtocol
from .protocol import ServerProtocol, State
from .server import Server, WebSocketServer, serve, unix_serve

__all__ = [
    "BasicAuth",
    "Close",
    "CloseCode",
    "ConcurrencyError",
    "ConnectionClosed",
    "ConnectionClosedError",
    "ConnectionClosedOK",
    "Data",
    "DuplicateParameter",
    "Frame",
    "Headers",
    "HeadersLike",
    "InvalidHandshake",
    "InvalidHeader",
    "InvalidHeaderFormat",
    "InvalidHeaderValue",
    "InvalidMessage",
    "InvalidMethod",
    "InvalidOrigin",
    "InvalidParameterName",
    "InvalidParameterValue",
    "InvalidState",
    "InvalidUTF8",
    "InvalidUpgrade",
    "InvalidVersion",
    "InvalidWebSocketVersion",
    "Limits",
    "MultipleValuesError",
    "NegotiationError",
    "Opcode",
    "PayloadTooBig",
    "PerMessageDeflate",
    "ProtocolError",
    "Request",
    "Response",
    "SecurityError",
    "Server",
    "ServerConnection",
    "ServerPerMessageDeflateFactory",
    "ServerProtocol",
    "State",
    "WebSocketException",
    "WebSocketServer",
    "WebSocketServerProtocol",
    "basic_auth",
    "broadcast",
    "serve",
    "unix_serve",
]
