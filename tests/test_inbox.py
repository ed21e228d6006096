"""Inboxes wired end to end: ``POST /api/notify`` and the ``inbox`` / ``ack`` / ``read``
commands, with real hubs on ephemeral ports and real ``websockets`` clients, on the memory
broker and across hubs joined by a private Redis. Abuse of every new surface included."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest
from hubfix import (
    API_KEY,
    MSGPACK_PROTO,
    SECRET,
    HubClient,
    api,
    client,
    eventually,
    http,
    make_settings,
    metric,
    running,
    scrape,
    secure_settings,
)
from wshelp import run

from hub.app import Hub
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]


@asynccontextmanager
async def memory_hubs(**overrides: Any) -> AsyncIterator[tuple[Hub, Hub]]:
    """One hub, named twice (what is sent to one is served by the other)."""
    async with running(make_settings(**overrides)) as hub:
        yield hub, hub


def redis_hubs(server: RedisServer) -> Callable[..., Any]:
    @asynccontextmanager
    async def hubs(**overrides: Any) -> AsyncIterator[tuple[Hub, Hub]]:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(
                running(make_settings(redis_url=server.url, **overrides))
            )
            b = await stack.enter_async_context(
                running(make_settings(redis_url=server.url, **overrides))
            )
            yield a, b

    return hubs


@pytest.fixture(params=["memory", "redis"])
def hubs(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Two hubs: the same one on the memory broker, two processes' worth on one Redis."""
    if request.param == "memory":
        return memory_hubs
    return redis_hubs(request.getfixturevalue("redis_server"))


async def notify(hub: Hub, user: str, data: Any, **fields: Any) -> dict[str, Any]:
    status, body = await api(hub, "/api/notify", {"user": user, "data": data, **fields})
    assert status == 200, body
    return body["result"]


async def pushes(c: HubClient, n: int) -> list[Any]:
    return [await c.push() for _ in range(n)]


def seqs(items: list[Any]) -> list[int]:
    return [p["inbox"]["seq"] for p in items]


async def open_inbox(c: HubClient, **fields: Any) -> dict[str, Any]:
    reply = await c.call("inbox", **fields)
    assert "result" in reply, reply
    return reply["result"]


def test_live_pushes_reach_every_connection_of_the_user(hubs: Callable[..., Any]) -> None:
    async def main() -> None:
        async with hubs() as (a, b):
            async with client(b, user="u") as one, client(a, user="u", proto=MSGPACK_PROTO) as two:
                async with client(b, user="other") as other:
                    await open_inbox(one)
                    await open_inbox(two)
                    await eventually(lambda: a.node.registry.has_user("u"))
                    done = await notify(a, "u", {"n": 1}, id="order-1")
                    assert done["seq"] == 1 and done["duplicate"] is False
                    expected = {"inbox": {"seq": 1, "epoch": done["epoch"], "id": "order-1"}}
                    assert await one.push() == {**expected, "data": {"n": 1}}
                    assert await two.push() == {**expected, "data": {"n": 1}}
                    again = await notify(a, "u", {"n": 1}, id="order-1")  # a retry
                    assert again == {**done, "duplicate": True}
                    await notify(a, "u", {"n": 2})
                    assert seqs([await one.push()]) == [2]  # the retry pushed nothing
                    assert seqs([await two.push()]) == [2]
                    async with client(b, user="u") as three:  # asks for nothing
                        await notify(a, "u", 3)
                        assert seqs([await one.push()]) == [3]
                        with pytest.raises(TimeoutError):
                            await three.push(timeout=0.2)
                    with pytest.raises(TimeoutError):
                        await other.push(timeout=0.1)

    run(main)


def test_catch_up_then_live_in_order_with_no_gap_and_no_duplicate(
    hubs: Callable[..., Any],
) -> None:
    """Notifications keep coming while the client asks for its inbox: it gets each one once,
    in order, whichever hub stored it."""

    async def main() -> None:
        async with hubs() as (a, b):
            for i in range(30):
                await notify(a, "u", i)
            stop = asyncio.Event()
            sent: list[int] = []

            async def keep_notifying() -> None:
                i = 30
                while not stop.is_set():
                    sent.append((await notify(a, "u", i))["seq"])
                    i += 1

            task = asyncio.create_task(keep_notifying())
            try:
                await eventually(lambda: len(sent) >= 3)
                async with client(b, user="u") as c:
                    result = await open_inbox(c, since=10)
                    assert result["seq"] >= 33
                    await eventually(lambda: len(sent) >= result["seq"] - 30 + 20)
                    stop.set()
                    await task
                    got = seqs(await pushes(c, 30 + len(sent) - 10))
                    assert got == list(range(11, 31 + len(sent)))
                    with pytest.raises(TimeoutError):
                        await c.push(timeout=0.3)  # nothing twice
            finally:
                stop.set()
                await task

    run(main, timeout=40)


