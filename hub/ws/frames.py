"""RFC 6455 framing: opcodes, frame headers, masking, close payloads.

Pure functions and small value types; the connection state machine lives in ``protocol.py``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Generator
from dataclasses import dataclass

from .exceptions import InvalidUTF8, PayloadTooBig, ProtocolError
from .streams import StreamReader

__all__ = [
    "CTRL_OPCODES",
    "DATA_OPCODES",
    "Close",
    "CloseCode",
    "Frame",
    "FrameHeader",
    "Opcode",
    "apply_mask",
    "encode_frame",
    "read_header",
]


class Opcode(enum.IntEnum):
    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


OP_CONT, OP_TEXT, OP_BINARY = Opcode.CONT, Opcode.TEXT, Opcode.BINARY
OP_CLOSE, OP_PING, OP_PONG = Opcode.CLOSE, Opcode.PING, Opcode.PONG
DATA_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY})
CTRL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})
_OPCODES = {int(op): op for op in Opcode}


class CloseCode(enum.IntEnum):
    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # never on the wire
    ABNORMAL_CLOSURE = 1006  # never on the wire
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never on the wire


# How a close code reads in messages: the words websockets uses, so that logs and exception
# texts match what its users already grep for ("sent 1000 (OK); then received 1000 (OK)").
CLOSE_CODE_LABELS: dict[int, str] = {
    1000: "OK",
    1001: "going away",
    1002: "protocol error",
    1003: "unsupported data",
    1005: "no status received [internal]",
    1006: "abnormal closure [internal]",
    1007: "invalid frame payload data",
    1008: "policy violation",
    1009: "message too big",
    1010: "mandatory extension",
    1011: "internal error",
    1012: "service restart",
    1013: "try again later",
    1014: "bad gateway",
    1015: "TLS handshake failure [internal]",
}

# Codes a peer may put in a close frame (RFC 6455 7.4 and the IANA registry), plus 3000-4999.
_WIRE_CODES = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def is_valid_close_code(code: int) -> bool:
    return code in _WIRE_CODES or 3000 <= code < 5000


@dataclass(slots=True, frozen=True)
class Close:
    """The payload of a close frame."""

    code: int
    reason: str = ""

    def __str__(self) -> str:
        if 3000 <= self.code < 4000:
            label = "registered"
        elif 4000 <= self.code < 5000:
            label = "private use"
        else:
            label = CLOSE_CODE_LABELS.get(self.code, "unknown")
        text = f"{self.code} ({label})"
        return f"{text} {self.reason}" if self.reason else text

    @classmethod
    def parse(cls, data: bytes) -> Close:
        """Parse a received close payload; raise :class:`ProtocolError` when it is invalid."""
        if len(data) == 0:
            return cls(CloseCode.NO_STATUS_RCVD)
        if len(data) == 1:
            raise ProtocolError("close frame too short")
        (code,) = struct.unpack_from("!H", data)
        if not is_valid_close_code(code):
            raise ProtocolError(f"invalid close code {code}")
        try:
            reason = data[2:].decode()
        except UnicodeDecodeError:
            raise InvalidUTF8("invalid utf-8 in close reason")
        return cls(code, reason)

    def serialize(self) -> bytes:
        if self.code == CloseCode.NO_STATUS_RCVD:
            return b""
        return struct.pack("!H", self.code) + self.reason.encode()


@dataclass(slots=True)
class Frame:
    """A frame as delivered upward: unmasked and, for deflate, decompressed.

    ``text`` carries the decoded text of a text-message fragment: the protocol validates UTF-8 as
    frames arrive (to fail fast with 1007), so it hands up the string instead of decoding twice.
    """

    opcode: Opcode
    data: bytes
    fin: bool = True
    rsv1: bool = False
    rsv2: bool = False
    rsv3: bool = False
    text: str | None = None


@dataclass(slots=True)
class FrameHeader:
    fin: bool
    rsv1: bool
    rsv2: bool
    rsv3: bool
    opcode: Opcode
    length: int
    mask: bytes | None


def read_header(
    reader: StreamReader, *, expect_mask: bool, max_size: int | None
) -> Generator[None, None, FrameHeader]:
    """Read and validate one frame header (everything before the payload).

    ``max_size`` bounds the payload length here, from the header, so an oversized frame is refused
    before a single payload byte is buffered.
    """
    head = yield from reader.read_exact(2)
    b0, b1 = head[0], head[1]
    opcode = _OPCODES.get(b0 & 0x0F)
    if opcode is None:
        raise ProtocolError(f"invalid opcode {b0 & 0x0F:#x}")
    fin = bool(b0 & 0x80)
    if opcode in CTRL_OPCODES and not fin:
        raise ProtocolError("fragmented control frame")
    masked = bool(b1 & 0x80)
    if masked != expect_mask:
        raise ProtocolError("incorrect masking")
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", (yield from reader.read_exact(2)))
    elif length == 127:
        (length,) = struct.unpack("!Q", (yield from reader.read_exact(8)))
        if length >> 63:
            raise ProtocolError("invalid payload length")
    if opcode in CTRL_OPCODES and length > 125:
        raise ProtocolError("control frame too long")
    if max_size is not None and length > max_size:
        raise PayloadTooBig(f"frame of {length} bytes exceeds limit of {max_size} bytes")
    mask = (yield from reader.read_exact(4)) if masked else None
    return FrameHeader(fin, bool(b0 & 0x40), bool(b0 & 0x20), bool(b0 & 0x10), opcode, length, mask)


def apply_mask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``mask``, starting ``offset`` bytes into the mask cycle.

    One big-integer XOR runs at C speed for large payloads, with no per-byte Python loop.
    """
    n = len(data)
    if n == 0:
        return b""
    if offset % 4:
        k = offset % 4
        mask = mask[k:] + mask[:k]
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


_PACK_H = struct.Struct("!BB").pack
_PACK_HH = struct.Struct("!BBH").pack
_PACK_HQ = struct.Struct("!BBQ").pack


def encode_frame(opcode: int, data: bytes, *, fin: bool = True, rsv1: bool = False) -> bytes:
    """Serialise an unmasked (server-to-client) frame."""
    b0 = opcode | (0x80 if fin else 0) | (0x40 if rsv1 else 0)
    n = len(data)
    if n < 126:
        return _PACK_H(b0, n) + data
    if n < 65536:
        return _PACK_HH(b0, 126, n) + data
    return _PACK_HQ(b0, 127, n) + data


def encode_masked_frame(
    opcode: int, data: bytes, mask: bytes, *, fin: bool = True, rsv1: bool = False
) -> bytes:
    """Serialise a masked (client-to-server) frame; used by tests and benchmarks."""
    b0 = opcode | (0x80 if fin else 0) | (0x40 if rsv1 else 0)
    n = len(data)
    if n < 126:
        head = _PACK_H(b0, 0x80 | n)
    elif n < 65536:
        head = _PACK_HH(b0, 0x80 | 126, n)
    else:
        head = _PACK_HQ(b0, 0x80 | 127, n)
    return head + mask + apply_mask(data, mask)
