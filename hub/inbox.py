"""Per-user inboxes: notifications kept until a device acknowledges them.

A channel's history is a cache shared by whoever subscribes; an inbox belongs to one user and
tracks what each of the user's devices has. A backend's ``notify`` stores an entry and pushes it
to every open connection of the user in one step, so a device that reconnects (to any hub
process) asks for what came after its last acknowledgement and gets it once, in order, before
the live stream goes on.

Each entry has a per-user increasing ``seq`` (not consecutive: collapsed and expired entries
leave gaps), the backend's optional ``id`` (a second notify with a known id is a no-op, so a
backend may retry), an optional ``collapse_key`` (the newer entry replaces the older one) and
an optional ``ttl``. The user's inbox has an **epoch** that changes when it is lost (Redis
restarted empty, or every key expired): a device holding a cursor of another epoch starts over.

Two stores share these semantics: :class:`MemoryInbox` for one process and :class:`RedisInbox`,
whose notify is the shipped script ``inbox.lua`` (backends in other languages run the same
file). Fallbacks (an entry no device acknowledged in time, handed to the backend) are kept in
one sorted set per deployment; :meth:`Inbox.claim_due` takes each due entry exactly once across
all processes, so a webhook is sent at most once per entry.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
from redis.exceptions import NoScriptError, ResponseError

from .codec import unpack_msgpack
from .errors import BadSignature
from .history import new_epoch
from .redis.cluster import Router
from .redis.resp import pack_publish, reply_error
from .redis.script import Script
from .redis.wire import DEFAULT_PREFIX, Envelopes, Names, check_signing_key, pack_message, seal
from .rules import user_problem

__all__ = [
    "INBOX_SIZE",
    "INBOX_TTL",
    "NOTIFY_SCRIPT",
    "Due",
    "Inbox",
    "InboxPage",
    "MemoryInbox",
    "Notified",
    "RedisInbox",
    "notify_problem",
]

NOTIFY_SCRIPT = Script.shipped("inbox.lua")

#: The defaults of ``inbox_size`` (entries kept per user) and ``inbox_ttl`` (seconds), for the
#: settings, both stores and the publishers: one pair, so a backend and the hubs agree.
INBOX_SIZE = 1000
INBOX_TTL = 7 * 86400.0

#: Devices whose acknowledgement cursor is kept per user; past this the one furthest behind
#: is forgotten (it then catches up from the oldest entry still kept, at least once).
MAX_DEVICES = 64


class Notified(NamedTuple):
    """What a notify did: the entry's ``seq`` (the first notify's when ``duplicate``), whether
    it replaced an older entry of its collapse key, how many entries whose ttl had passed it
    dropped, and how many entries the inbox then holds. (A named tuple: made once per notify,
    it costs a third of a frozen dataclass.)"""

    seq: int
    epoch: str
    receivers: int
    duplicate: bool = False
    collapsed: bool = False
    expired: int = 0
    length: int = 0


@dataclass(frozen=True, slots=True)
class InboxPage:
    """A read of an inbox: its top ``seq``, epoch, cursors and unexpired entries after a seq.

    ``entries`` are the pushes as stored (msgpack maps with ``data`` and ``inbox``), oldest
    first. ``last`` is the seq the read got to: pass it as ``since`` for the next page (it can
    be past the last entry returned when expired entries were skipped). ``epoch`` is ``""`` for
    a user who has no inbox. ``expired`` counts the entries whose ttl had passed that this read
    met and dropped from the store (a later read does not meet them again).
    """

    top: int
    epoch: str
    read: int
    acked: int
    entries: list[bytes] = field(default_factory=list)
    last: int = 0
    expired: int = 0

    @property
    def complete(self) -> bool:
        """Whether the page reached the newest entry."""
        return self.last >= self.top


@dataclass(frozen=True, slots=True)
class Due:
    """A fallback whose time has come: no device had acknowledged ``seq`` when it was claimed.
    ``push`` is the stored push (``None`` if the entry is gone: expired or collapsed)."""

    user: str
    seq: int
    push: bytes | None


#: Opens entries of a store that signs nothing (the memory store).
_UNSIGNED = Envelopes()

#: Longest backend ``id`` and ``collapse_key``.
MAX_KEY = 200


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def notify_problem(
    user: Any,
    id: Any = None,
    collapse_key: Any = None,
    ttl: Any = None,
    fallback_after: Any = None,
) -> str | None:
    """What is wrong with a notification's fields, or None: the one rule for the HTTP API, the
    CLI and the publishers."""
    problem = user_problem(user)
    if problem is not None:
        return problem
    for name, value in (("id", id), ("collapse_key", collapse_key)):
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_KEY):
            return f"{name} must be a string of 1 to {MAX_KEY} characters"
    if ttl is not None and (not _number(ttl) or ttl <= 0):
        return "ttl must be a positive number of seconds"
    if fallback_after is not None and (not _number(fallback_after) or fallback_after < 0):
        return "fallback_after must be a non-negative number of seconds"
    return None


def _mark(push: bytes) -> dict[str, Any]:
    return unpack_msgpack(push)["inbox"]


class Inbox(abc.ABC):
    """The interface both stores implement."""

    def __init__(self, size: int = INBOX_SIZE, ttl: float = INBOX_TTL) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError("inbox size must be a positive integer")
        if ttl <= 0:
            raise ValueError("inbox ttl must be positive")
        self.size = size
        self.ttl = ttl

    @abc.abstractmethod
    async def notify(
        self,
        user: str,
        envelope: bytes,
        *,
        id: str | None = None,
        collapse_key: str | None = None,
        ttl: float | None = None,
    ) -> Notified:
        """Store ``envelope`` (a msgpack map with ``data``) for ``user`` and push it."""

    @abc.abstractmethod
    async def read(
        self, user: str, since: int | None = None, *, device: str | None = None, limit: int = 100
    ) -> InboxPage:
        """Unexpired entries after ``since`` (``None``: after ``device``'s acknowledgement, or
        from the oldest entry kept). Creates nothing for a user with no inbox."""

    @abc.abstractmethod
    async def ack(self, user: str, device: str, seq: int) -> int:
        """``device`` has every entry up to ``seq`` (cumulative; never moves back, never past
        the top). Returns the device's cursor."""

    @abc.abstractmethod
    async def mark_read(self, user: str, seq: int) -> int:
        """Move the user's read cursor to ``seq`` (never back) and push ``{"inbox": {"read"}}``
        to all the user's connections. Returns the cursor."""

    @abc.abstractmethod
    async def schedule_fallback(self, user: str, seq: int, due: float) -> None:
        """Hand entry ``seq`` to :meth:`claim_due` at ``due`` (epoch seconds) if no device has
        acknowledged it by then."""

    async def close(self) -> None:  # noqa: B027 (most stores hold nothing)
        """Release what the store holds (connections)."""

    def open(self, user: str, push: bytes) -> dict[str, Any]:
        """A stored or pushed entry of ``user`` as a map (``data``, ``inbox``); raises
        ``BadEnvelope`` (``BadSignature``) for one to drop."""
        return _UNSIGNED.open(b"", push)

    @abc.abstractmethod
    async def claim_due(self, now: float | None = None, limit: int = 100) -> list[Due]:
        """Take the fallbacks due by ``now``: each is returned to one caller only, and only if
        no device acknowledged it; acknowledged ones are dropped."""