def test_acks_are_per_device_and_the_read_cursor_reaches_every_connection(
    hubs: Callable[..., Any],
) -> None:
    async def main() -> None:
        async with hubs() as (a, b):
            for i in range(3):
                await notify(a, "u", i)
            async with client(b, user="u") as desktop:
                result = await open_inbox(desktop, device="desktop")
                assert (result["seq"], result["acked"], result["read"]) == (3, 0, 0)
                assert seqs(await pushes(desktop, 3)) == [1, 2, 3]
                assert (await desktop.call("ack", seq=3))["result"] == {"acked": 3}
            async with client(b, user="u") as desktop, client(a, user="u") as phone:
                assert (await open_inbox(desktop, device="desktop"))["acked"] == 3
                assert (await open_inbox(phone, device="phone"))["acked"] == 0
                assert seqs(await pushes(phone, 3)) == [1, 2, 3]  # it had none of them
                assert (await phone.call("read", seq=2))["result"] == {"read": 2}
                epoch = result["epoch"]
                for c in (desktop, phone):
                    assert await c.push() == {"inbox": {"read": 2, "epoch": epoch}}
                assert (await phone.call("read", seq=1))["result"] == {"read": 2}  # not back
                status, body = await api(a, "/api/inbox", {"user": "u", "device": "desktop"})
                assert status == 200
                assert {k: body["result"][k] for k in ("seq", "read", "acked")} == {
                    "seq": 3,
                    "read": 2,
                    "acked": 3,
                }
                assert body["result"]["entries"] == []  # after the desktop's ack
                status, body = await api(a, "/api/inbox", {"user": "u", "since": 1, "limit": 1})
                assert body["result"]["entries"] == [{"seq": 2, "data": 1}]
                assert body["result"]["last"] == 2

    run(main)


def test_a_cursor_of_another_epoch_starts_over(hubs: Callable[..., Any]) -> None:
    async def main() -> None:
        async with hubs() as (a, b):
            done = await notify(a, "u", "x")
            await notify(a, "u", "y")
            async with client(b, user="u") as c:
                result = await open_inbox(c, since=5, epoch="gone1234")
                assert result["reset"] is True and result["epoch"] == done["epoch"]
                assert [p["data"] for p in await pushes(c, 2)] == ["x", "y"]
            async with client(b, user="nobody") as c:  # no inbox at all: nothing is made
                result = await open_inbox(c)
                assert result == {"seq": 0, "epoch": "", "read": 0, "acked": 0}
                first = await notify(a, "nobody", 1)
                assert (await c.push())["inbox"]["seq"] == first["seq"] == 1

    run(main)


def test_collapse_keys_and_ttl_decide_what_a_returning_device_gets(
    hubs: Callable[..., Any],
) -> None:
    async def main() -> None:
        async with hubs() as (a, b):
            await notify(a, "u", "3 unread", collapse_key="badge")
            await notify(a, "u", "short-lived", ttl=0.05)
            await notify(a, "u", "4 unread", collapse_key="badge")
            await asyncio.sleep(0.1)
            async with client(b, user="u") as c:
                await open_inbox(c)
                assert [p["data"] for p in await pushes(c, 1)] == ["4 unread"]
                with pytest.raises(TimeoutError):
                    await c.push(timeout=0.3)

    run(main)


def test_batch_notify_answers_each_seq_in_order(hubs: Callable[..., Any]) -> None:
    async def main() -> None:
        async with hubs() as (a, b):
            async with client(b, user="u") as c:
                await open_inbox(c)
                batch = [{"user": "u", "data": i} for i in range(5)]
                batch.append({"user": "v", "data": "v", "id": "x"})
                status, body = await api(a, "/api/notify", {"notifications": batch})
                assert status == 200, body
                results = body["result"]["results"]
                assert [r["seq"] for r in results] == [1, 2, 3, 4, 5, 1]
                assert [p["data"] for p in await pushes(c, 5)] == [0, 1, 2, 3, 4]
                samples = await scrape(a)
                assert metric(samples, "hub_inbox_stored_total") == 6

    run(main)


