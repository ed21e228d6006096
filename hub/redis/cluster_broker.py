"""The Redis broker on a Redis Cluster, with sharded pub/sub (Redis 7).

The same channel names, envelopes, lazy unsubscribe, gaps and readiness as
:class:`hub.redis.broker.RedisBroker`; what differs is topology. Sharded pub/sub delivers a
message only to subscribers connected to the master owning the channel's hash slot, so this
broker keeps a pub/sub link (:class:`hub.redis.link.Link`, speaking ``SSUBSCRIBE``) per shard
owning a slot of something it subscribes, routes each name with the slot map
(:class:`hub.redis.cluster.SlotMap`), and moves names between links when their slot moves.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable

from redis.exceptions import RedisError

from ..config import mask_url
from .broker import RedisBroker
from .cluster import Addr, SlotMap
from .link import Link, RateLimitedLog, log

__all__ = ["RedisClusterBroker"]


class RedisClusterBroker(RedisBroker):
    """The broker on a Redis Cluster (see the module docstring).

    There is a link per shard owning a slot of something this process subscribes (``all`` and
    ``ctl`` included); a link whose last channel is unsubscribed is closed. Publishing uses
    ``SPUBLISH`` on the owning shard (``AsyncPublisher`` in cluster mode).

    The slot map comes from ``CLUSTER SLOTS`` of any reachable node (the seeds of the URL
    first). A link that fails (the shard went away, or answered ``MOVED``) reports a gap for
    its channels like the single-node link does, and before each reconnect attempt the map is
    refreshed and channels whose slot now belongs to another shard (a failover) move to that
    shard's link (and get a gap notice once subscribed there). When Redis drops the
    subscriptions of a slot that left a shard (the end of a migration), only that slot's
    channels move, the same way (:meth:`_slot_left`); the link goes on. ``ready`` means every
    link is up; ``ready_for`` a channel (and ``ready_for_user``) that the link of its own
    shard is, so a dead shard refuses only what it owns.
    """

    def _setup(self) -> None:
        self._map = SlotMap(self.url, **self._redis_kwargs)
        self._links: dict[Addr, Link] = {}
        # What this process needs subscribed, by Redis channel name, and the link carrying it.
        self._wanted: set[bytes] = {self._all, self._ctl}
        self._route_of: dict[bytes, Link] = {}
        self._booting: asyncio.Task[None] | None = None
        # Names Redis dropped from a link because their slot left its shard, and that link;
        # _rehome subscribes them on the new owner.
        self._orphans: dict[bytes, Link] = {}
        self._rehoming: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        self._log_map = RateLimitedLog()

    # -- lifecycle -----------------------------------------------------------------------------

    def _boot(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self._booting = loop.create_task(self._first_map(), name="hub-redis-cluster-boot")
        return self._booting

    async def _first_map(self) -> None:
        """Learn the slot map (retrying with backoff), then open the links."""
        attempt = 0
        while True:
            try:
                await self._map.refresh()
                break
            except (RedisError, OSError, TimeoutError) as exc:
                url = mask_url(self.url)
                self._log_map(log.warning, "redis cluster at %s unreachable: %s", url, exc)
            delay = min(self.backoff_max, self.backoff_min * 2**attempt)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        groups = self._route(list(self._wanted))
        await asyncio.gather(*(self._subscribe_on(link, group) for link, group in groups.items()))
        # Subscribes made before the map was known returned unconfirmed.
        routes = self._route_of
        self._gap_names([n for n in self._wanted if n in routes and routes[n].up])

    async def _stop_links(self) -> None:
        for task in (self._booting, self._rehoming):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._booting = self._rehoming = None
        self._orphans.clear()
        links, self._links = list(self._links.values()), {}
        self._route_of.clear()
        await asyncio.gather(*(link.close() for link in links))
        await asyncio.gather(*self._retired, return_exceptions=True)

    @property
    def ready(self) -> bool:
        links = self._links.values()
        return self.handler is not None and bool(links) and all(link.up for link in links)

    def ready_for(self, channel: str) -> bool:
        return self._carried(self._ch + channel.encode())

    def ready_for_user(self, user: str) -> bool:
        return self._carried(self._user + user.encode())

    def _carried(self, name: bytes) -> bool:
        """``name`` is wanted and routed to a link that is up (subscribed: ``want`` returns
        once Redis confirmed)."""
        link = self._route_of.get(name)
        return self.handler is not None and link is not None and link.up and name in self._wanted

    # -- routing -------------------------------------------------------------------------------

    def _link_for(self, addr: Addr) -> Link:
        link = self._links.get(addr)
        if link is None:
            pool = self._map.pool(addr, **self._sub_kwargs)
            label = f"{addr[0]}:{addr[1]}"
            link = self._links[addr] = Link(
                self, pool.make_connection, label, sharded=True, addr=addr
            )
            link.start()
        return link

    def _route(self, names: Iterable[bytes]) -> dict[Link, list[bytes]]:
        """Assign ``names`` to the links of the shards owning them (moving them off a link
        whose shard no longer does); the names to subscribe, per link."""
        groups: dict[Link, list[bytes]] = {}
        for name in names:
            addr = self._map.owner(name)
            old = self._route_of.get(name)
            if addr is None:  # map unknown, or a slot nobody serves: wait for a refresh
                if old is not None:
                    old.forget([name])
                    del self._route_of[name]
                continue
            link = self._link_for(addr)
            if old is not link:
                if old is not None:
                    old.forget([name])
                self._route_of[name] = link
            groups.setdefault(link, []).append(name)
        return groups

    def _retire(self, link: Link) -> None:
        """Close a link with nothing left to carry. Not awaited: the link may be the caller."""
        if link.addr is not None and self._links.get(link.addr) is link:
            del self._links[link.addr]
        task = asyncio.get_running_loop().create_task(link.close())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    async def _want(self, names: list[bytes]) -> None:
        self._wanted.update(names)
        groups = self._route(names)
        await asyncio.gather(*(self._subscribe_on(link, group) for link, group in groups.items()))

    @staticmethod
    async def _subscribe_on(link: Link, names: list[bytes]) -> None:
        """``link.want``, but on a link still making its first connection, wait for that first:
        a new shard's link must not let a subscribe return before Redis confirmed it."""
        first = link.first_attempt
        if first is not None and not first.done():
            link.wanted.update(names)  # so that the link subscribes them if it connects first
            await asyncio.shield(first)
        await link.want(names)

    def _unwant(self, names: list[bytes]) -> None:
        for name in names:
            if name == self._all or name == self._ctl:
                continue
            self._wanted.discard(name)
            link = self._route_of.get(name)
            if link is None:
                continue
            link.unwant([name])
            if name not in link._lingering:  # not subscribed (link down): nothing to sweep
                del self._route_of[name]
                if link.idle:
                    self._retire(link)

    # -- what the links tell the broker --------------------------------------------------------

    def _swept(self, link: Link, names: list[bytes]) -> None:
        for name in names:
            if self._route_of.get(name) is link and name not in self._wanted:
                del self._route_of[name]
        if link.idle:
            self._retire(link)

    async def _retrying(self, link: Link) -> None:
        """Before a link reconnects: refresh the slot map and move channels whose slot moved
        (a shard that is merely down still owns its slots, and its link keeps retrying)."""
        try:
            await self._map.refresh()
        except (RedisError, OSError, TimeoutError) as exc:
            self._log_map(log.warning, "redis cluster slot map refresh failed: %s", exc)
            return
        await self._reroute()

    def _slot_left(self, link: Link, name: bytes) -> None:
        """Redis dropped ``name`` from ``link``: its slot has left that shard (the end of a
        migration, or a failover). Only the channels of that slot are affected: a gap notice
        now, and again once subscribed on the new owner; the link's other channels carry on."""
        if self._route_of.get(name) is not link:
            return
        if name not in self._wanted:  # unsubscribed, lingering: nothing to move, nor to sweep
            del self._route_of[name]
            if link.idle:
                self._retire(link)
            return
        link.forget([name])
        self._orphans[name] = link
        self._gap_names([name])
        if self._rehoming is None:
            loop = asyncio.get_running_loop()
            self._rehoming = loop.create_task(self._rehome(), name="hub-redis-rehome")

    async def _rehome(self) -> None:
        """Subscribe the orphaned names on their new owners, refreshing the slot map (with
        backoff) until it shows them moved. A node that dropped a slot may be asked before the
        others know, so a map still naming the old owner is retried; after three such answers
        the name is subscribed where the map says (a slot that went away and came back)."""
        attempt = 0
        try:
            while self._orphans:
                try:
                    await self._map.refresh()
                except (RedisError, OSError, TimeoutError) as exc:
                    self._log_map(log.warning, "redis cluster slot map refresh failed: %s", exc)
                else:
                    ready = []
                    for name, link in list(self._orphans.items()):
                        owner = self._map.owner(name)
                        if name not in self._wanted or self._route_of.get(name) is not link:
                            del self._orphans[name]  # unsubscribed, or moved by a reroute
                        elif owner is not None and (owner != link.addr or attempt >= 3):
                            del self._orphans[name]
                            ready.append(name)
                    if ready:
                        await self._move(ready)
                if not self._orphans:
                    break
                delay = min(self.backoff_max, self.backoff_min * 2**attempt)
                attempt = min(attempt + 1, 30)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            self._rehoming = None

    async def _reroute(self) -> None:
        moved = []
        for name in self._wanted:
            old = self._route_of.get(name)
            if old is None or old.addr != self._map.owner(name):
                moved.append(name)
        if moved:
            await self._move(moved)

    async def _move(self, names: list[bytes]) -> None:
        """Route ``names`` afresh, subscribe them there, close the links left with nothing to
        carry and report a gap for the names. Closing comes after the subscribes since the
        caller may be such a link (a dead shard's, retrying), which closing cancels once this
        returns."""
        groups = self._route(names)
        await asyncio.gather(*(self._subscribe_on(link, group) for link, group in groups.items()))
        for other in list(self._links.values()):
            if other.idle:
                self._retire(other)  # before the gap: subscribers learn the broker is ready
        for link, group in groups.items():
            if link.up:  # a link still connecting reports a gap once it is up
                self._gap_names(group)

    def _gap_names(self, names: list[bytes]) -> None:
        prefix = self._ch
        channels = [n[len(prefix) :].decode() for n in names if n.startswith(prefix)]
        if channels and self.handler is not None:
            self._call(self.handler.on_gap, channels)
        self._user_gap(names)
