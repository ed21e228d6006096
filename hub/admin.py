"""What the admin page (``/admin``, with ``admin = true``) shows: every hub process, its Redis
link and its counts, the top channels, and where a user is connected.

One process answers each page request, so the others report through the broker's control
channel, the one every process already listens on:

- ``admin.node``: each process's heartbeat, every :data:`HEARTBEAT` seconds (its id, pid, Redis
  link state, counts, delivered and fan-out totals, top channels). The page lists the processes
  heard from within :data:`STALE` seconds: a process cut off from Redis drops out of the list of
  the others, and shows its own link as down to a page it serves itself.
- ``admin.who`` / ``admin.seen``: a user search asks every process and gathers the replies for
  :data:`WHO_WAIT` seconds.

A control message is input like any other (anyone who can publish to Redis can forge one): every
field is checked, strings are cut short and lists bounded; :meth:`Admin.on_message` returns False
for a malformed one, which the bridge counts in ``hub_bridge_malformed_total``.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from . import __version__
from .broker import MemoryBroker
from .errors import HubUnavailable

if TYPE_CHECKING:
    from .node import Node
    from .session import Session

__all__ = ["Admin"]

log = logging.getLogger("hub.admin")

HEARTBEAT = 1.0
STALE = 5.0
WHO_WAIT = 0.3
#: Channels in a process's top list.
TOP = 10
#: Most processes remembered, connections reported per process and channels per connection.
MAX_PROCESSES = 256
MAX_CONNECTIONS = 100
MAX_CHANNELS = 50
#: Longest string kept from a control message (channel names are at most 255 by default).
MAX_TEXT = 300
#: The numbers of a heartbeat, all non-negative.
COUNTS = (
    "time",
    "pid",
    "started",
    "connections",
    "subscriptions",
    "channels",
    "users",
    "delivered",
    "published",
    "fanout_count",
    "fanout_sum",
    "reconnects",
)
LINKS = ("memory", "up", "down")


def _text(value: Any) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) and value else None


def _count(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def _clean_process(info: Any) -> dict[str, Any] | None:
    """A peer's heartbeat with only known, well-typed fields, or None."""
    if not isinstance(info, dict):
        return None
    pid, host = _text(info.get("id")), _text(info.get("host"))
    version, link = _text(info.get("version")), info.get("redis")
    if pid is None or host is None or version is None or link not in LINKS:
        return None
    clean: dict[str, Any] = {"id": pid, "host": host, "version": version, "redis": link}
    clean["ready"] = info.get("ready") is True
    for key in COUNTS:
        value = _count(info.get(key))
        if value is None:
            return None
        clean[key] = value
    top = info.get("top")
    if not isinstance(top, list) or len(top) > TOP:
        return None
    clean["top"] = []
    for entry in top:
        if not (isinstance(entry, list) and len(entry) == 2):
            return None
        channel, count = _text(entry[0]), _count(entry[1])
        if channel is None or count is None:
            return None
        clean["top"].append([channel, count])
    return clean


def _clean_connection(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, dict):
        return None
    process, client = _text(entry.get("process")), _text(entry.get("client"))
    address, protocol = _text(entry.get("address")) or "", _text(entry.get("protocol")) or ""
    channels = entry.get("channels")
    if process is None or client is None or not isinstance(channels, list):
        return None
    names = [_text(c) for c in channels[:MAX_CHANNELS]]
    if None in names:
        return None
    return {
        "process": process,
        "client": client,
        "address": address,
        "protocol": protocol,
        "channels": names,
    }


