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
import orjson

from .errors import BadRequest
from .rules import user_problem

__all__ = [
    "CODECS",
    "Codec",
    "JsonCodec",
    "MsgpackCodec",
    "check_data",
    "json_bytes",
    "loads_strict",
    "unpack_msgpack",
]


def unpack_msgpack(payload: bytes, _unpackb: Callable[..., Any] = msgpack.unpackb) -> Any:
    """msgpack as the hub reads it, from a client's binary frame and from Redis alike
    (envelopes, history and presence entries, inbox envelopes): str stays str, bin stays bytes,
    extension types stay themselves, map keys are strings (or bin). One definition, so data
    crosses Redis exactly as it crosses one process; nesting past msgpack's own limit raises,
    as bad input."""
    return _unpackb(payload, raw=False, strict_map_key=True)


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


#: The strict encoder: what ``json_bytes`` falls back to where orjson would write differently.
_dumps = _ENCODER.encode

#: orjson leaves to us what the strict encoder would write differently or refuse: dataclasses,
#: datetimes and subclasses of the JSON types (and it refuses non-string keys and integers
#: beyond 64 bits on its own).
_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def json_bytes(obj: Any, _orjson: Callable[..., bytes] = orjson.dumps) -> bytes | None:
    """Compact, strict JSON in UTF-8, or None when JSON cannot carry ``obj``: what the fan-out
    writes to JSON clients, once per push.

    orjson encodes a small push five times faster than the standard library's C encoder. Where
    the two would differ it yields: orjson writes NaN and Infinity as ``null`` (so any output
    holding ``null`` is encoded again strictly, which refuses them), and whatever orjson
    refuses (integer map keys, big integers, deep nesting) goes to the strict encoder, so the
    bytes always decode to what the standard library would have written.
    """
    try:
        out = _orjson(obj, option=_ORJSON_OPTIONS)
    except TypeError:
        pass
    else:
        if b"null" not in out:
            return out
    try:
        return _dumps(obj).encode()
    except (TypeError, ValueError, RecursionError):
        return None


def check_data(data: Any) -> None:
    """Refuse data that cannot cross Redis, whichever broker is in use: what msgpack cannot
    pack (integers beyond 64 bits, types outside JSON and msgpack, unpaired surrogates) would
    otherwise fail the fan-out of a process on the memory broker instead of the publish."""
    try:
        msgpack.packb(data, use_bin_type=True)
    except OverflowError:
        raise BadRequest("data cannot be encoded: integer out of 64-bit range") from None
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"data cannot be encoded: {_reason(exc)}") from None


def check_sender(sender: Any) -> dict[str, Any]:
    """The ``from`` of a publication: ``{"user": str, "client": str, "info": any}`` (``client``
    and ``info`` optional). Clients never set it (the hub sets theirs from the connection); a
    backend may, over the HTTP API or in a Redis envelope, and this is the one check of it."""
    if type(sender) is not dict:
        raise BadRequest("from must be an object with user, client and info")
    unknown = set(sender).difference(("user", "client", "info"))
    if unknown:
        raise BadRequest(f"from has unknown fields: {', '.join(sorted(map(str, unknown)))}"[:100])
    user, client = sender.get("user"), sender.get("client", "")
    problem = user_problem(user)
    if problem is not None:
        raise BadRequest(f"from.{problem}")
    if type(client) is not str or len(client) > 200:
        raise BadRequest("from.client must be a string of at most 200 characters")
    check_data(sender.get("info"))
    return sender


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeError):
        return "unpaired surrogate in a string"
    if isinstance(exc, TypeError):
        return "unsupported type"
    return "nested too deep"


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
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        # 60,000 "[" exhaust the decoder's recursion guard: bad input, not a server fault.
        raise ValueError("nested too deep") from None
    if _SURROGATE_ESCAPE.search(text) is not None:  # rare: check the pairs matched up
        try:
            _dumps(obj).encode()
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
        out = json_bytes(obj)
        return None if out is None else out.decode()


class MsgpackCodec(Codec):
    name = "msgpack"
    subprotocol = "hub.v1.msgpack"
    binary = True
    index = 1

    def decode(self, message: str | bytes) -> dict[str, Any]:
        if isinstance(message, str):
            raise BadRequest("msgpack protocol expects binary frames")
        try:
            obj = unpack_msgpack(message)
        except Exception:
            raise BadRequest("invalid msgpack") from None
        if not isinstance(obj, dict):
            raise BadRequest("command must be a map")
        return obj

    def encode(self, obj: dict[str, Any]) -> bytes:
        try:
            return msgpack.packb(obj, use_bin_type=True)
        except OverflowError:
            raise BadRequest("data cannot be encoded: integer out of 64-bit range") from None
        except (TypeError, ValueError) as exc:  # nesting past msgpack's limit, foreign types
            raise BadRequest(f"data cannot be encoded: {_reason(exc)}") from None


JSON = JsonCodec()
MSGPACK = MsgpackCodec()
CODECS: tuple[Codec, ...] = (JSON, MSGPACK)
BY_SUBPROTOCOL = {c.subprotocol: c for c in CODECS}
