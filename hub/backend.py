"""What the hub asks the application's backend, and what it makes of the answers: the connect,
subscribe, publish and RPC proxies (over hub.proxy), subscription tokens, the ``refresh`` op
and server-side subscriptions. docs/proxy.md is the contract; session.py and app.py only
dispatch here."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import orjson

from .codec import check_data
from .config import Namespace, Settings
from .errors import BadRequest, ErrorCode, HubUnavailable, ReplyError
from .rules import check_channel, info_problem, user_problem
from .tokens import MAX_EXP, Credentials, TokenError, TokenExpired

if TYPE_CHECKING:
    from .proxy import ProxyClient
    from .session import Session
    from .ws import ServerConnection

__all__ = [
    "connect",
    "connect_body",
    "publish_data",
    "refresh",
    "rpc",
    "server_side",
    "server_side_channels",
    "subscribe_allowed",
    "subscription_token",
]

log = logging.getLogger("hub.backend")

#: Cookies passed to the connect proxy at most (a request may carry more; they are dropped).
MAX_COOKIES = 64
MAX_TOKEN = 8192  # characters of a token in a command
MAX_METHOD = 200  # characters of an RPC method name


def connect_body(
    connection: ServerConnection, settings: Settings, client: str, remote_addr: str
) -> dict[str, Any]:
    """The connect proxy's request: the client id the connection will have, the peer, the
    headers ``proxy_headers`` names (their values joined as HTTP does) and the cookies."""
    request = connection.request
    assert request is not None
    headers = {}
    for name in settings.proxy_headers:
        values = request.headers.get_all(name)
        if values:
            headers[name] = ", ".join(values)
    cookies: dict[str, str] = {}
    for value in request.headers.get_all("Cookie"):
        for pair in value.split(";"):
            name, sep, content = pair.strip().partition("=")
            if sep and name and len(cookies) < MAX_COOKIES:
                cookies.setdefault(name, content.strip().strip('"'))
    return {
        "client": client,
        "transport": "websocket",
        "remote_addr": remote_addr,
        "headers": headers,
        "cookies": cookies,
    }


async def connect(
    proxy: ProxyClient, settings: Settings, body: dict[str, Any]
) -> tuple[Credentials, list[str]]:
    """Ask the connect proxy: the connection's credentials and the channels to subscribe it to.
    A refusal raises ProxyRefused / ProxyDisconnect, an answer past its ``expire_at``
    TokenExpired; a broken answer is ProxyFailed (never a yes)."""
    assert settings.connect_proxy is not None
    result = await proxy.call("connect", settings.connect_proxy, body)
    user, info = result.get("user"), result.get("info")
    problem = user_problem(user) or info_problem(info)
    if problem is not None:
        raise proxy.malformed("connect", f"connect answer: {problem}")
    expire_at = result.get("expire_at")
    if expire_at is not None:
        if type(expire_at) not in (int, float) or not 0 < expire_at <= MAX_EXP:
            raise proxy.malformed("connect", "connect answer's expire_at must be unix seconds")
        if expire_at <= time.time():
            raise TokenExpired("connect proxy: expired")
    channels = result.get("channels") or []
    if type(channels) is not list or len(channels) > max(settings.max_subscriptions, 1):
        raise proxy.malformed(
            "connect", "connect answer's channels must be a list within the limit"
        )
    try:
        channels = [_channel(c, settings) for c in channels]
    except BadRequest:
        raise proxy.malformed("connect", "connect answer names an invalid channel") from None
    credentials = Credentials(
        user,
        channels=tuple(channels) or None,
        expires_at=None if expire_at is None else float(expire_at),
        info=info,
    )
    return credentials, channels


def _channel(channel: Any, settings: Settings) -> str:
    return check_channel(channel, settings.max_channel_length)


def _check_backend_data(proxy: ProxyClient, kind: str, data: Any, what: str) -> None:
    try:
        check_data(data)
    except ReplyError:
        raise proxy.malformed(kind, f"{what} cannot be encoded") from None


def _json(value: Any) -> None:
    """What goes to the backend must be JSON: msgpack clients can send bytes, non-string keys."""
    try:
        orjson.dumps(value)
    except TypeError:
        raise BadRequest("data cannot be sent to the backend as json") from None


def _proxy(session: Session) -> ProxyClient:
    proxy = session.node.proxy
    assert proxy is not None  # a proxy url is set, so the hub made its client
    return proxy


# -- subscribe and publish proxies --------------------------------------------------------------


#: Marks a subscribe answer without ``info``: the subscriber keeps its connection's info.
NO_INFO = object()


async def subscribe_allowed(
    session: Session, channel: str, ns: Namespace
) -> tuple[dict[str, Any], Any]:
    """Ask the namespace's subscribe proxy: what to add to the subscribe reply (``data``), and
    the subscriber's ``info`` on this channel (presence, join/leave, ``from``), or NO_INFO."""
    assert ns.subscribe_proxy is not None
    body: dict[str, Any] = {"client": session.client_id, "user": session.user, "channel": channel}
    if session.credentials.info is not None:
        body["info"] = session.credentials.info
    proxy = _proxy(session)
    result = await proxy.call("subscribe", ns.subscribe_proxy, body)
    info = result.get("info", NO_INFO)
    if info is not NO_INFO:
        problem = info_problem(info)
        if problem is not None:
            raise proxy.malformed("subscribe", f"subscribe answer: {problem}")
    if "data" not in result:
        return {}, info
    data = result["data"]
    _check_backend_data(proxy, "subscribe", data, "subscribe answer's data")
    try:
        session.check_size(ns, data)
    except ReplyError as exc:
        raise proxy.malformed("subscribe", f"subscribe answer's {exc.message}") from None
    return {"data": data}, info


