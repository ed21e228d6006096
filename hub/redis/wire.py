"""What crosses Redis, both ways, in one place: the channel names, and for each kind of envelope
its packing (publishers, the broker) beside its opening and checks (the broker, history reads).
The contract for other languages is docs/publish-api.md.

A hub process listens on a few Redis channels under a prefix (``hub`` by default):
``<prefix>:ch:<channel>`` for channel publications (and the coalesced join/leave notices of the
channel), ``<prefix>:user:<user id>`` for per-user messages, ``<prefix>:all`` for broadcasts and
``<prefix>:ctl`` for control messages (a server-side disconnect, hub.admin's messages). Every
payload is a msgpack map: ``{"data": <value>, ...optional fields}`` or, on the control channel,
``{"op": "disconnect", "user": ..., "code": ..., "reason": ...}``.

Redis is a trust boundary (docs/operations.md): whatever can ``PUBLISH`` there reaches the hub's
users. So every payload the hub takes from Redis, live from pub/sub or stored in a history
stream, is opened here before any of it reaches a client: a field of the wrong type drops the
message (``BadEnvelope``, counted by the broker), never a traceback and never a bad value passed
on. msgpack is read with the client codec's options (``hub.codec.unpack_msgpack``).

**Signed payloads** (``redis_signing_key``, docs/publish-api.md "Signed payloads"): a payload is
then a msgpack array ``[envelope, mac]`` of two ``bin`` values, where ``envelope`` holds the
msgpack bytes of the map as before and ``mac`` is HMAC-SHA256 with the shared key over
``<length of the Redis channel name in decimal> ":" <Redis channel name> <envelope>``. Binding the
name keeps a signed message from being replayed on another channel (a channel publication as a
per-user push, say). The history script turns ``[envelope, mac]`` into
``[envelope, mac, {"offset": n, "epoch": e}]`` without touching the signed bytes, and the inbox
script into ``[envelope, mac, {"inbox": {"seq": n, "epoch": e}}]``. A hub with a key
accepts only payloads whose mac checks out; a hub without one accepts both forms unchecked, so
publishers can start signing before the hubs require it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack

from ..codec import check_sender, unpack_msgpack
from ..errors import BadEnvelope, BadRequest, BadSignature
from ..rules import (
    DISCONNECT_CODE,
    MAX_EPOCH_LENGTH,
    MAX_REASON_BYTES,
    MIN_SECRET_BYTES,
    disconnect_problem,
)

__all__ = [
    "DEFAULT_PREFIX",
    "DISCONNECT_CODE",
    "HISTORY_FIELDS",
    "MAX_EPOCH_LENGTH",
    "MAX_REASON_BYTES",
    "MIN_SIGNING_KEY",
    "Envelopes",
    "Names",
    "check_signing_key",
    "disconnect_problem",
    "inbox_mark",
    "open_control",
    "open_join_leave",
    "pack_control",
    "pack_disconnect",
    "pack_join_leave",
    "pack_message",
    "seal",
    "unpack",
]

DEFAULT_PREFIX = "hub"
#: Envelope fields of a publication on a channel with history, assigned by the history script.
HISTORY_FIELDS = ("offset", "epoch")
#: Bytes of a signing key, at least (the size of the HMAC-SHA256 output).
MIN_SIGNING_KEY = MIN_SECRET_BYTES
_MAX_OFFSET = (1 << 63) - 1
_MAC_SIZE = 32
_SIGNED = 0x92  # fixarray of 2: [envelope, mac]
_SIGNED_STORED = 0x93  # fixarray of 3: [envelope, mac, {"offset", "epoch"} or {"inbox"}]
#: A plain notify's push: b"\xc1<seq>-0 <epoch> " then the envelope as the backend gave it
#: (0xc1 is the one byte msgpack never uses, so no envelope starts with it). hub/inbox.lua
#: writes it so because building the "inbox" map into the envelope costs Redis more.
_HEADED = 0xC1

#: msgpack as the hub reads it (the options live in ``hub.codec``).
unpack = unpack_msgpack


# -- names ----------------------------------------------------------------------------------------


class Names:
    """The Redis channel names for one prefix. Publishers and the broker share this so the two
    sides cannot disagree on a name."""

    __slots__ = ("all", "ctl", "prefix")

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise ValueError("prefix must be a non-empty string without whitespace")
        self.prefix = prefix
        self.all = f"{prefix}:all"
        self.ctl = f"{prefix}:ctl"

    def channel(self, channel: str) -> str:
        return f"{self.prefix}:ch:{channel}"

    def user(self, user: str) -> str:
        return f"{self.prefix}:user:{user}"


# -- packing --------------------------------------------------------------------------------------

_local = threading.local()


def _packer() -> msgpack.Packer:
    """This thread's packer: ``msgpack.packb`` makes a new one per call, which costs more than
    packing a small message. One per thread, since a packer's buffer is not thread-safe."""
    try:
        packer: msgpack.Packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# -- signatures -----------------------------------------------------------------------------------