# -- one process ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    seq: int
    push: bytes
    stored: float
    expires: float  # 0: never
    collapse_key: str


@dataclass(slots=True)
class _UserInbox:
    epoch: str
    seq: int = 0
    read: int = 0
    acked: int = 0
    touched: float = 0.0
    entries: OrderedDict[int, _Entry] = field(default_factory=OrderedDict)
    ids: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)
    keys: dict[str, int] = field(default_factory=dict)
    devices: dict[str, int] = field(default_factory=dict)


class MemoryInbox(Inbox):
    """Inboxes in this process, with the semantics of the Redis store: ``publish(user, push)``
    delivers a push to the user's local connections (what ``PUBLISH`` does for Redis)."""

    def __init__(
        self,
        size: int = INBOX_SIZE,
        ttl: float = INBOX_TTL,
        *,
        publish: Callable[[str, bytes], int] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(size, ttl)
        self._publish = publish or (lambda user, push: 0)
        self._clock = clock
        self._users: dict[str, _UserInbox] = {}
        self._due: dict[tuple[str, int], float] = {}

    def _live(self, user: str) -> _UserInbox | None:
        """The user's inbox unless it expired (as Redis keys would)."""
        box = self._users.get(user)
        if box is not None and self._clock() - box.touched >= self.ttl:
            del self._users[user]
            return None
        return box

    async def notify(
        self,
        user: str,
        envelope: bytes,
        *,
        id: str | None = None,
        collapse_key: str | None = None,
        ttl: float | None = None,
    ) -> Notified:
        now = self._clock()
        box = self._live(user)
        if box is None:
            box = self._users[user] = _UserInbox(epoch=new_epoch())
        if id and id in box.ids:
            return Notified(box.ids[id][0], box.epoch, 0, True, length=len(box.entries))
        box.seq += 1
        seq = box.seq
        mark: dict[str, Any] = {"seq": seq, "epoch": box.epoch}
        if id:
            mark["id"] = id
        push = _append_inbox(envelope, mark)
        collapsed = False
        if collapse_key:
            older = box.keys.get(collapse_key)
            if older is not None:
                collapsed = box.entries.pop(older, None) is not None
            box.keys[collapse_key] = seq
        box.entries[seq] = _Entry(seq, push, now, now + ttl if ttl else 0.0, collapse_key or "")
        if id:
            box.ids[id] = (seq, now)
        expired = self._trim(box, now)
        box.touched = now
        receivers = self._publish(user, push)
        return Notified(seq, box.epoch, receivers, False, collapsed, expired, len(box.entries))

    def _trim(self, box: _UserInbox, now: float) -> int:
        """Drop from the oldest end as the script does; the count dropped for their ttl."""
        oldest = now - self.ttl
        dropped = 0
        while box.entries:
            entry = next(iter(box.entries.values()))
            expired = entry.expires and entry.expires <= now
            if len(box.entries) > self.size or entry.stored < oldest or expired:
                dropped += 1 if expired else 0
                del box.entries[entry.seq]
                if entry.collapse_key and box.keys.get(entry.collapse_key) == entry.seq:
                    del box.keys[entry.collapse_key]
            else:
                break
        while box.ids:
            first, (_, stored) = next(iter(box.ids.items()))
            if stored < oldest or len(box.ids) > 4 * self.size:
                del box.ids[first]
            else:
                break
        return dropped

    async def read(
        self, user: str, since: int | None = None, *, device: str | None = None, limit: int = 100
    ) -> InboxPage:
        box = self._live(user)
        if box is None:
            return InboxPage(0, "", 0, 0)
        acked = box.devices.get(device, 0) if device else 0
        start = since if since is not None else acked
        now = self._clock()
        entries: list[bytes] = []
        dead: list[_Entry] = []
        last, rows = start, 0
        for seq, entry in box.entries.items():
            if seq <= start:
                continue
            if rows >= limit:  # a full page: expired rows count, as in the Redis store
                break
            rows += 1
            last = seq
            if not entry.expires or entry.expires > now:
                entries.append(entry.push)
            else:
                dead.append(entry)
        else:
            last = max(last, box.seq)
        for entry in dead:  # dropped as the script drops them: counted once
            del box.entries[entry.seq]
            if entry.collapse_key and box.keys.get(entry.collapse_key) == entry.seq:
                del box.keys[entry.collapse_key]
        return InboxPage(box.seq, box.epoch, box.read, acked, entries, last, len(dead))

    async def ack(self, user: str, device: str, seq: int) -> int:
        box = self._live(user)
        if box is None:
            return 0
        cursor = max(box.devices.get(device, 0), min(seq, box.seq))
        box.devices[device] = cursor
        box.acked = max(box.acked, cursor)
        if len(box.devices) > MAX_DEVICES:
            del box.devices[min(box.devices, key=box.devices.__getitem__)]
        box.touched = self._clock()
        return cursor

    async def mark_read(self, user: str, seq: int) -> int:
        box = self._live(user)
        if box is None:
            return 0
        cursor = min(seq, box.seq)
        if cursor > box.read:
            box.read = cursor
            self._publish(user, _read_push(cursor, box.epoch))
        box.touched = self._clock()
        return box.read

    async def schedule_fallback(self, user: str, seq: int, due: float) -> None:
        self._due[(user, seq)] = due

    async def claim_due(self, now: float | None = None, limit: int = 100) -> list[Due]:
        now = self._clock() if now is None else now
        taken = sorted((due, key) for key, due in self._due.items() if due <= now)[:limit]
        claimed: list[Due] = []
        for _, (user, seq) in taken:
            del self._due[(user, seq)]
            box = self._live(user)
            if box is None or box.acked >= seq:
                continue
            entry = box.entries.get(seq)
            live = entry is not None and (not entry.expires or entry.expires > now)
            claimed.append(Due(user, seq, entry.push if live and entry else None))
        return claimed


def _append_inbox(envelope: bytes, mark: dict[str, Any]) -> bytes:
    """The envelope with ``"inbox": mark`` added, as the script makes it."""
    fields = unpack_msgpack(envelope)
    if not isinstance(fields, dict):
        raise ValueError("envelope must be a msgpack map")
    fields["inbox"] = mark
    return msgpack.packb(fields, use_bin_type=True)


def _read_push(cursor: int, epoch: str) -> bytes:
    return msgpack.packb({"inbox": {"read": cursor, "epoch": epoch}}, use_bin_type=True)


# -- Redis ------------------------------------------------------------------------------------

# Read: the top seq, epoch, cursors and entries after a seq, creating nothing. An entry whose
# ttl has passed is deleted as it is met and counted in the reply, so each expired entry is
# counted once, by the read or the notify that drops it (its collapse key is forgotten later,
# see inbox.lua).
_READ = """
-- KEYS[1] stream, KEYS[2] meta, KEYS[3] acks; ARGV[1] since ("" = the device's cursor),
-- ARGV[2] device ("" none), ARGV[3] limit, ARGV[4] inbox size.
-- Returns {top, epoch, read, acked, last, entries, expired}.
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  return {0, '', 0, 0, 0, {}, 0}
end
local top = tonumber(redis.call('HGET', KEYS[2], 'seq'))
local read = tonumber(redis.call('HGET', KEYS[2], 'read'))
local acked = 0
if ARGV[2] ~= '' then
  acked = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
end
local since = acked
if ARGV[1] ~= '' then
  since = tonumber(ARGV[1])
end
-- The notify trims by whole stream nodes: entries past the newest "size" are not the inbox's.
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[4])
if excess > 0 then
  local cut = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess + 1)
  local low = tonumber(string.match(cut[#cut][1], '^(%d+)'))
  if since < low - 1 then
    since = low - 1
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[3])
local rows = redis.call('XRANGE', KEYS[1], string.format('%d-0', since + 1), '+',
  'COUNT', limit + 1)
local out, last, expired = {}, since, 0
for i, row in ipairs(rows) do
  if i > limit then
    return {top, epoch, read, acked, last, out, expired}
  end
  last = tonumber(string.match(row[1], '^(%d+)'))
  local f = {}
  for j = 1, #row[2], 2 do
    f[row[2][j]] = row[2][j + 1]
  end
  local x = tonumber(f['x']) or 0  -- no x: no ttl
  if x == 0 or x > now then
    out[#out + 1] = f['e']
  else
    expired = expired + redis.call('XDEL', KEYS[1], row[1])
  end
end
if top > last then
  last = top
end
return {top, epoch, read, acked, last, out, expired}
"""

# Ack: move a device's cursor forward (never past the top), and the user's "any device" mark.
_ACK = """
-- KEYS[1] stream, KEYS[2] meta, KEYS[3] acks, KEYS[4..] the user's other keys;
-- ARGV[1] device, ARGV[2] seq, ARGV[3] max devices, ARGV[4] inbox TTL ms.
local top = redis.call('HGET', KEYS[2], 'seq')
if not top then
  return 0
end
local seq = math.min(tonumber(ARGV[2]), tonumber(top))
local cursor = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if seq > cursor then
  cursor = seq
  redis.call('HSET', KEYS[3], ARGV[1], cursor)
end
if cursor > tonumber(redis.call('HGET', KEYS[2], 'acked') or '0') then
  redis.call('HSET', KEYS[2], 'acked', cursor)
end
if redis.call('HLEN', KEYS[3]) > tonumber(ARGV[3]) then
  local all = redis.call('HGETALL', KEYS[3])
  local worst, low = nil, nil
  for i = 1, #all, 2 do
    local v = tonumber(all[i + 1])
    if low == nil or v < low then
      worst, low = all[i], v
    end
  end
  redis.call('HDEL', KEYS[3], worst)
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ARGV[4])
end
redis.call('HDEL', KEYS[2], 'renewed', 'next')  -- the next notify sets the TTL again (inbox.lua)
return cursor
"""

# Read cursor: move it forward and tell every connection of the user.
_MARK_READ = """
-- KEYS[1..] the user's keys (KEYS[2] meta); ARGV[1] seq, ARGV[2] pub/sub channel ("": the
-- caller publishes, signed), ARGV[3] "1" SPUBLISH, ARGV[4] inbox TTL ms.
-- Returns {read, epoch, moved}.
local top = redis.call('HGET', KEYS[2], 'seq')
if not top then
  return {0, '', 0}
end
local seq = math.min(tonumber(ARGV[1]), tonumber(top))
local read = tonumber(redis.call('HGET', KEYS[2], 'read') or '0')
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local moved = 0
if seq > read then
  read, moved = seq, 1
  redis.call('HSET', KEYS[2], 'read', read)
  if ARGV[2] ~= '' then
    local push = cmsgpack.pack({inbox = {read = read, epoch = epoch}})
    if ARGV[3] == '1' then
      redis.call('SPUBLISH', ARGV[2], push)
    else
      redis.call('PUBLISH', ARGV[2], push)
    end
  end
end
for _, key in ipairs(KEYS) do
  redis.call('PEXPIRE', key, ARGV[4])
end
redis.call('HDEL', KEYS[2], 'renewed', 'next')  -- the next notify sets the TTL again (inbox.lua)
return {read, epoch, moved}
"""

# Claim: take up to N due fallbacks out of the deployment's sorted set; whoever removes a
# member owns it, so each is handed out once.
_CLAIM = """
-- KEYS[1] the fallback set; ARGV[1] now (ms), ARGV[2] limit.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
return due
"""

# One entry and whether any device acknowledged it (for a claimed fallback).
_ENTRY = """
-- KEYS[1] stream, KEYS[2] meta; ARGV[1] seq, ARGV[2] inbox size. Returns {acked, push or
-- false}.
local acked = tonumber(redis.call('HGET', KEYS[2], 'acked') or '-1')
local row = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', ARGV[1] .. '-0')[1]
if not row then
  return {acked, false}
end
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if excess > 0 then  -- past the size (trimmed by whole stream nodes): gone
  local cut = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', excess + 1)
  if tonumber(ARGV[1]) < tonumber(string.match(cut[#cut][1], '^(%d+)')) then
    return {acked, false}
  end
end
local f = {}
for j = 1, #row[2], 2 do
  f[row[2][j]] = row[2][j + 1]
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local x = tonumber(f['x']) or 0  -- no x: no ttl
if x ~= 0 and x <= now then
  return {acked, false}
end
return {acked, f['e']}
"""

READ_SCRIPT, ACK_SCRIPT, MARK_READ_SCRIPT, CLAIM_SCRIPT, ENTRY_SCRIPT = (
    Script(s) for s in (_READ, _ACK, _MARK_READ, _CLAIM, _ENTRY)
)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _optional(
    id: str | None, collapse_key: str | None, ttl: float | None
) -> tuple[bytes, bytes, bytes]:
    """A notify's optional arguments as the script takes them: id and collapse key (empty
    for none), ttl in ms (``0`` for none)."""
    return (
        id.encode() if id else b"",
        collapse_key.encode() if collapse_key else b"",
        b"%d" % _ms(ttl) if ttl else b"0",
    )


def inbox_keys(names: Names, user: str) -> list[str]:
    """A user's inbox keys: stream, meta, ids, idt, collapse keys, acks (docs/inbox.md)."""
    base = "{" + names.user(user) + "}:inbox"
    return [base, *(f"{base}:{part}" for part in ("meta", "ids", "idt", "keys", "acks"))]


class _Epochs:
    """Epoch candidates for the notify script (8 characters, 48 random bits each), cut from
    one ``os.urandom`` read per 512: a notify sends one every call and almost never uses it."""

    __slots__ = ("_pool",)

    def __init__(self) -> None:
        self._pool: list[bytes] = []

    def reset(self) -> None:
        """A forked child must not hand out its parent's candidates."""
        self._pool = []

    def next(self) -> bytes:
        pool = self._pool
        if not pool:
            text = base64.urlsafe_b64encode(os.urandom(6 * 512))
            pool.extend(text[i : i + 8] for i in range(0, len(text), 8))
        return pool.pop()


_epochs = _Epochs()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_epochs.reset)


