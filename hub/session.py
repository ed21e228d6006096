"""A client session: one per WebSocket connection. It parses commands, enforces permissions and
limits, and replies; pushes reach it through ``hub.fanout`` (it is a ``Recipient`` there).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from . import backend
from .codec import Codec
from .config import Namespace
from .errors import BadRequest, CloseCode, ErrorCode, HubUnavailable, ProxyDisconnect, ReplyError
from .expiry import Expiry
from .limits import TokenBucket
from .rules import check_channel, history_limit, history_result, parse_history, parse_since
from .tokens import Credentials
from .ws import ConnectionClosed, ServerConnection

if TYPE_CHECKING:
    from .node import Node

__all__ = ["Session"]

log = logging.getLogger("hub.session")

MAX_ABUSE = 10  # bad commands tolerated before the connection is closed
MAX_LIMITED = 20  # rate-limited commands in a row tolerated before the connection is closed


def bucket(rate: float, burst: int) -> TokenBucket | None:
    """A rate limit from settings: None when off (rate 0); burst 0 means one second's worth."""
    return TokenBucket(rate, burst or rate) if rate > 0 else None


class Session:
    __slots__ = (
        "_channel_info",
        "_client_id",
        "_publish_buckets",
        "abuse",
        "bucket",
        "codec",
        "connection",
        "credentials",
        "expiry",
        "limited",
        "node",
        "user",
    )

    def __init__(
        self,
        node: Node,
        connection: ServerConnection,
        credentials: Credentials,
        codec: Codec,
        client_id: str | None = None,
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
        self._client_id = client_id
        self._channel_info: dict[str, Any] | None = None  # the subscribe proxy's, by channel
        self.expiry = Expiry(self)  # the credentials' deadlines (hub.expiry)

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

    def presence_entry(self, channel: str | None = None) -> dict[str, Any]:
        """What presence and join/leave pushes show of this connection (on ``channel``: the
        subscribe proxy may have given it an info of its own there)."""
        info = self.credentials.info
        infos = self._channel_info
        if infos is not None and channel in infos:
            info = infos[channel]
        return {"user": self.user, "client": self.client_id, "info": info}

    def set_channel_info(self, channel: str, info: Any) -> None:
        """The subscribe proxy's ``info`` for this connection on ``channel``
        (``backend.NO_INFO``: none, the connection's own applies)."""
        infos = self._channel_info
        if info is backend.NO_INFO:
            if infos is not None:
                infos.pop(channel, None)
            return
        if infos is None:
            infos = self._channel_info = {}
        infos[channel] = info

    def check_size(self, ns: Namespace, data: Any) -> None:
        """``data`` fits the namespace's ``max_message_size`` as this client's codec encodes
        it: the rule of a client's publish, and of what a backend publishes in its name."""
        encoded = self.codec.encode({"data": data})
        size = len(encoded.encode() if isinstance(encoded, str) else encoded)
        if ns.max_message_size and size > ns.max_message_size:
            raise ReplyError(f"data exceeds {ns.max_message_size} bytes", ErrorCode.TOO_LARGE)

    # -- outbound ------------------------------------------------------------------------------

    async def _reply(self, obj: dict[str, Any]) -> None:
        payload = self.codec.encode(obj)
        try:
            await self.connection.send(payload)
        except ConnectionClosed:
            pass

    def close_soon(self, code: int, reason: str = "") -> None:
        """Close from a synchronous context (a broker callback)."""
        if self.connection.open:
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
        except ProxyDisconnect as exc:  # the backend's answer (docs/proxy.md)
            await self.connection.close(exc.code, exc.reason)
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

    def sender(self, channel: str | None = None) -> dict[str, Any]:
        """The ``from`` of this session's publications: what the server knows of the sender,
        never what the client claims (hub.codec.check_sender holds the shape)."""
        return self.presence_entry(channel)

    # -- commands ------------------------------------------------------------------------------

    def _channel(self, command: dict[str, Any]) -> str:
        return check_channel(command.get("channel"), self.node.settings.max_channel_length)

    def _readable(self, channel: str, subscribing: bool = False) -> Namespace:
        """The channel's namespace, if this session may read the channel (subscribe, history).
        A subscribed session may: it got in by these rules, a subscription token, the
        subscribe proxy or the server; where the subscribe proxy decides, only it may."""
        ns = self.node.settings.namespace(channel)
        if not subscribing and self.node.registry.is_subscribed(self, channel):
            return ns
        if ns.subscribe_proxy and not subscribing:
            raise ReplyError("subscribe first (the backend decides)", ErrorCode.PERMISSION_DENIED)
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
        ns = self.node.settings.namespace(channel)
        token = command.get("token")
        if token is not None and ns.subscribe == "token" and not ns.personal:
            granted = backend.subscription_token(self, channel, token)
        else:
            granted = None
            ns = self._readable(channel, subscribing=True)
        if since is not None and not ns.history_size:
            raise ReplyError("history is not enabled on this channel", ErrorCode.NOT_ENABLED)
        registry = self.node.registry
        if registry.is_subscribed(self, channel):
            raise ReplyError("already subscribed", ErrorCode.ALREADY_SUBSCRIBED)
        limit = self.node.settings.max_subscriptions
        if limit and len(registry.channels_of(self)) >= limit:
            raise ReplyError(f"subscription limit of {limit} reached", ErrorCode.LIMIT_EXCEEDED)
        extra: dict[str, Any] = {}
        info: Any = backend.NO_INFO
        if ns.subscribe_proxy:
            extra, info = await backend.subscribe_allowed(self, channel, ns)
        self.set_channel_info(channel, info)  # before the join: presence shows it
        if granted is not None:
            self.expiry.set(channel, granted.expires_at)
        if not ns.history_size:
            await self.node.subscribe(self, channel)
            return extra
        try:
            result = await self.node.subscribe_history(self, channel, ns, since)
        except HubUnavailable:
            raise ReplyError("broker unavailable, try again", ErrorCode.UNAVAILABLE) from None
        return backend.with_extra(result, extra)

    async def _history(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(command)
        since, limit = parse_history(command)
        ns = self._readable(channel)
        if not ns.history_size:
            raise ReplyError("history is not enabled on this channel", ErrorCode.NOT_ENABLED)
        offset, limit = None if since is None else since[0], history_limit(limit, ns)
        try:
            page = await self.node.history(channel, ns, since=offset, limit=limit)
        except HubUnavailable:
            raise ReplyError("broker unavailable, try again", ErrorCode.UNAVAILABLE) from None
        return history_result(page, since)

    async def _unsubscribe(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(command)
        if not await self.node.unsubscribe(self, channel):
            raise ReplyError("not subscribed", ErrorCode.NOT_SUBSCRIBED)
        self.expiry.clear(channel)
        self.set_channel_info(channel, backend.NO_INFO)
        return {}

    async def _publish(self, command: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(command)
        if "data" not in command:
            raise BadRequest("publish needs data")
        ns = self._writable(channel)
        data = command["data"]
        self.check_size(ns, data)
        if ns.publish_proxy:
            data = await backend.publish_data(self, channel, ns, data)
        sender = self.sender(channel)
        try:
            await self.node.publish(channel, data, source="client", **{"from": sender})
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
    "rpc": backend.rpc,
    "refresh": backend.refresh,
}
