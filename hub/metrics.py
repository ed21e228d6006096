"""Prometheus metrics (``hub_`` prefix). Hot paths add to plain numbers, read at scrape time.

With ``PROMETHEUS_MULTIPROC_DIR`` set (the supervisor of ``hub serve --workers N`` sets it to a
fresh directory before any worker imports prometheus-client), every worker writes its values to
files there and ``render()`` aggregates all of them, so a scrape that lands on any one worker sees
the whole server. Pull-style values (gauges read from the registry, the broker's own counters)
cannot be read across processes, so in that mode each worker copies them into file-backed metrics
with :meth:`Metrics.refresh`, about once a second (``Hub`` runs it) and before each render.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

# The ``source`` of ``hub_messages_published_total``: the HTTP API, a client's ``publish``
# command, or Python code calling ``Node.publish`` in-process. Backends that publish straight to
# Redis do not pass through a hub, so no hub counts them.
PublishSource = Literal["http", "client", "api"]

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "multiprocess_dir"]

#: How a gauge's per-worker values add up: the sum over live workers (a dead worker's share is
#: dropped when the supervisor calls ``mark_process_dead``). Ignored in single-process mode.
LIVESUM = "livesum"

#: Counters a broker or presence store keeps as plain attributes (no prometheus calls on its
#: hot path).
BROKER_COUNTERS = (
    ("malformed", "hub_bridge_malformed", "Malformed payloads received from Redis."),
    (
        "bad_signatures",
        "hub_bridge_bad_signatures",
        "Payloads from Redis dropped for a missing or wrong signature (redis_signing_key).",
    ),
    ("reconnects", "hub_bridge_reconnects", "Times the Redis link was re-established."),
    ("handler_errors", "hub_bridge_handler_errors", "Broker callbacks that raised."),
    ("write_errors", "hub_presence_write_errors", "Presence writes to Redis that failed."),
)


def multiprocess_dir() -> str | None:
    """The switch prometheus-client itself reads (once, at import) to pick multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir()
        self._sampled: list[tuple[Gauge, Callable[[], float]]] = []
        self._pulled: list[list[Any]] = []
        self.connections = Gauge(
            "hub_connections", "Open client connections.", registry=r, multiprocess_mode=LIVESUM
        )
        self.connections_accepted = Counter(
            "hub_connections_accepted", "Client connections accepted.", registry=r
        )
        self.connections_refused = Counter(
            "hub_connections_refused",
            "Connections refused because the process holds all the sockets its open-file limit "
            "leaves room for (answered 503, or reset while many wait for that).",
            registry=r,
        )
        self.connections_closed = Counter(
            "hub_connections_closed",
            "Client connections closed, by close code.",
            ["code"],
            registry=r,
        )
        self.subscriptions = Gauge(
            "hub_subscriptions",
            "Current channel subscriptions.",
            registry=r,
            multiprocess_mode=LIVESUM,
        )
        self.channels = Gauge(
            "hub_channels",
            "Channels with at least one local subscriber.",
            registry=r,
            multiprocess_mode=LIVESUM,
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
            "Time to hand one event-loop turn's arrivals to every local recipient.",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.slow_consumers = Counter(
            "hub_slow_consumer_disconnects", "Connections closed for not keeping up.", registry=r
        )
        self.slow_consumer_skipped = Counter(
            "hub_slow_consumer_skipped",
            "Pushes not written to a connection over its outbound budget, by slow_consumer "
            "policy: dropped (drop) or replaced by a newer one (latest).",
            ["policy"],
            registry=r,
        )
        self.slow_consumer_gaps = Counter(
            "hub_slow_consumer_gaps",
            "Gap notices sent to a connection that drained after pushes were skipped, by policy.",
            ["policy"],
            registry=r,
        )
        self.history_reads = Counter(
            "hub_history_reads",
            "History pages read (history commands and POST /api/history), subscribes aside.",
            registry=r,
        )
        self.history_recoveries = Counter(
            "hub_history_recoveries",
            "Subscribes with since, by result: recovered (every missed publication was still "
            "kept) or lost (the client must reload: trimmed, expired or another epoch).",
            ["result"],
            registry=r,
        )
        self.history_recovered = Counter(
            "hub_history_recovered_publications",
            "Publications written from history to clients recovering with since.",
            registry=r,
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
        self.http_errors = Counter(
            "hub_http_errors",
            "HTTP API requests answered with an error, by status.",
            ["status"],
            registry=r,
        )
        self.command_failures = Counter(
            "hub_command_failures",
            "Client commands whose handler raised unexpectedly (a bug: see the log).",
            registry=r,
        )
        self.rate_limited = Counter(
            "hub_rate_limited",
            "Requests refused by a rate limit: command, publish (per connection), auth (per "
            "source address, answered 429 at the handshake).",
            ["limit"],
            registry=r,
        )
        self.proxy_calls = Counter(
            "hub_proxy_calls",
            "Calls to a proxy's backend, by proxy (connect, subscribe, publish, rpc).",
            ["proxy"],
            registry=r,
        )
        self.proxy_errors = Counter(
            "hub_proxy_errors",
            "Proxy calls that failed, by proxy and reason (timeout, unavailable, status, "
            "malformed).",
            ["proxy", "reason"],
            registry=r,
        )
        self.proxy_seconds = Histogram(
            "hub_proxy_duration_seconds",
            "Time of one proxy call, waiting for a free slot included, by proxy.",
            ["proxy"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
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
        """Read the gauges from the registry at scrape time instead of updating them per event.

        ``set_function`` is invisible to other processes, so in multiprocess mode the functions
        are sampled by :meth:`refresh` instead (no cost on the connect/subscribe paths either way).
        """
        pairs = (
            (self.connections, connections),
            (self.subscriptions, subscriptions),
            (self.channels, channels),
        )
        for gauge, function in pairs:
            if self.multiprocess_dir is None:
                gauge.set_function(function)
            else:
                self._sampled.append((gauge, function))

    def track_counters(self, *owners: object) -> None:
        """Expose the counters a broker, presence or inbox store keeps as plain attributes
        (one counter per name, the sum over the owners that keep it)."""
        for attr, name, doc in BROKER_COUNTERS:
            keeping = [owner for owner in owners if getattr(owner, attr, None) is not None]
            if keeping:
                counter = Counter(name, doc, registry=self.registry)
                self.pull(
                    counter,
                    lambda attr=attr, keeping=keeping: sum(getattr(o, attr) for o in keeping),
                )

    def pull(self, counter: Counter, read: Callable[[], float]) -> None:
        """Feed ``counter`` from a plain number its owner increments on a hot path.

        A prometheus ``inc()`` takes a lock; a hot path adding to an int and :meth:`refresh`
        copying the growth into the counter before each scrape costs far less per message.
        """
        self._pulled.append([counter, read, 0.0])

    def refresh(self) -> None:
        """Bring pulled counters (and, in multiprocess mode, sampled gauges) up to date.

        Called before each render and, in multiprocess mode, about once a second by ``Hub`` so
        the files other workers' scrapes read stay fresh.
        """
        for gauge, function in self._sampled:
            gauge.set(function())
        for entry in self._pulled:
            counter, read, seen = entry
            value = float(read())
            if value > seen:
                counter.inc(value - seen)
                entry[2] = value

    def render(self) -> bytes:
        self.refresh()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)
        return generate_latest(registry)
