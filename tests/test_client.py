"""hub.client, the Python client, against real ``hub serve`` processes (and a private Redis where
recovery crosses processes), plus a tiny raw WebSocket server that answers with garbage.

Every wait is bounded; a test body runs in its own loop (wshelp.run).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from backendfix import backend
from hubfix import API_KEY, SECRET
from hubproc import HubProcess, SequencePublisher
from procfix import free_port
from wshelp import run

from hub.client import Client, ClientError
from hub.errors import CloseCode, may_reconnect
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

CHAT = """
[namespaces.chat]
publish = true
"""
HISTORY = """
[namespaces.chat]
publish = true
history_size = 100000
history_ttl = 600
"""
SECURE = f"""
token_secret = "{SECRET}"
api_key = "{API_KEY}"

[namespaces.chat]
publish = true
"""
KEY = {"X-API-Key": API_KEY}
PROXY_SECRET = "client-proxy-secret-0123456789abcdef0123"
FAST = {"min_delay": 0.05, "max_delay": 0.3}
WAIT = 15.0


def ws(hub: HubProcess) -> str:
    return f"ws://127.0.0.1:{hub.port}/ws"


class Recorder:
    """Every event of a client, in order."""

    def __init__(self, client: Client) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        for name in ("state", "message", "gap", "reload", "error"):
            client.on(name, lambda detail, name=name: self.events.append((name, detail)))

    def of(self, name: str) -> list[dict[str, Any]]:
        return [detail for event, detail in self.events if event == name]

    def states(self) -> list[tuple[str, Any]]:
        return [(d["state"], d.get("code")) for d in self.of("state")]


async def until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_the_reconnect_rule_is_the_close_code_table() -> None:
    for code in CloseCode:
        if code >= 4000:
            assert may_reconnect(code) == code.reconnect, code
    assert [c for c in range(4000, 5000) if not may_reconnect(c)] == list(range(4500, 5000))
    assert all(may_reconnect(c) for c in (1000, 1001, 1006, 1011, 1012, 1013))
    assert not any(may_reconnect(c) for c in (1002, 1003, 1007, 1008, 1009, 1010))


def test_the_server_never_imports_websockets() -> None:
    """hub.client's transport is an optional extra: the server runs without it."""
    code = (
        "import sys, hub.cli, hub.app, hub.http_api, hub.node, hub.redis.broker\n"
        "assert 'websockets' not in sys.modules, 'the server imported websockets'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_subscribe_publish_receive(hubs: Callable[..., HubProcess], encoding: str) -> None:
    hub = hubs(CHAT)

    async def main() -> None:
        async with (
            Client(ws(hub), user="alice", encoding=encoding, **FAST) as alice,
            Client(ws(hub), user="bob", encoding="msgpack", **FAST) as bob,
        ):
            stream = alice.messages()
            assert await alice.subscribe("chat:room") == {}
            assert await bob.subscribe("chat:room") == {}
            assert alice.state == "connected" and alice.connections == 1

            await bob.publish("chat:room", {"text": "hi", "blob": b"\x00\xff"})
            message = await stream.get(WAIT)
            # bytes reach a JSON client too: the hub sends that push as a msgpack binary frame
            assert message["channel"] == "chat:room"
            assert message["data"] == {"text": "hi", "blob": b"\x00\xff"}
            assert message["offset"] is None  # no history in this namespace

            await asyncio.to_thread(hub.post, "/api/publish", {"channel": "chat:room", "data": 7})
            assert (await stream.get(WAIT))["data"] == 7
            await asyncio.to_thread(hub.post, "/api/send", {"user": "alice", "data": "dm"})
            direct = await stream.get(WAIT)
            assert (direct["channel"], direct["data"]) == (None, "dm")

            with pytest.raises(ClientError) as refused:
                await alice.publish("news", "x")  # the default namespace forbids publishing
            assert refused.value.code == 103
            with pytest.raises(ClientError) as unknown:
                await alice.call("nonsense")
            assert unknown.value.code == 104
            with pytest.raises(ClientError) as bad:
                await alice.subscribe("bad channel!")
            assert bad.value.code == 107
            assert "bad channel!" not in alice.subs

            assert await alice.unsubscribe("chat:room") == {}
            await bob.publish("chat:room", "after unsubscribe")
            await alice.publish("chat:room", "alice still publishes")
            await asyncio.to_thread(hub.post, "/api/send", {"user": "alice", "data": "marker"})
            assert (await stream.get(WAIT))["data"] == "marker"  # nothing of chat:room came
        assert alice.state == bob.state == "closed"
        with pytest.raises(ClientError) as closed:
            await alice.call("subscribe", {"channel": "chat:room"})
        assert closed.value.code == "disconnected"

    run(main, timeout=60)


def test_recovery_across_a_forced_reconnect(hubs: Callable[..., HubProcess]) -> None:
    """The backend drops the client with 4000 and publications go on while it is away: it
    reconnects with backoff, resubscribes with ``since``, and gets every publication once, in
    order."""
    hub = hubs(HISTORY)

    async def main() -> None:
        async with Client(ws(hub), user="reader", min_delay=1.0, max_delay=2.0) as client:
            record = Recorder(client)
            reply = await client.subscribe("chat:feed")
            assert set(reply) == {"offset", "epoch"}

            async def publish(seqs: range) -> None:
                for seq in seqs:
                    body = {"channel": "chat:feed", "data": seq}
                    await asyncio.to_thread(hub.post, "/api/publish", body)

            await publish(range(100))
            body = {"user": "reader", "code": 4000, "reason": "slow"}
            await asyncio.to_thread(hub.post, "/api/disconnect", body)
            await until(lambda: client.state == "disconnected", "the drop")
            await publish(range(100, 130))
            assert client.state == "disconnected"  # these 30 went out while it was away
            await until(lambda: client.state == "connected", "the reconnect")
            await publish(range(130, 200))
            await until(lambda: len(record.of("message")) >= 200, "every publication")
            await asyncio.sleep(0.1)
            got = [m["data"] for m in record.of("message")]
            assert got == list(range(200))
            offsets = [m["offset"] for m in record.of("message")]
            assert offsets == list(range(reply["offset"] + 1, reply["offset"] + 201))
            assert client.connections == 2
            drops = [d for d in record.of("state") if d["state"] == "disconnected"]
            assert [d["code"] for d in drops] == [4000] and drops[0]["delay"] >= 0.5
            assert not record.of("reload") and not record.of("error")
            assert client.position("chat:feed") == {"offset": offsets[-1], "epoch": reply["epoch"]}

    run(main, timeout=90)


def test_recovery_across_processes(
    hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    """Two hubs share a private Redis; the client's hub is SIGKILLed under a non-stop publisher,
    the client moves to the other url and recovers from history: no loss, no duplicate."""
    a = hubs(HISTORY, redis_server.url)
    b = hubs(HISTORY, redis_server.url)

    async def main() -> None:
        async with Client([ws(a), ws(b)], user="reader", **FAST) as client:
            record = Recorder(client)
            await client.subscribe("chat:feed")
            publisher = SequencePublisher(redis_server.url, "chat:feed")
            publisher.start()
            try:
                await until(lambda: len(record.of("message")) >= 50, "first publications")
                await asyncio.to_thread(a.kill)
                await until(lambda: client.connections == 2, "the reconnect to b")
                assert client.url is not None and client.url.startswith(ws(b))
                seen = len(record.of("message"))
                await until(lambda: len(record.of("message")) > seen + 50, "live again")
            finally:
                total = await asyncio.to_thread(publisher.finish)
            await until(lambda: len(record.of("message")) >= total, "every publication")
            seqs = [m["data"]["seq"] for m in record.of("message")]
            assert seqs == list(range(total)), sorted(set(range(total)) ^ set(seqs))[:20]
            assert [d["code"] for d in record.of("state") if d["state"] == "disconnected"] == [1006]
            assert not record.of("reload")

    run(main, timeout=90)


def test_close_codes_decide_reconnection(hubs: Callable[..., HubProcess]) -> None:
    hub = hubs(SECURE)

    async def main() -> None:
        # A bad token: 4500, and no second attempt.
        bad = Client(ws(hub), token="not-a-jwt", **FAST)
        bad_record = Recorder(bad)
        bad.connect()
        pending = asyncio.ensure_future(bad.subscribe("news"))
        await until(lambda: bad.state == "closed", "the refusal")
        assert bad_record.states()[-1] == ("closed", 4500)
        with pytest.raises(ClientError) as refused:
            await asyncio.wait_for(pending, WAIT)  # nobody waits forever on a closed client
        assert refused.value.code == "disconnected"
        await asyncio.sleep(1)  # several max_delay periods
        assert (bad.attempts, bad.state, bad.close_code) == (1, "closed", 4500)
        await bad.close()

        # 4003 and 4000 reconnect (and resubscribe); 4503 stops.
        token = mint_token("carol", SECRET, ttl=3600)
        async with Client(ws(hub), token=token, **FAST) as client:
            record = Recorder(client)
            stream = client.messages()
            await client.subscribe("news")
            for n, code in enumerate((4003, 4000), start=2):
                body = {"user": "carol", "code": code}
                await asyncio.to_thread(hub.post, "/api/disconnect", body, KEY)
                await until(lambda n=n: client.connections == n, f"reconnect after {code}")
                await until(lambda: client.subs["news"].active, "the resubscription")
            await asyncio.to_thread(hub.post, "/api/publish", {"channel": "news", "data": 1}, KEY)
            assert (await stream.get(WAIT))["data"] == 1
            await asyncio.to_thread(hub.post, "/api/disconnect", {"user": "carol"}, KEY)
            await until(lambda: client.state == "closed", "the final close")
            async for _ in stream:  # the stream ends with the client
                raise AssertionError("no message expected")
            await asyncio.sleep(1)
            assert client.connections == 3 and client.state == "closed"
            codes = [code for state, code in record.states() if state in ("disconnected", "closed")]
            assert codes == [4003, 4000, 4503]

    run(main, timeout=60)


def test_a_token_is_refreshed_without_reconnecting(hubs: Callable[..., HubProcess]) -> None:
    """The hub's refresh push before ``exp`` is answered with ``get_token``'s next token: the
    same connection goes on past the first token's expiry, no 4002."""
    hub = hubs(SECURE)
    minted: list[str] = []

    async def get_token() -> str:
        minted.append(mint_token("erin", SECRET, ttl=3 if not minted else 3600))
        return minted[-1]

    async def main() -> None:
        async with Client(ws(hub), get_token=get_token, **FAST) as client:
            record = Recorder(client)
            await client.subscribe("news")
            await until(lambda: len(minted) == 2, "the refresh", 10)
            await asyncio.sleep(3)  # past the first token's exp
            await asyncio.to_thread(hub.post, "/api/publish", {"channel": "news", "data": 3}, KEY)
            await until(lambda: record.of("message"), "a publication on the same connection")
            assert client.connections == 1 and record.of("error") == []
            assert [d for d in record.of("state") if d["state"] == "disconnected"] == []

    run(main, timeout=60)


def test_an_expired_token_is_renewed(hubs: Callable[..., HubProcess]) -> None:
    """A refresh that fails (``get_token`` raises on the refresh push) ends in 4002, and the
    reconnect gets a fresh token from ``get_token``."""
    hub = hubs(SECURE)
    minted: list[str] = []

    async def get_token() -> str:
        if len(minted) == 1:
            minted.append("refused")
            raise RuntimeError("the token service is down for a moment")
        minted.append(mint_token("dave", SECRET, ttl=2 if not minted else 3600))
        return minted[-1]

    async def main() -> None:
        async with Client(ws(hub), get_token=get_token, **FAST) as client:
            record = Recorder(client)
            await client.subscribe("news")
            await until(lambda: client.connections == 2, "the reconnect after expiry", 10)
            await until(lambda: client.subs["news"].active, "the resubscription")
            assert len(minted) == 3
            assert [d["code"] for d in record.of("state") if d["state"] == "disconnected"] == [4002]
            await asyncio.to_thread(hub.post, "/api/publish", {"channel": "news", "data": 2}, KEY)
            await until(lambda: record.of("message"), "a publication on the new connection")

    run(main, timeout=60)


# -- a hostile server ---------------------------------------------------------------------------


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One client frame (masked, unfragmented, as hub.client's websockets sends them)."""
    b0, b1 = await reader.readexactly(2)
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4)
    payload = await reader.readexactly(length)
    return b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x80 | opcode, 127]) + struct.pack("!Q", n)
    return head + payload