def notify_args(
    names: Names,
    user: str,
    envelope: bytes,
    *,
    id: str | None = None,
    collapse_key: str | None = None,
    ttl: float | None = None,
    size: int = INBOX_SIZE,
    inbox_ttl: float = INBOX_TTL,
    sharded: bool = False,
    epoch: bytes | None = None,
) -> list[Any]:
    """What follows the sha in ``EVALSHA`` of ``inbox.lua`` for one notify: the key count,
    KEYS and ARGV (docs/inbox.md, "Redis wire format"). The stream and meta keys, and the
    ids, idt and collapse-key keys only when the notify names an id or a collapse key; the
    three optional arguments (id, collapse key, ttl) only when one of them is given."""
    keys = inbox_keys(names, user)[: 5 if id or collapse_key else 2]
    args: list[Any] = [
        envelope,
        size,
        _ms(inbox_ttl),
        _epochs.next() if epoch is None else epoch,
        1 if sharded else 0,
    ]
    if id or collapse_key or ttl:
        args += [id or "", collapse_key or "", _ms(ttl) if ttl else 0]
    return [len(keys), *keys, *args]


def batch_args(calls: list[list[Any]]) -> list[Any]:
    """What follows the sha in ``EVALSHA`` of ``inbox.lua``'s batch form for several notifies,
    each laid out by :func:`notify_args` with the same inbox settings (docs/inbox.md, "Redis
    wire format"): the keys of all of them, ``many``, the shared size, TTL and flag, the
    layout (a letter per notify), then each notify's envelope, epoch candidate and the rest."""
    keys: list[Any] = []
    args: list[Any] = []
    layout = []
    shared: tuple[Any, ...] | None = None
    for one in calls:
        count = one[0]
        keys += one[1 : 1 + count]
        envelope, size, inbox_ttl, epoch, flag, *rest = one[1 + count :]
        if shared is None:
            shared = (size, inbox_ttl, flag)
        elif shared != (size, inbox_ttl, flag):
            raise ValueError("the notifies of a batch must share their inbox settings")
        args += [envelope, epoch, *rest]
        layout.append("p" if not rest else "f" if count == 5 else "t")
    size, inbox_ttl, flag = shared or (INBOX_SIZE, _ms(INBOX_TTL), 0)
    return [len(keys), *keys, "many", size, inbox_ttl, flag, "".join(layout), *args]