class Admin:
    """The admin view of one process (owned by the ``Hub``; the node hands it control messages)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.host = socket.gethostname()[:100]
        self.id = f"{self.host}/{os.getpid()}/{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        #: Other processes: id -> (their last heartbeat, when it arrived, monotonic).
        self.peers: dict[str, tuple[dict[str, Any], float]] = {}
        self._searches: dict[str, list[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._replies: set[asyncio.Task[None]] = set()

    @property
    def alone(self) -> bool:
        """No other process can hear this one (the in-memory broker)."""
        return isinstance(self.node.broker, MemoryBroker)

    def start(self) -> None:
        if not self.alone:
            self._task = asyncio.get_running_loop().create_task(self._beat())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._replies) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- this process -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        node = self.node
        registry = node.registry
        broker = node.broker
        fanout_count = fanout_sum = 0.0
        for family in node.metrics.fanout_seconds.collect():
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    fanout_count = sample.value
                elif sample.name.endswith("_sum"):
                    fanout_sum = sample.value
        published = sum(
            sample.value
            for family in node.metrics.published.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )
        top = heapq.nlargest(TOP, ((len(registry.subscribers(c)), c) for c in registry.channels()))
        return {
            "id": self.id,
            "time": time.time(),
            "host": self.host,
            "pid": os.getpid(),
            "version": __version__,
            "started": self.started,
            "redis": "memory" if self.alone else ("up" if broker.ready else "down"),
            "ready": node.ready,
            "reconnects": int(getattr(broker, "reconnects", 0)),
            "connections": len(registry),
            "subscriptions": registry.subscription_count,
            "channels": registry.channel_count,
            "users": registry.user_count,
            "delivered": sum(node.fanout.delivered),
            "published": published,
            "fanout_count": fanout_count,
            "fanout_sum": fanout_sum,
            "top": [[channel, count] for count, channel in top],
        }

    def overview(self) -> dict[str, Any]:
        """Every process heard from lately (this one first) and the top channels over all."""
        now = time.monotonic()
        processes = [{**self.info(), "age": 0.0, "self": True}]
        for pid, (info, seen) in list(self.peers.items()):
            if now - seen > STALE:
                del self.peers[pid]
            else:
                processes.append({**info, "age": round(now - seen, 1), "self": False})
        totals: dict[str, float] = {}
        for process in processes:
            for channel, count in process["top"]:
                totals[channel] = totals.get(channel, 0) + count
        top = heapq.nlargest(TOP, totals.items(), key=lambda item: item[1])
        return {"time": time.time(), "processes": processes, "top": [list(t) for t in top]}

    def connections_of(self, user: str) -> list[dict[str, Any]]:
        sessions = self.node.registry.user_sessions(user)[:MAX_CONNECTIONS]
        return [self._describe(s) for s in sessions]

    def _describe(self, session: Session) -> dict[str, Any]:
        connection = session.connection
        peer = connection.remote_address
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""
        return {
            "process": self.id,
            "client": session.client_id,
            "address": address,
            "protocol": connection.subprotocol or "",
            "channels": self.node.registry.channels_of(session)[:MAX_CHANNELS],
        }

    async def find_user(self, user: str) -> tuple[list[dict[str, Any]], bool]:
        """``user``'s connections on every process that answers within :data:`WHO_WAIT`, and
        whether the others could be asked at all (not with the Redis link down)."""
        found = self.connections_of(user)
        if self.alone:
            return found, True
        search = uuid.uuid4().hex
        self._searches[search] = replies = []
        try:
            await self.node.broker.control(
                {"op": "admin.who", "req": search, "from": self.id, "user": user}
            )
            await asyncio.sleep(WHO_WAIT)
        except HubUnavailable:
            return found, False
        finally:
            del self._searches[search]
        return found + replies, True

    # -- the control channel ----------------------------------------------------------------------

    async def _beat(self) -> None:
        while True:
            try:
                await self.node.broker.control({"op": "admin.node", "info": self.info()})
            except Exception as exc:  # Redis down: the others stop hearing from this process
                log.debug("admin heartbeat not sent: %s", exc)
            await asyncio.sleep(HEARTBEAT)

    def on_message(self, message: dict[str, Any]) -> bool:
        """A control message whose op starts with ``admin.``; False if it is malformed."""
        op = message.get("op")
        if op == "admin.node":
            info = _clean_process(message.get("info"))
            if info is None:
                return False
            if info["id"] != self.id and (
                info["id"] in self.peers or len(self.peers) < MAX_PROCESSES
            ):
                self.peers[info["id"]] = (info, time.monotonic())
            return True
        if op == "admin.who":
            search, asker, user = (_text(message.get(k)) for k in ("req", "from", "user"))
            if search is None or asker is None or user is None:
                return False
            if asker != self.id:
                found = self.connections_of(user)
                if found:
                    reply = {"op": "admin.seen", "req": search, "to": asker, "found": found}
                    task = asyncio.get_running_loop().create_task(self._reply(reply))
                    self._replies.add(task)
                    task.add_done_callback(self._replies.discard)
            return True
        if op == "admin.seen":
            search, found = _text(message.get("req")), message.get("found")
            if search is None or not isinstance(found, list):
                return False
            replies = self._searches.get(search)
            if replies is None or message.get("to") != self.id:
                return True  # another process's search, or one that timed out
            clean = [_clean_connection(entry) for entry in found[:MAX_CONNECTIONS]]
            if None in clean:
                return False
            room = MAX_CONNECTIONS * 10 - len(replies)
            replies.extend(c for c in clean[: max(room, 0)] if c is not None)
            return True
        return True  # a newer hub's admin op: forward compatible

    async def _reply(self, message: dict[str, Any]) -> None:
        try:
            await self.node.broker.control(message)
        except Exception as exc:
            log.debug("admin reply not sent: %s", exc)
