"""Process-wide tuning for a server process (``hub serve`` and each worker).

The fan-out path allocates a few short-lived objects per message (an envelope, a push, a frame)
that reference counting frees at once; few of them are in cycles. CPython's cyclic collector
nevertheless runs a generation-0 pass every 700 net allocations, and every pass walks whatever
young objects exist, including each new connection's. Measured on the per-user path (one Redis
message, one push, one send), a larger threshold saves 6-10% of server CPU. ``gc.freeze`` moves
everything built at start-up (modules, settings, the server) out of the collector's sight.
"""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]

#: Net allocations between generation-0 collections (CPython's default is 700); generations 1
#: and 2 keep running after 50 and 100 of those.
GEN0_THRESHOLD = 100_000


def tune_gc() -> None:
    """Call once the server is started: collect what start-up left, freeze the survivors, and
    collect young objects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, 50, 100)
