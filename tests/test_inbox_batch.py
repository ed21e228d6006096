"""Notifies that share a script call: ``inbox.lua``'s batch form and the queue that makes it
(:class:`hub.inbox.NotifyQueue`), against private ``redis-server``s and a private Redis Cluster.

A batch must be indistinguishable from the same notifies sent one by one, except in what it
costs: every caller gets its own result or its own error, and Redis runs fewer calls.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import redis
from test_inbox_store import envelope, redis_store, unpack
from wshelp import run

from hub.inbox import (
    NOTIFY_BATCH,
    NOTIFY_SCRIPT,
    NotifyCommands,
    RedisInbox,
    batch_args,
    notify_args,
)
from hub.redis.cluster import Router
from hub.redis.resp import pack_command
from hub.redis.wire import Names

if TYPE_CHECKING:
    from redisfix import LocalCluster, RedisServer

pytest_plugins = ["redisfix"]

#: Notifies of three users, every kind of notify, retries and collapses among them.
SEQUENCE: list[tuple[str, Any, dict[str, Any]]] = [
    ("a", 0, {}),
    ("b", 1, {"id": "n-1"}),
    ("a", 2, {"ttl": 60}),
    ("c", 3, {"collapse_key": "badge"}),
    ("b", 4, {"id": "n-1"}),  # a retry: a no-op
    ("a", 5, {"collapse_key": "badge", "ttl": 30}),
    ("c", 6, {"collapse_key": "badge"}),  # replaces 3
    ("a", 7, {}),
    ("b", 8, {"id": "n-2", "collapse_key": "k"}),
    ("a", 9, {"collapse_key": "badge"}),  # replaces 5
    ("c", 10, {}),
    ("b", 11, {"id": "n-3", "collapse_key": "k"}),  # replaces 8
    ("a", 12, {"id": "n-1"}),  # another user's id: not a retry
    ("c", 13, {"ttl": 5}),
    ("b", 14, {}),
    ("a", 15, {}),
    ("c", 16, {"id": "x"}),
    ("c", 17, {"id": "x"}),  # a retry inside the same call
    ("b", 18, {"ttl": 90}),
    ("a", 19, {}),
]


def outcome(done: Any) -> tuple[Any, ...]:
    """What a notify did, but for the epoch (each inbox draws its own)."""
    return (done.seq, done.receivers, done.duplicate, done.collapsed, done.expired, done.length)


def test_a_batch_does_what_the_same_notifies_one_by_one_do(redis_server: RedisServer) -> None:
    """The same 20 notifies to other users: awaited one by one (a call each), then made at
    once (calls of NOTIFY_BATCH): the same results, entries and pushes, in the same order."""

    async def main() -> None:
        async with redis_store(redis_server.url, 1000, 3600) as store:
            inbox, r = store.inbox, store.redis
            assert r is not None
            redis_server.reset_stats()
            alone = [
                await inbox.notify(f"one-{u}", envelope(d), **f) for u, d, f in SEQUENCE
            ]  # fmt: skip
            assert redis_server.calls("evalsha") == len(SEQUENCE)
            redis_server.reset_stats()
            made = [inbox.notify(f"many-{u}", envelope(d), **f) for u, d, f in SEQUENCE]
            together = await asyncio.gather(*made)
            assert redis_server.calls("evalsha") == -(-len(SEQUENCE) // NOTIFY_BATCH)
            assert [outcome(d) for d in together] == [outcome(d) for d in alone]
            for user in "abc":
                one, many = (
                    [(unpack(e)["data"], unpack(e)["inbox"]["seq"]) for e in page.entries]
                    for page in [
                        await inbox.read(f"{kind}-{user}", since=0) for kind in ("one", "many")
                    ]
                )
                assert many == one and one
                for kind in ("one", "many"):  # the same fields stored, times and all
                    fields = [set(f) for _, f in r.xrange(f"{{hub:user:{kind}-{user}}}:inbox")]
                    if kind == "one":
                        expected = fields
                    assert fields == expected
            pushes = await store.pushed(2 * 18)  # 2 retries push nothing
            by_kind: dict[str, list[Any]] = {"one": [], "many": []}
            for user, push in pushes:
                kind, name = user.split("-")
                by_kind[kind].append((name, push["data"], push["inbox"]["seq"]))
            assert by_kind["many"] == by_kind["one"] and len(by_kind["one"]) == 18

    run(main)


@pytest.mark.parametrize("sharded", [False, True])
def test_the_hand_packed_batch_is_the_documented_call_byte_for_byte(sharded: bool) -> None:
    """``NotifyCommands.packed_many`` packs the batch form by hand; it must be the documented
    call (docs/inbox.md): ``many``, size, inbox ttl, the flag and the layout, then each
    notify's keys in order, and its envelope, epoch candidate and (but for ``p``) id,
    collapse key and ttl, as :func:`notify_args` lays out one notify."""
    from hub import inbox as module

    names = Names("hub")
    commands = NotifyCommands(1000, 3600.0, sharded)
    group = [
        (f"hub:user:{u}".encode(), envelope(d), f.get("id"), f.get("collapse_key"), f.get("ttl"))
        for u, d, f in SEQUENCE
    ]
    candidates = [b"ep%06d" % n for n in range(len(group))]
    for _ in range(2):  # the user cache cold, then warm
        module._epochs._pool = candidates[::-1]  # handed out from the end
        packed = commands.packed_many([(*g, None) for g in group])  # type: ignore[misc]
        keys: list[Any] = []
        args: list[Any] = []
        layout = ""
        for (user, data, fields), epoch in zip(SEQUENCE, candidates, strict=True):
            one = notify_args(
                names, user, envelope(data), size=1000, inbox_ttl=3600.0, sharded=sharded,
                epoch=epoch, **fields,
            )  # fmt: skip
            count = one[0]
            keys += one[1 : 1 + count]
            env, _size, _ttl, candidate, _flag, *extra = one[1 + count :]
            args += [env, candidate, *extra]
            layout += "p" if not extra else "f" if count == 5 else "t"
        expected = pack_command(
            b"EVALSHA", NOTIFY_SCRIPT.sha_bytes, len(keys), *keys,
            "many", 1000, 3_600_000, 1 if sharded else 0, layout, *args,
        )  # fmt: skip
        assert packed == expected
        settings = {"size": 1000, "inbox_ttl": 3600.0, "sharded": sharded}
        calls = [
            notify_args(names, u, envelope(d), epoch=epoch, **settings, **f)
            for (u, d, f), epoch in zip(SEQUENCE, candidates, strict=True)
        ]
        assert pack_command(b"EVALSHA", NOTIFY_SCRIPT.sha_bytes, *batch_args(calls)) == expected
        assert commands.as_eval(packed) == pack_command(
            b"EVAL", NOTIFY_SCRIPT.text_bytes, len(keys), *keys,
            "many", 1000, 3_600_000, 1 if sharded else 0, layout, *args,
        )  # fmt: skip


def test_a_notify_redis_refuses_fails_alone_in_its_call(redis_server: RedisServer) -> None:
    """A notify to a user whose meta key is not a hash (WRONGTYPE), one with an envelope that
    is not a map, and good ones, made at once: each bad caller gets its error, with its Redis
    error code; the good ones are stored and pushed; one script call ran."""

    async def main() -> None:
        async with redis_store(redis_server.url, 100, 3600) as store:
            inbox, r = store.inbox, store.redis
            assert r is not None
            r.set("{hub:user:bad}:inbox:meta", "not a hash")
            redis_server.reset_stats()
            made = [
                inbox.notify("good", envelope(1)),
                inbox.notify("bad", envelope(2)),
                inbox.notify("good", b"\x01not a map"),
                inbox.notify("good", envelope(3), id="i"),
                inbox.notify("bad", envelope(4), id="j"),
                inbox.notify("other", envelope(5)),
            ]
            results = await asyncio.gather(*made, return_exceptions=True)
            assert redis_server.calls("evalsha") == 1
            wrongtype, refused = results[1], results[2]
            assert isinstance(wrongtype, redis.ResponseError)
            assert isinstance(results[4], redis.ResponseError)
            assert str(wrongtype).startswith("WRONGTYPE")
            assert isinstance(refused, redis.ResponseError) and "msgpack map" in str(refused)
            assert [(d.seq, d.duplicate) for d in (results[0], results[3], results[5])] == [
                (1, False),
                (2, False),
                (1, False),
            ]
            pushes = await store.pushed(3)
            assert [(u, p["data"]) for u, p in pushes] == [("good", 1), ("good", 3), ("other", 5)]
            assert r.get("{hub:user:bad}:inbox:meta") == b"not a hash"
            assert not r.exists("{hub:user:bad}:inbox")

    run(main)


def test_a_batch_laid_out_wrongly_is_refused_before_anything_is_written(
    redis_server: RedisServer,
) -> None:
    """Abuse of the batch form from another language: unknown layout letters, or keys and
    arguments that do not add up to the layout, get a clear error and write nothing."""
    r = redis_server.client()
    env = msgpack.packb({"data": 1})
    two = ["{hub:user:x}:inbox", "{hub:user:x}:inbox:meta"]
    wrong = [
        (two, ["many", 10, 60000, 0, "q", env, "e1"], "letters"),
        (two, ["many", 10, 60000, 0, "pp", env, "e1"], "keys and arguments"),
        (two, ["many", 10, 60000, 0, "p", env, "e1", "extra"], "keys and arguments"),
        (two, ["many", 10, 60000, 0, "f", env, "e1", "i", "", 0], "keys and arguments"),
        (two * 2, ["many", 10, 60000, 0, "p", env, "e1"], "keys and arguments"),
        (two, ["many", 10, 60000, 0, "p" * 10_000, env, "e1"], "keys and arguments"),
    ]
    for keys, args, why in wrong:
        with pytest.raises(redis.ResponseError, match=why):
            r.eval(NOTIFY_SCRIPT.text, len(keys), *keys, *args)
    assert r.dbsize() == 0
    # An empty batch is a no-op, and a good one after all that works.
    assert r.eval(NOTIFY_SCRIPT.text, 0, "many", 10, 60000, 0, "") == []
    reply = r.eval(NOTIFY_SCRIPT.text, 2, *two, "many", 10, 60000, 0, "p", env, "e1")
    assert reply == [[1, b"e1", 0, 0, 0, 0, 1]]


def test_a_batch_to_a_redis_without_the_script_is_sent_again_as_eval(
    redis_server: RedisServer,
) -> None:
    """NOSCRIPT (a fresh or flushed Redis: nothing ran) makes the queue send the same batch
    as EVAL; every notify of it runs once."""

    async def main() -> None:
        async with redis_store(redis_server.url, 100, 3600) as store:
            inbox = store.inbox
            await inbox.notify("u", envelope("warm"))
            redis_server.client().script_flush()
            done = await asyncio.gather(*(inbox.notify("u", envelope(n)) for n in range(12)))
            assert [d.seq for d in done] == list(range(2, 14))
            page = await inbox.read("u", since=0)
            assert [unpack(e)["data"] for e in page.entries] == ["warm", *range(12)]

    run(main)


def test_a_caller_cancelled_while_queued_leaves_the_others_alone(
    redis_server: RedisServer,
) -> None:
    """A caller that gives up (cancelled) before its call came back: its notify may still
    run, as a single notify's may, and every other caller of the call gets its result."""

    async def main() -> None:
        async with redis_store(redis_server.url, 100, 3600) as store:
            inbox = store.inbox
            tasks = [asyncio.create_task(inbox.notify("u", envelope(n))) for n in range(6)]
            await asyncio.sleep(0)  # queued, not sent yet
            tasks[2].cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            assert isinstance(done[2], asyncio.CancelledError)
            assert [d.seq for i, d in enumerate(done) if i != 2] == [1, 2, 4, 5, 6]

    run(main)


