"""A client session: one per WebSocket connection. It parses commands, enforces permissions and
limits, and owns the connection's outbound buffer (slow consumers are closed, never waited for).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

from .codec import Codec
from .config import Namespace
from .errors import BadRequest, CloseCode, ErrorCode, HubUnavailable, ReplyError
from .limits import TokenBucket
from .tokens import Credentials
from .ws import ConnectionClosed, ServerConnection
from .ws.protocol import OPEN

if TYPE_CHECKING:
    from .history import HistoryPage
    from .node import Node, Push, PushRun

__all__ = ["Session", "check_channel"]

log = logging.getLogger("hub.session")

_CHANNEL = re.compile(r"[A-Za-z0-9_\-.:@/=,+]+")
MAX_ABUSE = 10  # bad commands tolerated before the connection is closed
MAX_LIMITED = 20  # rate-limited commands in a row tolerated before the connection is closed
SLOW_CONSUMER_GRACE = 1.0  # seconds a closed slow consumer gets to drain before it is dropped


def check_channel(channel: Any, max_length: int) -> str:
    """``channel`` if it is a valid channel name, else :class:`BadRequest` saying why."""
    if not isinstance(channel, str) or not channel:
        raise BadRequest("channel must be a non-empty string")
    if len(channel) > max_length:
        raise BadRequest("channel name too long")
    if _CHANNEL.fullmatch(channel) is None:
        raise BadRequest("channel name has invalid characters")
    return channel


def bucket(rate: float, burst: int) -> TokenBucket | None:
    """A rate limit from settings: None when off (rate 0); burst 0 means one second's worth."""
    return TokenBucket(rate, burst or rate) if rate > 0 else None


