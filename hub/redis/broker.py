"""The Redis broker: a :class:`~hub.broker.Broker` that joins hub processes through Redis pub/sub.

Each process holds one pub/sub connection (:class:`~hub.redis.link.Link`) and subscribes only
what it needs: ``<prefix>:ch:<c>`` while it has a local subscriber of channel ``c``,
``<prefix>:user:<u>`` while it holds a connection of user ``u``, and always ``<prefix>:all`` and
``<prefix>:ctl`` (names and envelopes: :mod:`hub.redis.wire`). There is no pattern subscription
and no Redis subscription per WebSocket: one Redis message reaches a process once, is opened and
checked once (:meth:`RedisBroker._on_message`) and handed to the node once, and the node encodes
one frame for all its recipients.

Publishing goes over a separate, pipelined connection (:class:`hub.redis.publisher.AsyncPublisher`),
so a slow subscribe never delays a publish and concurrent publishes share round trips.

When Redis goes away the broker reports it at once (``ready`` turns False, ``on_gap`` for every
channel with local subscribers), the link reconnects with exponential backoff and jitter,
resubscribes in batches, and the broker reports a gap again once the subscriptions are back:
messages published in between are lost, and subscribers that refetched state early must refetch
after the link is back too.

On a Redis Cluster (``redis+cluster://`` URL) the same names travel over sharded pub/sub, with a
link per shard: :class:`hub.redis.cluster_broker.RedisClusterBroker`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.asyncio.connection import ConnectionPool
from redis.exceptions import RedisError

from ..broker import Broker, BrokerHandler, Publication
from ..config import mask_url
from ..errors import BadEnvelope, BadSignature, RedisUnavailable
from ..history import HistoryPage
from .cluster import is_cluster_url
from .link import Link, RateLimitedLog, log
from .publisher import AsyncPublisher
from .wire import (
    DEFAULT_PREFIX,
    Envelopes,
    Names,
    inbox_mark,
    open_control,
    open_join_leave,
    pack_control,
    pack_join_leave,
)

__all__ = ["RedisBroker"]

_RESERVED = frozenset({"channel", "data", "gap", "join", "leave", "offset", "epoch", "from"})


class RedisBroker(Broker):
    """Join hub processes through Redis (see the module docstring and docs/publish-api.md).

    ``unsubscribe_delay``: a channel (or user) left by its last local subscriber stays subscribed
    in Redis this long, so churn (a page reload) does not thrash Redis. ``ping_interval`` /
    ``ping_timeout``: liveness probe of the pub/sub connection; a silent one is replaced.
    ``backoff_min`` / ``backoff_max``: reconnect delays (doubling, with jitter). ``batch_size``:
    channels per SUBSCRIBE when resubscribing. ``forward``: optional envelope fields passed on
    to clients with a channel publication. ``start_timeout``: how long :meth:`start` waits for
    the first connection before carrying on (not ready) and retrying in the background.

    A ``redis+cluster://host:port[,host:port...]`` URL makes a :class:`RedisClusterBroker`
    (sharded pub/sub), so configuration by URL is all it takes.

    Counters for metrics: ``malformed`` (payloads dropped), ``reconnects`` (links restored),
    ``handler_errors`` (node callbacks that raised).
    """

    def __new__(cls, url: str, *args: Any, **kwargs: Any) -> RedisBroker:
        if cls is RedisBroker and is_cluster_url(url):
            from .cluster_broker import RedisClusterBroker  # which builds on this module

            cls = RedisClusterBroker
        return super().__new__(cls)

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        unsubscribe_delay: float = 1.0,
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        connect_timeout: float = 5.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        batch_size: int = 500,
        forward: Iterable[str] = ("ts", "event"),
        start_timeout: float = 5.0,
        signing_key: bytes | str | None = None,
        **redis_kwargs: Any,
    ) -> None:
        self.url = url
        self.names = Names(prefix)
        self.unsubscribe_delay = unsubscribe_delay
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.batch_size = batch_size
        self.forward = tuple(forward)
        if _RESERVED.intersection(self.forward):
            raise ValueError(f"forward must not name any of {sorted(_RESERVED)}")
        if isinstance(signing_key, str):
            signing_key = signing_key.encode()
        self.signing_key = signing_key
        self.envelopes = Envelopes(signing_key, self.forward)
        self.start_timeout = start_timeout

        self.malformed = 0
        self.bad_signatures = 0
        self.reconnects = 0
        self.handler_errors = 0

        redis_kwargs.setdefault("socket_timeout", connect_timeout)
        redis_kwargs.setdefault("socket_connect_timeout", connect_timeout)
        self._redis_kwargs = redis_kwargs
        # RESP2 on the pub/sub connection: messages, confirmations and pongs arrive as plain
        # replies to read in order (redis-py >= 8 defaults to RESP3, whose pushes it diverts).
        self._sub_kwargs = {**redis_kwargs, "client_name": f"{prefix}-bridge-sub", "protocol": 2}
        self._publisher: AsyncPublisher | None = None

        self._ch = f"{prefix}:ch:".encode()
        self._user = f"{prefix}:user:".encode()
        self._all = self.names.all.encode()
        self._ctl = self.names.ctl.encode()
        self._closing = False
        self._log_malformed = RateLimitedLog()
        self._log_handler = RateLimitedLog()
        self._setup()

    def _setup(self) -> None:
        """The one link of a single Redis, always subscribed to ``all`` and ``ctl``."""
        self._pool = ConnectionPool.from_url(self.url, **self._sub_kwargs)
        self._main = Link(self, self._pool.make_connection, mask_url(self.url))
        self._main.wanted.update((self._all, self._ctl))

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, handler: BrokerHandler) -> None:
        await super().start(handler)
        self._closing = False
        kwargs = {**self._redis_kwargs, "client_name": f"{self.names.prefix}-bridge-pub"}
        self._publisher = AsyncPublisher(
            self.url, prefix=self.names.prefix, signing_key=self.signing_key, **kwargs
        )
        try:
            await asyncio.wait_for(asyncio.shield(self._boot()), self.start_timeout)
        except TimeoutError:
            pass
        if not self.ready:
            log.warning("redis at %s is not reachable yet; retrying", mask_url(self.url))

    def _boot(self) -> asyncio.Future[None]:
        """Start the link(s); done after the first connection attempt."""
        self._main.start()
        assert self._main.first_attempt is not None
        return self._main.first_attempt

    async def close(self) -> None:
        self._closing = True
        await self._stop_links()
        if self._publisher is not None:
            await self._publisher.aclose()
            self._publisher = None
        await super().close()

    async def _stop_links(self) -> None:
        await self._main.close()

    @property
    def ready(self) -> bool:
        return self.handler is not None and self._main.up

    # -- subscriptions -------------------------------------------------------------------------

    async def subscribe(self, channels: Iterable[str]) -> None:
        await self._want([self._ch + c.encode() for c in channels])

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._unwant([self._ch + c.encode() for c in channels])

    async def subscribe_user(self, user: str) -> None:
        await self._want([self._user + user.encode()])

    async def unsubscribe_user(self, user: str) -> None:
        self._unwant([self._user + user.encode()])

    async def _want(self, names: list[bytes]) -> None:
        await self._main.want(names)

    def _unwant(self, names: list[bytes]) -> None:
        self._main.unwant(n for n in names if n != self._all and n != self._ctl)

    # -- what the links tell the broker --------------------------------------------------------

    def _link_gap(self, link: Link) -> None:
        """A gap on every channel with local subscribers that the link carries."""
        prefix = self._ch
        channels = [n[len(prefix) :].decode() for n in link.wanted if n.startswith(prefix)]
        if channels and self.handler is not None:
            self._call(self.handler.on_gap, channels)
        self._user_gap(link.wanted)

    def _user_gap(self, names: Iterable[bytes]) -> None:
        """Users whose pushes may have been lost: their inboxes catch up (hub.notify)."""
        users = [n[len(self._user) :].decode() for n in names if n.startswith(self._user)]
        if users and self.handler is not None:
            self._call(self.handler.on_user_gap, users)

    async def _retrying(self, link: Link) -> None:
        """Called before each reconnect attempt (a cluster refreshes its slot map here)."""

    def _swept(self, link: Link, names: list[bytes]) -> None:
        """Called when the link unsubscribed ``names`` (a cluster may close an idle link)."""

    def _slot_left(self, link: Link, name: bytes) -> None:
        """Redis dropped ``name`` because its slot left the shard: only on a cluster, where the
        broker moves it to the new owner; a single Redis never does, so here the link
        reconnects as for any failure."""
        raise RedisUnavailable(f"slot of {name!r} moved")

    # -- publishing ----------------------------------------------------------------------------

    def _pub(self) -> AsyncPublisher:
        if self._publisher is None:
            raise RedisUnavailable("broker not started")
        return self._publisher

    async def _publishing(self, publish: Awaitable[Any]) -> Any:
        try:
            return await publish
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"redis unavailable: {exc}") from exc

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **meta: Any,
    ) -> tuple[int, str] | None:
        unknown = set(meta).difference(self.forward, ("from",))
        if unknown:
            # They would reach no client (receivers pass on only ``forward``): fail loudly.
            raise ValueError(f"envelope fields not forwarded: {', '.join(sorted(unknown))}")
        publish = self._pub().publish(
            channel, data, history_size=history_size, history_ttl=history_ttl, **meta
        )
        sent = await self._publishing(publish)
        return None if sent.offset is None else (sent.offset, sent.epoch)

    async def history(
        self,
        channel: str,
        *,
        since: int | None,
        limit: int | None,
        history_size: int,
        history_ttl: float,
        subscribing: bool = False,
    ) -> HistoryPage:
        read = self._pub().history(
            channel, since=since, limit=limit, history_size=history_size, keep_epoch=subscribing
        )
        try:
            page = await read
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"redis unavailable: {exc}") from exc
        if page.skipped:  # stored by a writer that could not pass hub.redis.wire
            self.bad_signatures += page.unsigned
            self.malformed += page.skipped - page.unsigned
        # Clients get what live pushes carry: data, the forwarded fields, offset and epoch.
        meta = self.envelopes.meta
        page.entries = [{"data": e["data"], **meta(e)} for e in page.entries]
        return page

    async def send_to_user(self, user: str, data: Any) -> None:
        await self._publishing(self._pub().send_to_user(user, data))

    async def broadcast(self, data: Any) -> None:
        await self._publishing(self._pub().broadcast(data))

    async def disconnect(self, user: str, code: int, reason: str) -> None:
        await self._publishing(self._pub().disconnect(user, code, reason))

    async def join_leave(
        self, channel: str, join: list[dict[str, Any]], leave: list[dict[str, Any]]
    ) -> None:
        """On the channel's own Redis name (every process with a subscriber listens there),
        as a map with ``join`` / ``leave`` lists instead of ``data``."""
        payload = pack_join_leave(join, leave)  # signed by _publish with a key
        await self._publishing(self._pub()._publish(self.names.channel(channel), payload))

    async def control(self, message: dict[str, Any]) -> None:
        """On the control channel every process listens on (hub.admin's heartbeats, searches)."""
        payload = pack_control(message)
        await self._publishing(self._pub()._publish(self.names.ctl, payload))

    # -- incoming messages ---------------------------------------------------------------------

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            self._handler_failed()

    def _handler_failed(self) -> None:
        """A node callback raised: count and log it; the link goes on with the next message."""
        self.handler_errors += 1
        self._log_handler(log.error, "broker callback failed", exc_info=True)

    def _malformed(self, name: bytes, why: str) -> None:
        self.malformed += 1
        self._log_malformed(log.warning, "dropped a malformed message on %r: %s", name, why)

    def _on_admin(self, name: bytes, message: dict[str, Any]) -> None:
        """hub.admin's heartbeats and searches: it checks their fields (False: malformed)."""
        assert self.handler is not None
        try:
            if not self.handler.on_admin(message):
                self._malformed(name, f"bad {message['op'][:40]} message")
        except Exception:
            self._handler_failed()

    def _bad_signature(self, name: bytes, why: str) -> None:
        self.bad_signatures += 1
        self._log_malformed(log.warning, "dropped a message on %r: %s", name, why)

    def _on_message(self, name: bytes, payload: bytes) -> None:
        """One pub/sub message: opened and checked by ``hub.redis.wire`` (the one place that
        decides what a payload from Redis may hold), then handed to the node."""
        handler = self.handler
        if handler is None:
            return
        envelopes = self.envelopes
        try:
            envelope = envelopes.open(name, payload)
            if name == self._ctl:
                kind, args = open_control(envelope)
                if kind == "disconnect":
                    self._call(handler.on_disconnect, *args)
                elif kind == "admin":
                    self._on_admin(name, envelope)
                else:
                    log.debug("ignoring control message %r", envelope["op"][:40])
                return
            if "inbox" in envelope and name.startswith(self._user):  # hub.inbox's notify
                user = name[len(self._user) :].decode()
                self._call(handler.on_inbox, user, inbox_mark(envelope), envelope.get("data"))
                return
            if "data" not in envelope:
                if name.startswith(self._ch) and ("join" in envelope or "leave" in envelope):
                    join, leave = open_join_leave(envelope)
                    channel = name[len(self._ch) :].decode()
                    self._call(handler.on_join_leave, channel, join, leave)
                    return
                raise BadEnvelope("no data field")
            data = envelope["data"]
            if name.startswith(self._ch):
                meta = envelopes.meta(envelope) if len(envelope) > 1 else {}
                channel = name[len(self._ch) :].decode()
                publication = Publication(channel, data, meta)
                try:  # as _call does, without a call per message
                    handler.on_publication(publication)
                except Exception:
                    self._handler_failed()
            elif name.startswith(self._user):
                user = name[len(self._user) :].decode()
                try:
                    handler.on_user_message(user, data)
                except Exception:
                    self._handler_failed()
            elif name == self._all:
                self._call(handler.on_broadcast, data)
        except BadSignature as exc:
            self._bad_signature(name, str(exc))
        except BadEnvelope as exc:
            self._malformed(name, str(exc))
