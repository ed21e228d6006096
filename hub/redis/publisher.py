"""The publisher SDK: publish to hub processes through Redis from any Python backend.

:class:`Publisher` (blocking, on ``redis.Redis`` / ``redis.RedisCluster``) and
:class:`AsyncPublisher` (asyncio, on the pipelines of :mod:`hub.redis.cluster`) write the
envelopes of :mod:`hub.redis.wire`, the contract in docs/publish-api.md, so a backend never
builds one by hand. The hub's own broker publishes through :class:`AsyncPublisher` too: there is
one implementation of the format. ``hub.publisher`` re-exports this module for code written
against it.
"""

from __future__ import annotations

import asyncio
import functools
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import redis
import redis.asyncio
from redis.cluster import ClusterNode
from redis.exceptions import NoScriptError, ResponseError

from ..history import (
    PUBLISH_SCRIPT,
    READ_SCRIPT,
    HistoryPage,
    PublishCommands,
    Published,
    publish_args,
    read_args,
)
from ..inbox import (
    INBOX_SIZE,
    INBOX_TTL,
    NOTIFY_BATCH,
    NOTIFY_SCRIPT,
    Notified,
    NotifyCommands,
    NotifyQueue,
    batch_args,
    check_notify,
    fallback_entry,
    notified,
    publisher_notify_args,
)
from ..rules import user_problem
from .cluster import Router, SlotMap, is_cluster_url, parse_cluster_url
from .resp import pack_command, pack_publish, reply_error
from .wire import (
    DEFAULT_PREFIX,
    DISCONNECT_CODE,
    Envelopes,
    Names,
    check_signing_key,
    pack_disconnect,
    pack_message,
    seal,
)

__all__ = ["AsyncPublisher", "HistoryPage", "Published", "Publisher"]


def _user(user: Any) -> str:
    problem = user_problem(user)
    if problem is not None:
        raise ValueError(problem)
    return user


