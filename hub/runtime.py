"""Process-wide tuning for a server process (``hub serve`` and each worker).

The fan-out path allocates a few short-lived objects per message (an envelope, a push, a frame)
that reference counting frees at once; few of them are in cycles. CPython's cyclic collector
nevertheless runs a generation-0 pass every 700 net allocations, and every pass walks whatever
young objects exist, including each new connection's. Measured on the per-user path (one Redis
message, one push, one send), a larger threshold saves 6-10% of server CPU. ``gc.freeze`` moves
everything built at start-up (modules, settings, the server) out of the collector's sight.

Memory freed when many connections go does not all leave the process by itself: glibc keeps
freed heap pages for reuse, and whatever a closed connection left in a reference cycle waits for
a collection, which the high threshold makes rare. :class:`MemoryReturn` collects and trims once
after the connection count has fallen by half (see docs/operations.md, "Capacity").
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import platform
import time
from collections.abc import Callable

__all__ = ["MemoryReturn", "return_memory", "tune_gc"]

log = logging.getLogger("hub.runtime")

#: Net allocations between generation-0 collections (CPython's default is 700); generations 1
#: and 2 keep running after 50 and 100 of those.
GEN0_THRESHOLD = 100_000


def tune_gc() -> None:
    """Call once the server is started: collect what start-up left, freeze the survivors, and
    collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 50, 100)


#: A trim is due once the connection count is at most half its peak since the last trim, and
#: at least this many fewer: small servers and small waves never pay for one.
TRIM_MIN_DROP = 1_000
#: Seconds from the drop to the trim, so one wave of disconnects (and its handler tasks) is over
#: and costs one trim.
TRIM_SETTLE = 1.0
#: Seconds at least between two trims, whatever the churn.
TRIM_MIN_INTERVAL = 30.0


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc (musl, macOS)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def return_memory() -> None:
    """Collect every generation, then hand free heap pages back to the OS (glibc only)."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


class MemoryReturn:
    """Returns memory to the OS after a mass disconnect: a rule with hysteresis, off the hot path.

    :meth:`seen` gets the connection count after every open and close (a comparison or two).
    When the count has fallen to half its peak since the last trim, and by at least
    ``TRIM_MIN_DROP``, one trim is scheduled ``TRIM_SETTLE`` seconds later (at the soonest
    ``TRIM_MIN_INTERVAL`` after the previous one); the count at that moment becomes the new
    peak. Churn around a steady count never triggers one; a server that halves again later
    trims again.
    """

    __slots__ = ("_clock", "_count", "_due", "_last", "_peak", "_trim", "trims")

    def __init__(
        self,
        trim: Callable[[], None] = return_memory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._trim = trim
        self._clock = clock
        self._peak = 0
        self._count = 0
        self._due: asyncio.TimerHandle | None = None
        self._last = -TRIM_MIN_INTERVAL
        self.trims = 0

    def seen(self, count: int) -> None:
        """The connection count now (call after each open and close)."""
        self._count = count
        peak = self._peak
        if count > peak:
            self._peak = count
        elif self._due is None and peak - count >= max(TRIM_MIN_DROP, peak - peak // 2):
            wait = max(TRIM_SETTLE, self._last + TRIM_MIN_INTERVAL - self._clock())
            self._due = asyncio.get_running_loop().call_later(wait, self.run)

    def run(self) -> None:
        """Collect and trim now; the current count becomes the peak to fall from."""
        self._due = None
        self._last = self._clock()
        self._peak = self._count
        start = time.perf_counter()
        self._trim()
        self.trims += 1
        log.info(
            "returned memory after connections fell (now %d): %.0f ms",
            self._count,
            1000 * (time.perf_counter() - start),
        )

    def cancel(self) -> None:
        if self._due is not None:
            self._due.cancel()
            self._due = None