def with_extra(result: Any, extra: dict[str, Any]) -> Any:
    """A subscribe result (a dict, or a history subscribe's (dict, then)) with ``extra`` added."""
    if not extra:
        return result
    if type(result) is tuple:
        return {**result[0], **extra}, result[1]
    return {**result, **extra}


async def publish_data(session: Session, channel: str, ns: Namespace, data: Any) -> Any:
    """Ask the namespace's publish proxy; the data to publish (the backend may replace it)."""
    assert ns.publish_proxy is not None
    _json(data)
    body = {"client": session.client_id, "user": session.user, "channel": channel, "data": data}
    proxy = _proxy(session)
    result = await proxy.call("publish", ns.publish_proxy, body)
    if "data" not in result:
        return data
    data = result["data"]
    _check_backend_data(proxy, "publish", data, "publish answer's data")
    try:
        session.check_size(ns, data)  # what a client's publish obeys, with its error (110)
    except ReplyError:
        proxy.count_error("publish", "too_large")
        raise
    return data


# -- commands -----------------------------------------------------------------------------------


async def rpc(session: Session, command: dict[str, Any]) -> dict[str, Any]:
    """``{"op": "rpc", "method", "data"}``: the rpc proxy's ``result.data`` is the reply's."""
    url = session.node.settings.rpc_proxy
    if url is None:
        raise ReplyError("rpc is not enabled", ErrorCode.NOT_ENABLED)
    method, data = command.get("method", ""), command.get("data")
    if type(method) is not str or len(method) > MAX_METHOD:
        raise BadRequest(f"method must be a string of at most {MAX_METHOD} characters")
    _json(data)
    body = {"client": session.client_id, "user": session.user, "method": method, "data": data}
    result = await _proxy(session).call("rpc", url, body)
    if "data" not in result:
        return {}
    return {"data": result["data"]}


def _verify(session: Session, token: Any) -> Credentials:
    verifier = session.node.verifier
    if verifier is None:
        raise ReplyError("tokens are not enabled", ErrorCode.NOT_ENABLED)
    if type(token) is not str or not 0 < len(token) <= MAX_TOKEN:
        raise BadRequest(f"token must be a string of 1 to {MAX_TOKEN} characters")
    try:
        credentials = verifier.verify(token)
    except TokenExpired:
        raise ReplyError("token expired", ErrorCode.UNAUTHORIZED) from None
    except TokenError as exc:
        raise ReplyError(str(exc)[:100], ErrorCode.UNAUTHORIZED) from None
    if credentials.user != session.user:
        raise ReplyError("token is for another user", ErrorCode.PERMISSION_DENIED)
    return credentials


def subscription_token(session: Session, channel: str, token: Any) -> Credentials:
    """A subscription token for ``channel``: signed as connection tokens are, with this
    connection's user as ``sub`` and the channel as ``channel``."""
    credentials = _verify(session, token)
    if credentials.channel != channel:
        raise ReplyError("token is for another channel", ErrorCode.PERMISSION_DENIED)
    return credentials


async def refresh(session: Session, command: dict[str, Any]) -> dict[str, Any]:
    """``{"op": "refresh", "token"}``: new connection credentials for the same user, so the
    connection outlives its first token; with ``channel``, a subscription token's renewal."""
    channel = command.get("channel")
    if channel is not None:
        channel = _channel(channel, session.node.settings)
        credentials = subscription_token(session, channel, command.get("token"))
        if not session.node.registry.is_subscribed(session, channel):
            raise ReplyError("not subscribed", ErrorCode.NOT_SUBSCRIBED)
    else:
        credentials = _verify(session, command.get("token"))
        if credentials.channel is not None:
            raise ReplyError("a subscription token needs its channel", ErrorCode.BAD_REQUEST)
        session.credentials = credentials
    session.expiry.set(channel, credentials.expires_at)
    if credentials.expires_at is None:
        return {}
    return {"expire_at": int(credentials.expires_at)}


# -- server-side subscriptions ------------------------------------------------------------------


def server_side_channels(settings: Settings, credentials: Credentials) -> list[str]:
    """The channels a token subscribes its connection to: the exact names (no ``*``) of its
    ``channels`` claim in namespaces with ``server_side = true``, and the user's personal
    channel in those that are also ``personal``."""
    channels = []
    for name in credentials.channels or ():
        if "*" not in name and settings.namespace(name).server_side:
            channels.append(name)
    for ns in settings.namespaces.values():
        if ns.server_side and ns.personal and ns.name:
            channels.append(f"{ns.name}:{credentials.user}")
    return channels


async def server_side(session: Session, channels: Iterable[str]) -> None:
    """Subscribe on the server, without a subscribe command: each gets a ``subscribed`` push
    first, then its publications as usual. Names a client could not use are skipped."""
    settings = session.node.settings
    limit = settings.max_subscriptions or None
    for channel in list(dict.fromkeys(channels))[:limit]:
        try:
            _channel(channel, settings)
        except BadRequest:
            continue
        await session._reply({"channel": channel, "subscribed": {"server": True}})
        try:
            await session.node.subscribe(session, channel)
        except HubUnavailable:  # the broker is back soon; a gap notice will say what was lost
            log.warning("server-side subscription of %r to %s failed", session, channel)