def test_inbox_commands_refuse_bad_input_and_touch_only_the_users_own_inbox() -> None:
    async def main() -> None:
        async with running(make_settings(command_rate=0)) as hub:
            await notify(hub, "bob", "for bob")
            await notify(hub, "mallory", "for mallory")
            bad_seqs: list[dict[str, Any]] = [
                {},
                {"seq": "3"},
                {"seq": True},
                {"seq": -1},
                {"seq": 1.5},
                {"seq": 1 << 64},
                {"seq": [1]},
            ]
            bad_opens: list[dict[str, Any]] = [
                {"since": "0"},
                {"since": 1 << 70},
                {"epoch": 7},
                {"epoch": "x" * 65},
                {"device": ""},
                {"device": "a b"},
                {"device": "x" * 65},
                {"device": ["x"]},
            ]
            # Fewer than 10 bad commands per connection: the tenth closes it (4502).
            for op, cases in (("ack", bad_seqs), ("read", bad_seqs), ("inbox", bad_opens)):
                async with client(hub, user="mallory") as m:
                    for fields in cases:
                        assert await m.error(op, **fields) == 107, (op, fields)
            async with client(hub, user="mallory") as m:
                # Naming another user changes nothing: a connection has its own user's inbox.
                reply = await m.call("ack", seq=1, user="bob")
                assert reply["result"] == {"acked": 1}
                reply = await m.call("read", seq=1, user="bob")
                assert reply["result"] == {"read": 1}
                assert (await m.push())["inbox"]["read"] == 1
                await open_inbox(m, device="flood")
                assert seqs(await pushes(m, 1)) == [1]
                for _ in range(300):  # an ack flood: answered without a round trip each
                    await m.send({"op": "ack", "id": 1, "seq": 1 << 62})
                for _ in range(300):
                    assert "result" in await m.reply()
                assert await m.error("inbox") == 105  # opened already
                huge = await m.call("ack", seq=(1 << 63) - 1)
                assert huge["result"] == {"acked": 1}  # never past the top
            status, body = await api(hub, "/api/inbox", {"user": "bob"})
            assert status == 200
            assert (body["result"]["acked"], body["result"]["read"]) == (0, 0)
            samples = await scrape(hub)
            assert metric(samples, "hub_command_errors_total", code="107") >= 22

    run(main, timeout=40)


def test_notify_and_inbox_api_refuse_bad_input_with_a_status() -> None:
    async def main() -> None:
        async with running(make_settings(max_message_size=1024)) as hub:
            bad: list[tuple[Any, int]] = [
                ({"data": 1}, 400),
                ({"user": "", "data": 1}, 400),
                ({"user": 5, "data": 1}, 400),
                ({"user": "u"}, 400),
                ({"user": "u", "data": 1, "id": ""}, 400),
                ({"user": "u", "data": 1, "id": "x" * 201}, 400),
                ({"user": "u", "data": 1, "collapse_key": 3}, 400),
                ({"user": "u", "data": 1, "ttl": 0}, 400),
                ({"user": "u", "data": 1, "ttl": "5"}, 400),
                ({"user": "u", "data": 1, "ttl": True}, 400),
                ({"user": "u", "data": 1, "fallback_after": -1}, 400),
                ({"user": "u", "data": 1, "extra": 1}, 400),
                ({"user": "u", "data": "x" * 2000}, 413),
                ({"notifications": []}, 400),
                ({"notifications": "x"}, 400),
                ({"notifications": [{"user": "u", "data": 1}] * 1001}, 400),
                ({"notifications": [{"user": "u", "data": 1}, {"user": "u"}]}, 400),
                ({"notifications": [{"user": "u", "data": 1}], "user": "u"}, 400),
                ({"notifications": [5]}, 400),
            ]
            for body, expected in bad:
                status, answer = await api(hub, "/api/notify", body)
                assert status == expected, (body, answer)
                assert isinstance(answer["error"]["message"], str)
            for body in (
                {},
                {"user": ""},
                {"user": "u", "since": -1},
                {"user": "u", "limit": 0},
                {"user": "u", "limit": 1001},
                {"user": "u", "device": "a b"},
            ):
                status, answer = await api(hub, "/api/inbox", body)
                assert status == 400, (body, answer)
            status, body = await api(hub, "/api/inbox", {"user": "u"})
            assert status == 200 and body["result"]["entries"] == []  # nothing stored above
            samples = await scrape(hub)
            assert metric(samples, "hub_http_errors_total", status="400") >= 24

    run(main)