class Session:
    __slots__ = (
        "_client_id",
        "_publish_buckets",
        "abuse",
        "bucket",
        "codec",
        "connection",
        "credentials",
        "limited",
        "node",
        "user",
    )

    def __init__(
        self, node: Node, connection: ServerConnection, credentials: Credentials, codec: Codec
    ) -> None:
        self.node = node
        self.connection = connection
        self.credentials = credentials
        self.user = credentials.user
        self.codec = codec
        self.abuse = 0
        self.limited = 0  # commands refused by a rate limit since the last one admitted
        settings = node.settings
        self.bucket = bucket(settings.command_rate, settings.command_burst)
        self._publish_buckets: dict[str, TokenBucket | None] | None = None
        self._client_id: str | None = None

    def __repr__(self) -> str:
        return f"<Session user={self.user!r} {self.connection.remote_address}>"

    @property
    def client_id(self) -> str:
        """Names this connection in presence and join/leave, unique across processes. Made on
        first use: most connections of most deployments never need one."""
        cid = self._client_id
        if cid is None:
            cid = self._client_id = uuid.uuid4().hex
        return cid

    def presence_entry(self) -> dict[str, Any]:
        """What presence and join/leave pushes show of this connection."""
        return {"user": self.user, "client": self.client_id, "info": self.credentials.info}

    # -- outbound ------------------------------------------------------------------------------

    def push(self, push: Push | PushRun) -> int:
        """Queue a push; returns the bytes queued (0 when skipped). Never waits."""
        connection = self.connection
        if connection.protocol.state is not OPEN:
            return 0
        frame = push.frame_for(self)
        transport = connection.transport
        buffered = transport.get_write_buffer_size() + connection._wsize + len(frame)
        if buffered > self.node.settings.outbound_buffer:
            self.node.metrics.slow_consumers.inc()
            log.info("closing slow consumer %r (%d bytes pending)", self, buffered)
            connection._fail(CloseCode.SLOW_CONSUMER, "slow consumer")
            # The close frame waits behind the full buffer; a client that does not read it
            # within the grace is reset, which frees the kernel's send queue too.
            asyncio.get_running_loop().call_later(SLOW_CONSUMER_GRACE, connection.abort)
            return 0
        connection._write(frame)
        return len(frame)

    async def _reply(self, obj: dict[str, Any]) -> None:
        payload = self.codec.encode(obj)
        try:
            await self.connection.send(payload)
        except ConnectionClosed:
            pass

    def close_soon(self, code: int, reason: str = "") -> None:
        """Close from a synchronous context (a broker callback)."""
        if self.connection.protocol.state is OPEN:
            asyncio.get_running_loop().create_task(self.connection.close(code, reason))

    # -- inbound -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve commands until the connection closes."""
        connection = self.connection
        metrics = self.node.metrics
        try:
            async for message in connection:
                metrics.client_messages.inc()
                await self.handle(message)
                if self.abuse >= MAX_ABUSE:
                    await connection.close(CloseCode.BAD_REQUEST, "too many bad commands")
                    return
                if self.limited >= MAX_LIMITED:
                    # The closing handshake, not an abrupt close: a socket closed with the
                    # flood still unread goes out as a reset, which can destroy the replies
                    # and the close frame before the client reads them. The handshake drops
                    # what else the flood sent, for at most close_timeout.
                    await connection.close(CloseCode.RATE_LIMITED, "rate limit exceeded")
                    return
        except ConnectionClosed:
            pass  # closed with an error code or without a closing handshake: nothing to answer

    async def handle(self, message: str | bytes) -> None:
        cid: Any = None
        try:
            command = self.codec.decode(message)
            cid = command.get("id")
            if not isinstance(cid, int) or isinstance(cid, bool):
                cid = None
                raise BadRequest("id must be an integer")
            limit = self.bucket
            if limit is not None and not limit.take():
                self._rate_limited("command")
            op = command.get("op")
            handler = _OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ReplyError(f"unknown op: {op!r}"[:100], ErrorCode.UNKNOWN_OP)
            result = await handler(self, command)
            self.limited = 0
        except ReplyError as exc:
            if exc.code != ErrorCode.RATE_LIMITED:
                self.limited = 0
            self.abuse += exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_OP)
            self.node.metrics.command_errors.labels(str(int(exc.code))).inc()
            await self._reply({"id": cid, "error": {"code": int(exc.code), "message": exc.message}})
            return
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception:
            # A bug, not the client's fault: answer, count and log it, keep the connection.
            self.node.metrics.command_failures.inc()
            log.exception("command failed on %r", self)
            error = {"code": int(ErrorCode.INTERNAL), "message": "internal error"}
            await self._reply({"id": cid, "error": error})
            return
        if type(result) is tuple:
            # Something to write right after the reply (a history subscribe's pushes).
            result, then = result
            try:
                await self._reply({"id": cid, "result": result})
            finally:
                then()
            return
        await self._reply({"id": cid, "result": result})

    def _rate_limited(self, limit: str) -> None:
        self.limited += 1
        self.node.metrics.rate_limited.labels(limit).inc()
        raise ReplyError("rate limit exceeded, slow down", ErrorCode.RATE_LIMITED)

    def sender(self) -> dict[str, Any]:
        """The ``from`` of this session's publications: what the server knows of the sender,
        never what the client claims (hub.codec.check_sender holds the shape)."""
        return self.presence_entry()

    # -- commands ------------------------------------------------------------------------------

    def _channel(self, command: dict[str, Any]) -> str:
        return check_channel(command.get("channel"), self.node.settings.max_channel_length)

    def _readable(self, channel: str) -> Namespace:
        """The channel's namespace, if this session may read the channel (subscribe, history)."""
        ns = self.node.settings.namespace(channel)
        if ns.personal:
            if channel.partition(":")[2] != self.user:
                raise ReplyError("personal channel of another user", ErrorCode.PERMISSION_DENIED)
        elif ns.subscribe == "token" and not self.credentials.may_subscribe(channel):
            raise ReplyError("token does not grant this channel", ErrorCode.PERMISSION_DENIED)
        return ns

    def _writable(self, channel: str) -> Namespace:
        """The channel's namespace, if this session may publish there: publishing is on, the
        session may read the channel (a publisher must never reach where it could not listen),
        the token grants it where the namespace says ``publish = "token"``, and the
        namespace's publish rate admits it."""
        ns = self.node.settings.namespace(channel)
        if not ns.publish:
            raise ReplyError("publishing is not allowed here", ErrorCode.PERMISSION_DENIED)
        self._readable(channel)
        if ns.publish == "token" and not self.credentials.may_publish(channel):
            raise ReplyError("token does not grant publishing here", ErrorCode.PERMISSION_DENIED)
        if ns.publish_rate:
            buckets = self._publish_buckets
            if buckets is None:
                buckets = self._publish_buckets = {}
            limit = buckets.get(ns.name)
            if limit is None:
                limit = buckets[ns.name] = bucket(ns.publish_rate, ns.publish_burst)
            if limit is not None and not limit.take():
                self._rate_limited("publish")
        return ns

    async def _subscribe(self, command: dict[str, Any]) -> Any:
        channel = self._channel(command)
        since = parse_since(command)
        ns = self._readable(channel)
        if since is not None and not ns.history_size:
            raise ReplyError("history is not enabled on this channel", ErrorCode.NOT_ENABLED)
        registry = self.node.registry
        if registry.is_subscribed(self, channel):
            raise ReplyError("already subscribed", ErrorCode.ALREADY_SUBSCRIBED)
        limit = self.node.settings.max_subscriptions
        if limit and len(registry.channels_of(self)) >= limit:
            raise ReplyError(f"subscription limit of {limit} reached", ErrorCode.LIMIT_EXCEEDED)
        if not ns.history_size:
            await self.node.subscribe(self, channel)
            return {}
        try:
            return await self.node.subscribe_history(self, channel, ns, since)
        except HubUnavailable:
            raise ReplyError("broker unavailable, try again", ErrorCode.UNAVAILABLE) from None

    async def _history(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(command)
        since, limit = parse_history(command)
        ns = self._readable(channel)
        if not ns.history_size:
            raise ReplyError("history is not enabled on this channel", ErrorCode.NOT_ENABLED)
        limit = ns.history_size if limit is None else min(limit, ns.history_size)
        try:
            page = await self.node.history(
                channel, ns, since=None if since is None else since[0], limit=limit
            )
        except HubUnavailable:
            raise ReplyError("broker unavailable, try again", ErrorCode.UNAVAILABLE) from None
        return history_result(page, since)

    async def _unsubscribe(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(command)
        if not await self.node.unsubscribe(self, channel):
            raise ReplyError("not subscribed", ErrorCode.NOT_SUBSCRIBED)
        return {}

    async def _publish(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(command)
        if "data" not in command:
            raise BadRequest("publish needs data")
        ns = self._writable(channel)
        encoded = self.codec.encode({"data": command["data"]})
        size = len(encoded.encode() if isinstance(encoded, str) else encoded)
        if ns.max_message_size and size > ns.max_message_size:
            raise ReplyError(f"data exceeds {ns.max_message_size} bytes", ErrorCode.TOO_LARGE)
        try:
            await self.node.publish(
                channel, command["data"], source="client", **{"from": self.sender()}
            )
        except HubUnavailable:
            raise ReplyError("broker unavailable, try again", ErrorCode.UNAVAILABLE) from None
        return {}

    def _presence_channel(self, command: dict[str, Any]) -> str:
        """The channel whose presence may be read: presence is on in its namespace, and who
        may not subscribe a channel may not see who is in it either."""
        channel = self._channel(command)
        if not self.node.settings.namespace(channel).presence:
            raise ReplyError("presence is not enabled here", ErrorCode.NOT_ENABLED)
        self._readable(channel)
        return channel

    async def _presence(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._presence_channel(command)
        try:
            return {"clients": await self.node.presence.clients(channel)}
        except HubUnavailable:
            raise ReplyError("presence unavailable, try again", ErrorCode.UNAVAILABLE) from None

    async def _presence_stats(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._presence_channel(command)
        try:
            return await self.node.presence.stats(channel)
        except HubUnavailable:
            raise ReplyError("presence unavailable, try again", ErrorCode.UNAVAILABLE) from None

    async def _inbox(self, command: dict[str, Any]) -> Any:
        return await self.node.inbox.open(self, command)

    async def _ack(self, command: dict[str, Any]) -> dict[str, Any]:
        return await self.node.inbox.ack(self, command)

    async def _read(self, command: dict[str, Any]) -> dict[str, Any]:
        return await self.node.inbox.mark_read(self, command)


def parse_since(command: dict[str, Any]) -> tuple[int, str] | None:
    """The ``since`` position of a command: ``{"offset": <int >= 0>, "epoch": <str>}``."""
    since = command.get("since")
    if since is None:
        return None
    if type(since) is not dict:
        raise BadRequest("since must be an object with offset and epoch")
    offset, epoch = since.get("offset"), since.get("epoch")
    if type(offset) is not int or offset < 0:
        raise BadRequest("since.offset must be a non-negative integer")
    if type(epoch) is not str or not 0 < len(epoch) <= 64:
        raise BadRequest("since.epoch must be a string of 1 to 64 characters")
    return offset, epoch


def parse_history(command: dict[str, Any]) -> tuple[tuple[int, str] | None, int | None]:
    """The ``since`` and ``limit`` of a history request (the command, or the HTTP body)."""
    since = parse_since(command)
    limit = command.get("limit")
    if limit is not None and (type(limit) is not int or limit < 0):
        raise BadRequest("limit must be a non-negative integer")
    return since, limit


def history_result(page: HistoryPage, since: tuple[int, str] | None) -> dict[str, Any]:
    """The answer to a history request (command or HTTP). With a ``since`` of another epoch
    nothing is listed: those offsets name other publications."""
    entries = page.entries
    if since is not None and since[1] != page.epoch:
        entries = []
    publications = [{k: v for k, v in e.items() if k != "epoch"} for e in entries]
    return {"publications": publications, "offset": page.offset, "epoch": page.epoch}


_OPS = {
    "subscribe": Session._subscribe,
    "unsubscribe": Session._unsubscribe,
    "publish": Session._publish,
    "history": Session._history,
    "presence": Session._presence,
    "presence_stats": Session._presence_stats,
    "inbox": Session._inbox,
    "ack": Session._ack,
    "read": Session._read,
}