def _non_empty(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _history_options(size: Any, ttl: Any, fields: Mapping[str, Any]) -> None:
    """Check the history keywords: bad values fail at the caller, not inside Redis."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("history_size must be a non-negative integer")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 0:
        raise ValueError("history_ttl must be a non-negative number of seconds")
    if "offset" in fields or "epoch" in fields:
        raise ValueError("offset and epoch are assigned by the history script")


def _limit(since: int | None, limit: int | None) -> None:
    if since is not None and (isinstance(since, bool) or not isinstance(since, int) or since < 0):
        raise ValueError("since must be a non-negative integer offset")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError("limit must be a non-negative integer")


_NOTIFY_FIELDS = ("id", "collapse_key", "ttl", "fallback_after")


def _notification(item: Any) -> tuple[str, Any, dict[str, Any]]:
    """One item of ``notify_many``: user, data and the optional fields (``ValueError`` for an
    item that is not a map with ``user`` and ``data``, or names another field)."""
    if not isinstance(item, Mapping) or "user" not in item or "data" not in item:
        raise ValueError("each notification is a map with user and data")
    unknown = set(item) - {"user", "data", *_NOTIFY_FIELDS}
    if unknown:
        raise ValueError(f"unknown notification field: {sorted(map(str, unknown))[0][:40]}")
    return item["user"], item["data"], {k: item.get(k) for k in _NOTIFY_FIELDS}


class _Publishing:
    """What both publishers share: the names, the signing key, and the checked arguments of a
    history read (the blocking and the asyncio one differ only in how they reach Redis)."""

    def __init__(self, prefix: str, signing_key: bytes | str | None) -> None:
        self.names = Names(prefix)
        self._key = check_signing_key(signing_key)
        self._envelopes = Envelopes(self._key)

    def _history_read(
        self,
        channel: str,
        since: int | None,
        limit: int | None,
        history_size: int,
        history_ttl: float,
        keep_epoch: bool = False,
    ) -> tuple[str, list[bytes], Callable[[bytes], dict[str, Any]]]:
        """The Redis name, the read script's arguments and the opener of its entries."""
        name = self.names.channel(_non_empty("channel", channel))
        _limit(since, limit)
        _history_options(history_size, history_ttl, {})
        args = read_args(name, since, limit, history_size, keep_epoch)
        return name, args, functools.partial(self._envelopes.entry, name.encode())


class Publisher(_Publishing):
    """Blocking publisher for backends (web apps, workers, scripts).

    Each method returns how many hub processes received the message (Redis counts subscribed
    connections; a hub process has one), which is 0 when no process has a local subscriber.

    A ``redis+cluster://host:port[,host:port...]`` URL (or ``cluster=True``, or a
    ``redis.RedisCluster`` client) publishes with ``SPUBLISH`` to the shard owning each channel,
    for hubs joined through a Redis Cluster.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        client: redis.Redis | redis.RedisCluster | None = None,
        cluster: bool = False,
        signing_key: bytes | str | None = None,
        **redis_kwargs: Any,
    ) -> None:
        super().__init__(prefix, signing_key)
        if client is None:
            if url is None:
                raise ValueError("give a redis url or a client")
            if cluster or is_cluster_url(url):
                seeds, userinfo, _ = parse_cluster_url(url)
                if userinfo:
                    user, _, password = userinfo[:-1].partition(":")
                    redis_kwargs.setdefault("username", urllib.parse.unquote(user) or None)
                    redis_kwargs.setdefault("password", urllib.parse.unquote(password) or None)
                nodes = [ClusterNode(host, port) for host, port in seeds]
                client = redis.RedisCluster(startup_nodes=nodes, **redis_kwargs)
            else:
                client = redis.Redis.from_url(url, **redis_kwargs)
            self._owned = True
        else:
            self._owned = False
        self.client = client
        # Sharded pub/sub on a cluster: a plain PUBLISH there is broadcast over the cluster bus
        # and never reaches SSUBSCRIBE subscribers.
        sharded = isinstance(client, redis.RedisCluster)
        self._sharded = sharded
        self._publish_raw: Callable[[str, bytes], Any] = (
            client.spublish if sharded else client.publish
        )
        self._publish_script = client.register_script(PUBLISH_SCRIPT.text)
        self._read_script = client.register_script(READ_SCRIPT.text)

    def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **fields: Any,
    ) -> Published:
        """Publish ``data`` to ``channel``; ``fields`` are optional envelope fields.

        With ``history_size > 0`` (the channel's namespace keeps history: pass its
        ``history_size`` and ``history_ttl``) the publication is stored and gets the channel's
        next offset, in one script run (``hub/history.lua``); the result then carries
        ``offset`` and ``epoch``.
        """
        name = self.names.channel(_non_empty("channel", channel))
        _history_options(history_size, history_ttl, fields)
        payload = seal(self._key, name.encode(), pack_message(data, fields))
        if not history_size:
            return Published(int(self._publish_raw(name, payload)))
        args = publish_args(name, payload, history_size, history_ttl, self._sharded)
        return Published.from_reply(self._publish_script(keys=args[1:3], args=args[3:]))

    def history(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        history_size: int = 0,
        history_ttl: float = 0.0,
    ) -> HistoryPage:
        """The channel's stored publications: after offset ``since`` (at most ``limit``), or
        the newest ``limit`` (all when None), oldest first, with the current offset and epoch.
        Give the namespace's ``history_size``: the stream is trimmed approximately, and
        offsets older than the newest ``history_size`` are left out (0: no bound).
        ``history_ttl`` is checked but not needed (a read writes nothing). A channel with no
        history answers offset 0 and an epoch that is not kept."""
        _, args, entry = self._history_read(channel, since, limit, history_size, history_ttl)
        return HistoryPage.from_reply(self._read_script(keys=args[1:3], args=args[3:]), entry)

    def send_to_user(self, user: str, data: Any) -> int:
        name = self.names.user(_user(user))
        return int(self._send(name, pack_message(data)))

    def send_to_users(self, messages: Iterable[tuple[str, Any]]) -> list[int]:
        """Send each ``(user, data)`` pair, in order, in one round trip; returns, per message,
        how many hub processes received it (0: the user is connected nowhere).

        For notifying many users at once: per message it costs a fraction of
        :meth:`send_to_user`, which waits for Redis each time.
        """
        payloads = []
        for user, data in messages:
            name = self.names.user(_user(user))
            payloads.append((name, seal(self._key, name.encode(), pack_message(data))))
        if isinstance(self.client, redis.RedisCluster):  # each user channel has its own shard
            return [int(self._publish_raw(name, payload)) for name, payload in payloads]
        pipe = self.client.pipeline(transaction=False)
        for name, payload in payloads:
            pipe.publish(name, payload)
        return [int(n) for n in pipe.execute()]

    def notify(
        self,
        user: str,
        data: Any,
        *,
        id: str | None = None,
        collapse_key: str | None = None,
        ttl: float | None = None,
        fallback_after: float | None = None,
        inbox_size: int = INBOX_SIZE,
        inbox_ttl: float = INBOX_TTL,
    ) -> Notified:
        """Store ``data`` in ``user``'s inbox and push it to the user's connections that asked
        for their inbox, in one script run (``hub/inbox.lua``, docs/inbox.md); pass the hubs'
        ``inbox_size`` and ``inbox_ttl``. A second notify with the same ``id`` stores and
        pushes nothing and answers the first one's ``seq`` (``duplicate``), so a retry is
        safe. ``collapse_key``: replaces the user's older entry with that key; ``ttl``:
        seconds after which it is never delivered; ``fallback_after``: seconds after which an
        entry no device acknowledged goes to the hubs' ``fallback_url``. With a
        ``signing_key`` the push is signed (the script adds its seq and epoch beside the
        signed bytes)."""
        args = publisher_notify_args(
            self.names,
            user,
            data,
            id=id,
            collapse_key=collapse_key,
            ttl=ttl,
            fallback_after=fallback_after,
            inbox_size=inbox_size,
            inbox_ttl=inbox_ttl,
            sharded=self._sharded,
            signing_key=self._key,
        )
        try:
            done = notified(self.client.evalsha(NOTIFY_SCRIPT.sha, *args))
        except NoScriptError:
            done = notified(self.client.eval(NOTIFY_SCRIPT.text, *args))
        if fallback_after and not done.duplicate:
            key, member, score = fallback_entry(
                self.names, user, done.seq, time.time() + fallback_after
            )
            self.client.zadd(key, {member: score})
            self.client.pexpire(key, max(1, round(inbox_ttl * 1000)))
        return done

    def notify_many(
        self,
        notifications: Iterable[Mapping[str, Any]],
        *,
        inbox_size: int = INBOX_SIZE,
        inbox_ttl: float = INBOX_TTL,
    ) -> list[Notified]:
        """Several notifications, each a map with ``user`` and ``data`` and optionally ``id``,
        ``collapse_key``, ``ttl`` and ``fallback_after`` (the fields of :meth:`notify` and of
        ``POST /api/notify``), in order, in one round trip: script calls of up to
        ``NOTIFY_BATCH`` notifies each (on a cluster, one call per notify, each on its
        shard); every one is checked before any is sent. Returns what each notify did; a
        notify Redis refuses raises (the first such error) once all of them ran."""
        items = [_notification(n) for n in notifications]
        calls = [
            publisher_notify_args(
                self.names,
                user,
                data,
                **fields,
                inbox_size=inbox_size,
                inbox_ttl=inbox_ttl,
                sharded=self._sharded,
                signing_key=self._key,
            )
            for user, data, fields in items
        ]
        if not calls:
            return []
        if isinstance(self.client, redis.RedisCluster):  # each user has its own shard
            replies = [self._evalsha(args) for args in calls]
        else:  # the script's batch form: NOTIFY_BATCH notifies a call
            chunks = [calls[i : i + NOTIFY_BATCH] for i in range(0, len(calls), NOTIFY_BATCH)]
            batches = self._evalsha_many([batch_args(chunk) for chunk in chunks])
            replies = [reply for batch in batches for reply in batch]
            for reply in replies:  # each notify's error in its place: the first is raised
                if isinstance(reply, Exception):
                    raise reply if isinstance(reply, ResponseError) else reply_error(reply)
        done = [notified(reply) for reply in replies]
        due = []
        now = time.time()
        for (user, _, fields), sent in zip(items, done, strict=True):
            after = fields["fallback_after"]
            if after and not sent.duplicate:
                due.append(fallback_entry(self.names, user, sent.seq, now + after))
        if due:
            key = due[0][0]
            self.client.zadd(key, {member: score for _, member, score in due})
            self.client.pexpire(key, max(1, round(inbox_ttl * 1000)))
        return done

    def _evalsha(self, args: list[Any]) -> Any:
        try:
            return self.client.evalsha(NOTIFY_SCRIPT.sha, *args)
        except NoScriptError:
            return self.client.eval(NOTIFY_SCRIPT.text, *args)

    def _evalsha_many(self, calls: list[list[Any]]) -> list[Any]:
        """The notifies in one pipeline; if Redis did not know the script (none of them ran:
        NOSCRIPT), it is loaded and the lot sent once more."""
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for args in calls:
                pipe.evalsha(NOTIFY_SCRIPT.sha, *args)
            replies = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                self.client.script_load(NOTIFY_SCRIPT.text)
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return list(replies)
        raise AssertionError("unreachable")

    def broadcast(self, data: Any) -> int:
        return int(self._send(self.names.all, pack_message(data)))

    def disconnect(self, user: str, code: int = DISCONNECT_CODE, reason: str = "") -> int:
        return int(self._send(self.names.ctl, pack_disconnect(user, code, reason)))

    def _send(self, name: str, payload: bytes) -> Any:
        return self._publish_raw(name, seal(self._key, name.encode(), payload))

    def close(self) -> None:
        if self._owned:
            self.client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPublisher(_Publishing):
    """Publisher for asyncio backends, on one pipelined connection of its own.

    Publishes made concurrently share round trips; publishes from one task arrive in order. A
    publish that meets a broken connection raises ``redis.exceptions.ConnectionError`` (or
    ``TimeoutError``) and is not retried; the next one reconnects.

    With a ``redis+cluster://`` URL (or ``cluster=True``) it publishes with ``SPUBLISH`` on one
    pipelined connection per shard, routed by hash slot: a channel always maps to one shard, so
    publishes from one task still arrive in order per channel. A ``MOVED`` answer (the slot has
    moved; Redis did not deliver) refreshes the slot map and is retried.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        client: redis.asyncio.Redis | None = None,
        timeout: float = 5.0,
        cluster: bool = False,
        signing_key: bytes | str | None = None,
        **redis_kwargs: Any,
    ) -> None:
        super().__init__(prefix, signing_key)
        if isinstance(client, redis.asyncio.RedisCluster):
            raise ValueError("for a cluster, give a redis+cluster:// url (one pipeline per shard)")
        if client is not None:
            # A dedicated connection made with the client's settings (address, auth, TLS).
            self._router = Router(client.connection_pool.make_connection)
        elif url is not None:
            redis_kwargs.setdefault("socket_timeout", timeout)
            redis_kwargs.setdefault("socket_connect_timeout", timeout)
            if cluster or is_cluster_url(url):
                self._router = Router(slot_map=SlotMap(url, **redis_kwargs))
            else:
                self._router = Router.from_url(url, **redis_kwargs)
        else:
            raise ValueError("give a redis url or a client")
        self._commands = PublishCommands()
        self._notify_queues: dict[tuple[int, float, bool], NotifyQueue] = {}

    async def _publish(self, name: str, payload: bytes) -> int:
        """PUBLISH (SPUBLISH) ``payload``, signed first when there is a key."""
        if self._key is not None:
            payload = seal(self._key, name.encode(), payload)
        command = b"SPUBLISH" if self._router.sharded else b"PUBLISH"
        return int(await self._router.execute_packed(name, pack_publish(command, name, payload)))

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **fields: Any,
    ) -> Published:
        """Publish ``data`` to ``channel``; ``fields`` are optional envelope fields. With
        ``history_size > 0`` it is stored in the channel's history and the result carries
        ``offset`` and ``epoch`` (see :meth:`Publisher.publish`)."""
        name = self.names.channel(_non_empty("channel", channel))
        _history_options(history_size, history_ttl, fields)
        payload = pack_message(data, fields)
        if not history_size:
            return Published(await self._publish(name, payload))
        payload = seal(self._key, name.encode(), payload)
        sharded = self._router.sharded
        command, epoch = self._commands.packed(name, payload, history_size, history_ttl, sharded)
        try:
            reply = await self._router.execute_packed(name, command)
        except NoScriptError:
            args = publish_args(name, payload, history_size, history_ttl, sharded, epoch)
            command = pack_command(b"EVAL", PUBLISH_SCRIPT.text_bytes, *args)
            reply = await self._router.execute_packed(name, command)
        return Published.from_reply(reply)

    async def history(
        self,
        channel: str,
        *,
        since: int | None = None,
        limit: int | None = None,
        history_size: int = 0,
        history_ttl: float = 0.0,
        keep_epoch: bool = False,
    ) -> HistoryPage:
        """See :meth:`Publisher.history`. ``keep_epoch``: what a hub's subscribe does, keep
        the epoch answered for a channel with no history yet (``hub.history.EMPTY_TTL``), so
        the first publication gets it."""
        name, args, entry = self._history_read(
            channel, since, limit, history_size, history_ttl, keep_epoch
        )
        return HistoryPage.from_reply(await self._router.script(name, READ_SCRIPT, args), entry)

    async def send_to_user(self, user: str, data: Any) -> int:
        return await self._publish(self.names.user(_user(user)), pack_message(data))

    async def send_to_users(self, messages: Iterable[tuple[str, Any]]) -> list[int]:
        """Send each ``(user, data)`` pair, in order, pipelined in one write; returns, per
        message, how many hub processes received it. See :meth:`Publisher.send_to_users`."""
        user = self.names.user
        if self._router.sharded:  # routed one by one, each to its shard's pipeline
            payloads = [(user(_user(u)), pack_message(d)) for u, d in messages]
            return list(await asyncio.gather(*(self._publish(n, p) for n, p in payloads)))
        key = self._key
        if key is None:
            commands = [
                pack_publish(b"PUBLISH", user(_user(u)), pack_message(d)) for u, d in messages
            ]
        else:
            commands = []
            for u, d in messages:
                name = user(_user(u))
                payload = seal(key, name.encode(), pack_message(d))
                commands.append(pack_publish(b"PUBLISH", name, payload))
        replies = await self._router.execute_many(commands)
        return [int(n) for n in replies]

    async def notify(
        self,
        user: str,
        data: Any,
        *,
        id: str | None = None,
        collapse_key: str | None = None,
        ttl: float | None = None,
        fallback_after: float | None = None,
        inbox_size: int = INBOX_SIZE,
        inbox_ttl: float = INBOX_TTL,
    ) -> Notified:
        """See :meth:`Publisher.notify`; notifies made concurrently share script calls
        (:class:`hub.inbox.NotifyQueue`), and those of one task to one user arrive in order."""
        sharded = self._router.sharded
        settings = (inbox_size, inbox_ttl, sharded)
        queue = self._notify_queues.get(settings)
        if queue is None:  # settings not seen yet: checked, then kept
            check_notify(user, id, collapse_key, ttl, fallback_after, inbox_size, inbox_ttl)
            if len(self._notify_queues) >= 64:
                self._notify_queues.clear()
            commands = NotifyCommands(*settings)
            queue = NotifyQueue(self._router, self.names, commands, self._key)
            self._notify_queues[settings] = queue
        elif user_problem(user) is not None or not (
            id is None and collapse_key is None and ttl is None and fallback_after is None
        ):
            check_notify(user, id, collapse_key, ttl, fallback_after, inbox_size, inbox_ttl)
        envelope = pack_message(data)
        done = await queue.notify(user, envelope, id, collapse_key, ttl)
        if fallback_after and not done.duplicate:
            key, member, score = fallback_entry(
                self.names, user, done.seq, time.time() + fallback_after
            )
            ms = max(1, round(inbox_ttl * 1000))
            for reply in (
                await self._router.execute(key, "ZADD", key, score, member),
                await self._router.execute(key, "PEXPIRE", key, ms),
            ):
                if isinstance(reply, Exception):
                    raise reply
        return done

    async def notify_many(
        self,
        notifications: Iterable[Mapping[str, Any]],
        *,
        inbox_size: int = INBOX_SIZE,
        inbox_ttl: float = INBOX_TTL,
    ) -> list[Notified]:
        """See :meth:`Publisher.notify_many`: every one checked first, then all sent together
        (pipelined on the connection of each shard), in order per user."""
        items = [_notification(n) for n in notifications]
        for user, _, fields in items:
            check_notify(user, **fields, inbox_size=inbox_size, inbox_ttl=inbox_ttl)
        calls = (
            self.notify(user, data, **fields, inbox_size=inbox_size, inbox_ttl=inbox_ttl)
            for user, data, fields in items
        )
        return list(await asyncio.gather(*calls))

    async def broadcast(self, data: Any) -> int:
        return await self._publish(self.names.all, pack_message(data))

    async def disconnect(self, user: str, code: int = DISCONNECT_CODE, reason: str = "") -> int:
        return await self._publish(self.names.ctl, pack_disconnect(user, code, reason))

    async def aclose(self) -> None:
        await self._router.close()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
