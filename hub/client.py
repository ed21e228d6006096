"""hub.client: an asyncio client of the hub's client protocol (docs/protocol.md), for Python
services, bots and tests. It behaves as hub.js does (docs/client-js.md): tokens, subscriptions
renewed after every reconnect with recovery (``since``) on history channels, reconnects with
backoff and jitter, the close-code rule of hub.errors.may_reconnect, gap and reload events, JSON
or msgpack, subscription tokens, and the channels the server subscribes it to. API and events:
docs/client-python.md.

The transport is the ``websockets`` client library (``pip install 'hub[client]'``); the server
never imports this module. Everything the hub sends is treated as untrusted: a frame that does
not decode or a message of the wrong shape becomes an ``error`` event, never an exception in the
application's code or the end of the client.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import ClientError, ErrorCode, may_reconnect

try:
    from websockets.asyncio.client import ClientConnection, connect
    from websockets.exceptions import ConnectionClosed
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError("hub.client needs the websockets library: pip install 'hub[client]'") from exc

__all__ = ["Client", "ClientError", "MessageStream", "may_reconnect"]

log = logging.getLogger("hub.client")

#: The subprotocol of each encoding (docs/protocol.md, "Connecting").
SUBPROTOCOLS = {"json": "hub.v1.json", "msgpack": "hub.v1.msgpack"}

#: The events ``on`` accepts (the same as hub.js).
EVENTS = frozenset({"state", "message", "gap", "reload", "error"})

Handler = Callable[[Any, "ClientError | None"], None]
Listener = Callable[[dict[str, Any]], Any]
TokenSource = Callable[[], "str | Awaitable[str]"]
#: A subscription's token source: called with the channel's name.
ChannelTokenSource = Callable[[str], "str | Awaitable[str]"]


@dataclass(slots=True)
class _Sub:
    """A subscription kept across reconnects: where its history channel stands, and its token
    (``server``: the hub subscribes it on every connect, this client never does)."""

    offset: int | None = None
    epoch: str | None = None
    seen: int | None = None  # the offset of the last publication delivered
    waiters: list[asyncio.Future[Any]] = field(default_factory=list)
    pending: bool = False
    active: bool = False
    retries: int = 0
    token: str | None = None
    get_token: ChannelTokenSource | None = None
    server: bool = False


@dataclass(slots=True)
class _Call:
    handler: Handler
    timer: asyncio.TimerHandle


async def _call_source(source: Callable[..., Any], *args: Any) -> Any:
    """A token from a token function (plain or coroutine); None means none."""
    token = source(*args)
    if inspect.isawaitable(token):
        token = await token
    if token is not None and not isinstance(token, str):
        raise TypeError("get_token must return a string")
    return token


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ws_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"not a ws://, wss://, http:// or https:// url: {url!r}")
    return urllib.parse.urlunsplit(parts._replace(scheme=scheme))


class Client:
    """A connection to a hub, kept open until ``close()`` or a close code that forbids
    reconnecting. ``urls`` is one URL or a list: each reconnect goes to the next one.

    Times are in seconds. ``connect_options`` go to ``websockets.asyncio.client.connect``
    (e.g. ``ssl``, ``proxy``, ``max_size``); the client sets ``subprotocols`` and the
    ``Authorization`` header itself; ``headers`` are added to the handshake (e.g. the
    ``Cookie`` a connect proxy authenticates, docs/proxy.md).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        user: str | None = None,
        headers: Mapping[str, str] | None = None,
        encoding: str = "json",
        min_delay: float = 0.5,
        max_delay: float = 15.0,
        stable_after: float = 5.0,
        timeout: float = 10.0,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        self.urls = [_ws_url(u) for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("at least one url")
        if encoding not in SUBPROTOCOLS:
            raise ValueError("encoding must be 'json' or 'msgpack'")
        if not 0 < min_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        self.token = token
        self.get_token = get_token
        self.user = user
        self.headers = dict(headers or {})
        self.encoding = encoding
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self.timeout = timeout
        self.connect_options = dict(connect_options or {})
        self.state = "disconnected"
        self.url: str | None = None  # the url of the current connection
        self.attempts = 0  # connection attempts since the last stable connection
        self.connections = 0  # successful opens, ever
        self.close_code: int | None = None  # the last close code
        self.subs: dict[str, _Sub] = {}
        self._ws: ClientConnection | None = None
        self._url_index = 0
        self._ids = 1
        self._calls: dict[int, _Call] = {}
        self._listeners: dict[str, list[Listener]] = {name: [] for name in EVENTS}
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._stopped = True
        self._stable: asyncio.TimerHandle | None = None

    # -- events ------------------------------------------------------------------------------

    def on(self, name: str, fn: Listener) -> Callable[[], None]:
        """Call ``fn(detail)`` for each ``name`` event (a coroutine function runs as a task);
        returns a function that removes it."""
        if name not in EVENTS:
            raise ValueError(f"unknown event: {name}")
        self._listeners[name].append(fn)

        def remove() -> None:
            if fn in self._listeners[name]:
                self._listeners[name].remove(fn)

        return remove

    def messages(self) -> MessageStream:
        """An async iterator of message events from now on; it ends when the client closes
        for good (``close()`` or a close code that forbids reconnecting)."""
        return MessageStream(self)

    def _emit(self, name: str, detail: dict[str, Any]) -> None:
        for fn in list(self._listeners[name]):
            try:
                result = fn(detail)
                if inspect.isawaitable(result):
                    self._spawn(result)
            except Exception:
                log.exception("hub.client: %s listener failed", name)

    def _set_state(self, state: str, **extra: Any) -> None:
        self.state = state
        if state == "closed":
            # No connection is coming: nobody waits forever for a first subscribe reply.
            for sub in self.subs.values():
                self._settle(sub, error=ClientError("disconnected", "client closed"))
        self._emit("state", {"state": state, **extra})

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("hub.client: task failed", exc_info=task.exception())

    # -- connecting --------------------------------------------------------------------------

    def connect(self) -> Client:
        """Start connecting, and keep reconnecting (call from a running event loop)."""
        self._stopped = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def close(self) -> None:
        """Close for good (state ``closed``): no reconnect until ``connect()`` again."""
        self._stopped = True
        self._wake.set()
        ws, task, current = self._ws, self._task, asyncio.current_task()
        if ws is not None:
            await ws.close(1000, "client closing")
        elif task is not None and task is not current:
            task.cancel()  # waiting out a backoff delay, a token or an opening handshake
        if task is not None and task is not current:
            await asyncio.wait([task])
        if self.state != "closed" and (task is None or task.cancelled()):
            self._set_state("closed", code=1000, reason="client closing")
        for pending in list(self._tasks):
            if pending is not current:
                pending.cancel()

    async def __aenter__(self) -> Client:
        return self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self) -> None:
        while True:
            code, reason = await self._connection()
            if self._stopped or not may_reconnect(code):
                self._stopped = True
                self._set_state("closed", code=code, reason=reason)
                return
            base = min(self.max_delay, self.min_delay * 2 ** min(self.attempts, 16))
            # Half fixed, half random: clients dropped together do not all return at once.
            delay = base / 2 + random.random() * base / 2
            self._set_state("disconnected", code=code, reason=reason, delay=delay)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            if self._stopped:
                self._set_state("closed", code=1000, reason="client closing")
                return

    async def _token(self) -> str | None:
        if self.get_token is None:
            return self.token
        return await _call_source(self.get_token)

    async def _connection(self) -> tuple[int, str]:
        """One connection attempt and its lifetime: the close code and reason it ended with."""
        self._set_state("connecting")
        try:
            token = await self._token()
        except Exception as exc:
            return 1006, f"get_token failed: {exc}"
        if self._stopped:
            return 1000, "client closing"
        url = self.urls[self._url_index % len(self.urls)]
        headers = dict(self.headers)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif self.user:
            sep = "&" if urllib.parse.urlsplit(url).query else "?"
            url += sep + urllib.parse.urlencode({"user": self.user})
        self.attempts += 1
        options = {"open_timeout": self.timeout, **self.connect_options}
        try:
            ws = await connect(
                url,
                subprotocols=[SUBPROTOCOLS[self.encoding]],  # type: ignore[list-item]
                additional_headers=headers,
                **options,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._url_index += 1
            return 1006, f"connect failed: {exc}"[:200]
        if self._stopped:
            await ws.close(1000, "client closing")
            return 1000, "client closing"
        self._ws = ws
        self.url = url
        self.connections += 1
        loop = asyncio.get_running_loop()
        self._stable = loop.call_later(self.stable_after, self._reset_attempts)
        self._set_state("connected")
        for channel, sub in list(self.subs.items()):
            if not sub.server:  # the hub subscribes those again itself
                self._spawn(self._send_subscribe(channel))
        try:
            async for raw in ws:
                try:
                    self._on_message(raw)
                except Exception as exc:  # a shape no check foresaw: the server's fault
                    log.warning("hub.client: message not handled: %r", exc)
                    self._emit("error", {"channel": None, "error": exc, "retrying": False})
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._stable.cancel()
            await ws.close()
        code = ws.close_code if ws.close_code is not None else 1006
        reason = ws.close_reason or ""
        self.close_code = code
        for call in list(self._calls.values()):
            call.timer.cancel()
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.handler(None, ClientError("disconnected", "connection closed before the reply"))
        for sub in self.subs.values():
            sub.pending = sub.active = False
        self._url_index += 1  # the next url of the list, if there are several
        return code, reason

    def _reset_attempts(self) -> None:
        self.attempts = 0

    # -- commands ----------------------------------------------------------------------------

    def _encode(self, obj: dict[str, Any]) -> str | bytes:
        if self.encoding == "msgpack":
            return msgpack.packb(obj, use_bin_type=True)
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    async def _send(
        self, op: str, fields: dict[str, Any], handler: Handler, timeout: float | None
    ) -> None:
        """Send one command; ``handler(result, error)`` runs when its reply arrives (inline,
        before the next message is read), at the timeout, or when the connection closes."""
        ws = self._ws
        if ws is None or self.state != "connected":
            handler(None, ClientError("disconnected", "not connected"))
            return
        cid = self._ids
        self._ids += 1
        frame = self._encode({"op": op, **fields, "id": cid})  # may raise: bad data
        wait = self.timeout if timeout is None else timeout

        def expire() -> None:
            if self._calls.pop(cid, None) is not None:
                handler(None, ClientError("timeout", f"no reply to {op} within {wait} s"))

        self._calls[cid] = _Call(handler, asyncio.get_running_loop().call_later(wait, expire))
        try:
            await ws.send(frame)
        except ConnectionClosed:
            call = self._calls.pop(cid, None)
            if call is not None:
                call.timer.cancel()
                handler(None, ClientError("disconnected", "connection closed"))

    async def call(
        self, op: str, fields: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Send any command; its ``result``, or ``ClientError``."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def handler(result: Any, error: ClientError | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        await self._send(op, dict(fields or {}), handler, timeout)
        return await future

    async def publish(self, channel: str, data: Any) -> Any:
        """Publish to a channel whose namespace lets clients publish."""
        return await self.call("publish", {"channel": channel, "data": data})

    async def history(
        self, channel: str, limit: int | None = None, since: dict[str, Any] | None = None
    ) -> Any:
        """A history channel's stored publications (``{"publications", "offset", "epoch"}``)."""
        fields: dict[str, Any] = {"channel": channel}
        if limit is not None:
            fields["limit"] = limit
        if since is not None:
            fields["since"] = since
        return await self.call("history", fields)

    async def subscribe(
        self,
        channel: str,
        *,
        token: str | None = None,
        get_token: ChannelTokenSource | None = None,
    ) -> Any:
        """Subscribe now or as soon as connected, and again after every reconnect (with
        ``since`` on history channels, so nothing is lost). The first reply's result.

        In a ``subscribe = "token"`` namespace, ``token`` is the channel's subscription token,
        or ``get_token(channel)`` (a function or coroutine function) gives one before every
        subscribe and when the hub's refresh push for the channel says it runs out."""
        sub = self.subs.get(channel)
        if sub is not None and sub.active:
            return {"offset": sub.offset, "epoch": sub.epoch}
        if sub is None:
            sub = self.subs[channel] = _Sub()
        if token is not None:
            sub.token = token
        if get_token is not None:
            sub.get_token = get_token
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sub.waiters.append(future)
        if self.state == "connected":
            self._spawn(self._send_subscribe(channel))
        return await future

    async def unsubscribe(self, channel: str) -> Any:
        """Stop receiving a channel (and stop renewing it)."""
        sub = self.subs.pop(channel, None)
        if sub is None:
            return {}
        self._settle(sub, error=ClientError("unsubscribed", "unsubscribed"))
        if self.state != "connected":
            return {}
        try:
            return await self.call("unsubscribe", {"channel": channel})
        except ClientError as exc:
            if exc.code == ErrorCode.NOT_SUBSCRIBED:  # the subscribe was still pending
                return {}
            raise

    def position(self, channel: str) -> dict[str, Any] | None:
        """``{offset, epoch}`` of the last publication seen on a history channel."""
        sub = self.subs.get(channel)
        return None if sub is None else {"offset": sub.offset, "epoch": sub.epoch}

    @staticmethod
    def _settle(sub: _Sub, result: Any = None, error: BaseException | None = None) -> None:
        waiters, sub.waiters = sub.waiters, []
        for future in waiters:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    async def _send_subscribe(self, channel: str) -> None:
        sub = self.subs.get(channel)
        if sub is None or sub.pending or sub.active or self.state != "connected":
            return
        sub.pending = True
        fields: dict[str, Any] = {"channel": channel}
        since = sub.offset is not None and sub.epoch is not None
        if since:
            fields["since"] = {"offset": sub.offset, "epoch": sub.epoch}
        if sub.get_token is not None:
            try:
                fields["token"] = await _call_source(sub.get_token, channel)
            except Exception as exc:  # no token, no subscription: as a refusal is
                if self.subs.get(channel) is sub:
                    del self.subs[channel]
                    self._settle(sub, error=exc)
                    self._emit("error", {"channel": channel, "error": exc, "retrying": False})
                return
            if self.subs.get(channel) is not sub or self.state != "connected":
                sub.pending = False
                return
        elif sub.token is not None:
            fields["token"] = sub.token

        def handler(result: Any, error: ClientError | None) -> None:
            self._subscribed(channel, sub, since, result, error)

        await self._send("subscribe", fields, handler, None)

    def _subscribed(
        self, channel: str, sub: _Sub, since: bool, result: Any, error: ClientError | None
    ) -> None:
        """A subscribe's reply, handled before the pushes that follow it are read."""
        if self.subs.get(channel) is not sub:
            return
        sub.pending = False
        if error is not None:
            if error.code == "timeout" and self._ws is not None:
                # The hub is stuck for us: reconnect (and resubscribe) rather than wait.
                self._spawn(self._ws.close(4000, "subscribe timed out"))
                return
            if error.code == "disconnected" or error.code == "timeout":
                return  # tried again after the reconnect
            if error.code == ErrorCode.ALREADY_SUBSCRIBED:
                result = {}
            elif error.code in (ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL):
                # The hub cannot reach its broker (or failed): retry later, the sub stays.
                sub.retries += 1
                base = min(self.max_delay, self.min_delay * 2**sub.retries)
                delay = base / 2 + random.random() * base / 2
                asyncio.get_running_loop().call_later(
                    delay, lambda: self._spawn(self._send_subscribe(channel))
                )
                self._emit("error", {"channel": channel, "error": error, "retrying": True})
                return
            else:
                del self.subs[channel]
                self._settle(sub, error=error)
                self._emit("error", {"channel": channel, "error": error, "retrying": False})
                return
        sub.active = True
        sub.retries = 0
        if not isinstance(result, dict):
            result = {}
        offset, epoch = result.get("offset"), result.get("epoch")
        if _is_int(offset) and isinstance(epoch, str):
            if since and result.get("recovered") is False:
                self._emit("reload", {"channel": channel, "reason": "history lost"})
                sub.offset, sub.epoch, sub.seen = offset, epoch, None
            elif not since:
                # A first subscribe: continue from the top (pushes that came first may be past it).
                if sub.offset is None or sub.offset < offset:
                    sub.offset = offset
                sub.epoch = epoch
            # recovered: the missed publications follow as pushes and move the offset forward.
        self._settle(sub, result)

    # -- inbound -----------------------------------------------------------------------------

    def _decode(self, raw: str | bytes) -> Any:
        if isinstance(raw, str):
            return json.loads(raw)
        # Binary frames are msgpack: always for msgpack clients, for JSON clients the pushes
        # whose data JSON cannot carry (bytes, non-string keys, extension types).
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)

    def _on_message(self, raw: str | bytes) -> None:
        try:
            msg = self._decode(raw)
        except Exception as exc:  # hostile bytes: any decoder failure is the server's fault
            self._emit("error", {"channel": None, "error": exc, "retrying": False})
            return
        if not isinstance(msg, dict):
            return
        if "id" in msg and ("result" in msg or "error" in msg):
            self._on_reply(msg)
            return
        if "channel" not in msg and "refresh" in msg:
            self._spawn(self._refresh())  # the token runs out soon: send a fresh one
            return
        if "channel" not in msg:
            detail = {"channel": None, "data": msg.get("data"), "offset": None, "epoch": None}
            detail["push"] = msg
            self._emit("message", detail)
            return
        channel = msg["channel"]
        if not isinstance(channel, str):
            return
        subscribed = msg.get("subscribed")
        if isinstance(subscribed, dict) and subscribed.get("server") is True:
            # Subscribed by the server (token claim, connect proxy): it does so again on every
            # connect, so this client never sends a subscribe for it; its pushes are delivered.
            sub = self.subs.get(channel)
            if sub is None:
                sub = self.subs[channel] = _Sub()
            sub.server = sub.active = True
            sub.pending = False
            self._settle(sub, {})
            return
        sub = self.subs.get(channel)
        if sub is None:
            return  # unsubscribed meanwhile
        if "refresh" in msg:
            self._spawn(self._refresh(channel))  # its subscription token runs out soon
            return
        if "unsubscribed" in msg:
            # Its subscription token ran out unrenewed: the hub ended it.
            del self.subs[channel]
            reason = msg["unsubscribed"]
            reason = reason.get("reason") if isinstance(reason, dict) else reason
            error = ClientError("unsubscribed", str(reason))
            self._settle(sub, error=error)
            self._emit("error", {"channel": channel, "error": error, "retrying": False})
            return
        if msg.get("gap"):
            self._on_gap(channel, sub)
            return
        offset, epoch = msg.get("offset"), msg.get("epoch")
        if _is_int(offset) and isinstance(epoch, str):
            if sub.epoch is not None and epoch != sub.epoch:
                sub.seen = None  # a new stream: offsets start over
            elif sub.seen is not None and offset <= sub.seen:
                return  # a duplicate of a publication already delivered
            sub.seen = sub.offset = offset
            sub.epoch = epoch
        else:
            offset = epoch = None
        detail = {"channel": channel, "data": msg.get("data"), "offset": offset, "epoch": epoch}
        detail["push"] = msg
        self._emit("message", detail)

    async def _refresh(self, channel: str | None = None) -> None:
        """Answer the hub's refresh push with ``get_token``'s token (docs/protocol.md, Tokens),
        or for a channel its subscription's ``get_token``; without one, or if it fails, the hub
        closes with 4002 (ends the subscription) at expiry, and the reconnect asks again."""
        sub = None if channel is None else self.subs.get(channel)
        try:
            if channel is None:
                if self.get_token is None:
                    return
                token = await self._token()
                if token:
                    await self.call("refresh", {"token": token})
                return
            if sub is None or sub.get_token is None:
                return
            token = await _call_source(sub.get_token, channel)
            await self.call("refresh", {"channel": channel, "token": token})
        except Exception as exc:
            self._emit("error", {"channel": channel, "error": exc, "retrying": False})

    def _on_reply(self, msg: dict[str, Any]) -> None:
        cid = msg["id"]
        call = self._calls.pop(cid, None) if _is_int(cid) else None
        if call is None:
            return
        call.timer.cancel()
        error = msg.get("error")
        if error:
            if isinstance(error, dict) and _is_int(error.get("code")):
                code, message = error["code"], error.get("message")
                call.handler(None, ClientError(code, str(message)))
            else:
                call.handler(None, ClientError(ErrorCode.INTERNAL, "malformed error reply"))
        else:
            call.handler(msg.get("result"), None)

    def _on_gap(self, channel: str, sub: _Sub) -> None:
        recovering = sub.offset is not None and sub.epoch is not None
        self._emit("gap", {"channel": channel, "recovering": recovering})
        if recovering and not sub.pending:
            # Resubscribe from where we are: the hub replays what we missed from history.
            sub.pending = True
            sub.active = False
            self._spawn(self._resubscribe(channel, sub))

    async def _resubscribe(self, channel: str, sub: _Sub) -> None:
        try:
            await self.call("unsubscribe", {"channel": channel})
        except ClientError as exc:
            if exc.code != ErrorCode.NOT_SUBSCRIBED:
                sub.pending = False
                return  # disconnected: the reconnect resubscribes with since anyway
        sub.pending = False
        if self.subs.get(channel) is sub:
            await self._send_subscribe(channel)


class MessageStream:
    """``async for message in client.messages()``: message events in order, from the moment
    the stream was made until the client closes for good."""

    def __init__(self, client: Client) -> None:
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._removers = [
            client.on("message", self._queue.put_nowait),
            client.on("state", self._on_state),
        ]

    def _on_state(self, detail: dict[str, Any]) -> None:
        if detail["state"] == "closed":
            self._queue.put_nowait(None)

    def close(self) -> None:
        """Stop collecting messages."""
        for remove in self._removers:
            remove()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        item = await self._queue.get()
        if item is None:
            self.close()
            raise StopAsyncIteration
        return item

    async def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message, waiting at most ``timeout`` seconds (``TimeoutError``)."""
        return await asyncio.wait_for(self.__anext__(), timeout)