#: A notify waiting in a :class:`NotifyQueue`: user channel, envelope, id, collapse key, ttl and
#: the caller's future.
_Queued = tuple[bytes, bytes, str | None, str | None, float | None, asyncio.Future[Notified]]


class NotifyCommands:
    """``EVALSHA`` of ``inbox.lua`` packed in RESP: a notify is a hot path, and the general
    packer costs more per call than the script's common case in Redis. What depends only on
    the user (keys) is packed once per user and kept, what depends only on the inbox settings
    once. The common notify (no id, no collapse key, no ttl) is 2 keys and 5 arguments."""

    __slots__ = ("_flag", "_mid", "_tail", "_users", "inbox_ttl", "sharded", "size")

    LIMIT = 10_000  # users remembered; the cache starts over beyond that
    _HEAD = b"$7\r\nEVALSHA\r\n$40\r\n" + NOTIFY_SCRIPT.sha_bytes + b"\r\n"
    #: A notify up to its keys: plain (10 parts, 2 keys), with a ttl (13 parts, 2 keys), with
    #: an id or a collapse key (16 parts, 5 keys).
    _PLAIN = b"*10\r\n" + _HEAD + b"$1\r\n2\r\n"
    _TWO_KEYS = b"*13\r\n" + _HEAD + b"$1\r\n2\r\n"
    _FIVE_KEYS = b"*16\r\n" + _HEAD + b"$1\r\n5\r\n"
    _KEYS = b"$%d\r\n{%b}:inbox\r\n$%d\r\n{%b}:inbox:meta\r\n"
    _MORE = b"".join(b"$%%d\r\n{%%b}:inbox:%s\r\n" % p for p in (b"ids", b"idt", b"keys"))
    #: A notify's id, collapse key and ttl; the batch form's marker; EVAL in place of _HEAD.
    _TAIL = b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
    _MANY = b"$4\r\nmany\r\n"
    _TEXT = NOTIFY_SCRIPT.text_bytes
    _EVAL = b"$4\r\nEVAL\r\n$%d\r\n%b\r\n" % (len(_TEXT), _TEXT)

    def __init__(self, size: int, inbox_ttl: float, sharded: bool) -> None:
        self.size, self.inbox_ttl, self.sharded = size, inbox_ttl, sharded
        self._users: dict[bytes, bytes] = {}
        parts = (b"%d" % size, b"%d" % _ms(inbox_ttl))
        self._tail = b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in parts)
        self._flag = b"$1\r\n1\r\n" if sharded else b"$1\r\n0\r\n"
        # What follows the envelope: the end of its bulk, size, ttl and the epoch's length;
        # then the epoch and what follows it.
        self._mid = b"\r\n" + self._tail + b"$8\r\n"

    def _user(self, name: bytes) -> bytes:
        if len(self._users) >= self.LIMIT:
            self._users.clear()
        n = len(name) + 8  # "{" name "}:inbox"
        head = self._PLAIN + self._KEYS % (n, name, n + 5, name)
        self._users[name] = head
        return head

    def packed(
        self,
        name: bytes,
        envelope: bytes,
        id: str | None = None,
        collapse_key: str | None = None,
        ttl: float | None = None,
    ) -> tuple[bytes, bytes]:
        """The packed command for user channel ``name`` and its epoch candidate."""
        head = self._users.get(name) or self._user(name)
        epoch = _epochs.next()
        if id is None and collapse_key is None and ttl is None:
            command = b"%b$%d\r\n%b%b%b\r\n%b" % (
                head, len(envelope), envelope, self._mid, epoch, self._flag
            )  # fmt: skip
            return command, epoch
        keys = head[len(self._PLAIN) :]
        ident, ckey, life = _optional(id, collapse_key, ttl)
        if ident or ckey:
            n = len(name) + 8
            count, keys = self._FIVE_KEYS, keys + self._MORE % (
                n + 4, name, n + 4, name, n + 5, name
            )  # fmt: skip
        else:
            count = self._TWO_KEYS
        command = (
            b"%b%b$%d\r\n%b%b%b\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
        ) % (
            count, keys, len(envelope), envelope, self._mid, epoch, self._flag,
            len(ident), ident, len(ckey), ckey, len(life), life,
        )  # fmt: skip
        return command, epoch

    def packed_many(self, group: list[_Queued]) -> bytes:
        """One ``EVALSHA`` of the script's batch form for the notifies of ``group`` (their
        user channels, envelopes, ids, collapse keys and ttls; the rest of each is ignored)."""
        skip, users, tail = len(self._PLAIN), self._users, self._TAIL
        layout, keys, args = bytearray(), [], []
        nkeys = 0
        for name, envelope, id, collapse_key, ttl, *_ in group:
            head = users.get(name) or self._user(name)
            keys.append(head[skip:])
            args.append(b"$%d\r\n%b\r\n$8\r\n%b\r\n" % (len(envelope), envelope, _epochs.next()))
            if id is None and collapse_key is None and ttl is None:
                layout.append(112)  # p
                nkeys += 2
                continue
            ident, ckey, life = _optional(id, collapse_key, ttl)
            args.append(tail % (len(ident), ident, len(ckey), ckey, len(life), life))
            if ident or ckey:
                n = len(name) + 8
                keys.append(self._MORE % (n + 4, name, n + 4, name, n + 5, name))
                layout.append(102)  # f
                nkeys += 5
            else:
                layout.append(116)  # t
                nkeys += 2
        count = b"%d" % nkeys
        parts = 3 + nkeys + 5 + 2 * len(group) + 3 * sum(c != 112 for c in layout)
        return b"".join(
            (
                b"*%d\r\n%b$%d\r\n%b\r\n" % (parts, self._HEAD, len(count), count),
                *keys,
                self._MANY,
                self._tail,
                self._flag,
                b"$%d\r\n%b\r\n" % (len(layout), layout),
                *args,
            )
        )

    @classmethod
    def as_eval(cls, command: bytes) -> bytes:
        """``command`` (packed here) as ``EVAL`` of the script's text, for a Redis that does
        not know the script yet."""
        count = command.index(b"\r\n") + 2
        return command[:count] + cls._EVAL + command[count + len(cls._HEAD) :]


