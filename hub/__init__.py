"""hub: a real-time pub/sub broadcast hub for chat and notification backends."""

from __future__ import annotations

__version__ = "0.1.0"
