"""Prometheus metrics (``hub_`` prefix). Hot paths count once per fan-out, not per recipient."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.connections = Gauge("hub_connections", "Open client connections.", registry=r)
        self.connections_accepted = Counter(
            "hub_connections_accepted", "Client connections accepted.", registry=r
        )
        self.connections_closed = Counter(
            "hub_connections_closed",
            "Client connections closed, by close code.",
            ["code"],
            registry=r,
        )
        self.subscriptions = Gauge(
            "hub_subscriptions", "Current channel subscriptions.", registry=r
        )
        self.channels = Gauge(
            "hub_channels", "Channels with at least one local subscriber.", registry=r
        )
        self.client_messages = Counter(
            "hub_client_messages_received", "Commands received from clients.", registry=r
        )
        self.published = Counter(
            "hub_messages_published", "Messages published, by source.", ["source"], registry=r
        )
        self.delivered = Counter(
            "hub_messages_delivered",
            "Messages written to client connections, by kind.",
            ["kind"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "hub_bytes_sent", "Bytes of pushed frames written to client connections.", registry=r
        )
        self.fanout_seconds = Histogram(
            "hub_fanout_duration_seconds",
            "Time to hand one message to every local recipient.",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.slow_consumers = Counter(
            "hub_slow_consumer_disconnects", "Connections closed for not keeping up.", registry=r
        )
        self.handshake_failures = Counter(
            "hub_handshake_failures",
            "Failed opening handshakes, by reason.",
            ["reason"],
            registry=r,
        )
        self.command_errors = Counter(
            "hub_command_errors",
            "Error replies to client commands, by error code.",
            ["code"],
            registry=r,
        )
        self.delivered_channel = self.delivered.labels("channel")
        self.delivered_user = self.delivered.labels("user")
        self.delivered_broadcast = self.delivered.labels("broadcast")

    def track(
        self,
        connections: Callable[[], float],
        subscriptions: Callable[[], float],
        channels: Callable[[], float],
    ) -> None:
        """Read the gauges from the registry at scrape time instead of updating them per event."""
        self.connections.set_function(connections)
        self.subscriptions.set_function(subscriptions)
        self.channels.set_function(channels)

    def track_broker(self, broker: object) -> None:
        """Expose a broker's own counters (e.g. the Redis bridge's) at scrape time."""
        self.registry.register(_BrokerCollector(broker))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BrokerCollector(Collector):
    """Counters the broker keeps as plain attributes (no prometheus calls on its hot path)."""

    _COUNTERS = (
        ("malformed", "hub_bridge_malformed", "Malformed payloads received from Redis."),
        ("reconnects", "hub_bridge_reconnects", "Times the Redis link was re-established."),
        ("handler_errors", "hub_bridge_handler_errors", "Broker callbacks that raised."),
    )

    def __init__(self, broker: object) -> None:
        self.broker = broker

    def collect(self):  # type: ignore[no-untyped-def]
        for attr, name, doc in self._COUNTERS:
            value = getattr(self.broker, attr, None)
            if value is not None:
                yield CounterMetricFamily(name, doc, value=value)