def check_signing_key(key: bytes | str | None) -> bytes | None:
    """``signing_key`` as bytes; short keys are refused (HMAC-SHA256 wants 32 bytes or more)."""
    if key is None:
        return None
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_SIGNING_KEY:
        raise ValueError(f"signing_key must have at least {MIN_SIGNING_KEY} bytes")
    return raw


def _mac(key: bytes, name: bytes, envelope: bytes) -> bytes:
    head = b"%d:" % len(name)
    return hmac.new(key, head + name + envelope, hashlib.sha256).digest()


def seal(key: bytes | None, name: bytes, envelope: bytes) -> bytes:
    """The payload to publish on Redis channel ``name``: ``envelope`` as is without a key, else
    ``[envelope, mac]`` (see the module docstring). Opened by :meth:`Envelopes.open`."""
    if key is None:
        return envelope
    return _pack([envelope, _mac(key, name, envelope)])


# -- publications (channel, user, all): packed here, opened and checked by Envelopes --------------


def pack_message(data: Any, fields: Mapping[str, Any] | None = None) -> bytes:
    """The envelope ``{"data": data, **fields}`` in msgpack.

    ``bytes`` values become msgpack ``bin`` and ``str`` values msgpack ``str``: the hub keeps that
    distinction, and a push whose data holds bytes reaches JSON clients as a binary frame.
    """
    pack = _packer().pack
    if not fields:
        return _DATA_MAP + pack(data)
    if "data" in fields:
        raise ValueError("the data field is given separately")
    return pack({"data": data, **fields})


#: msgpack for a map of one entry whose key is "data": what ``{"data": data}`` starts with.
_DATA_MAP = b"\x81\xa4data"


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
        if head == _HEADED:
            return self._open_headed(name, payload)
        if self.key is not None:
            raise BadSignature("not signed")
        return _map(payload)

    def _open_headed(self, name: bytes, payload: bytes) -> dict[str, Any]:
        """A plain notify's push (``_HEADED``): the envelope, opened as any other, with
        ``inbox`` = ``{"seq", "epoch"}`` from the head (checked by ``inbox_mark``)."""
        end = payload.find(b" ", 1, 24)
        cut = payload.find(b" ", end + 1, end + 2 + MAX_EPOCH_LENGTH) if end > 0 else -1
        sid = payload[1:end]
        if cut < 0 or not sid.endswith(b"-0") or not sid[:-2].isdigit():
            raise BadEnvelope("a notify's push is <0xc1><seq>-0 <epoch> <envelope>")
        try:
            epoch = payload[end + 1 : cut].decode()
        except UnicodeDecodeError:
            raise BadEnvelope("inbox.epoch must be a string") from None
        inner = payload[cut + 1 :]
        if inner[:1] == b"\xc1":
            raise BadEnvelope("a notify's push holds one envelope")
        envelope = self.open(name, inner)
        envelope["inbox"] = {"seq": int(sid[:-2]), "epoch": epoch}
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
            # What a script adds around the signed bytes: history's offset and epoch, or an
            # inbox's {"inbox": {seq, epoch[, id]}} (checked by inbox_mark).
            stored = parts[2]
            if type(stored) is not dict or (
                set(stored) != {"offset", "epoch"} and set(stored) != {"inbox"}
            ):
                raise BadEnvelope("the third part is a map of offset and epoch, or of inbox")
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
        """A history entry read back from the stream of Redis channel ``name`` (stored there by
        ``hub/history.lua`` from a publication): the envelope, its fields checked as a live
        one's. Raises ``BadEnvelope`` for one to skip."""
        envelope = self.open(name, payload)
        if "data" not in envelope or "offset" not in envelope:
            raise BadEnvelope("a history entry needs data, offset and epoch")
        self.meta(envelope)
        return envelope