#: Notifies that one call of ``inbox.lua`` carries at most. Redis pays the call itself (the
#: ``EVALSHA``, its ``TIME``, three shared arguments and their conversion) once per call: eight
#: plain notifies in one call cost it about 72k instructions each against 100k one by one
#: (bench/inbox_redis.py); more in a call gain less each while a longer script holds Redis
#: longer, and a burst of 32 goes out as four calls Redis can start on one by one.
NOTIFY_BATCH = 8


class NotifyQueue:
    """Notifies sent as few script calls as they can share: the notifies made during one
    event-loop turn (as many as tasks notifying at once make) go out together at the end of
    it, up to :data:`NOTIFY_BATCH` in one call of ``inbox.lua`` (its batch form, docs/inbox.md);
    a notify made alone is a call of its own. On a cluster, only notifies of one user share a
    call (a script's keys must share a slot). Each caller gets its own notify's result or
    error: a notify that Redis refuses fails alone, the others in its call go on; a call that
    fails as a whole (a lost connection) fails all of its notifies, each of which may have run.
    Notifies of one user keep the order they were made in."""

    __slots__ = ("_commands", "_key", "_names", "_pending", "_router", "_scheduled", "_tasks")

    def __init__(
        self, router: Router, names: Names, commands: NotifyCommands, signing_key: bytes | None
    ) -> None:
        self._router, self._names, self._commands, self._key = router, names, commands, signing_key
        #: Per route (a user channel on a cluster, else ""): its name and the notifies queued.
        self._pending: dict[str, tuple[str, list[_Queued]]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(
        self,
        user: str,
        envelope: bytes,
        id: str | None = None,
        collapse_key: str | None = None,
        ttl: float | None = None,
    ) -> asyncio.Future[Notified]:
        """Queue one notify of checked fields; its future has what it did. The envelope is
        signed here when the queue has a signing key."""
        name = self._names.user(user)
        raw = name.encode()
        if self._key is not None:
            envelope = seal(self._key, raw, envelope)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Notified] = loop.create_future()
        route = name if self._router.sharded else ""
        waiting = self._pending.get(route)
        if waiting is None:
            waiting = self._pending[route] = (name, [])
        group = waiting[1]
        group.append((raw, envelope, id, collapse_key, ttl, future))
        if len(group) >= NOTIFY_BATCH:
            del self._pending[route]
            self._send(loop, name, group)
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        loop = asyncio.get_running_loop()
        for name, group in pending.values():
            self._send(loop, name, group)

    def _send(self, loop: asyncio.AbstractEventLoop, name: str, group: list[_Queued]) -> None:
        task = loop.create_task(self._run(name, group))
        self._tasks.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _run(self, name: str, group: list[_Queued]) -> None:
        commands = self._commands
        if len(group) == 1:
            raw, envelope, id, collapse_key, ttl, _ = group[0]
            command = commands.packed(raw, envelope, id, collapse_key, ttl)[0]
        else:
            command = commands.packed_many(group)
        try:
            # Routed by the channel name: the keys' hash tag, the slot of every inbox key.
            try:
                reply = await self._router.execute_packed(name, command)
            except NoScriptError:  # it did not run: the same call as EVAL
                reply = await self._router.execute_packed(name, commands.as_eval(command))
        except Exception as exc:
            for item in group:
                if not item[5].done():
                    item[5].set_exception(exc)
            return
        except BaseException:
            for item in group:
                item[5].cancel()
            raise
        replies = [reply] if len(group) == 1 else reply
        if type(replies) is not list or len(replies) != len(group):
            replies = [ValueError(f"notify batch reply: {reply!r:.80}")] * len(group)
        for item, one in zip(group, replies, strict=True):
            future = item[5]
            if future.done():
                continue
            if isinstance(one, Exception):  # hiredis leaves an error inside a list as its own
                future.set_exception(one if isinstance(one, ResponseError) else reply_error(one))
                continue
            try:
                future.set_result(notified(one))
            except Exception as exc:
                future.set_exception(exc)


