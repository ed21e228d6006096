"""What crosses Redis, checked in one place: envelopes, control messages, join/leave notices,
history entries, and their optional signature.

Redis is a trust boundary (docs/operations.md): whatever can ``PUBLISH`` there reaches the hub's
users. So every payload the hub takes from Redis, live from pub/sub or stored in a history
stream, goes through :class:`Envelopes` before any of it reaches a client: a field of the wrong
type drops the message (``BadEnvelope``, counted by the bridge), never a traceback and never a
bad value passed on.

**Signed payloads** (``redis_signing_key``, docs/publish-api.md "Signed payloads"): a payload is
then a msgpack array ``[envelope, mac]`` of two ``bin`` values, where ``envelope`` holds the
msgpack bytes of the map as before and ``mac`` is HMAC-SHA256 with the shared key over
``<length of the Redis channel name in decimal> ":" <Redis channel name> <envelope>``. Binding the
name keeps a signed message from being replayed on another channel (a channel publication as a
per-user push, say). The history script turns ``[envelope, mac]`` into
``[envelope, mac, {"offset": n, "epoch": e}]`` without touching the signed bytes. A hub with a key
accepts only payloads whose mac checks out; a hub without one accepts both forms unchecked, so
publishers can start signing before the hubs require it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable
from typing import Any

import msgpack

from .codec import check_sender
from .errors import BadEnvelope, BadRequest, BadSignature

__all__ = [
    "HISTORY_FIELDS",
    "MAX_EPOCH_LENGTH",
    "MAX_REASON_BYTES",
    "Envelopes",
    "disconnect_problem",
    "seal",
    "unpack",
]

#: A WebSocket close reason must fit a 125-byte control frame with its 2-byte code.
MAX_REASON_BYTES = 120
#: Epochs the hub makes have 8 characters; ``since.epoch`` from clients may have up to 64.
MAX_EPOCH_LENGTH = 64
#: Envelope fields of a publication on a channel with history, assigned by the history script.
HISTORY_FIELDS = ("offset", "epoch")
_MAX_OFFSET = (1 << 63) - 1
_MAC_SIZE = 32
_SIGNED = 0x92  # fixarray of 2: [envelope, mac]
_SIGNED_STORED = 0x93  # fixarray of 3: [envelope, mac, {"offset", "epoch"}]


def unpack(payload: bytes) -> Any:
    """msgpack with the options of the client codec (hub.codec), so data crosses Redis exactly as
    it crosses one process: str stays str, bin stays bytes, extension types stay themselves,
    only string map keys. Nesting past msgpack's own limit fails here, as bad input."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=True)


def _mac(key: bytes, name: bytes, envelope: bytes) -> bytes:
    head = b"%d:" % len(name)
    return hmac.new(key, head + name + envelope, hashlib.sha256).digest()


def seal(key: bytes | None, name: bytes, envelope: bytes) -> bytes:
    """The payload to publish on Redis channel ``name``: ``envelope`` as is without a key, else
    ``[envelope, mac]`` (see the module docstring)."""
    if key is None:
        return envelope
    return msgpack.packb([envelope, _mac(key, name, envelope)], use_bin_type=True)


def disconnect_problem(user: Any, code: Any, reason: Any) -> str | None:
    """What is wrong with a disconnect's fields, or None: the one rule for the publishers (which
    raise ``ValueError``) and the hub (which drops the control message)."""
    if not isinstance(user, str) or not user:
        return "user must be a non-empty string"
    if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
        return "code must be an integer from 4000 to 4999"
    problem = f"reason must be a string of at most {MAX_REASON_BYTES} bytes"
    if not isinstance(reason, str):
        return problem
    try:
        size = len(reason.encode())
    except UnicodeEncodeError:  # an unpaired surrogate: no close frame can carry it
        return problem
    return problem if size > MAX_REASON_BYTES else None