def inbox_mark(envelope: dict[str, Any]) -> dict[str, Any]:
    """The ``inbox`` map of a push from a user's inbox (hub.inbox, live or stored), checked:
    ``{"seq", "epoch"[, "id"]}`` with ``data`` beside it, or a read cursor ``{"read", "epoch"}``.
    Only those fields are passed on."""
    mark = envelope.get("inbox")
    if type(mark) is not dict:
        raise BadEnvelope("inbox must be a map")
    epoch = mark.get("epoch")
    if type(epoch) is not str or not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
        raise BadEnvelope("inbox.epoch must be a string of 1 to 64 characters")
    if "seq" in mark:
        seq = mark["seq"]
        if type(seq) is not int or not 0 < seq <= _MAX_OFFSET:
            raise BadEnvelope("inbox.seq must be a positive integer")
        if "data" not in envelope:
            raise BadEnvelope("an inbox entry needs data")
        out: dict[str, Any] = {"seq": seq, "epoch": epoch}
        if "id" in mark:
            if type(mark["id"]) is not str or len(mark["id"]) > 1000:
                raise BadEnvelope("inbox.id must be a string")
            out["id"] = mark["id"]
        return out
    read = mark.get("read")
    if type(read) is not int or not 0 <= read <= _MAX_OFFSET:
        raise BadEnvelope("inbox needs seq or read")
    return {"read": read, "epoch": epoch}


def _map(payload: bytes) -> dict[str, Any]:
    try:
        envelope = unpack(payload)
    except Exception as exc:
        raise BadEnvelope(f"not msgpack ({type(exc).__name__}: {exc})"[:200]) from None
    if type(envelope) is not dict:
        raise BadEnvelope("not a map")
    return envelope


# -- control messages (on <prefix>:ctl) -----------------------------------------------------------


def pack_disconnect(user: str, code: int = DISCONNECT_CODE, reason: str = "") -> bytes:
    """The control message that closes every connection of ``user`` on every hub process.

    Checked here like the HTTP API checks it, so a bad value fails at the caller instead of being
    dropped (and counted as malformed) by every hub.
    """
    problem = disconnect_problem(user, code, reason)
    if problem is not None:
        raise ValueError(problem)
    return _pack({"op": "disconnect", "user": user, "code": code, "reason": reason})


def pack_control(message: dict[str, Any]) -> bytes:
    """Any other control message: hub.admin's heartbeats and searches (``op`` ``admin.*``),
    whose fields hub.admin checks on arrival."""
    return _pack(message)


def open_control(message: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
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
    code = message.get("code", DISCONNECT_CODE)
    reason = message.get("reason", "")
    problem = disconnect_problem(user, code, reason)
    if problem is not None:
        raise BadEnvelope(f"bad disconnect: {problem}")
    return "disconnect", (user, code, reason)


# -- join/leave notices (on the channel's own name, a map without data) ---------------------------


def pack_join_leave(join: list[dict[str, Any]], leave: list[dict[str, Any]]) -> bytes:
    """A hub's coalesced join/leave of one channel: ``{"join": [...], "leave": [...]}``, each
    list only when it has entries."""
    envelope: dict[str, Any] = {}
    if join:
        envelope["join"] = join
    if leave:
        envelope["leave"] = leave
    return _pack(envelope)


def open_join_leave(envelope: dict[str, Any]) -> tuple[list[Any], list[Any]]:
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