def test_a_flood_of_notifies_shares_calls_and_loses_nothing(redis_server: RedisServer) -> None:
    """5,000 notifies to 50 users made at once, through the async publisher: every one
    stored once, in order per user, in about 5,000 / NOTIFY_BATCH script calls."""
    from hub.redis.publisher import AsyncPublisher

    async def main() -> None:
        async with AsyncPublisher(redis_server.url) as publisher:
            redis_server.reset_stats()
            made = [publisher.notify(f"f{n % 50}", {"n": n}) for n in range(5000)]
            done = await asyncio.gather(*made)
            assert redis_server.calls("evalsha") == 5000 // NOTIFY_BATCH
            for user in range(50):
                assert [d.seq for d in done[user::50]] == list(range(1, 101))
        router = Router.from_url(redis_server.url)
        inbox = RedisInbox(router)
        try:
            page = await inbox.read("f7", since=0, limit=200)
            assert [unpack(e)["data"]["n"] for e in page.entries] == list(range(7, 5000, 50))
        finally:
            await router.close()

    run(main, timeout=60)


def test_on_a_cluster_only_notifies_of_one_user_share_a_call(redis_cluster: LocalCluster) -> None:
    """A script's keys must share a slot: on a cluster the queue batches per user, and many
    users notified at once each get theirs, on their own shard."""

    async def main() -> None:
        router = Router.from_url(redis_cluster.url)
        inbox = RedisInbox(router, size=100, ttl=60)
        users = [f"user{n}" for n in range(12)]
        try:
            made = [inbox.notify(u, envelope(i), id=f"n{i}") for i in range(3) for u in users]
            done = await asyncio.gather(*made)
            assert [d.seq for d in done] == [i + 1 for i in range(3) for _ in users]
            for user in users:
                page = await inbox.read(user, since=0)
                assert [unpack(e)["data"] for e in page.entries] == [0, 1, 2]
        finally:
            await router.close()

    run(main)


def test_the_sync_publishers_batch_sends_script_calls_and_raises_what_redis_refused(
    redis_server: RedisServer,
) -> None:
    """``Publisher.notify_many`` sends the batch form, NOTIFY_BATCH notifies a call, in one
    round trip: all of them run, and the first that Redis refused is raised. Notifies with
    other inbox settings cannot share a call."""
    from hub.redis.publisher import Publisher

    r = redis_server.client()
    r.set("{hub:user:bad}:inbox:meta", "not a hash")
    r.script_load(NOTIFY_SCRIPT.text)  # no NOSCRIPT round first: the calls counted are these
    batch = [{"user": "bad" if n == 11 else "s", "data": n} for n in range(20)]
    with Publisher(redis_server.url) as publisher:
        redis_server.reset_stats()
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            publisher.notify_many(batch)
        assert redis_server.calls("evalsha") == -(-20 // NOTIFY_BATCH)
        done = publisher.notify_many([{"user": "s", "data": "after"}])
        assert done[0].seq == 20  # the 19 good ones all ran
    with pytest.raises(ValueError, match="inbox settings"):
        batch_args([notify_args(Names("hub"), "s", envelope(1), size=n) for n in (1, 2)])
