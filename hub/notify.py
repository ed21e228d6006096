"""Notifications: the per-user inboxes of ``hub.inbox`` wired to clients, backends and the
offline fallback.

A client asks for its inbox (``{"op": "inbox", "since": N}``) and gets, after the reply, every
unexpired entry after ``N`` (or after its device's acknowledgement), in order, then the live
stream, with no gap and no duplicate between the two. The same care as a history subscribe
(``hub.fanout.Tracker``): the session is made a follower, whose live pushes are held back,
before the store is read; after the reply and the stored entries are written, the held pushes
it does not have yet (by ``seq``) are written and it goes live. A follower keeps the highest
``seq`` it was sent, so a push arriving twice (from the store and from pub/sub) is written once.

When the pub/sub link of this process was cut (a gap) or a push comes with another epoch, its
followers catch up the same way from the store, so a notification stored while this process did
not hear it still arrives. Notifications go to the connections that asked for the inbox only
(one that did not would get them out of order with what it asks for later); read cursors go to
every connection of the user.

Catching up is a replay of ``hub.fanout``: written in slices of the fan-out's replay budget,
waiting for the connection to drain in between, so a long inbox never closes a client as a
slow consumer.

The fallback: an entry no device acknowledged within ``fallback_after`` seconds is POSTed to
``fallback_url`` (JSON, HMAC-SHA256 signed with ``fallback_secret``), retried with backoff; the
store hands each due entry to one process only (``Inbox.claim_due``), so it is sent at most
once across a deployment.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError

from .codec import check_data, json_bytes
from .errors import BadEnvelope, BadRequest, BadSignature, ErrorCode, HubUnavailable, ReplyError
from .fanout import REPLAY_POLL, Push
from .inbox import Due, Inbox, InboxPage, MemoryInbox, Notified, notify_problem
from .redis.wire import inbox_mark, unpack
from .rules import check_user

if TYPE_CHECKING:
    from .node import Node
    from .session import Session

__all__ = [
    "MAX_BATCH",
    "Notification",
    "Notifications",
    "check_device",
    "fallback_signature",
    "notify_problem",
]

log = logging.getLogger("hub.notify")

#: Largest ``seq`` a command may name (Redis integers are 64-bit).
MAX_SEQ = (1 << 63) - 1
#: Most notifications in one batch (``POST /api/notify`` with ``notifications``).
MAX_BATCH = 1000
#: The device of a connection that names none and whose token names none.
DEFAULT_DEVICE = "default"
_DEVICE = re.compile(r"[A-Za-z0-9_\-.:@]{1,64}")
#: Entries read from the store per round trip while catching up.
PAGE = 200
#: Live pushes held for one catching-up connection; past this they are dropped and the store
#: is read once more instead (they are all in it).
HELD_MAX = 2000
#: Seconds between two looks for due fallbacks, at most.
FALLBACK_POLL = 1.0
#: Attempts to hand one fallback to the backend, and the first retry delay (doubling).
FALLBACK_ATTEMPTS = 5
FALLBACK_BACKOFF = 0.5
FALLBACK_TIMEOUT = 10.0


def check_device(device: Any) -> str:
    if not isinstance(device, str) or _DEVICE.fullmatch(device) is None:
        raise BadRequest("device must be 1 to 64 letters, digits or _-.:@")
    return device


def _seq(command: dict[str, Any], name: str, *, required: bool) -> int | None:
    value = command.get(name)
    if value is None and not required:
        return None
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise BadRequest(f"{name} must be an integer from 0 to 2^63-1")
    return value


def fallback_signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``X-Hub-Signature`` of a fallback: HMAC-SHA256 over ``<timestamp>.<body>``, hex."""
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification to store and push, its fields checked (:func:`notify_problem`)."""

    user: str
    data: Any
    id: str | None = None
    collapse_key: str | None = None
    ttl: float | None = None
    fallback_after: float | None = None

    @classmethod
    def from_body(cls, body: Any) -> Notification:
        """From a JSON object (the HTTP API); :class:`BadRequest` saying what is wrong."""
        if not isinstance(body, dict):
            raise BadRequest("a notification must be an object")
        if "data" not in body:
            raise BadRequest("missing field: data")
        unknown = set(body) - {"user", "data", "id", "collapse_key", "ttl", "fallback_after"}
        if unknown:
            raise BadRequest(f"unknown field: {sorted(unknown)[0][:40]}")
        fields = {k: body.get(k) for k in ("id", "collapse_key", "ttl", "fallback_after")}
        problem = notify_problem(body.get("user"), **fields)
        if problem is not None:
            raise BadRequest(problem)
        return cls(body["user"], body["data"], **fields)


class Follower:
    """A connection that asked for its inbox: its device, what it was sent (epoch, highest
    ``seq``), the live pushes held while it catches up, and its acknowledgement as last known."""

    __slots__ = (
        "acked",
        "again",
        "backlog",
        "device",
        "epoch",
        "held",
        "last",
        "overflow",
        "syncing",
    )

    def __init__(self, device: str) -> None:
        self.device = device
        #: Stored entries written since the inbox was opened, until it first goes live.
        self.backlog: int | None = 0
        self.epoch = ""
        self.last = 0
        self.acked = 0
        self.held: list[dict[str, Any]] | None = []
        self.overflow = False  # held pushes were dropped: read the store again
        self.again = False  # a gap while catching up: read the store again
        self.syncing = False


class InboxMetrics:
    def __init__(self, node: Node) -> None:
        r = node.metrics.registry

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"hub_inbox_{name}", doc, list(labels), registry=r)

        self.stored = counter("stored", "Notifications stored by this process's notify.")
        self.duplicates = counter(
            "duplicates", "Notifies whose id the inbox had seen: nothing stored or pushed."
        )
        self.delivered = counter("delivered", "Live notification pushes written to connections.")
        self.redelivered = counter(
            "redelivered", "Stored notifications written to connections catching up."
        )
        self.dropped = counter(
            "duplicates_dropped", "Pushes not written: the connection already had that seq."
        )
        self.acked = counter("acked", "Acknowledgements stored.")
        self.reads = counter("read_cursor_moves", "Read cursor updates asked by clients.")
        self.resets = counter("resets", "Connections told their inbox started over (new epoch).")
        self.malformed = counter("malformed", "Stored or pushed entries dropped as malformed.")
        self.collapsed = counter(
            "collapsed", "Entries replaced by a newer notify with their collapse key."
        )
        self.expired = counter(
            "expired",
            "Entries whose ttl had passed, dropped by the notify or read that met them first"
            " (each counted once per deployment).",
        )
        self.length = Histogram(
            "hub_inbox_length",
            "Entries in the user's inbox after each notify of this process.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.fallbacks = counter(
            "fallbacks", "Fallbacks handed to the backend, by result.", ("result",)
        )
        self.backlog = Histogram(
            "hub_inbox_catch_up_entries",
            "Stored entries a connection got after asking for its inbox, before it went live.",
            buckets=(0, 1, 5, 10, 50, 100, 500, 1000, 5000),
            registry=r,
        )


class Notifications:
    """The inbox service of one node (``node.inbox``): client commands, pushes from the broker,
    notify for backends, and the fallback sender."""

    def __init__(self, node: Node, store: Inbox | None = None) -> None:
        self._push_type = Push
        self.node = node
        #: Pushes go out through the node's fan-out, under its outbound budget.
        self._deliver = node.fanout.deliver
        s = node.settings
        self.store = store or MemoryInbox(s.inbox_size, s.inbox_ttl, publish=self._published)
        self.metrics = InboxMetrics(node)
        self._followers: dict[Session, Follower] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fallback_loop: asyncio.Task[None] | None = None
        secret = s.fallback_secret
        self._secret = secret.encode() if secret else b""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.node.settings.fallback_url and self._fallback_loop is None:
            loop = asyncio.get_running_loop()
            self._fallback_loop = loop.create_task(self._fallbacks())

    async def close(self) -> None:
        tasks = [*self._tasks]
        if self._fallback_loop is not None:
            tasks.append(self._fallback_loop)
            self._fallback_loop = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, session: Session) -> None:
        """The session is gone."""
        self._followers.pop(session, None)

    # -- pushes from the store (memory) or the broker (Redis) ----------------------------------

    def _published(self, user: str, push: bytes) -> int:
        """The memory store's publish: hand the push to this node at once."""
        envelope = unpack(push)
        self.on_push(user, inbox_mark(envelope), envelope.get("data"))
        return 1 if self.node.registry.has_user(user) else 0

    def on_push(self, user: str, mark: dict[str, Any], data: Any) -> None:
        """A notification (``mark`` has ``seq``) or a read cursor (``read``) for ``user``."""
        sessions = list(self.node.registry.user_sessions(user))
        if not sessions:
            return
        if "read" in mark:
            push = self._push_type({"inbox": mark})
            for session in sessions:
                self._deliver(session, push)
            return
        obj = {"inbox": mark, "data": data}
        push = self._push_type(obj)
        followers = self._followers
        delivered = 0
        for session in sessions:
            f = followers.get(session)
            if f is not None:
                delivered += self._admit(session, f, obj, push)
        if delivered:
            self.metrics.delivered.inc(delivered)

    def _admit(self, session: Session, f: Follower, obj: dict[str, Any], push: Push) -> int:
        """Write a live push to a follower unless it has it; 1 if written."""
        if f.held is not None:
            if len(f.held) < HELD_MAX:
                f.held.append(obj)
            else:
                f.overflow = True
            return 0
        mark = obj["inbox"]
        if mark["epoch"] != f.epoch:
            # The inbox started over (or this is its first entry): catch up in the new epoch.
            f.held = [obj]
            self._sync(session, f)
            return 0
        if mark["seq"] <= f.last:
            self.metrics.dropped.inc()
            return 0
        f.last = mark["seq"]
        return 1 if self._deliver(session, push) else 0

    def on_gap(self, users: list[str]) -> None:
        """This process may have missed pushes to these users (its Redis link was cut): their
        followers catch up from the store."""
        for user in users:
            for session in list(self.node.registry.user_sessions(user)):
                f = self._followers.get(session)
                if f is None:
                    continue
                if f.held is None:
                    f.held = []
                    self._sync(session, f)
                else:
                    f.again = True

    # -- client commands -----------------------------------------------------------------------

    def _device(self, session: Session, command: dict[str, Any]) -> str:
        device = command.get("device")
        if device is not None:
            return check_device(device)
        f = self._followers.get(session)
        if f is not None:
            return f.device
        return session.credentials.device or DEFAULT_DEVICE

    async def open(
        self, session: Session, command: dict[str, Any]
    ) -> tuple[dict[str, Any], Callable[[], None]]:
        """``{"op": "inbox"[, "since": N][, "epoch": E][, "device": D]}``: the reply (top
        ``seq``, epoch, read and ack cursors, ``reset`` when ``epoch`` is not the inbox's), and
        what to run right after it is written: the stored entries, then live."""
        since = _seq(command, "since", required=False)
        epoch = command.get("epoch")
        if epoch is not None and (type(epoch) is not str or not 0 < len(epoch) <= 64):
            raise BadRequest("epoch must be a string of 1 to 64 characters")
        device = self._device(session, command)
        if session in self._followers:
            raise ReplyError("inbox already open", ErrorCode.ALREADY_SUBSCRIBED)
        if not self.node.broker.ready_for_user(session.user):
            raise ReplyError("broker unavailable, try again", ErrorCode.UNAVAILABLE)
        f = self._followers[session] = Follower(device)  # holding live pushes from here on
        user = session.user
        try:
            page = await self._read(user, since, device)
            # The client's cursor names another inbox, or one ahead of this one (Redis lost
            # its last writes, appendfsync everysec): all of this one.
            ahead = since is not None and page.epoch != "" and since > page.top
            reset = bool(epoch and page.epoch and epoch != page.epoch) or ahead
            if reset:
                page = await self._read(user, 0, device)
        except BaseException:
            self._followers.pop(session, None)
            raise
        f.epoch, f.acked = page.epoch, page.acked
        # What the client has: entries up to here are not written again.
        f.last = 0 if reset else page.acked if since is None else since
        result: dict[str, Any] = {
            "seq": page.top,
            "epoch": page.epoch,
            "read": page.read,
            "acked": page.acked,
        }
        if reset:
            result["reset"] = True
            self.metrics.resets.inc()

        def go_live() -> None:
            if self._followers.get(session) is not f:
                return  # closed meanwhile
            if self._write(session, f, page) and not (f.again or f.overflow):
                self._release(session, f)
            else:
                self._sync(session, f)

        return result, go_live

    async def open_on_connect(self, session: Session, path: str) -> None:
        """The connect option: ``/ws?inbox=1[&since=N][&epoch=E][&device=D]`` opens the inbox
        before the first command is read. The reply is a push, ``{"inbox": {"opened":
        result}}`` (``{"inbox": {"error": {...}}}`` if it failed), then the entries."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if query.get("inbox") != ["1"]:
            return
        command: dict[str, Any] = {}
        for name in ("since", "epoch", "device"):
            values = query.get(name)
            if values:
                value: Any = values[0]
                if name == "since":
                    value = int(value) if value.isdigit() and len(value) < 20 else value
                command[name] = value
        try:
            result, go_live = await self.open(session, command)
        except ReplyError as exc:
            self.node.metrics.command_errors.labels(str(int(exc.code))).inc()
            error = {"code": int(exc.code), "message": exc.message}
            self._deliver(session, self._push_type({"inbox": {"error": error}}))
            return
        self._deliver(session, self._push_type({"inbox": {"opened": result}}))
        go_live()

    async def ack(self, session: Session, command: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "ack", "seq": N}``: this device has every entry up to ``N``."""
        seq = _seq(command, "seq", required=True)
        assert seq is not None
        device = self._device(session, command)
        f = self._followers.get(session)
        if f is not None and device == f.device and seq <= f.acked:
            return {"acked": f.acked}  # nothing new: no round trip (an ack flood costs nothing)
        cursor = await self._store(self.store.ack(session.user, device, seq))
        if f is not None and device == f.device:
            f.acked = max(f.acked, cursor)
        self.metrics.acked.inc()
        return {"acked": cursor}

    async def mark_read(self, session: Session, command: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "read", "seq": N}``: move the user's read cursor (pushed to every one of
        the user's connections, on every process)."""
        seq = _seq(command, "seq", required=True)
        assert seq is not None
        self.metrics.reads.inc()
        return {"read": await self._store(self.store.mark_read(session.user, seq))}

    # -- catching up ---------------------------------------------------------------------------

    async def _store(self, call: Any) -> Any:
        try:
            return await call
        except (RedisError, OSError, HubUnavailable):
            raise ReplyError("inbox unavailable, try again", ErrorCode.UNAVAILABLE) from None

    async def _read(self, user: str, since: int | None, device: str | None = None) -> InboxPage:
        return self._met(await self._store(self.store.read(user, since, device=device, limit=PAGE)))

    def _met(self, page: InboxPage) -> InboxPage:
        """Count the expired entries a read dropped (the store drops each once)."""
        if page.expired:
            self.metrics.expired.inc(page.expired)
        return page

    def _entries(self, user: str, page: InboxPage) -> list[dict[str, Any]]:
        """The page's entries as pushes, checked (the store is in Redis: a trust boundary) and,
        with ``redis_signing_key``, only the signed ones."""
        out = []
        open_entry = self.store.open
        for raw in page.entries:
            try:
                envelope = open_entry(user, raw)
                mark = inbox_mark(envelope)
            except BadSignature:
                continue  # counted by the store: hub_bridge_bad_signatures_total
            except (BadEnvelope, ValueError, TypeError):
                self.metrics.malformed.inc()
                continue
            if "seq" in mark:
                out.append({"inbox": mark, "data": envelope.get("data")})
        return out

    def _write(self, session: Session, f: Follower, page: InboxPage) -> bool:
        """Write the page's entries the follower does not have, at most the fan-out's replay
        budget; True if all were written (``f.last`` is then the page's end)."""
        fanout = self.node.fanout
        budget = fanout.replay_budget
        written, sent = 0, 0
        make = self._push_type
        try:
            with fanout.replaying():
                for obj in self._entries(session.user, page):
                    seq = obj["inbox"]["seq"]
                    if seq <= f.last or obj["inbox"]["epoch"] != f.epoch:
                        continue
                    if sent >= budget:
                        return False
                    n = self._deliver(session, make(obj))
                    if not n:
                        return False  # closed
                    sent += n
                    written += 1
                    f.last = seq
        finally:
            if written:
                self.metrics.redelivered.inc(written)
                if f.backlog is not None:
                    f.backlog += written
        f.last = max(f.last, page.last)
        return page.complete

    def _release(self, session: Session, f: Follower) -> None:
        """Go live: the held pushes the follower does not have yet, then every push as it
        comes."""
        held, f.held = f.held or [], None
        if f.backlog is not None:  # the catch-up the inbox command asked for is over
            self.metrics.backlog.observe(f.backlog)
            f.backlog = None
        for obj in held:
            n = self._admit(session, f, obj, self._push_type(obj))
            if n:
                self.metrics.delivered.inc()

    def _sync(self, session: Session, f: Follower) -> None:
        if not f.syncing:
            f.syncing = True
            self._spawn(self._catch_up(session, f))

    async def _catch_up(self, session: Session, f: Follower) -> None:
        """Read the store from what the follower has until it has everything, then go live.
        Redis errors are retried (with backoff) for as long as the connection is open."""
        delay = 0.05
        user = session.user
        try:
            while self._followers.get(session) is f:
                connection = session.connection
                if not connection.open:
                    return
                if not self.node.fanout.replay_ready(session):
                    await asyncio.sleep(REPLAY_POLL)  # let it drain first
                    continue
                f.again = False
                try:
                    page = self._met(
                        await self.store.read(user, f.last if f.epoch else 0, limit=PAGE)
                    )
                except Exception as exc:  # Redis away or loading: again, for as long as it is open
                    if not isinstance(exc, (RedisError, OSError, HubUnavailable)):
                        log.exception("inbox read of %r failed", user[:100])
                    await asyncio.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 2.0)
                    continue
                if self._followers.get(session) is not f:
                    return
                if page.epoch and page.epoch != f.epoch:
                    if f.epoch:
                        self.metrics.resets.inc()
                        reset = {"inbox": {"reset": True, "epoch": page.epoch}}
                        self._deliver(session, self._push_type(reset))
                    f.epoch, f.last = page.epoch, 0
                    continue
                if not self._write(session, f, page):
                    continue
                if f.overflow:
                    f.overflow, f.held = False, []
                    continue
                if f.again:
                    continue
                f.syncing = False
                self._release(session, f)
                return
        finally:
            f.syncing = False

    # -- backends ------------------------------------------------------------------------------

    async def notify(self, n: Notification) -> Notified:
        """Store ``n`` and push it to every connection of its user (one step in the store);
        schedule its fallback. Raises :class:`BadRequest`, :class:`ReplyError` (too large) or
        :class:`HubUnavailable`."""
        check_data(n.data)
        envelope = msgpack.packb({"data": n.data}, use_bin_type=True)
        limit = self.node.settings.max_message_size
        if len(envelope) > limit:
            raise ReplyError(f"data exceeds {limit} bytes", ErrorCode.TOO_LARGE)
        store = self.store
        try:
            done = await store.notify(
                n.user, envelope, id=n.id, collapse_key=n.collapse_key, ttl=n.ttl
            )
            after = n.fallback_after
            if after is None:
                after = self.node.settings.fallback_after
            if after and not done.duplicate:
                await store.schedule_fallback(n.user, done.seq, time.time() + after)
        except (RedisError, OSError) as exc:
            raise HubUnavailable(f"redis unavailable: {exc}") from exc
        metrics = self.metrics
        (metrics.duplicates if done.duplicate else metrics.stored).inc()
        if done.collapsed:
            metrics.collapsed.inc()
        if done.expired:
            metrics.expired.inc(done.expired)
        metrics.length.observe(done.length)
        return done

    async def notify_many(self, items: list[Notification]) -> list[Notified]:
        """Several notifications, sent together (the Redis store's calls carry up to
        ``NOTIFY_BATCH`` of them, ``hub.inbox.NotifyQueue``), in order per user."""
        return list(await asyncio.gather(*(self.notify(n) for n in items)))

    async def read(
        self, user: str, since: int | None, device: str | None, limit: int
    ) -> dict[str, Any]:
        """A page of ``user``'s inbox for a backend (``/api/inbox``)."""
        try:
            page = self._met(await self.store.read(user, since, device=device, limit=limit))
        except (RedisError, OSError) as exc:
            raise HubUnavailable(f"redis unavailable: {exc}") from exc
        entries = []
        for obj in self._entries(user, page):
            mark = obj["inbox"]
            entry = {"seq": mark["seq"], "data": obj["data"]}
            if "id" in mark:
                entry["id"] = mark["id"]
            entries.append(entry)
        return {
            "seq": page.top,
            "epoch": page.epoch,
            "read": page.read,
            "acked": page.acked,
            "last": page.last,
            "entries": entries,
        }

    # -- the fallback --------------------------------------------------------------------------

    async def _fallbacks(self) -> None:
        """Claim due fallbacks (each goes to one process only) and hand them to the backend."""
        poll = FALLBACK_POLL
        after = self.node.settings.fallback_after
        if after:
            poll = min(poll, max(0.05, after / 4))
        while True:
            try:
                claimed = await self.store.claim_due()
            except (RedisError, OSError, HubUnavailable) as exc:
                log.info("fallbacks not claimed: %s", exc)
                claimed = []
            for due in claimed:
                self._spawn(self._hand_over(due))
            if len(claimed) < 100:
                await asyncio.sleep(poll)

    def fallback_body(self, due: Due) -> bytes | None:
        """The JSON a fallback POSTs, or None for an entry gone (expired, collapsed) or one
        whose data JSON cannot carry."""
        if due.push is None:
            return None
        try:
            envelope = self.store.open(due.user, due.push)
            mark = inbox_mark(envelope)
        except BadSignature:
            return None  # counted by the store
        except (BadEnvelope, ValueError, TypeError):
            self.metrics.malformed.inc()
            return None
        body: dict[str, Any] = {
            "user": due.user,
            "seq": due.seq,
            "epoch": mark.get("epoch"),
            "data": envelope.get("data"),
        }
        if "id" in mark:
            body["id"] = mark["id"]
        return json_bytes(body)

    async def _hand_over(self, due: Due) -> None:
        body = self.fallback_body(due)
        if body is None:
            if due.push is not None:
                self.metrics.fallbacks.labels("failed").inc()
            return
        url = self.node.settings.fallback_url
        assert url
        delay = FALLBACK_BACKOFF
        for attempt in range(FALLBACK_ATTEMPTS):
            status = await asyncio.to_thread(self._post, url, body)
            if 200 <= status < 300:
                self.metrics.fallbacks.labels("sent").inc()
                return
            if 400 <= status < 500 and status not in (408, 429):
                break  # the backend refuses it: asking again would not help
            if attempt + 1 < FALLBACK_ATTEMPTS:
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay *= 2
        log.warning("fallback of %r seq %d not delivered", due.user[:100], due.seq)
        self.metrics.fallbacks.labels("failed").inc()

    def _post(self, url: str, body: bytes) -> int:
        """One POST (in a thread); the status, or 0 when there was no answer."""
        timestamp = str(int(time.time()))
        request = urllib.request.Request(url, data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        request.add_header("X-Hub-Timestamp", timestamp)
        request.add_header("X-Hub-Signature", fallback_signature(self._secret, timestamp, body))
        try:
            with urllib.request.urlopen(request, timeout=FALLBACK_TIMEOUT) as response:
                response.read(1 << 16)
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError, ValueError):
            return 0
        except Exception:  # a garbled answer (http.client raises its own kinds)
            return 0


