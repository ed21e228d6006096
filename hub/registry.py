"""The local registry: which of this process's connections belong to which user and channel.

It answers the fan-out question (who here gets this?) and tells the node when a channel or user
gains its first or loses its last local connection, which is when the broker (re)subscribes.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Registry"]

S = TypeVar("S", bound=Hashable)


class Registry(Generic[S]):
    """Sessions by user id and by channel. Not thread-safe: it lives on one event loop."""

    __slots__ = ("_channels", "_sessions", "_users")

    def __init__(self) -> None:
        # A user has a few connections and a connection a few channels: lists, a quarter of the
        # memory of one-element sets. A channel may have thousands of subscribers: sets.
        self._users: dict[str, list[S]] = {}
        self._channels: dict[str, set[S]] = {}
        self._sessions: dict[S, list[str]] = {}  # session -> its channels

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def sessions(self) -> list[S]:
        return list(self._sessions)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def user_count(self) -> int:
        return len(self._users)

    @property
    def subscription_count(self) -> int:
        return sum(len(s) for s in self._channels.values())

    def add(self, session: S, user: str) -> bool:
        """Register a connection; True when it is the user's first one here."""
        self._sessions[session] = []
        sessions = self._users.get(user)
        if sessions is None:
            self._users[user] = [session]
            return True
        sessions.append(session)
        return False

    def remove(self, session: S, user: str) -> tuple[bool, list[str]]:
        """Forget a connection. Returns (user's last connection here?, channels left empty)."""
        channels = self._sessions.pop(session, None)
        emptied = []
        for channel in channels or ():
            if self._discard(channel, session):
                emptied.append(channel)
        last_user = False
        sessions = self._users.get(user)
        if sessions is not None and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._users[user]
                last_user = True
        return last_user, emptied

    def subscribe(self, session: S, channel: str) -> bool:
        """Add a subscription; True when it is the channel's first local subscriber."""
        self._sessions[session].append(channel)
        subscribers = self._channels.get(channel)
        if subscribers is None:
            self._channels[channel] = {session}
            return True
        subscribers.add(session)
        return False

    def unsubscribe(self, session: S, channel: str) -> bool:
        """Remove a subscription; True when the channel has no local subscriber left."""
        channels = self._sessions.get(session)
        if channels is None or channel not in channels:
            return False
        channels.remove(channel)
        return self._discard(channel, session)

    def _discard(self, channel: str, session: S) -> bool:
        subscribers = self._channels.get(channel)
        if subscribers is None:
            return False
        subscribers.discard(session)
        if not subscribers:
            del self._channels[channel]
            return True
        return False

    def is_subscribed(self, session: S, channel: str) -> bool:
        channels = self._sessions.get(session)
        return channels is not None and channel in channels

    def channels_of(self, session: S) -> list[str]:
        return self._sessions.get(session, [])

    def subscribers(self, channel: str) -> set[S]:
        return self._channels.get(channel) or set()

    def user_sessions(self, user: str) -> list[S]:
        return self._users.get(user) or []

    def has_channel(self, channel: str) -> bool:
        return channel in self._channels

    def has_user(self, user: str) -> bool:
        return user in self._users

    def channels(self) -> list[str]:
        return list(self._channels)

    def users(self) -> list[str]:
        return list(self._users)