class Envelopes:
    """Opens and checks payloads from Redis for one hub (its signing key and forwarded fields).

    Cheap where it runs per message: an unsigned payload costs one msgpack decode and a few type
    checks, and fields are looked at only when the map has more than ``data``.
    """

    __slots__ = ("_incoming", "key")

    def __init__(self, key: bytes | None = None, forward: Iterable[str] = ("ts", "event")) -> None:
        self.key = key
        self._incoming = (*forward, "from", *HISTORY_FIELDS)

    def seal(self, name: bytes, envelope: bytes) -> bytes:
        return seal(self.key, name, envelope)

    def open(self, name: bytes, payload: bytes) -> dict[str, Any]:
        """The map a payload on Redis channel ``name`` carries, its signature checked when this
        hub has a key. Raises :class:`BadSignature` or :class:`BadEnvelope` saying why."""
        head = payload[0] if payload else -1
        if head == _SIGNED or head == _SIGNED_STORED:
            return self._open_signed(name, payload)
        if self.key is not None:
            raise BadSignature("not signed")
        try:  # _map, inlined: this runs for every message
            envelope = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception as exc:
            raise BadEnvelope(f"not msgpack ({type(exc).__name__}: {exc})"[:200]) from None
        if type(envelope) is not dict:
            raise BadEnvelope("not a map")
        return envelope

    def _open_signed(self, name: bytes, payload: bytes) -> dict[str, Any]:
        try:
            parts = unpack(payload)
        except Exception as exc:
            raise BadEnvelope(f"not msgpack ({type(exc).__name__})") from None
        if (
            type(parts) is not list
            or not 2 <= len(parts) <= 3
            or type(parts[0]) is not bytes
            or type(parts[1]) is not bytes
        ):
            raise BadEnvelope("a signed payload is [envelope, mac] of two bin values")
        inner, mac = parts[0], parts[1]
        key = self.key
        if key is not None and not (
            len(mac) == _MAC_SIZE and hmac.compare_digest(mac, _mac(key, name, inner))
        ):
            raise BadSignature("wrong signature")
        envelope = _map(inner)
        if len(parts) == 3:
            stored = parts[2]
            if type(stored) is not dict or set(stored) != {"offset", "epoch"}:
                raise BadEnvelope("the history part is a map of offset and epoch")
            envelope.update(stored)
        return envelope

    def meta(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """The fields of a channel publication passed on to clients (forwarded fields, offset
        and epoch), each type-checked (inline: this runs for every publication with fields)."""
        meta = {k: envelope[k] for k in self._incoming if k in envelope}
        if not meta:
            return meta
        if "offset" in meta or "epoch" in meta:
            offset, epoch = meta.get("offset"), meta.get("epoch")
            if type(offset) is not int or not 0 < offset <= _MAX_OFFSET:
                raise BadEnvelope("offset must be a positive integer, with an epoch")
            if type(epoch) is not str or not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
                raise BadEnvelope("epoch must be a string of 1 to 64 characters, with an offset")
        if "ts" in meta:
            ts = meta["ts"]
            kind = type(ts)
            if not (kind is int or (kind is float and math.isfinite(ts))):
                raise BadEnvelope("ts must be a finite number")
        if "event" in meta and type(meta["event"]) is not str:
            raise BadEnvelope("event must be a string")
        if "from" in meta:
            try:
                check_sender(meta["from"])
            except BadRequest as exc:
                raise BadEnvelope(exc.message) from None
        return meta

    def entry(self, name: bytes, payload: bytes) -> dict[str, Any]:
        """A history entry read back from the stream of Redis channel ``name``: the envelope,
        its fields checked as a live one's. Raises ``BadEnvelope`` for one to skip."""
        envelope = self.open(name, payload)
        if "data" not in envelope or "offset" not in envelope:
            raise BadEnvelope("a history entry needs data, offset and epoch")
        self.meta(envelope)
        return envelope

    @staticmethod
    def control(message: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        """What a control message asks: ``("disconnect", (user, code, reason))``, ``("admin",
        ())`` for ``admin.*`` ops (hub.admin checks their fields), or ``("other", ())`` for an
        op this hub does not know (a newer hub's: ignored, for compatibility)."""
        op = message.get("op")
        if not isinstance(op, str):
            raise BadEnvelope("control message without op")
        if op.startswith("admin."):
            return "admin", ()
        if op != "disconnect":
            return "other", ()
        user = message.get("user")
        code = message.get("code", 4503)
        reason = message.get("reason", "")
        problem = disconnect_problem(user, code, reason)
        if problem is not None:
            raise BadEnvelope(f"bad disconnect: {problem}")
        return "disconnect", (user, code, reason)

    @staticmethod
    def join_leave(envelope: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """``{"join": [entry, ...], "leave": [...]}`` from a hub's coalesced join/leave: lists
        of ``{"user", "client", "info"}`` maps with string user and client."""
        join, leave = envelope.get("join", []), envelope.get("leave", [])
        for entries in (join, leave):
            if type(entries) is not list:
                raise BadEnvelope("join/leave must be lists of maps")
            for e in entries:
                if type(e) is not dict or type(e.get("user")) is not str:
                    raise BadEnvelope("join/leave entries need a string user and client")
                if type(e.get("client")) is not str:
                    raise BadEnvelope("join/leave entries need a string user and client")
        return join, leave


def _map(payload: bytes) -> dict[str, Any]:
    try:
        envelope = unpack(payload)
    except Exception as exc:
        raise BadEnvelope(f"not msgpack ({type(exc).__name__}: {exc})"[:200]) from None
    if type(envelope) is not dict:
        raise BadEnvelope("not a map")
    return envelope
