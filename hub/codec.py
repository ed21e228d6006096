"""The client protocol's two encodings: JSON in text frames, msgpack in binary frames.

Both carry the same structures (see docs/protocol.md). Pushes are encoded once per encoding and
shared by every recipient that speaks it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import BadRequest

__all__ = ["CODECS", "Codec", "JsonCodec", "MsgpackCodec", "loads_strict"]

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _make_dumps() -> Callable[[Any], str]:
    """Compact, strict JSON (no NaN/Infinity): ``_ENCODER.encode`` without its Python layers.

    Encoding a push is on every fan-out; calling CPython's C encoder directly halves the time
    for small messages. No circular-reference check: what is encoded was decoded from JSON or
    msgpack, or built by the hub (a cycle still fails, with RecursionError, caught below).
    Interpreters without the C encoder use the public path.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    encode = make(
        None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    join = "".join

    def dumps(obj: Any) -> str:
        return join(encode(obj, 0))

    return dumps


_dumps = _make_dumps()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not json")


#: A ``\\uD800``-``\\uDFFF`` escape: half of a surrogate pair, or a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads_strict(text: str | bytes) -> Any:
    """``json.loads`` without what Python accepts but JSON (RFC 8259, I-JSON) does not: the
    NaN / Infinity literals, and strings with an unpaired surrogate (``"\\ud800"``), which
    no encoder can write back as UTF-8 (they would fail the fan-out, not the publish)."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode(json.detect_encoding(text))  # strict: no encoded surrogates either
    obj = json.loads(text, parse_constant=_reject_constant)
    if _SURROGATE_ESCAPE.search(text) is not None:  # rare: check the pairs matched up
        try:
            _ENCODER.encode(obj).encode()
        except UnicodeEncodeError:
            raise ValueError("unpaired surrogate in a string") from None
    return obj


class Codec:
    """Encode replies and pushes, decode commands, for one subprotocol."""

    name: str
    subprotocol: str
    binary: bool
    index: int  # position in CODECS, so fan-out can cache one frame per codec in a list

    def decode(self, message: str | bytes) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, obj: dict[str, Any]) -> str | bytes:
        raise NotImplementedError


class JsonCodec(Codec):
    name = "json"
    subprotocol = "hub.v1.json"
    binary = False
    index = 0

    def decode(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, bytes):
            raise BadRequest("json protocol expects text frames")
        try:
            obj = loads_strict(message)
        except ValueError:
            raise BadRequest("invalid json") from None
        if not isinstance(obj, dict):
            raise BadRequest("command must be an object")
        return obj

    def encode(self, obj: dict[str, Any]) -> str:
        text = self.encode_or_none(obj)
        if text is None:
            raise BadRequest("data cannot be encoded as json")
        return text

    @staticmethod
    def encode_or_none(obj: dict[str, Any]) -> str | None:
        try:
            return _dumps(obj)
        except (TypeError, ValueError, RecursionError):
            return None


class MsgpackCodec(Codec):
    name = "msgpack"
    subprotocol = "hub.v1.msgpack"
    binary = True
    index = 1

    def decode(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, str):
            raise BadRequest("msgpack protocol expects binary frames")
        try:
            obj = msgpack.unpackb(message, raw=False, strict_map_key=True)
        except Exception:
            raise BadRequest("invalid msgpack") from None
        if not isinstance(obj, dict):
            raise BadRequest("command must be a map")
        return obj

    def encode(self, obj: dict[str, Any]) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)


JSON = JsonCodec()
MSGPACK = MsgpackCodec()
CODECS: tuple[Codec, ...] = (JSON, MSGPACK)
BY_SUBPROTOCOL = {c.subprotocol: c for c in CODECS}
