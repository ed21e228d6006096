"""Joining a history channel's live stream without a hole or a duplicate.

A session subscribing to a channel with history (with or without ``since``) is live at the broker
before the history is read, so nothing published after the read can be missed; but until its
reply and the missed publications are written, its live pushes are held back (``buffer``). Once
they are written it goes live, and pushes it already got from history are dropped by offset:
a publication read from history may still be on its way through pub/sub, or in the node's
end-of-turn queue. The first push newer than what was sent ends the check, so only the
session's first pushes after a subscribe pay for it, and channels without history never do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Push

__all__ = ["Tracker"]


class Tracker:
    """One session's pushes of one history channel while it joins (see the module docstring)."""

    __slots__ = ("buffer", "epoch", "last")

    def __init__(self) -> None:
        self.buffer: list[Push] | None = []
        self.epoch = ""
        self.last: int | None = 0

    @property
    def done(self) -> bool:
        """Live, and past every offset sent from history: the tracker can go."""
        return self.buffer is None and self.last is None

    def admit(self, pushes: Sequence[Push]) -> Sequence[Push]:
        """Of ``pushes`` (arrival order), those to write to the session now."""
        if self.buffer is not None:
            self.buffer.extend(pushes)
            return ()
        if self.last is None:
            return pushes
        out = []
        for push in pushes:
            if self.last is not None:
                obj = push.obj
                offset = obj.get("offset")
                if type(offset) is int:
                    if offset <= self.last and obj.get("epoch") == self.epoch:
                        continue  # already sent (from history, or covered by the reply)
                    self.last = None  # newer (or a new epoch): every later push is too
            out.append(push)
        return out

    def go_live(self, epoch: str, last: int) -> Sequence[Push]:
        """Stop holding back; ``last`` of ``epoch`` is the newest offset the session has. The
        held-back pushes it does not have yet, to write now."""
        held, self.buffer = self.buffer or [], None
        self.epoch, self.last = epoch, last
        return self.admit(held)
