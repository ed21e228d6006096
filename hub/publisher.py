"""``hub.publisher``: where the publisher SDK was first documented; it lives in
:mod:`hub.redis.publisher` now and this module re-exports it, so ``from hub.publisher import
Publisher, AsyncPublisher`` keeps working. New code imports from ``hub.redis.publisher``."""

from __future__ import annotations

from .history import HistoryPage, Published
from .redis.cluster import CLUSTER_SCHEME, SlotMap, is_cluster_url
from .redis.publisher import AsyncPublisher, Publisher
from .redis.wire import DEFAULT_PREFIX, DISCONNECT_CODE, Names, pack_disconnect, pack_message

__all__ = [
    "CLUSTER_SCHEME",
    "DEFAULT_PREFIX",
    "DISCONNECT_CODE",
    "AsyncPublisher",
    "HistoryPage",
    "Names",
    "Published",
    "Publisher",
    "SlotMap",
    "is_cluster_url",
    "pack_disconnect",
    "pack_message",
]
