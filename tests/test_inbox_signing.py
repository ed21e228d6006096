"""Inboxes with ``redis_signing_key``: real ``hub serve`` processes on a private Redis. Signed
notifies (both publishers, ``POST /api/notify`` on another hub, ``hub notify --redis``) reach
a client live and on catch-up, and so do read cursors; an unsigned notify, an entry written
straight into the stream by someone without the key, and one with a forged mac reach nobody,
live or stored, and each is counted in ``hub_bridge_bad_signatures_total``."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hubproc import HubProcess
from procfix import wait_until
from test_inbox_processes import command, dial, pushes
from wshelp import run

from hub.redis.publisher import AsyncPublisher, Publisher
from hub.redis.wire import seal

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

KEY = "signing-key-for-the-inbox-tests-0123456789"
OTHER = "another-signing-key-0123456789abcdef012345"
CONFIG = f'redis_signing_key = "{KEY}"\n'
STREAM = "{hub:user:u}:inbox"


def bad_signatures(hub: HubProcess) -> float:
    with urllib.request.urlopen(hub.base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(r"^hub_bridge_bad_signatures_total (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def forge(redis_server: RedisServer, data: str, signed_with: str | None) -> int:
    """What someone with write access to Redis could store: an entry with the next seq, the
    push unsigned or signed with another key. Returns its seq."""
    r = redis_server.client()
    seq = int(r.hincrby("{hub:user:u}:inbox:meta", "seq", 1))
    epoch = r.hget("{hub:user:u}:inbox:meta", "epoch").decode()
    mark = {"seq": seq, "epoch": epoch}
    if signed_with is None:
        push = msgpack.packb({"data": data, "inbox": mark})
    else:
        signed = seal(signed_with.encode(), b"hub:user:u", msgpack.packb({"data": data}))
        push = signed[:1].replace(b"\x92", b"\x93") + signed[1:] + msgpack.packb({"inbox": mark})
    now = int(time.time() * 1000)
    r.xadd(STREAM, {"e": push, "t": now, "x": 0}, id=f"{seq}-0")
    return seq


def test_signed_notifies_reach_clients_and_unsigned_or_forged_ones_nobody(
    hubs: Callable[..., HubProcess], redis_server: RedisServer, tmp_path: Any
) -> None:
    a = hubs(CONFIG, redis_server.url)
    b = hubs(CONFIG, redis_server.url)
    url = redis_server.url

    async def main() -> None:
        with Publisher(url, signing_key=KEY) as signed:
            signed.notify("u", "first")  # the inbox and its epoch exist: no catch-up below
        ws = await dial(b, "u")
        reply, _ = await command(ws, "inbox", device="phone")
        assert reply["result"]["seq"] == 1
        assert [p["data"] for p in await pushes(ws, 1)] == ["first"]
        with Publisher(url, signing_key=KEY) as signed, Publisher(url) as unsigned:
            assert signed.notify("u", "blocking").receivers == 1
            assert unsigned.notify("u", "unsigned").receivers == 1  # published, then dropped
        async with AsyncPublisher(url, signing_key=KEY) as apub:
            await apub.notify("u", "async", id="a-1")
        async with AsyncPublisher(url, signing_key=OTHER) as forger:
            await forger.notify("u", "other key")
        assert a.post("/api/notify", {"user": "u", "data": "http"})["result"]["seq"] == 6
        cli = [sys.executable, "-m", "hub.cli", "notify", "u", '"cli"', "--redis", url]
        done = subprocess.run(
            [*cli, "--config", str(a.config)], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        got = await pushes(ws, 4)
        assert [(p["data"], p["inbox"]["seq"]) for p in got] == [
            ("blocking", 2),
            ("async", 4),
            ("http", 6),
            ("cli", 7),
        ]
        assert got[1]["inbox"]["id"] == "a-1"
        epoch = got[0]["inbox"]["epoch"]
        # The read cursor a client moves on one hub reaches its connections on the others.
        other = await dial(a, "u")
        reply, _ = await command(other, "read", seq=6)
        assert reply["result"] == {"read": 6}
        assert await pushes(ws, 1) == [{"inbox": {"read": 6, "epoch": epoch}}]
        wait_until(lambda: bad_signatures(b) == 2, 10, "two live notifies dropped by hub b")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.3)  # nothing else came live
        await ws.close()
        await other.close()

        # Stored: what someone without the key wrote into the stream is not delivered either.
        forge(redis_server, "forged unsigned", None)
        forge(redis_server, "forged mac", OTHER)
        with Publisher(url, signing_key=KEY) as signed:
            assert signed.notify("u", "after").seq == 10
        late = await dial(b, "u")
        reply, _ = await command(late, "inbox", device="tablet")
        assert reply["result"]["seq"] == 10
        got = await pushes(late, 6)
        assert [p["data"] for p in got] == ["first", "blocking", "async", "http", "cli", "after"]
        # 2 live + the two dropped notifies and the two forged entries on catch-up.
        wait_until(lambda: bad_signatures(b) == 6, 10, "stored bad entries counted")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(late.recv(), 0.3)
        await late.close()
        # The backend's read of the inbox skips them too (and counts them, on hub a).
        page = a.post("/api/inbox", {"user": "u"})["result"]
        expected = ["first", "blocking", "async", "http", "cli", "after"]
        assert [e["data"] for e in page["entries"]] == expected
        assert bad_signatures(a) == 4

    run(main, timeout=60)
    for hub in (a, b):
        assert "Traceback" not in hub.log.read_text()


def test_a_hub_without_a_key_delivers_signed_and_unsigned_notifies(
    hubs: Callable[..., HubProcess], redis_server: RedisServer
) -> None:
    """Publishers start signing before the hubs require it."""
    hub = hubs("", redis_server.url)
    url = redis_server.url

    async def main() -> None:
        ws = await dial(hub, "u")
        await command(ws, "inbox")
        with Publisher(url, signing_key=KEY) as signed, Publisher(url) as unsigned:
            signed.notify("u", "signed")
            unsigned.notify("u", "unsigned")
        assert [p["data"] for p in await pushes(ws, 2)] == ["signed", "unsigned"]
        await ws.close()
        late = await dial(hub, "u")
        await command(late, "inbox")
        assert [p["data"] for p in await pushes(late, 2)] == ["signed", "unsigned"]
        await late.close()
        assert bad_signatures(hub) == 0

    run(main, timeout=30)


def test_payload_of_a_signed_notify_is_the_signed_array_with_the_mark_beside_it(
    redis_server: RedisServer,
) -> None:
    """What other languages need to know (docs/publish-api.md "Signed payloads"): the script
    leaves ``[envelope, mac]`` as it is and, for a notify with an id, adds ``{"inbox": {...}}``
    as a third element; a plain notify's push is ``\\xc1<seq>-0 <epoch> `` then the signed
    array, untouched."""
    r = redis_server.client()
    sub = r.pubsub()
    sub.subscribe("hub:user:u")
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    with Publisher(redis_server.url, signing_key=KEY) as signed:
        done = signed.notify("u", {"title": "hi"}, id="x")
    message = sub.get_message(timeout=2)
    sub.close()
    envelope, mac, extra = msgpack.unpackb(message["data"])
    assert msgpack.unpackb(envelope) == {"data": {"title": "hi"}}
    assert seal(KEY.encode(), b"hub:user:u", envelope) == msgpack.packb([envelope, mac])
    assert extra == {"inbox": {"seq": done.seq, "epoch": done.epoch, "id": "x"}}
    stored = r.xrange(STREAM)[0][1][b"e"]
    assert stored == message["data"]

    sub = r.pubsub()
    sub.subscribe("hub:user:u")
    assert sub.get_message(timeout=2)["type"] == "subscribe"
    with Publisher(redis_server.url, signing_key=KEY) as signed:
        plain = signed.notify("u", {"title": "plain"})
    message = sub.get_message(timeout=2)
    sub.close()
    head = b"\xc1%d-0 %s " % (plain.seq, plain.epoch.encode())
    assert message["data"].startswith(head)
    envelope, mac = msgpack.unpackb(message["data"][len(head) :])
    assert msgpack.unpackb(envelope) == {"data": {"title": "plain"}}
    assert seal(KEY.encode(), b"hub:user:u", envelope) == msgpack.packb([envelope, mac])
    assert r.xrange(STREAM)[1][1][b"e"] == message["data"]
