"""Channel history: offsets, epochs, the Redis scripts and the one-process store.

A namespace with ``history_size > 0`` keeps the last publications of each of its channels. Every
publication gets the channel's next **offset** (1, 2, 3...) and the channel's **epoch**, a short
random string that changes whenever the history is lost (Redis restarted empty, the keys
expired, a new process for the memory broker). A client that saw offset ``n`` of epoch ``e``
can then ask for everything after ``n`` and learn whether that is complete.

In Redis a channel's history is a stream ``{<prefix>:ch:<channel>}:history`` (entry IDs
``<offset>-0``) and a hash ``{<prefix>:ch:<channel>}:meta`` (``offset``, ``epoch``), in the hash
slot of the channel's pub/sub name. One script (``history.lua``) assigns the offset, stores the
envelope and publishes it, so the order in history is the order of delivery; another
(``history_read.lua``) reads offset, epoch and entries in one step. The wire format is in
docs/publish-api.md.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgpack

from .resp import bulk

__all__ = [
    "META_TTL_MIN",
    "PUBLISH_SCRIPT",
    "READ_SCRIPT",
    "HistoryPage",
    "MemoryHistory",
    "Published",
    "Script",
    "meta_key",
    "new_epoch",
    "stream_key",
]

#: The meta hash (offset and epoch) lives at least this long (seconds) after the last
#: publication, and never less than the history itself, so offsets survive idle periods and a
#: client coming back after the history expired learns "not recovered" rather than seeing
#: offsets start again at 1 under the same epoch.
META_TTL_MIN = 86400.0


def _ms(seconds: float) -> bytes:
    """A TTL for the scripts: milliseconds, "0" for none."""
    return b"%d" % max(1, round(seconds * 1000)) if seconds > 0 else b"0"


def meta_ttl(history_ttl: float) -> float:
    """The meta TTL for a namespace's ``history_ttl`` (0: neither expires)."""
    return max(history_ttl, META_TTL_MIN) if history_ttl > 0 else 0.0


class Script:
    """A Lua script: its text and SHA1 (for ``EVALSHA``)."""

    __slots__ = ("sha", "sha_bytes", "text", "text_bytes")

    def __init__(self, text: str) -> None:
        self.text = text
        self.text_bytes = text.encode()
        self.sha = hashlib.sha1(self.text_bytes).hexdigest()
        self.sha_bytes = self.sha.encode()

    @classmethod
    def shipped(cls, name: str) -> Script:
        """A script shipped in the package (other languages read the same file)."""
        return cls(resources.files(__package__).joinpath(name).read_text())


PUBLISH_SCRIPT = Script.shipped("history.lua")
READ_SCRIPT = Script.shipped("history_read.lua")


def stream_key(pubsub_name: str) -> str:
    return f"{{{pubsub_name}}}:history"


def meta_key(pubsub_name: str) -> str:
    return f"{{{pubsub_name}}}:meta"


def new_epoch() -> str:
    """A short random epoch (8 characters, 48 bits)."""
    return base64.urlsafe_b64encode(os.urandom(6)).decode()


class PublishCommands:
    """``EVALSHA`` of the publish script, packed in RESP: per channel only the envelope and the
    epoch candidate change, so the rest is packed once and kept (publishing with history is
    a hot path, and redis-py's general packer costs more than the script run in Redis)."""

    __slots__ = ("_parts",)

    LIMIT = 10_000  # channels remembered; the cache starts over beyond that

    def __init__(self) -> None:
        self._parts: dict[tuple[str, int, float, bool], tuple[bytes, bytes, bytes]] = {}

    def packed(
        self, pubsub_name: str, envelope: bytes, size: int, ttl: float, sharded: bool
    ) -> tuple[bytes, list[bytes]]:
        """The packed ``EVALSHA`` and, for the ``EVAL`` fallback, the script's arguments."""
        epoch = base64.urlsafe_b64encode(os.urandom(6))
        key = (pubsub_name, size, ttl, sharded)
        parts = self._parts.get(key)
        if parts is None:
            if len(self._parts) >= self.LIMIT:
                self._parts.clear()
            args = publish_args(pubsub_name, b"", size, ttl, sharded)
            head = b"*%d\r\n%s%s" % (
                len(args) + 2,
                bulk(b"EVALSHA"),
                bulk(PUBLISH_SCRIPT.sha_bytes),
            )
            parts = self._parts[key] = (
                head + b"".join(bulk(a) for a in args[:4]),
                b"".join(bulk(a) for a in args[5:8]),
                bulk(args[9]),
            )
        head, middle, tail = parts
        command = head + bulk(envelope) + middle + bulk(epoch) + tail
        return command, epoch


def publish_args(
    pubsub_name: str,
    envelope: bytes,
    size: int,
    ttl: float,
    sharded: bool,
    epoch: bytes | None = None,
) -> list[bytes]:
    """``numkeys, KEYS..., ARGV...`` of the publish script (after ``EVALSHA sha``)."""
    name = pubsub_name.encode()
    return [
        b"2",
        b"{%s}:history" % name,
        b"{%s}:meta" % name,
        name,
        envelope,
        b"%d" % size,
        _ms(ttl),
        _ms(meta_ttl(ttl)),
        new_epoch().encode() if epoch is None else epoch,
        b"1" if sharded else b"0",
    ]


