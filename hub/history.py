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

import hashlib
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgpack

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


def _ms(seconds: float) -> str:
    """A TTL for the scripts: milliseconds, "0" for none."""
    return str(max(1, round(seconds * 1000))) if seconds > 0 else "0"


def meta_ttl(history_ttl: float) -> float:
    """The meta TTL for a namespace's ``history_ttl`` (0: neither expires)."""
    return max(history_ttl, META_TTL_MIN) if history_ttl > 0 else 0.0


class Script:
    """A Lua script shipped in the package: its text and SHA1 (for ``EVALSHA``)."""

    __slots__ = ("sha", "text")

    def __init__(self, name: str) -> None:
        self.text = resources.files(__package__).joinpath(name).read_text()
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()


PUBLISH_SCRIPT = Script("history.lua")
READ_SCRIPT = Script("history_read.lua")


def stream_key(pubsub_name: str) -> str:
    return f"{{{pubsub_name}}}:history"


def meta_key(pubsub_name: str) -> str:
    return f"{{{pubsub_name}}}:meta"


def new_epoch() -> str:
    """A short random epoch (8 characters, 48 bits)."""
    return secrets.token_urlsafe(6)


def publish_args(
    pubsub_name: str, envelope: bytes, size: int, ttl: float, sharded: bool
) -> list[Any]:
    """``numkeys, KEYS..., ARGV...`` of the publish script (after ``EVALSHA sha``)."""
    return [
        2,
        stream_key(pubsub_name),
        meta_key(pubsub_name),
        pubsub_name,
        envelope,
        size,
        _ms(ttl),
        _ms(meta_ttl(ttl)),
        new_epoch(),
        "1" if sharded else "0",
    ]


def read_args(pubsub_name: str, since: int | None, limit: int | None, ttl: float) -> list[Any]:
    """``numkeys, KEYS..., ARGV...`` of the read script. ``limit`` None: every entry."""
    return [
        2,
        stream_key(pubsub_name),
        meta_key(pubsub_name),
        "" if since is None else str(since),
        "-1" if limit is None else str(limit),
        _ms(meta_ttl(ttl)),
        new_epoch(),
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
    def from_reply(cls, reply: Any, newest_first: bool) -> HistoryPage:
        top, epoch, raw = reply
        entries = []
        for _entry_id, fields in raw:
            # fields: [b"e", envelope]; the envelope already holds offset and epoch.
            envelope = msgpack.unpackb(fields[1], raw=False, strict_map_key=True)
            if type(envelope) is dict and "data" in envelope:
                if type(envelope.get("offset")) is int:
                    entries.append(envelope)
        if newest_first:
            entries.reverse()
        return cls(int(top), _text(epoch), entries)


class _Channel:
    __slots__ = ("entries", "expires", "offset")

    def __init__(self, size: int) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=size)
        self.offset = 0
        self.expires = float("inf")


class MemoryHistory:
    """History for the one-process broker, with the semantics of the Redis one: the last
    ``size`` publications, dropped ``ttl`` seconds after the channel's last publication (the
    offset counter is kept, like the Redis meta); one epoch per process."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.epoch = new_epoch()
        self._channels: dict[str, _Channel] = {}
        self._clock = clock

    def _channel(self, channel: str, size: int) -> _Channel:
        state = self._channels.get(channel)
        if state is None:
            state = self._channels[channel] = _Channel(size)
        elif state.entries.maxlen != size:  # the namespace's size changed (reload)
            state.entries = deque(state.entries, maxlen=size)
        if state.expires <= self._clock():
            state.entries.clear()
            state.expires = float("inf")
        return state

    def add(self, channel: str, envelope: dict[str, Any], size: int, ttl: float) -> int:
        """Store ``envelope`` (``offset`` and ``epoch`` are added to it); its offset."""
        state = self._channel(channel, size)
        state.offset += 1
        envelope["offset"] = state.offset
        envelope["epoch"] = self.epoch
        state.entries.append(envelope)
        if ttl > 0:
            state.expires = self._clock() + ttl
        return state.offset

    def read(self, channel: str, since: int | None, limit: int | None, size: int) -> HistoryPage:
        state = self._channel(channel, size)
        entries = list(state.entries)
        if since is not None:
            entries = [e for e in entries if e["offset"] > since]
            if limit is not None:
                entries = entries[:limit]
        elif limit is not None:
            entries = entries[len(entries) - limit :] if limit else []
        return HistoryPage(state.offset, self.epoch, entries)