GARBAGE_TEXT = [
    "{",  # not JSON
    "[" * 100_000,  # nested beyond any recursion limit
    "[1, 2]",  # JSON, not an object
    "null",
    '{"id": "1", "result": {}}',  # an id that is not an integer
    '{"id": 999, "result": {}}',  # a reply nobody waits for
    '{"id": [1], "error": {}}',
    '{"channel": ["x"], "data": 1}',  # an unhashable channel
    '{"channel": "elsewhere", "data": 1}',  # not subscribed
    '{"channel": "news", "gap": "yes"}',  # a gap on a channel without a position
]
GARBAGE_BINARY = [
    b"\xc1",  # never used in msgpack
    b"\x92\x01",  # a truncated array
    msgpack.packb({"channel": "news", "data": b"\x01"}) + b"\x00",  # trailing bytes
    msgpack.packb({(1, 2): 3}),  # an array as a map key: unhashable once decoded
    msgpack.packb(msgpack.ExtType(5, b"xx")),
]


class HostileServer:
    """A raw TCP server speaking just enough WebSocket to hand a client garbage."""

    def __init__(self) -> None:
        self.connections = 0
        self.commands: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/ws"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("sec-websocket-key:")
        )
        magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key.encode() + magic).digest()).decode()
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: hub.v1.json\r\n\r\n"
        )
        writer.write(response.encode())

    async def command(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 0x1:
                self.commands.append(json.loads(payload))
                return self.commands[-1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handshake(reader, writer)
            if self.connections > 1:
                # The second visit: refuse for good.
                writer.write(frame(0x8, struct.pack("!H", 4501) + b"go away"))
                await writer.drain()
                await read_frame(reader)
                return
            first = await self.command(reader)
            for text in GARBAGE_TEXT:
                writer.write(frame(0x1, text.encode()))
            for blob in GARBAGE_BINARY:
                writer.write(frame(0x2, blob))
            # A malformed error reply: the subscribe fails with 100 and is retried.
            writer.write(frame(0x1, json.dumps({"id": first["id"], "error": "boom"}).encode()))
            retry = await self.command(reader)
            reply = {"id": retry["id"], "result": {"offset": "3", "epoch": 5}}
            writer.write(frame(0x1, json.dumps(reply).encode()))
            pushes = [
                {"channel": "news", "data": "odd", "offset": "1", "epoch": 5},
                {"channel": "news", "data": "good"},
                {"data": "direct"},
            ]
            for push in pushes:
                writer.write(frame(0x1, json.dumps(push).encode()))
            writer.write(frame(0x1, b"\xff\xfe not utf-8"))  # the client fails the connection
            await writer.drain()
            await asyncio.sleep(0.5)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_a_hostile_server_does_not_break_the_client() -> None:
    async def main() -> None:
        server = HostileServer()
        url = await server.start()
        try:
            async with Client(url, **FAST) as client:
                record = Recorder(client)
                result = await asyncio.wait_for(client.subscribe("news"), WAIT)
                assert result == {"offset": "3", "epoch": 5}  # handed back, never trusted
                await until(lambda: client.state == "closed", "the final refusal")
            got = [(m["channel"], m["data"], m["offset"]) for m in record.of("message")]
            assert got == [("news", "odd", None), ("news", "good", None), (None, "direct", None)]
            assert client.position("news") == {"offset": None, "epoch": None}
            errors = record.of("error")
            undecodable = [e for e in errors if e["channel"] is None]
            # "{", the deep nesting and the first four binary frames (the ExtType decodes)
            assert len(undecodable) == 6, errors
            retried = [e for e in errors if e["channel"] == "news"]
            assert [e["retrying"] for e in retried] == [True], errors
            assert retried[0]["error"].code == 100
            assert record.of("gap") == [{"channel": "news", "recovering": False}]
            # the invalid UTF-8 ended the first connection (the client reconnected), the second
            # was refused for good
            assert server.connections == 2
            states = record.states()
            assert states[-1] == ("closed", 4501), states
            assert ("disconnected", 1006) in states or ("disconnected", 1007) in states, states
        finally:
            await server.close()

    run(main, timeout=60)


def test_a_listener_that_raises_does_not_break_the_client(
    hubs: Callable[..., HubProcess], caplog: pytest.LogCaptureFixture
) -> None:
    hub = hubs(CHAT)

    async def main() -> None:
        async with Client(ws(hub), user="erin", **FAST) as client:

            def broken(detail: dict[str, Any]) -> None:
                raise RuntimeError("listener bug")

            got: list[Any] = []

            async def slow(detail: dict[str, Any]) -> None:
                await asyncio.sleep(0)
                got.append(detail["data"])

            client.on("message", broken)
            remove = client.on("message", slow)
            await client.subscribe("chat:x")
            await client.publish("chat:x", 1)
            await until(lambda: got == [1], "the coroutine listener")
            remove()
            await client.publish("chat:x", 2)
            await client.publish("chat:x", 3)
            await asyncio.sleep(0.2)
            assert got == [1] and client.state == "connected"
        assert "listener bug" in caplog.text

    run(main, timeout=30)


def test_bad_arguments_fail_early(tmp_path: Path) -> None:
    for url in ("ftp://x/ws", "not a url", "/ws"):
        with pytest.raises(ValueError):
            Client(url)
    with pytest.raises(ValueError):
        Client([])
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/ws", encoding="xml")
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/ws", min_delay=0)
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/ws").on("nope", print)


def test_close_is_prompt_while_waiting_to_reconnect_or_connecting() -> None:
    async def main() -> None:
        # Nothing listens: the attempt fails and the client waits out a long backoff delay.
        client = Client(f"ws://127.0.0.1:{free_port()}/ws", min_delay=5, max_delay=10)
        record = Recorder(client)
        client.connect()
        await until(lambda: record.of("state"), "the first attempt")
        await until(lambda: client.state == "disconnected", "the failed attempt")
        assert record.of("state")[-1]["code"] == 1006
        started = time.monotonic()
        await client.close()
        assert time.monotonic() - started < 1 and client.state == "closed"

        # A server that accepts the connection and never answers the handshake.
        held: list[asyncio.StreamWriter] = []

        async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            client = Client(f"ws://127.0.0.1:{port}/ws", timeout=30)
            client.connect()
            await until(lambda: held, "the tcp connection")
            started = time.monotonic()
            await client.close()
            assert time.monotonic() - started < 1 and client.state == "closed"
            assert client.connections == 0
        finally:
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()

    run(main, timeout=30)


TOKENS = f"""
token_secret = "{SECRET}"
api_key = "{API_KEY}"

[namespaces.news]
server_side = true

[namespaces.user]
personal = true
server_side = true

[namespaces.private]
subscribe = "token"
"""


def test_subscription_tokens_are_sent_and_renewed(hubs: Callable[..., HubProcess]) -> None:
    """A ``subscribe = "token"`` channel gets its token (given, or from the subscription's
    ``get_token``); the hub's refresh push for it is answered with the next token, so the
    subscription outlives its first token; a static token that runs out ends the
    subscription (an ``unsubscribed`` error event), and a token for another channel is
    refused."""
    hub = hubs(TOKENS)
    asked: list[str] = []

    def sub_token(channel: str) -> str:
        asked.append(channel)
        return mint_token("fay", SECRET, channel=channel, ttl=3 if len(asked) == 1 else 3600)

    async def main() -> None:
        async with Client(ws(hub), token=mint_token("fay", SECRET, ttl=3600), **FAST) as client:
            record = Recorder(client)
            stream = client.messages()
            assert await client.subscribe("private:r", get_token=sub_token) == {}
            short = mint_token("fay", SECRET, channel="private:s", ttl=3)
            assert await client.subscribe("private:s", token=short) == {}
            with pytest.raises(ClientError) as refused:
                other = mint_token("fay", SECRET, channel="private:x")
                await client.subscribe("private:t", token=other)
            assert refused.value.code == 103 and "private:t" not in client.subs
            await until(lambda: len(asked) == 2, "the refresh of private:r", 10)

            def ends() -> list[dict[str, Any]]:
                return [e for e in record.of("error") if e["channel"] == "private:s"]

            await until(ends, "the end of private:s", 10)
            (ended,) = ends()
            assert (ended["error"].code, ended["error"].message) == (
                "unsubscribed",
                "token expired",
            )
            assert [e["channel"] for e in record.of("error")] == ["private:t", "private:s"]
            assert "private:s" not in client.subs
            await asyncio.sleep(0.5)  # past private:r's first token too
            for channel in ("private:s", "private:r"):
                body = {"channel": channel, "data": channel}
                await asyncio.to_thread(hub.post, "/api/publish", body, KEY)
            message = await stream.get(WAIT)
            assert (message["channel"], message["data"]) == ("private:r", "private:r")
            assert client.connections == 1 and asked == ["private:r", "private:r"]

    run(main, timeout=60)


def test_server_side_subscriptions_are_delivered(hubs: Callable[..., HubProcess]) -> None:
    """Channels the token's ``channels`` claim (and a personal server-side namespace) subscribe
    the connection to are delivered as messages without a subscribe, after a reconnect too,
    and never subscribed by the client itself."""
    hub = hubs(TOKENS)
    token = mint_token("gus", SECRET, channels=["news:daily"], ttl=3600)

    async def main() -> None:
        async with Client(ws(hub), token=token, **FAST) as client:
            record = Recorder(client)
            stream = client.messages()
            for connection in (1, 2):
                await until(
                    lambda c=connection: (
                        client.connections == c
                        and all(client.subs.get(ch, _inactive).active for ch in SERVER_SIDE)
                    ),
                    "the server's subscriptions",
                )
                for channel in SERVER_SIDE:
                    body = {"channel": channel, "data": connection}
                    await asyncio.to_thread(hub.post, "/api/publish", body, KEY)
                    message = await stream.get(WAIT)
                    assert (message["channel"], message["data"]) == (channel, connection)
                if connection == 1:
                    body = {"user": "gus", "code": 4003}
                    await asyncio.to_thread(hub.post, "/api/disconnect", body, KEY)
            assert record.of("error") == []
        # The client never subscribed them itself (it would have got 105, already subscribed).
        assert 'hub_command_errors_total{code="105"}' not in await asyncio.to_thread(metrics, hub)

    run(main, timeout=60)


SERVER_SIDE = ("news:daily", "user:gus")
_inactive = type("Inactive", (), {"active": False})()


def metrics(hub: HubProcess) -> str:
    with urllib.request.urlopen(hub.base + "/metrics", timeout=WAIT) as response:
        return response.read().decode()


def test_a_failing_connect_proxy_is_retried_with_backoff(hubs: Callable[..., HubProcess]) -> None:
    """A connect proxy whose backend fails closes with 4004: hub.client retries with backoff
    (unlike a refusal, 4500), and gets in once the backend answers again."""
    with backend(PROXY_SECRET) as app:
        app.connect_fault = (503, b"")
        hub = hubs(
            f"""
            token_secret = "{SECRET}"
            proxy_secret = "{PROXY_SECRET}"
            connect_proxy = "{app.url("/connect")}"
            """
        )

        async def main() -> None:
            cookie = {"Cookie": "sid=s-alice"}
            async with Client(ws(hub), headers=cookie, **FAST) as client:
                record = Recorder(client)
                await until(lambda: client.attempts >= 3, "retries")
                app.connect_fault = None
                await until(lambda: client.state == "connected", "the connection")
                codes = [d["code"] for d in record.of("state") if d["state"] == "disconnected"]
                assert len(codes) >= 2 and set(codes) == {CloseCode.BACKEND_UNAVAILABLE}
                assert all(d["delay"] > 0 for d in record.of("state") if "delay" in d)
                assert client.close_code == CloseCode.BACKEND_UNAVAILABLE
            assert all(body["cookies"] == {"sid": "s-alice"} for body in app.calls_to("/connect"))

        run(main, timeout=60)