def test_offline_user_gets_500_in_order_on_another_hub_and_acked_ones_stay_acked(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with redis_hubs(redis_server)() as (a, b):
            batch = [{"user": "u", "data": {"n": i}} for i in range(500)]
            status, _ = await api(a, "/api/notify", {"notifications": batch})
            assert status == 200
            async with client(b, user="u") as c:
                result = await open_inbox(c, device="d")
                assert result["seq"] == 500
                got = await pushes(c, 500)
                assert [p["data"]["n"] for p in got] == list(range(500))
                assert (await c.call("ack", seq=250))["result"] == {"acked": 250}
            async with client(a, user="u") as c:
                await open_inbox(c, device="d")
                assert seqs(await pushes(c, 250)) == list(range(251, 501))
                with pytest.raises(TimeoutError):
                    await c.push(timeout=0.3)
            samples = await scrape(b)
            assert metric(samples, "hub_inbox_redelivered_total") == 500
            # the whole catch-up, over several pages and drain waits: one observation of 500
            assert metric(samples, "hub_inbox_catch_up_entries_count") == 1
            assert metric(samples, "hub_inbox_catch_up_entries_sum") == 500
            samples = await scrape(a)
            assert metric(samples, "hub_inbox_catch_up_entries_sum") == 250

    run(main, timeout=40)


def test_followers_catch_up_what_their_hub_missed_while_its_redis_link_was_cut(
    redis_server: RedisServer,
) -> None:
    """Hub b's pub/sub link is killed by Redis (CLIENT KILL): notifications stored meanwhile
    reach its client once the link is back, once each and in order."""

    async def main() -> None:
        async with redis_hubs(redis_server)() as (a, b):
            async with client(b, user="u") as c:
                await open_inbox(c)
                await notify(a, "u", 0)
                assert seqs(await pushes(c, 1)) == [1]
                admin = redis_server.client()
                admin.client_kill_filter(_type="pubsub")
                for i in range(1, 20):
                    await notify(a, "u", i)
                got = seqs(await pushes(c, 19))
                assert got == list(range(2, 21))
                with pytest.raises(TimeoutError):
                    await c.push(timeout=0.5)

    run(main, timeout=40)


def test_the_connect_option_opens_the_inbox_before_any_command(hubs: Callable[..., Any]) -> None:
    async def main() -> None:
        async with hubs() as (a, b):
            first = await notify(a, "u", "a")
            await notify(a, "u", "b")
            async with client(b, user="u", inbox="1", since="1", device="tab") as c:
                opened = await c.push()
                assert opened == {
                    "inbox": {"opened": {"seq": 2, "epoch": first["epoch"], "read": 0, "acked": 0}}
                }
                assert [p["data"] for p in await pushes(c, 1)] == ["b"]
                await notify(a, "u", "c")
                assert [p["data"] for p in await pushes(c, 1)] == ["c"]
                assert await c.error("inbox") == 105
            async with client(b, user="u", inbox="1", since="x", device="tab") as c:
                assert (await c.push())["inbox"]["error"]["code"] == 107
                assert (await c.call("ack", seq=1))["result"] == {"acked": 1}  # still usable

    run(main)


def test_the_tokens_device_claim_names_the_device_and_a_bad_one_is_refused() -> None:
    async def main() -> None:
        async with running(secure_settings(api_key=API_KEY)) as hub:
            for i in range(3):
                await notify(hub, "alice", i)
            token = mint_token("alice", SECRET, device="phone-1")
            async with client(hub, token=token) as c:
                assert (await open_inbox(c))["acked"] == 0
                assert seqs(await pushes(c, 3)) == [1, 2, 3]
                assert (await c.call("ack", seq=2))["result"] == {"acked": 2}
            status, body = await api(hub, "/api/inbox", {"user": "alice", "device": "phone-1"})
            assert status == 200 and body["result"]["acked"] == 2
            assert [e["seq"] for e in body["result"]["entries"]] == [3]
            for bad in ("", "x" * 65, 7):
                token = mint_token("alice", SECRET, device=bad)
                async with client(hub, token=token) as c:
                    code, _ = await c.closed_with()
                    assert code == 4500, bad

    run(main)


def test_hub_notify_on_the_command_line() -> None:
    import subprocess
    import sys

    async def main() -> None:
        async with running(make_settings()) as hub:
            async with client(hub, user="cli") as c:
                await open_inbox(c)
                argv = [sys.executable, "-m", "hub.cli", "notify", "cli", '{"n": 1}']
                argv += ["--id", "cli-1", "--ttl", "60", "--http", f"http://127.0.0.1:{hub.port}"]
                done = await asyncio.to_thread(
                    subprocess.run, argv, capture_output=True, text=True, timeout=30
                )
                assert done.returncode == 0, done.stderr
                answer = json.loads(done.stdout)
                assert answer["result"]["seq"] == 1 and answer["result"]["duplicate"] is False
                assert await c.push() == {
                    "inbox": {"seq": 1, "epoch": answer["result"]["epoch"], "id": "cli-1"},
                    "data": {"n": 1},
                }
                argv[-3:] = ["0", "--http", f"http://127.0.0.1:{hub.port}"]  # ttl 0: refused
                done = await asyncio.to_thread(
                    subprocess.run, argv, capture_output=True, text=True, timeout=30
                )
                assert done.returncode == 1 and "http 400" in done.stderr, done.stderr

    run(main, timeout=60)


def test_publisher_notify_sync_async_and_the_cli_through_redis(redis_server: RedisServer) -> None:
    import subprocess
    import sys

    from hub.redis.publisher import AsyncPublisher, Publisher

    async def main() -> None:
        async with running(make_settings(redis_url=redis_server.url)) as hub:
            async with client(hub, user="p") as c:
                await open_inbox(c)
                with Publisher(redis_server.url) as publisher:
                    done = await asyncio.to_thread(
                        publisher.notify, "p", {"n": 1}, id="a", collapse_key="k", ttl=60
                    )
                    assert (done.seq, done.duplicate, done.receivers) == (1, False, 1)
                    again = await asyncio.to_thread(publisher.notify, "p", {"n": 1}, id="a")
                    assert (again.seq, again.duplicate) == (1, True)
                    for bad in ({"id": ""}, {"ttl": -1}, {"fallback_after": "x"}):
                        with pytest.raises(ValueError):
                            publisher.notify("p", 1, **bad)  # type: ignore[arg-type]
                    with pytest.raises(ValueError):
                        publisher.notify("", 1)
                assert await c.push() == {
                    "inbox": {"seq": 1, "epoch": done.epoch, "id": "a"},
                    "data": {"n": 1},
                }
                async with AsyncPublisher(redis_server.url) as publisher:
                    sent = await asyncio.gather(
                        *(publisher.notify("p", {"n": n}, fallback_after=600) for n in (2, 3, 4))
                    )
                    assert [d.seq for d in sent] == [2, 3, 4]
                    with pytest.raises(ValueError):
                        await publisher.notify("p", 1, collapse_key="x" * 201)
                assert [p["data"]["n"] for p in await pushes(c, 3)] == [2, 3, 4]
                fallbacks = redis_server.client().zrange("hub:inbox:fallback", 0, -1)
                assert sorted(fallbacks) == [b"2:p", b"3:p", b"4:p"]
                argv = [sys.executable, "-m", "hub.cli", "notify", "p", "5", "--redis"]
                done_cli = await asyncio.to_thread(
                    subprocess.run,
                    [*argv, redis_server.url],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert done_cli.returncode == 0, done_cli.stderr
                assert json.loads(done_cli.stdout)["result"]["seq"] == 5
                assert (await c.push())["data"] == 5
                bad = await asyncio.to_thread(
                    subprocess.run,
                    [*argv, "redis://127.0.0.1:1"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                assert bad.returncode == 1 and "hub: notify: redis" in bad.stderr

    run(main, timeout=60)


def test_metrics_get_api_and_a_cursor_ahead_of_the_inbox(hubs: Callable[..., Any]) -> None:
    async def main() -> None:
        async with hubs() as (a, b):
            await notify(a, "m", 1, collapse_key="c")
            await notify(a, "m", 2, collapse_key="c")
            await notify(a, "m", 3, ttl=60)
            status, _, raw = await http(a, "GET", "/api/inbox?user=m&limit=5")
            assert status == 200
            page = json.loads(raw)["result"]
            assert [e["data"] for e in page["entries"]] == [2, 3] and page["seq"] == 3
            for query in ("user=m&user=n", "user=m&limit=0", "since=1", "user=m&limit=x"):
                status, _, _ = await http(a, "GET", f"/api/inbox?{query}")
                assert status == 400, query
            status, headers, _ = await http(a, "PUT", "/api/inbox")
            assert status == 405 and headers["Allow"] == "GET, POST"
            samples = await scrape(a)
            assert metric(samples, "hub_inbox_collapsed_total") == 1
            assert metric(samples, "hub_inbox_length_count") == 3
            assert metric(samples, "hub_inbox_length_sum") == 1 + 1 + 2
            async with client(b, user="m") as c:  # a cursor past the top: the inbox lost it
                result = await open_inbox(c, since=9, epoch=page["epoch"])
                assert result["reset"] is True
                assert [p["data"] for p in await pushes(c, 2)] == [2, 3]

    run(main)


def test_expired_entries_are_counted_once_by_whoever_drops_them(
    hubs: Callable[..., Any],
) -> None:
    """``hub_inbox_expired_total``: entries whose ttl passed are counted where they are first
    met, by a catch-up or an API read as by a notify's trimming, once across the hubs."""

    async def main() -> None:
        async with hubs() as (a, b):
            for n in range(3):
                await notify(a, "u", f"brief {n}", ttl=0.05)
            await notify(a, "u", "kept")
            await asyncio.sleep(0.1)
            async with client(b, user="u") as c:
                await open_inbox(c)
                assert [p["data"] for p in await pushes(c, 1)] == ["kept"]
            async with client(a, user="u") as c:  # another reader, the other hub
                await open_inbox(c)
                assert [p["data"] for p in await pushes(c, 1)] == ["kept"]
            status, _, raw = await http(a, "GET", "/api/inbox?user=u")
            assert status == 200 and len(json.loads(raw)["result"]["entries"]) == 1
            await notify(a, "u", "short", ttl=0.05)
            await asyncio.sleep(0.1)
            status, _, raw = await http(b, "GET", "/api/inbox?user=u&since=4")
            assert status == 200 and json.loads(raw)["result"]["entries"] == []
            await notify(a, "u", "after")  # its trimming finds nothing left to count
            hubs_seen = {id(h): h for h in (a, b)}.values()
            counts = [metric(await scrape(h), "hub_inbox_expired_total") for h in hubs_seen]
            assert sum(counts) == 4, counts

    run(main)


def test_publisher_notify_many_pipelines_a_batch_checked_whole(redis_server: RedisServer) -> None:
    from hub.inbox import NOTIFY_BATCH
    from hub.redis.publisher import AsyncPublisher, Publisher

    def calls() -> int:
        return int(
            redis_server.client().info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        )

    async def main() -> None:
        async with running(make_settings(redis_url=redis_server.url)) as hub:
            async with client(hub, user="b1") as one, client(hub, user="b2") as two:
                await open_inbox(one)
                await open_inbox(two)
                batch = [
                    {"user": "b1", "data": 1, "id": "x"},
                    {"user": "b2", "data": 2, "fallback_after": 600},
                    {"user": "b1", "data": 3, "collapse_key": "c", "ttl": 60},
                    {"user": "b1", "data": 4, "id": "x"},  # a retry inside the batch
                ]
                with Publisher(redis_server.url) as publisher:
                    redis_server.client().script_flush()  # NOSCRIPT: loaded, the batch again
                    done = await asyncio.to_thread(publisher.notify_many, batch)
                    assert [(d.seq, d.duplicate) for d in done] == [
                        (1, False),
                        (1, False),
                        (2, False),
                        (1, True),
                    ]
                    for bad in ([{"user": "b1"}], [{"user": "b1", "data": 1, "to": 2}], [1]):
                        with pytest.raises(ValueError):
                            publisher.notify_many(bad)
                    with pytest.raises(ValueError, match="ttl"):  # one bad item: none is sent
                        publisher.notify_many([{"user": "b1", "data": 9}, {**batch[2], "ttl": 0}])
                    assert publisher.notify_many([]) == []
                assert [p["data"] for p in await pushes(one, 2)] == [1, 3]
                assert (await two.push())["data"] == 2
                fallbacks = redis_server.client().zrange("hub:inbox:fallback", 0, -1)
                assert fallbacks == [b"1:b2"]
                before = calls()
                async with AsyncPublisher(redis_server.url) as apub:
                    sent = await apub.notify_many([{"user": "b2", "data": n} for n in range(3, 23)])
                    assert [d.seq for d in sent] == list(range(2, 22))
                    with pytest.raises(ValueError):
                        await apub.notify_many([{"user": "b2", "data": 1}, {"user": "", "data": 2}])
                # 20 notifies in one turn: script calls of NOTIFY_BATCH each; the bad batch
                # sent nothing.
                assert calls() - before == -(-20 // NOTIFY_BATCH)
                assert [p["data"] for p in await pushes(two, 20)] == list(range(3, 23))

    run(main, timeout=60)
