"""Helpers for driving the sans-I/O protocol in tests: a client side written from the RFC."""

from __future__ import annotations

import base64
import os

from hub.ws.frames import Opcode, encode_masked_frame
from hub.ws.protocol import ServerProtocol

KEY = base64.b64encode(b"0123456789abcdef").decode()


def handshake_request(path: str = "/", extra: str = "", key: str = KEY) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


def masked(opcode: int, data: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    return encode_masked_frame(opcode, data, os.urandom(4), fin=fin, rsv1=rsv1)


def open_protocol(extra: str = "", **kwargs: object) -> ServerProtocol:
    """A protocol past a successful handshake, with the 101 already drained."""
    protocol = ServerProtocol(**kwargs)  # type: ignore[arg-type]
    protocol.receive_data(handshake_request(extra=extra))
    (request,) = protocol.events_received()
    response = protocol.accept(request)
    assert response.status_code == 101, response.body
    protocol.send_response(response)
    protocol.data_to_send()
    return protocol


def sent_close_code(protocol: ServerProtocol) -> int | None:
    """The close code in the close frame the server wrote, if any (server frames are unmasked)."""
    return sent_close_code_from(protocol.data_to_send())


def sent_close_code_from(writes: list[bytes]) -> int | None:
    for data in writes:
        if data[:1] == bytes([0x80 | Opcode.CLOSE]):
            payload = data[2:]
            return int.from_bytes(payload[:2], "big") if payload else 1005
    return None


__all__ = [
    "KEY",
    "handshake_request",
    "masked",
    "open_protocol",
    "sent_close_code",
    "sent_close_code_from",
]