def publisher_notify_args(
    names: Names,
    user: str,
    data: Any,
    *,
    id: str | None,
    collapse_key: str | None,
    ttl: float | None,
    fallback_after: float | None,
    inbox_size: int,
    inbox_ttl: float,
    sharded: bool,
    signing_key: bytes | None = None,
) -> list[Any]:
    """A publisher's notify, its fields checked (``ValueError`` saying what is wrong): the
    arguments of :func:`notify_args`, the envelope signed with ``signing_key``."""
    check_notify(user, id, collapse_key, ttl, fallback_after, inbox_size, inbox_ttl)
    envelope = seal(signing_key, names.user(user).encode(), pack_message(data))
    return notify_args(
        names,
        user,
        envelope,
        id=id,
        collapse_key=collapse_key,
        ttl=ttl,
        size=inbox_size,
        inbox_ttl=inbox_ttl,
        sharded=sharded,
    )


def check_notify(
    user: Any,
    id: Any,
    collapse_key: Any,
    ttl: Any,
    fallback_after: Any,
    inbox_size: Any,
    inbox_ttl: Any,
) -> None:
    """A publisher's notify fields and inbox settings, or ``ValueError`` saying what is wrong."""
    problem = notify_problem(user, id, collapse_key, ttl, fallback_after)
    if problem is not None:
        raise ValueError(problem)
    if not isinstance(inbox_size, int) or inbox_size < 1:
        raise ValueError("inbox_size must be a positive integer")
    if not _number(inbox_ttl) or inbox_ttl <= 0:
        raise ValueError("inbox_ttl must be a positive number of seconds")


