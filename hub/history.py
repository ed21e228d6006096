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
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import BadEnvelope, BadSignature
from .redis.resp import bulk
from .redis.script import Script

__all__ = [
    "EMPTY_TTL",
    "META_TTL_MIN",
    "PUBLISH_SCRIPT",
    "READ_SCRIPT",
    "UNTIMED_TTL",
    "HistoryPage",
    "MemoryHistory",
    "Published",
    "meta_key",
    "new_epoch",
    "stream_key",
]

#: Every key the hub writes to Redis expires, so that nothing a client can make the hub write
#: (a random channel name) stays for good, and the memory broker forgets the same way:
#:
#: - the meta hash (offset and epoch) lives at least ``META_TTL_MIN`` seconds after the last
#:   publication, and never less than the history itself, so offsets survive idle periods and a
#:   client coming back after the history expired learns "not recovered" rather than seeing
#:   offsets start again at 1 under the same epoch;
#: - with ``history_ttl = 0`` (no time limit set) entries and meta live ``UNTIMED_TTL`` after the
#:   channel's last publication;
#: - a meta made by a subscribe before any publication (so that the subscriber's epoch is the one
#:   the first publication gets) lives ``EMPTY_TTL``: it holds nothing but a fresh epoch, and a
#:   client that subscribes to many random names makes nothing that lasts.
#:
#: A plain history read creates nothing: a channel without history answers offset 0 and an epoch
#: that is not kept (a client recovering from it learns "not recovered").
META_TTL_MIN = 86400.0
UNTIMED_TTL = 30 * 86400.0
EMPTY_TTL = 3600.0


def _ms(seconds: float) -> bytes:
    """A TTL for the scripts, in milliseconds (at least 1)."""
    return b"%d" % max(1, round(seconds * 1000))


def stream_ttl(history_ttl: float) -> float:
    """How long entries live after their channel's last publication."""
    return history_ttl if history_ttl > 0 else UNTIMED_TTL


def meta_ttl(history_ttl: float) -> float:
    """How long a channel's offset and epoch live after its last publication."""
    return max(stream_ttl(history_ttl), META_TTL_MIN)


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
        _ms(stream_ttl(ttl)),
        _ms(meta_ttl(ttl)),
        new_epoch().encode() if epoch is None else epoch,
        b"1" if sharded else b"0",
    ]


def read_args(
    pubsub_name: str,
    since: int | None,
    limit: int | None,
    size: int,
    create: bool = False,
) -> list[bytes]:
    """``numkeys, KEYS..., ARGV...`` of the read script. ``limit`` None: every entry.
    ``create``: a subscribe, which keeps the epoch it answers for ``EMPTY_TTL`` when the channel
    has none yet; a plain read creates nothing."""
    return [
        b"2",
        stream_key(pubsub_name).encode(),
        meta_key(pubsub_name).encode(),
        b"" if since is None else b"%d" % since,
        b"-1" if limit is None else b"%d" % limit,
        _ms(EMPTY_TTL) if create else b"0",
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
    #: Stored entries left out because they did not pass ``hub.redis.wire``: a bad field, or (also
    #: counted in ``unsigned``) no valid signature where one is required.
    skipped: int = 0
    unsigned: int = 0

    def covers(self, since: int, epoch: str) -> bool:
        """Whether ``entries`` (read with this ``since``) hold every publication after it."""
        if epoch != self.epoch or since > self.offset:
            return False
        if since == self.offset:
            return True
        return bool(self.entries) and self.entries[0]["offset"] == since + 1

    @classmethod
    def from_reply(cls, reply: Any, entry: Callable[[bytes], dict[str, Any]]) -> HistoryPage:
        """The read script's answer; ``entry`` opens and checks each stored payload
        (``hub.redis.wire.Envelopes.entry``), raising ``BadEnvelope`` for one to skip."""
        top, epoch, raw = reply
        page = cls(int(top), _text(epoch))
        for _entry_id, fields in raw:
            # fields: [b"e", payload]; the payload already holds offset and epoch.
            try:
                page.entries.append(entry(fields[1]))
            except BadEnvelope as exc:
                page.skipped += 1
                page.unsigned += isinstance(exc, BadSignature)
        return page


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
    ``size`` publications, dropped ``stream_ttl(ttl)`` seconds after the channel's last
    publication; the offset and epoch live on (like the Redis meta) for ``meta_ttl(ttl)``, then
    the channel is forgotten and starts again under a new epoch. A subscribe to a channel with no
    state keeps its epoch for ``EMPTY_TTL``; a plain read keeps nothing. Epochs are random per
    channel, so a restarted process never reuses one."""

    SWEEP_EVERY = 1000  # operations between sweeps of forgotten channels

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._channels: dict[str, _Channel] = {}
        self._clock = clock
        self._ops = 0

    def __len__(self) -> int:
        return len(self._channels)

    def _channel(self, channel: str, size: int, create: bool) -> _Channel | None:
        """The channel's live state (made when ``create``), with expired entries dropped."""
        now = self._clock()
        self._ops += 1
        if self._ops >= self.SWEEP_EVERY:
            self._ops = 0
            for name in [n for n, c in self._channels.items() if c.forget_at <= now]:
                del self._channels[name]
        state = self._channels.get(channel)
        if state is not None and state.forget_at <= now:
            del self._channels[channel]
            state = None
        if state is None:
            if not create:
                return None
            state = self._channels[channel] = _Channel(size)
            state.forget_at = now + EMPTY_TTL  # subscribed before any publication
        elif state.entries.maxlen != size:  # the namespace's size changed (reload)
            state.entries = deque(state.entries, maxlen=size)
        if state.expires <= now:
            state.entries.clear()
            state.expires = math.inf
        return state

    def add(self, channel: str, envelope: dict[str, Any], size: int, ttl: float) -> tuple[int, str]:
        """Store ``envelope`` (``offset`` and ``epoch`` are added to it); its offset and epoch."""
        state = self._channel(channel, size, True)
        assert state is not None
        state.offset += 1
        envelope["offset"] = state.offset
        envelope["epoch"] = state.epoch
        state.entries.append(envelope)
        now = self._clock()
        state.expires = now + stream_ttl(ttl)
        state.forget_at = now + meta_ttl(ttl)
        return state.offset, state.epoch

    def read(
        self,
        channel: str,
        since: int | None,
        limit: int | None,
        size: int,
        ttl: float,
        create: bool = False,
    ) -> HistoryPage:
        """The channel's page; ``create`` (a subscribe) keeps the epoch of a channel with no
        state yet, a plain read answers an empty page under a fresh epoch and keeps nothing."""
        state = self._channel(channel, size, create)
        if state is None:
            return HistoryPage(0, new_epoch(), [])
        entries = list(state.entries)
        if since is not None:
            entries = [e for e in entries if e["offset"] > since]
            if limit is not None:
                entries = entries[:limit]
        elif limit is not None:
            entries = entries[len(entries) - limit :] if limit else []
        return HistoryPage(state.offset, state.epoch, entries)