def read_args(
    pubsub_name: str, since: int | None, limit: int | None, size: int, ttl: float
) -> list[bytes]:
    """``numkeys, KEYS..., ARGV...`` of the read script. ``limit`` None: every entry."""
    return [
        b"2",
        stream_key(pubsub_name).encode(),
        meta_key(pubsub_name).encode(),
        b"" if since is None else b"%d" % since,
        b"-1" if limit is None else b"%d" % limit,
        _ms(meta_ttl(ttl)),
        new_epoch().encode(),
        b"%d" % size,
    ]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Published(int):
    """What a publish returns: the number of hub processes that received it (an ``int``, as
    before history), plus ``offset`` and ``epoch`` when the channel keeps history."""

    offset: int | None
    epoch: str | None

    def __new__(cls, receivers: int, offset: int | None = None, epoch: str | None = None) -> Any:
        self = super().__new__(cls, receivers)
        self.offset = offset
        self.epoch = epoch
        return self

    @classmethod
    def from_reply(cls, reply: Any) -> Published:
        offset, epoch, receivers = reply
        return cls(int(receivers), int(offset), _text(epoch))


@dataclass(slots=True)
class HistoryPage:
    """A channel's history as read at one instant: ``offset`` is the newest offset assigned,
    ``entries`` are envelopes (``data``, ``offset``, ``epoch``, optional fields), oldest first."""

    offset: int
    epoch: str
    entries: list[dict[str, Any]] = field(default_factory=list)

    def covers(self, since: int, epoch: str) -> bool:
        """Whether ``entries`` (read with this ``since``) hold every publication after it."""
        if epoch != self.epoch or since > self.offset:
            return False
        if since == self.offset:
            return True
        return bool(self.entries) and self.entries[0]["offset"] == since + 1

    @classmethod
    def from_reply(cls, reply: Any) -> HistoryPage:
        top, epoch, raw = reply
        entries = []
        for _entry_id, fields in raw:
            # fields: [b"e", envelope]; the envelope already holds offset and epoch.
            envelope = msgpack.unpackb(fields[1], raw=False, strict_map_key=True)
            if type(envelope) is dict and "data" in envelope:
                if type(envelope.get("offset")) is int:
                    entries.append(envelope)
        return cls(int(top), _text(epoch), entries)


class _Channel:
    __slots__ = ("entries", "epoch", "expires", "forget_at", "offset")

    def __init__(self, size: int) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)
        self.epoch = new_epoch()
        self.offset = 0
        self.expires = math.inf  # when the entries go (history_ttl after the last publication)
        self.forget_at = math.inf  # when the whole channel goes (the Redis meta's TTL)


class MemoryHistory:
    """History for the one-process broker, with the semantics of the Redis one: the last
    ``size`` publications, dropped ``ttl`` seconds after the channel's last publication; the
    offset and epoch live on (like the Redis meta) for ``max(ttl, META_TTL_MIN)``, then the
    channel is forgotten and starts again under a new epoch. Epochs are random per channel, so
    a restarted process never reuses one."""

    SWEEP_EVERY = 1000  # operations between sweeps of forgotten channels

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._channels: dict[str, _Channel] = {}
        self._clock = clock
        self._ops = 0

    def __len__(self) -> int:
        return len(self._channels)

    def _channel(self, channel: str, size: int, ttl: float) -> _Channel:
        now = self._clock()
        self._ops += 1
        if self._ops >= self.SWEEP_EVERY:
            self._ops = 0
            for name in [n for n, c in self._channels.items() if c.forget_at <= now]:
                del self._channels[name]
        state = self._channels.get(channel)
        if state is None or state.forget_at <= now:
            state = self._channels[channel] = _Channel(size)
        elif state.entries.maxlen != size:  # the namespace's size changed (reload)
            state.entries = deque(state.entries, maxlen=size)
        if state.expires <= now:
            state.entries.clear()
            state.expires = math.inf
        if ttl > 0 and state.forget_at == math.inf:
            state.forget_at = now + meta_ttl(ttl)  # subscribed before any publication
        return state

    def add(self, channel: str, envelope: dict[str, Any], size: int, ttl: float) -> tuple[int, str]:
        """Store ``envelope`` (``offset`` and ``epoch`` are added to it); its offset and epoch."""
        state = self._channel(channel, size, ttl)
        state.offset += 1
        envelope["offset"] = state.offset
        envelope["epoch"] = state.epoch
        state.entries.append(envelope)
        if ttl > 0:
            now = self._clock()
            state.expires = now + ttl
            state.forget_at = now + meta_ttl(ttl)
        return state.offset, state.epoch

    def read(
        self, channel: str, since: int | None, limit: int | None, size: int, ttl: float
    ) -> HistoryPage:
        state = self._channel(channel, size, ttl)
        entries = list(state.entries)
        if since is not None:
            entries = [e for e in entries if e["offset"] > since]
            if limit is not None:
                entries = entries[:limit]
        elif limit is not None:
            entries = entries[len(entries) - limit :] if limit else []
        return HistoryPage(state.offset, state.epoch, entries)