def fallback_entry(names: Names, user: str, seq: int, due: float) -> tuple[str, str, int]:
    """The deployment's fallback set, the member for entry ``seq`` and its score (ms)."""
    return f"{names.prefix}:inbox:fallback", f"{seq}:{user}", _ms(due)


def notified(reply: Any) -> Notified:
    """A notify script's reply ``[seq, epoch, receivers, duplicate, collapsed, expired,
    length]`` (the first four from an older script). Runs once per notify: the reply as
    hiredis and redis-py give it (ints, epoch bytes) is taken as it is, anything else is
    converted field by field."""
    if type(reply) is list and len(reply) == 7:
        seq, epoch, receivers, duplicate, collapsed, expired, length = reply
        if type(seq) is int and type(epoch) is bytes and type(receivers) is int:
            if type(expired) is int and type(length) is int:
                fields = (seq, epoch.decode(), receivers, duplicate == 1, collapsed == 1)
                return _new_tuple(Notified, (*fields, expired, length))
    if isinstance(reply, Exception):
        raise reply
    if len(reply) == 7:
        seq, epoch, receivers, duplicate, collapsed, expired, length = reply
    else:
        (seq, epoch, receivers, duplicate), collapsed, expired, length = reply[:4], 0, 0, 0
    return Notified(
        int(seq),
        epoch.decode() if type(epoch) is bytes else str(epoch),
        int(receivers),
        duplicate == 1,
        collapsed == 1,
        int(expired),
        int(length),
    )


