"""Signed Redis payloads (``redis_signing_key``): a real ``hub serve`` and a private Redis, where
a writer without the key (or with another, or replaying a signed message on another channel)
reaches no client and disconnects nobody, and every such payload is counted."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack
import pytest
from hubfix import MSGPACK_PROTO, client, metric, scrape
from procfix import wait_until
from servefix import SECRET, hub_serve
from test_doc_examples import (  # the runner of the docs' blocks
    block,
    deliveries,
    localize,
    run_file,
    serving,
    ws,
)
from wshelp import run

from hub.config import ConfigError, load_settings
from hub.redis.publisher import AsyncPublisher, Publisher
from hub.redis.wire import seal
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

KEY = "signing-key-for-the-tests-0123456789abcdef"
OTHER = "another-signing-key-0123456789abcdef012345"
CONFIG = """
[namespaces.feed]
history_size = 20
history_ttl = 300

[namespaces.chat]
publish = true
"""
SCRIPT = (Path(__file__).resolve().parent.parent / "hub" / "history.lua").read_text()


def token(user: str) -> str:
    return mint_token(user, SECRET)


def test_with_a_signing_key_only_validly_signed_payloads_get_through(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    url = redis_server.url
    with hub_serve(tmp_path, CONFIG, url, redis_signing_key=KEY) as hub:

        async def main() -> None:
            async with (
                client(hub, token=token("alice")) as alice,  # type: ignore[arg-type]
                client(hub, MSGPACK_PROTO, token=token("bob")) as bob,  # type: ignore[arg-type]
            ):
                for c in (alice, bob):
                    await c.ok("subscribe", channel="news")
                    await c.ok("subscribe", channel="chat:1")
                first = await alice.call("subscribe", channel="feed:s")
                epoch = first["result"]["epoch"]
                bad = 0
                with (
                    Publisher(url, signing_key=KEY) as signed,
                    Publisher(url) as unsigned,
                    Publisher(url, signing_key=OTHER) as forger,
                ):
                    bad += unsigned.publish("news", "unsigned")
                    bad += forger.publish("news", "wrong key")
                    envelope = msgpack.packb({"data": "replayed"})
                    replay = seal(KEY.encode(), b"hub:ch:chat:other", envelope)
                    bad += r.publish("hub:ch:news", replay)  # signed, for another channel
                    good = seal(KEY.encode(), b"hub:ch:news", envelope)
                    bad += r.publish("hub:ch:news", good[:-1] + bytes([good[-1] ^ 1]))
                    bad += r.publish("hub:ch:news", msgpack.packb([envelope, b"short"]))
                    bad += unsigned.send_to_user("alice", "unsigned")
                    bad += unsigned.broadcast("unsigned")
                    bad += unsigned.disconnect("alice")
                    bad += forger.disconnect("bob")
                    history = r.register_script(SCRIPT)
                    name = "hub:ch:feed:s"
                    keys = [f"{{{name}}}:history", f"{{{name}}}:meta"]
                    args = [name, msgpack.packb({"data": "stored unsigned"}), 20, 300_000]
                    history(keys=keys, args=[*args, 86_400_000, "cand", 0])
                    bad += 1  # offset 1, dropped live
                    assert bad == 10
                    assert signed.publish("news", "signed") == 1
                    assert signed.send_to_user("alice", "for alice") == 1
                    assert signed.broadcast("to all") == 1
                    stored = signed.publish("feed:s", "stored", history_size=20, history_ttl=300)
                    assert (stored.offset, stored.epoch) == (2, epoch)
                    page = signed.history("feed:s", history_size=20)
                    assert [e["data"] for e in page.entries] == ["stored"]  # offset 1 skipped
                    assert page.skipped == 1
                async with AsyncPublisher(url, signing_key=KEY) as apub:
                    await apub.publish("feed:s", "async", history_size=20, history_ttl=300)
                    await apub.send_to_users([("alice", "batch")])
                await alice.ok("publish", channel="chat:1", data="from a client")  # the hub signs

                got = {p["data"]: p for p in [await alice.push() for _ in range(7)]}
                expected = ["signed", "for alice", "to all", "stored", "async", "batch"]
                assert set(got) == {*expected, "from a client"}, got
                assert (got["stored"]["offset"], got["async"]["offset"]) == (2, 3)
                bob_got = {(await bob.push())["data"] for _ in range(3)}
                assert bob_got == {"signed", "to all", "from a client"}
                reply = await alice.call("history", channel="feed:s")
                assert [p["data"] for p in reply["result"]["publications"]] == ["stored", "async"]
                samples = await scrape(hub)  # type: ignore[arg-type]
                assert metric(samples, "hub_bridge_bad_signatures_total") == bad + 1  # + the read
                assert metric(samples, "hub_bridge_malformed_total") == 0
                # Only a signed disconnect closes.
                with Publisher(url, signing_key=KEY) as signed:
                    signed.disconnect("alice", reason="signed")
                assert await alice.closed_with() == (4503, "signed")
                await bob.ok("subscribe", channel="chat:2")

        run(main)
        hub.assert_clean()


def test_a_hub_without_a_key_takes_signed_and_unsigned_payloads(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """So publishers can start signing before the hubs require it."""
    url = redis_server.url
    with hub_serve(tmp_path, CONFIG, url) as hub:

        async def main() -> None:
            async with client(hub, token=token("alice")) as alice:  # type: ignore[arg-type]
                await alice.ok("subscribe", channel="news")
                await alice.call("subscribe", channel="feed:s")
                with Publisher(url, signing_key=KEY) as signed, Publisher(url) as unsigned:
                    signed.publish("news", 1)
                    unsigned.publish("news", 2)
                    signed.publish("feed:s", 3, history_size=20, history_ttl=300)
                    unsigned.publish("feed:s", 4, history_size=20, history_ttl=300)
                    assert [e["data"] for e in unsigned.history("feed:s").entries] == [3, 4]
                assert [(await alice.push())["data"] for _ in range(4)] == [1, 2, 3, 4]
                reply = await alice.call("history", channel="feed:s")
                assert [p["data"] for p in reply["result"]["publications"]] == [3, 4]
                samples = await scrape(hub)  # type: ignore[arg-type]
                assert metric(samples, "hub_bridge_malformed_total") == 0

        run(main)
        hub.assert_clean()


def test_short_signing_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="redis_signing_key: must be at least 32 bytes"):
        load_settings(None, env={"HUB_REDIS_SIGNING_KEY": "short"}, overrides={"insecure": True})
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Publisher("redis://127.0.0.1:1/0", signing_key="short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        AsyncPublisher("redis://127.0.0.1:1/0", signing_key=b"short")


def test_the_node_example_signs_with_the_key_and_an_unsigned_run_reaches_nobody(
    redis_server: RedisServer,
    tmp_path: Path,
    node_modules: Path,
) -> None:
    """docs/publish-api.md's Node.js block, as written (tests/test_doc_examples.py runs it
    without a key), with ``HUB_REDIS_SIGNING_KEY`` set, against a hub holding the key: the real
    ``redis`` and ``@msgpack/msgpack`` packages and node:crypto make the signature."""
    code = localize(block("docs/publish-api.md", "Node.js").text, redis=redis_server)
    (tmp_path / "node_modules").symlink_to(node_modules)
    with serving("--redis", redis_server.url, HUB_REDIS_SIGNING_KEY=KEY) as hub:

        def signed() -> None:
            run_file(["node"], code, "signed.mjs", tmp_path, HUB_REDIS_SIGNING_KEY=KEY)

        alice, bob = deliveries(hub, signed, 3, 1)
        assert alice == [
            {"channel": "news", "data": {"title": "hello"}},
            {"data": {"unread": 3}},
            {"data": "maintenance in 5 minutes"},
        ]
        assert bob == [{"data": "maintenance in 5 minutes"}]

        def bad_signatures() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{hub.port}/metrics") as response:
                text = response.read().decode()
            found = re.search(r"^hub_bridge_bad_signatures_total (\S+)$", text, re.M)
            return float(found.group(1)) if found else 0.0

        with ws(hub.port, "user=alice", "news"):  # the hub listens on all four channels
            run_file(["node"], code, "unsigned.mjs", tmp_path)
            wait_until(lambda: bad_signatures() == 4, 10, "4 unsigned payloads counted")
        assert "Traceback" not in hub.text()
