"""A Lua script the hub runs in Redis: its text and SHA1, for ``EVALSHA`` (then ``EVAL`` once
where Redis does not know it yet, see :meth:`hub.redis.cluster.Router.script`)."""

from __future__ import annotations

import hashlib
from importlib import resources

__all__ = ["Script"]


class Script:
    """A Lua script: its text and SHA1 (for ``EVALSHA``)."""

    __slots__ = ("sha", "sha_bytes", "text", "text_bytes")

    def __init__(self, text: str) -> None:
        self.text = text
        self.text_bytes = text.encode()
        self.sha = hashlib.sha1(self.text_bytes).hexdigest()
        self.sha_bytes = self.sha.encode()

    @classmethod
    def shipped(cls, name: str) -> Script:
        """A script shipped at the top of the ``hub`` package (``hub/history.lua``...), where
        backends in other languages read the same file."""
        return cls(resources.files("hub").joinpath(name).read_text())