def result_of(done: Notified) -> dict[str, Any]:
    """What the HTTP API answers for one notify."""
    return {"seq": done.seq, "epoch": done.epoch, "duplicate": done.duplicate}


async def notify_api(service: Notifications, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/notify``: one notification (answers its seq), or ``{"notifications":
    [...]}`` (answers ``{"results": [...]}`` in the same order). A batch is checked whole
    before any of it is stored."""
    if "notifications" not in body:
        return result_of(await service.notify(Notification.from_body(body)))
    if set(body) != {"notifications"}:
        raise BadRequest("a batch has only the notifications field")
    items = body["notifications"]
    if not isinstance(items, list) or not 0 < len(items) <= MAX_BATCH:
        raise BadRequest(f"notifications must be a list of 1 to {MAX_BATCH}")
    checked = []
    for i, item in enumerate(items):
        try:
            checked.append(Notification.from_body(item))
        except BadRequest as exc:
            raise BadRequest(f"notifications[{i}]: {exc.message}") from None
    for n in checked:
        check_data(n.data)
    return {"results": [result_of(d) for d in await service.notify_many(checked)]}


def inbox_read_args(body: dict[str, Any]) -> tuple[str, int | None, str | None, int]:
    """``user``, ``since``, ``device`` and ``limit`` (1 to 1000, 100 by default) of an inbox
    read (``/api/inbox``)."""
    user = check_user(body.get("user"))
    since = _seq(body, "since", required=False)
    device = body.get("device")
    if device is not None:
        check_device(device)
    limit = body.get("limit", 100)
    if type(limit) is not int or not 1 <= limit <= 1000:
        raise BadRequest("limit must be an integer from 1 to 1000")
    return user, since, device, limit
