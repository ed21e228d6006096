"""The broker: how a publication reaches every process that has a subscriber for it.

The node subscribes a channel (or a user) at the broker when it gains its first local subscriber
and unsubscribes when it loses its last one; the broker calls the node back for every message
that arrives. :class:`MemoryBroker` serves one process; ``hub.redis.broker.RedisBroker`` joins many.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .history import HistoryPage, MemoryHistory

__all__ = ["Broker", "BrokerHandler", "MemoryBroker", "Publication"]


@dataclass(slots=True)
class Publication:
    """One message published to a channel. ``meta`` carries optional envelope fields."""

    channel: str
    data: Any
    meta: dict[str, Any] = field(default_factory=dict)


class BrokerHandler(Protocol):
    """What the broker calls when messages arrive (the node implements it)."""

    def on_publication(self, publication: Publication) -> None: ...

    def on_user_message(self, user: str, data: Any) -> None: ...

    def on_broadcast(self, data: Any) -> None: ...

    def on_inbox(self, user: str, mark: dict[str, Any], data: Any) -> None: ...

    def on_user_gap(self, users: list[str]) -> None: ...

    def on_disconnect(self, user: str, code: int, reason: str) -> None: ...

    def on_gap(self, channels: Iterable[str]) -> None: ...

    def on_join_leave(
        self, channel: str, join: list[dict[str, Any]], leave: list[dict[str, Any]]
    ) -> None: ...

    def on_admin(self, message: dict[str, Any]) -> bool: ...


class Broker(abc.ABC):
    """Interface between the node and the transport that links processes."""

    handler: BrokerHandler | None = None

    async def start(self, handler: BrokerHandler) -> None:
        self.handler = handler

    async def close(self) -> None:
        self.handler = None

    @property
    def ready(self) -> bool:
        """True while the broker can deliver (``/readyz``)."""
        return self.handler is not None

    def ready_for(self, channel: str) -> bool:
        """True while publications to ``channel`` reach this process: what a history
        subscription needs before it recovers (or it could leave a hole). A cluster answers for
        the channel's own shard, so one dead shard does not refuse every channel."""
        return self.ready

    def ready_for_user(self, user: str) -> bool:
        """The same for pushes to ``user`` (an inbox opens only while they arrive)."""
        return self.ready

    @abc.abstractmethod
    async def subscribe(self, channels: Iterable[str]) -> None: ...

    @abc.abstractmethod
    async def unsubscribe(self, channels: Iterable[str]) -> None: ...

    @abc.abstractmethod
    async def subscribe_user(self, user: str) -> None: ...

    @abc.abstractmethod
    async def unsubscribe_user(self, user: str) -> None: ...

    @abc.abstractmethod
    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **meta: Any,
    ) -> tuple[int, str] | None:
        """Deliver to every process; with ``history_size > 0`` also store it in the channel's
        history, which assigns ``offset`` and ``epoch`` (delivered with it, in ``meta``, and
        returned)."""

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
        """The channel's offset, epoch and stored publications (envelopes): after ``since``,
        or the newest ``limit`` (``None``: all) when ``since`` is None. A channel with no history
        answers an empty page and is left as it was, unless ``subscribing``: then its epoch is
        kept for a while (``hub.history.EMPTY_TTL``) so the first publication gets it."""
        raise NotImplementedError(f"{type(self).__name__} keeps no history")

    @abc.abstractmethod
    async def send_to_user(self, user: str, data: Any) -> None: ...

    @abc.abstractmethod
    async def broadcast(self, data: Any) -> None: ...

    @abc.abstractmethod
    async def disconnect(self, user: str, code: int, reason: str) -> None: ...

    async def join_leave(
        self, channel: str, join: list[dict[str, Any]], leave: list[dict[str, Any]]
    ) -> None:
        """Coalesced join/leave notices of one channel, to every process with subscribers
        (the node batches them, see ``hub.membership``). Here: this process only, which
        is right for a broker that links no other process."""
        if self.handler is None:
            raise RuntimeError("broker not started")
        self.handler.on_join_leave(channel, join, leave)

    async def control(self, message: dict[str, Any]) -> None:
        """An admin control message (``op`` starting with ``admin.``, see hub.admin) to every
        process, this one included. Here: this process only."""
        if self.handler is None:
            raise RuntimeError("broker not started")
        self.handler.on_admin(message)


class MemoryBroker(Broker):
    """One process: every publish is delivered straight back to this process's node.

    Subscriptions need no bookkeeping here: the registry already knows who is local. History
    lives in this process (:class:`~hub.history.MemoryHistory`): new epochs after a restart.
    """

    def __init__(self) -> None:
        self.store = MemoryHistory()

    async def subscribe(self, channels: Iterable[str]) -> None:
        return None

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        return None

    async def subscribe_user(self, user: str) -> None:
        return None

    async def unsubscribe_user(self, user: str) -> None:
        return None

    def _handler(self) -> BrokerHandler:
        if self.handler is None:
            raise RuntimeError("broker not started")
        return self.handler

    async def publish(
        self,
        channel: str,
        data: Any,
        *,
        history_size: int = 0,
        history_ttl: float = 0.0,
        **meta: Any,
    ) -> tuple[int, str] | None:
        handler = self._handler()
        if not history_size:
            handler.on_publication(Publication(channel, data, meta))
            return None
        # Stored and handed to the node in one step (no await): history order is delivery order.
        envelope = {"data": data, **meta}
        stored = self.store.add(channel, envelope, history_size, history_ttl)
        meta = {k: v for k, v in envelope.items() if k != "data"}
        handler.on_publication(Publication(channel, data, meta))
        return stored

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
        return self.store.read(channel, since, limit, history_size, history_ttl, subscribing)

    async def send_to_user(self, user: str, data: Any) -> None:
        self._handler().on_user_message(user, data)

    async def broadcast(self, data: Any) -> None:
        self._handler().on_broadcast(data)

    async def disconnect(self, user: str, code: int, reason: str) -> None:
        self._handler().on_disconnect(user, code, reason)
