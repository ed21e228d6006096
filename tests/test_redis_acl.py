"""The Redis ACL users documented in docs/operations.md, applied as written to a private Redis:
a hub and a backend using them do everything the hub does (channel, per-user, history and
recovery, presence, join/leave, client publish), and nothing beyond the list is allowed."""

from __future__ import annotations

import shlex
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import redis
from hubfix import ANY_CLIENT, client, running, secure_settings
from wshelp import run

from hub.redis.publisher import Publisher
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "operations.md"
NAMESPACES = """
[namespaces.feed]
history_size = 50
history_ttl = 300
publish = true

[namespaces.room]
presence = true
join_leave = true
publish = true
"""


def documented_acl() -> list[str]:
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("ACL SETUSER ")]
    assert [line.split()[2] for line in lines] == ["hub", "backend"], lines
    return lines


def apply_acl(server: RedisServer) -> tuple[str, str]:
    """The documented users, with passwords filled in; the default user switched off."""
    admin = redis.Redis(port=server.port)
    for line in documented_acl():
        line = line.replace("HUB_PASSWORD", "hub-pw").replace("BACKEND_PASSWORD", "backend-pw")
        admin.execute_command(*shlex.split(line))
    admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
    admin.execute_command("ACL", "SETUSER", "default", "off")
    admin.close()
    base = f"127.0.0.1:{server.port}"
    return f"redis://hub:hub-pw@{base}", f"redis://backend:backend-pw@{base}"


def test_the_documented_acl_users_run_everything(redis_server: RedisServer) -> None:
    hub_url, backend_url = apply_acl(redis_server)
    with pytest.raises(redis.exceptions.NoPermissionError):  # the list really restricts
        redis.Redis.from_url(hub_url).set("{hub:ch:x}:meta", 1)
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis.Redis.from_url(backend_url).publish("other:channel", b"x")

    async def main() -> None:
        settings = secure_settings(NAMESPACES, redis_url=hub_url)
        async with running(settings) as hub, AsyncExitStack() as stack:
            alice = await stack.enter_async_context(
                client(hub, token=mint_token("alice", settings.token_secret))
            )
            bob = await stack.enter_async_context(
                client(hub, token=mint_token("bob", settings.token_secret))
            )
            first = await alice.call("subscribe", channel="feed:1")
            assert set(first["result"]) == {"offset", "epoch"}, first
            await alice.ok("subscribe", channel="news")
            await alice.ok("subscribe", channel="room:1")
            await bob.ok("subscribe", channel="room:1")

            with Publisher(backend_url) as pub:
                assert pub.publish("news", {"n": 1}) == 1
                stored = pub.publish("feed:1", {"n": 2}, history_size=50, history_ttl=300)
                assert stored.offset == first["result"]["offset"] + 1
                pub.send_to_user("alice", {"n": 3})
                pub.broadcast({"n": 4})
            await alice.ok("publish", channel="feed:1", data={"n": 5})  # the hub's own script
            pushes = [await alice.push() for _ in range(5)]
            data = [p["data"] for p in pushes if "data" in p]
            assert data == [{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}, {"n": 5}], pushes
            assert pushes[-1]["offset"] == stored.offset + 1

            reply = await bob.call("presence_stats", channel="room:1")
            assert reply["result"] == {"num_clients": 2, "num_users": 2}, reply
            await bob.ok("publish", channel="room:1", data="hi")  # client publish

            seen: list[dict[str, Any]] = []  # bob's "hi" and the joins (batched, 0.5 s later)
            joined: set[str] = set()
            sender = {"user": "bob", "client": ANY_CLIENT, "info": None}
            hi = {"channel": "room:1", "data": "hi", "from": sender}
            while len(seen) < 4 and not (joined == {"alice", "bob"} and hi in seen):
                seen.append(await alice.push(10))
                joined |= {e["user"] for e in seen[-1].get("join", [])}
            assert hi in seen, seen
            assert joined == {"alice", "bob"}, seen

            # Recovery reads history through the hub user.
            again = await stack.enter_async_context(
                client(hub, token=mint_token("alice", settings.token_secret))
            )
            since = {"offset": first["result"]["offset"], "epoch": first["result"]["epoch"]}
            reply = await again.call("subscribe", channel="feed:1", since=since)
            assert reply["result"]["recovered"] is True, reply
            assert [(await again.push())["data"] for _ in range(2)] == [{"n": 2}, {"n": 5}]
            history = await again.call("history", channel="feed:1")
            assert [p["data"] for p in history["result"]["publications"]] == [{"n": 2}, {"n": 5}]

            await bob.ok("unsubscribe", channel="room:1")  # presence removal
            reply = await alice.call("presence_stats", channel="room:1")
            assert reply["result"] == {"num_clients": 1, "num_users": 1}, reply
            await hub.node.presence.refresh()  # the periodic rewrite, now
            # Presence writes fail quietly (counted, retried): none may have failed here.
            assert hub.node.presence.write_errors == 0

    run(main)


def test_the_documented_acl_users_run_the_inbox(redis_server: RedisServer) -> None:
    """Inboxes are on by default, so the documented users cover them too: a backend's notifies
    (plain, with an id and a collapse key, with a ttl, with a fallback), a client's catch-up,
    live push, ack and read through the hub, the hub's own notify and its fallback claim."""
    hub_url, backend_url = apply_acl(redis_server)
    with pytest.raises(redis.exceptions.NoPermissionError):  # still only the hub's keys
        redis.Redis.from_url(backend_url).hset("{other:user:a}:inbox:meta", "seq", 1)

    async def main() -> None:
        settings = secure_settings("", redis_url=hub_url)
        async with running(settings) as hub:
            with Publisher(backend_url) as pub:
                first = pub.notify("alice", {"n": 1})
                pub.notify("alice", {"n": 2}, id="order-2", collapse_key="badge")
                assert pub.notify("alice", {"n": 2}, id="order-2").duplicate
                pub.notify("alice", {"n": 3}, ttl=3600, fallback_after=0.01)
            token = mint_token("alice", settings.token_secret)
            async with client(hub, token=token) as alice:
                reply = await alice.call("inbox")
                assert reply["result"]["seq"] == 3 and reply["result"]["epoch"] == first.epoch
                caught_up = [(await alice.push())["data"] for _ in range(3)]
                assert caught_up == [{"n": 1}, {"n": 2}, {"n": 3}]
                await hub.node.inbox.store.notify("alice", msgpack.packb({"data": {"n": 4}}))
                assert (await alice.push())["data"] == {"n": 4}
                assert (await alice.call("ack", seq=2))["result"] == {"acked": 2}
                assert (await alice.call("read", seq=3))["result"] == {"read": 3}
                assert (await alice.push())["inbox"]["read"] == 3
            due = await hub.node.inbox.store.claim_due(time.time() + 60)
            assert [(d.user, d.seq) for d in due] == [("alice", 3)], due

    run(main)