#: A named tuple made from its fields without the generated ``__new__`` (a third of the cost).
_new_tuple = tuple.__new__


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisInbox(Inbox):
    """Inboxes in Redis (or a Redis Cluster), shared by every hub process of a deployment.

    A user's keys (see ``inbox.lua``) share the hash slot of ``<prefix>:user:<user>``, and all
    of them expire ``ttl`` seconds after the user's last ack or read, and between ``ttl`` and
    1/64 more after the last notify (``inbox.lua``, "renew"). Fallbacks wait in one sorted
    set, ``<prefix>:inbox:fallback`` (member ``<seq>:<user>``, score the due time in ms), which
    expires ``ttl`` after its last write.

    With ``signing_key`` (the hubs' ``redis_signing_key``) every push it makes is signed, and
    :meth:`open` takes only signed entries (docs/publish-api.md, "Signed payloads"); entries
    it refuses are counted in ``bad_signatures`` (``hub_bridge_bad_signatures_total``).
    """

    def __init__(
        self,
        router: Router,
        prefix: str = DEFAULT_PREFIX,
        size: int = INBOX_SIZE,
        ttl: float = INBOX_TTL,
        *,
        signing_key: bytes | str | None = None,
    ) -> None:
        super().__init__(size, ttl)
        self._router = router
        self.names = Names(prefix)
        self.fallback_key = f"{prefix}:inbox:fallback"
        self._key = check_signing_key(signing_key)
        self._envelopes = Envelopes(self._key)
        commands = NotifyCommands(size, ttl, router.sharded)
        self._queue = NotifyQueue(router, self.names, commands, self._key)
        self.bad_signatures = 0

    async def close(self) -> None:
        await self._router.close()

    def keys(self, user: str) -> list[str]:
        """stream, meta, ids, idt, collapse keys, acks: in that order."""
        return inbox_keys(self.names, user)

    def open(self, user: str, push: bytes) -> dict[str, Any]:
        """A stored or pushed entry of ``user`` as a map (``data``, ``inbox``), its signature
        checked when this store has a key; a refused one raises ``BadEnvelope`` (and counts
        in ``bad_signatures`` when it is a signature)."""
        try:
            return self._envelopes.open(self.names.user(user).encode(), push)
        except BadSignature:
            self.bad_signatures += 1
            raise

    async def _run(self, user: str, script: Script, keys: list[str], args: list[Any]) -> Any:
        return await self._router.script(keys[0], script, [len(keys), *keys, *args])

    async def notify(
        self,
        user: str,
        envelope: bytes,
        *,
        id: str | None = None,
        collapse_key: str | None = None,
        ttl: float | None = None,
    ) -> Notified:
        return await self._queue.notify(user, envelope, id, collapse_key, ttl)

    async def read(
        self, user: str, since: int | None = None, *, device: str | None = None, limit: int = 100
    ) -> InboxPage:
        stream, meta, *_, acks = self.keys(user)
        args = ["" if since is None else since, device or "", max(1, limit), self.size]
        top, epoch, read, acked, last, entries, expired = await self._run(
            user, READ_SCRIPT, [stream, meta, acks], args
        )
        return InboxPage(
            int(top),
            _text(epoch),
            int(read),
            int(acked),
            [bytes(e) for e in entries],
            int(last),
            int(expired),
        )

    async def ack(self, user: str, device: str, seq: int) -> int:
        stream, meta, ids, idt, ckeys, acks = self.keys(user)
        keys = [stream, meta, acks, ids, idt, ckeys]
        args = [device, int(seq), MAX_DEVICES, _ms(self.ttl)]
        return int(await self._run(user, ACK_SCRIPT, keys, args))

    async def mark_read(self, user: str, seq: int) -> int:
        sharded = self._router.sharded
        name = self.names.user(user)
        # Signed, the push is published here (Lua has no HMAC); unsigned, by the script.
        channel = "" if self._key is not None else name
        args = [int(seq), channel, 1 if sharded else 0, _ms(self.ttl)]
        read, epoch, moved = await self._run(user, MARK_READ_SCRIPT, self.keys(user), args)
        if int(moved) and self._key is not None:
            raw = name.encode()
            push = seal(self._key, raw, _read_push(int(read), _text(epoch)))
            command = b"SPUBLISH" if sharded else b"PUBLISH"
            await self._router.execute_packed(name, pack_publish(command, name, push))
        return int(read)

    async def schedule_fallback(self, user: str, seq: int, due: float) -> None:
        key, member, score = fallback_entry(self.names, user, seq, due)
        await self._router.execute(key, "ZADD", key, score, member)
        await self._router.execute(key, "PEXPIRE", key, _ms(self.ttl))

    async def claim_due(self, now: float | None = None, limit: int = 100) -> list[Due]:
        now = time.time() if now is None else now
        key = self.fallback_key
        members = await self._router.script(key, CLAIM_SCRIPT, [1, key, _ms(now), limit])
        claimed: list[Due] = []
        for member in members:
            seq_text, _, user = _text(member).partition(":")
            seq = int(seq_text)
            stream, meta = self.keys(user)[:2]
            acked, push = await self._run(user, ENTRY_SCRIPT, [stream, meta], [seq, self.size])
            if int(acked) < 0 or int(acked) >= seq:
                continue  # the inbox is gone, or a device has the entry
            claimed.append(Due(user, seq, bytes(push) if push else None))
        return claimed
