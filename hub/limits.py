"""Rate and count limits: a token bucket, and bounded tables keyed by source address.

The hub uses them for the per-connection command rate (``command_rate`` / ``command_burst``,
and per namespace ``publish_rate`` / ``publish_burst``), for the per-address budget of failed
authentications (``auth_failures`` per ``auth_failure_window``) and for the per-address count
of open sockets (``max_connections_per_ip``). Every table here is bounded: an attacker with
many addresses must not grow the hub's memory instead.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

__all__ = ["AddressBudget", "TokenBucket", "address_key"]

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; each command takes one."""

    __slots__ = ("_clock", "_stamp", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(float(burst), 1.0)
        self.tokens = self.burst
        self._clock = clock
        self._stamp = clock()

    def level(self, now: float) -> float:
        """The tokens available at ``now`` (on the bucket's clock)."""
        return min(self.burst, self.tokens + (now - self._stamp) * self.rate)

    def take(self) -> bool:
        """Take a token; False (nothing taken) when the bucket is empty."""
        now = self._clock()
        tokens = self.level(now)
        self._stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True

    def full_at(self) -> float:
        """When (on the clock) the bucket will be full again."""
        return self._stamp + (self.burst - self.tokens) / self.rate if self.rate else float("inf")


def address_key(host: object) -> str:
    """What one source counts as: its IPv4 address, or the /64 of an IPv6 address (one host
    usually has a whole /64 to pick addresses from)."""
    text = str(host)
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text  # a Unix socket path, or no address at all
    if ip.version == 6:
        mapped = ip.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return text


class AddressBudget:
    """Per source address: ``count`` events per ``window`` seconds (a token bucket each), in a
    table of at most ``max_addresses`` entries. Addresses whose bucket is full again are
    forgotten; when the table is still full, the oldest entries go (they lose their record,
    never anyone else's service)."""

    def __init__(
        self,
        count: int,
        window: float,
        *,
        max_addresses: int = 100_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self.count = count
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def enabled(self) -> bool:
        return self.count > 0 and self.window > 0

    @property
    def tracking(self) -> bool:
        """Whether any key has spent anything (if not, none is exhausted: callers may skip
        working out the key)."""
        return bool(self._buckets)

    def exhausted(self, key: str) -> bool:
        """True while ``key`` has used up its budget (it is then refused without costing more)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return False
        now = self._clock()
        if bucket.full_at() <= now:
            del self._buckets[key]
            return False
        return bucket.level(now) < 1.0

    def spend(self, key: str) -> None:
        """Record one event from ``key``."""
        if not self.enabled:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_addresses:
                self._prune()
            bucket = self._buckets[key] = TokenBucket(
                self.count / self.window, self.count, self._clock
            )
        bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, b in self._buckets.items() if b.full_at() <= now]:
            del self._buckets[key]
        excess = len(self._buckets) - self.max_addresses // 2
        if excess > 0:
            for key in list(self._buckets)[:excess]:
                del self._buckets[key]
