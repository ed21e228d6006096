"""The inbox stores on their own: one semantic suite run against the memory store and against a
private ``redis-server`` (and a private Redis Cluster for the slot layout), with real pub/sub
subscribers checking what the notify script pushes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
import redis
from wshelp import run

from hub.inbox import MAX_DEVICES, Inbox, MemoryInbox, RedisInbox
from hub.redis.cluster import Router

if TYPE_CHECKING:
    from redisfix import LocalCluster, RedisServer

pytest_plugins = ["redisfix"]

ENVELOPE = msgpack.packb({"data": {"unread": 1}})
#: Alice's inbox stream and meta keys, which the Redis-only tests look into.
STREAM, META = "{hub:user:alice}:inbox", "{hub:user:alice}:inbox:meta"


def envelope(data: Any) -> bytes:
    return msgpack.packb({"data": data}, use_bin_type=True)


def unpack(push: bytes) -> dict[str, Any]:
    """A push as docs/inbox.md describes it: a plain notify's ``\\xc1<seq>-0 <epoch> `` then
    the envelope, or a msgpack map with ``inbox`` (a notify with an id, the memory store)."""
    if push[:1] == b"\xc1":
        sid, epoch, envelope = push[1:].split(b" ", 2)
        assert sid.endswith(b"-0"), push
        fields = msgpack.unpackb(envelope, raw=False)
        assert "inbox" not in fields, push
        return {**fields, "inbox": {"seq": int(sid[:-2]), "epoch": epoch.decode()}}
    return msgpack.unpackb(push, raw=False)


class Store:
    """One store under test, with what it pushed to users (as a subscriber would see it)."""

    def __init__(self, inbox: Inbox, pushes: list[tuple[str, dict[str, Any]]]) -> None:
        self.inbox = inbox
        self.pushes = pushes
        self.redis: redis.Redis | None = None

    async def pushed(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        """Wait until ``count`` pushes arrived (Redis pub/sub is asynchronous)."""
        deadline = time.monotonic() + 5
        while len(self.pushes) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.pushes


@asynccontextmanager
async def memory_store(size: int, ttl: float) -> AsyncIterator[Store]:
    pushes: list[tuple[str, dict[str, Any]]] = []

    def publish(user: str, push: bytes) -> int:
        pushes.append((user, unpack(push)))
        return 1

    yield Store(MemoryInbox(size, ttl, publish=publish), pushes)


@asynccontextmanager
async def redis_store(url: str, size: int, ttl: float) -> AsyncIterator[Store]:
    """A RedisInbox on ``url`` with a redis-py subscriber of every user's channel."""
    import redis.asyncio as aredis

    pushes: list[tuple[str, dict[str, Any]]] = []
    sub = aredis.Redis.from_url(url)
    pubsub = sub.pubsub()
    await pubsub.psubscribe("hub:user:*")

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage":
                user = message["channel"].decode().removeprefix("hub:user:")
                pushes.append((user, unpack(message["data"])))

    listener = asyncio.create_task(listen())
    router = Router.from_url(url)
    store = Store(RedisInbox(router, size=size, ttl=ttl), pushes)
    store.redis = redis.Redis.from_url(url)
    try:
        yield store
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await pubsub.aclose()
        await sub.aclose()
        await router.close()
        store.redis.close()


Body = Callable[[Store], Coroutine[Any, Any, None]]


@pytest.fixture(params=["memory", "redis"])
def check(request: pytest.FixtureRequest, tmp_path: Any) -> Callable[..., None]:
    """``check(body, size=, ttl=)`` runs ``body(store)`` against the parametrized store."""

    def runner(body: Body, size: int = 1000, ttl: float = 3600.0) -> None:
        if request.param == "memory":
            opened = memory_store(size, ttl)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            opened = redis_store(server.url, size, ttl)

        async def main() -> None:
            async with opened as store:
                await body(store)

        run(main)

    return runner


def test_notify_numbers_stores_and_pushes_in_order(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        first = await inbox.notify("alice", envelope("a"), id="n-1")
        second = await inbox.notify("alice", envelope("b"))
        assert (first.seq, second.seq) == (1, 2)
        assert first.epoch == second.epoch and len(first.epoch) == 8
        assert not first.duplicate
        pushes = await store.pushed(2)
        assert pushes == [
            ("alice", {"data": "a", "inbox": {"seq": 1, "epoch": first.epoch, "id": "n-1"}}),
            ("alice", {"data": "b", "inbox": {"seq": 2, "epoch": first.epoch}}),
        ]
        page = await inbox.read("alice")
        assert [unpack(e) for e in page.entries] == [p for _, p in pushes]
        assert (page.top, page.epoch, page.last, page.complete) == (2, first.epoch, 2, True)
        after = await inbox.read("alice", since=1)
        assert [unpack(e)["data"] for e in after.entries] == ["b"]
        # Another user's inbox is its own, with its own numbering.
        assert (await inbox.notify("bob", envelope("c"))).seq == 1

    check(body)


def test_a_known_id_is_a_no_op(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        first = await inbox.notify("alice", envelope("once"), id="order-7")
        again = await inbox.notify("alice", envelope("twice"), id="order-7")
        assert again.duplicate and again.seq == first.seq and again.receivers == 0
        page = await inbox.read("alice")
        assert [unpack(e)["data"] for e in page.entries] == ["once"]
        await inbox.notify("alice", envelope("later"))
        assert len(await store.pushed(2)) == 2  # the retry pushed nothing
        await asyncio.sleep(0.05)
        assert [p["data"] for _, p in store.pushes] == ["once", "later"]

    check(body)


def test_a_collapse_key_keeps_only_the_newest(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        await inbox.notify("alice", envelope("3 unread"), id="u3", collapse_key="badge")
        await inbox.notify("alice", envelope("hello"))
        newest = await inbox.notify("alice", envelope("4 unread"), id="u4", collapse_key="badge")
        page = await inbox.read("alice")
        assert [unpack(e)["data"] for e in page.entries] == ["hello", "4 unread"]
        assert page.top == newest.seq == 3
        # A retry of the replaced notify does not bring "3 unread" back.
        assert (await inbox.notify("alice", envelope("3 unread"), id="u3")).duplicate
        page = await inbox.read("alice")
        assert [unpack(e)["data"] for e in page.entries] == ["hello", "4 unread"]

    check(body)


def test_expired_entries_are_never_delivered(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        await inbox.notify("alice", envelope("short"), ttl=0.2)
        await inbox.notify("alice", envelope("long"))
        page = await inbox.read("alice")
        assert [unpack(e)["data"] for e in page.entries] == ["short", "long"]
        await asyncio.sleep(0.3)
        page = await inbox.read("alice")
        assert [unpack(e)["data"] for e in page.entries] == ["long"]
        assert (page.last, page.top) == (2, 2)

    check(body)


def test_size_and_age_bound_the_inbox(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        for n in range(8):
            await inbox.notify("alice", envelope(n))
        page = await inbox.read("alice", since=0)
        assert [unpack(e)["data"] for e in page.entries] == [3, 4, 5, 6, 7]
        # Paging: two at a time, from the oldest kept.
        first = await inbox.read("alice", since=0, limit=2)
        assert [unpack(e)["data"] for e in first.entries] == [3, 4] and not first.complete
        rest = await inbox.read("alice", since=first.last, limit=10)
        assert [unpack(e)["data"] for e in rest.entries] == [5, 6, 7] and rest.complete

    check(body, size=5)


def test_the_whole_inbox_expires_and_comes_back_with_a_new_epoch(
    check: Callable[..., None],
) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        old = await inbox.notify("alice", envelope("old"))
        await asyncio.sleep(0.6)
        page = await inbox.read("alice")
        assert (page.top, page.epoch, page.entries) == (0, "", [])
        new = await inbox.notify("alice", envelope("new"))
        assert new.seq == 1 and new.epoch != old.epoch

    check(body, ttl=0.5)


def test_acks_are_per_device(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        for n in range(1, 6):
            await inbox.notify("alice", envelope(n))
        assert await inbox.ack("alice", "desktop", 3) == 3
        assert await inbox.ack("alice", "desktop", 2) == 3  # cumulative: never moves back
        desktop = await inbox.read("alice", device="desktop")
        assert desktop.acked == 3
        assert [unpack(e)["data"] for e in desktop.entries] == [4, 5]
        phone = await inbox.read("alice", device="phone")  # offline all along: gets all five
        assert phone.acked == 0
        assert [unpack(e)["data"] for e in phone.entries] == [1, 2, 3, 4, 5]
        assert await inbox.ack("alice", "phone", 10**9) == 5  # never past the top
        assert await inbox.ack("nobody", "phone", 3) == 0  # no inbox: nothing is created

    check(body)


def test_the_read_cursor_is_pushed_to_every_connection(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        first = await inbox.notify("alice", envelope(1))
        await inbox.notify("alice", envelope(2))
        assert await inbox.mark_read("alice", 1) == 1
        assert await inbox.mark_read("alice", 0) == 1  # never back, and no second push
        assert await inbox.mark_read("alice", 99) == 2
        pushes = await store.pushed(4)
        await asyncio.sleep(0.05)
        reads = [p for _, p in pushes if "data" not in p]
        assert reads == [
            {"inbox": {"read": 1, "epoch": first.epoch}},
            {"inbox": {"read": 2, "epoch": first.epoch}},
        ]
        assert (await inbox.read("alice")).read == 2

    check(body)


def test_fallbacks_are_claimed_once_and_only_when_unacknowledged(
    check: Callable[..., None],
) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        for n in range(1, 4):
            await inbox.notify("alice", envelope(n))
        now = time.time()
        for seq in (1, 2, 3):
            await inbox.schedule_fallback("alice", seq, now - 1 if seq < 3 else now + 60)
        await inbox.ack("alice", "phone", 1)
        claimed = await inbox.claim_due()
        assert [(d.user, d.seq) for d in claimed] == [("alice", 2)]
        assert claimed[0].push is not None and unpack(claimed[0].push)["data"] == 2
        assert await inbox.claim_due() == []  # taken: never handed out twice
        later = await inbox.claim_due(now=now + 61)
        assert [(d.user, d.seq) for d in later] == [("alice", 3)]

    check(body)


def test_a_hostile_envelope_or_device_flood_is_refused_or_bounded(
    check: Callable[..., None],
) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        with pytest.raises(Exception, match="msgpack map"):
            await inbox.notify("alice", msgpack.packb([1, 2, 3]))
        await inbox.notify("alice", envelope("x"))
        for n in range(MAX_DEVICES + 20):
            await inbox.ack("alice", f"device-{n}", 1)
        if store.redis is not None:
            assert store.redis.hlen("{hub:user:alice}:inbox:acks") <= MAX_DEVICES

    check(body)


def test_reads_of_unknown_users_create_nothing_and_every_key_expires(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with redis_store(redis_server.url, 10, 3600) as store:
            inbox = store.inbox
            assert store.redis is not None
            for n in range(200):
                await inbox.read(f"stranger-{n}", since=0)
                await inbox.read(f"stranger-{n}", device="d")
                await inbox.mark_read(f"stranger-{n}", 5)
            assert store.redis.dbsize() == 0
            for n in range(30):
                await inbox.notify("alice", envelope(n), id=f"id-{n}", collapse_key=f"k{n % 3}")
            await inbox.ack("alice", "phone", 3)
            await inbox.mark_read("alice", 2)
            await inbox.schedule_fallback("alice", 30, time.time() + 60)
            keys = store.redis.keys("*")
            assert len(keys) == 7
            for key in keys:
                assert 0 < store.redis.pttl(key) <= 3600_000, key

    run(main)


def test_the_inbox_ttl_is_renewed_once_per_slack_and_never_cut_short(
    redis_server: RedisServer,
) -> None:
    """A notify sets the stream's and meta's TTL to ``inbox_ttl`` + 1/64 and later notifies
    leave it until that 1/64 has gone by, so the inbox lives between ``inbox_ttl`` and 1/64
    longer past the last notify; an ack or a read sets it to ``inbox_ttl`` and the next notify
    renews it again, so it is never shorter than ``inbox_ttl`` past any of them."""
    ttl_ms, slack_ms = 6400, 100

    async def main() -> None:
        async with redis_store(redis_server.url, 10, ttl_ms / 1000) as store:
            inbox, r, stream, meta = store.inbox, store.redis, STREAM, META
            assert r is not None

            def ttls() -> list[int]:
                return [r.pttl(stream), r.pttl(meta)]

            await inbox.notify("alice", envelope(1))
            assert all(ttl_ms < t <= ttl_ms + slack_ms for t in ttls())
            await asyncio.sleep(0.05)
            await inbox.notify("alice", envelope(2))  # within the slack: not renewed
            assert all(t <= ttl_ms + slack_ms - 40 for t in ttls())
            assert all(t > ttl_ms - 40 for t in ttls())  # still past inbox_ttl of the notify
            await asyncio.sleep(0.1)
            await inbox.notify("alice", envelope(3))  # the slack has gone by: renewed
            assert all(ttl_ms + slack_ms - 20 < t <= ttl_ms + slack_ms for t in ttls())
            await inbox.ack("alice", "phone", 1)
            assert all(ttl_ms - 20 < t <= ttl_ms for t in ttls())
            await inbox.notify("alice", envelope(4))  # after an ack: renewed at once
            assert all(ttl_ms < t <= ttl_ms + slack_ms for t in ttls())
            await inbox.mark_read("alice", 2)
            await inbox.notify("alice", envelope(5))  # after a read too
            assert all(ttl_ms < t <= ttl_ms + slack_ms for t in ttls())
            page = await inbox.read("alice", since=0)
            assert [unpack(e)["data"] for e in page.entries] == [1, 2, 3, 4, 5]

    run(main)


def test_a_forged_renewed_mark_cannot_hold_off_the_ttl(redis_server: RedisServer) -> None:
    """Meta ``next`` is read back by every notify, and ``renewed`` when next has come: garbage,
    a time in the future or a negative one in them (someone else writing the hash) makes the
    notify renew the TTL, never skip it, and the notify still stores and pushes."""
    ttl_ms, slack_ms = 6400, 100

    async def main() -> None:
        async with redis_store(redis_server.url, 10, ttl_ms / 1000) as store:
            inbox, r, stream, meta = store.inbox, store.redis, STREAM, META
            assert r is not None
            await inbox.notify("alice", envelope(0))
            for n, forged in enumerate((b"garbage", b"", b"1e300", b"-5", b"99999999999999"), 1):
                r.hset(meta, mapping={"next": forged, "renewed": forged})
                r.pexpire(stream, 1000)
                r.pexpire(meta, 1000)
                done = await inbox.notify("alice", envelope(n))
                assert done.seq == n + 1
                assert all(ttl_ms < r.pttl(k) <= ttl_ms + slack_ms for k in (stream, meta)), forged
            page = await inbox.read("alice", since=0)
            assert [unpack(e)["data"] for e in page.entries] == list(range(6))
            assert len(await store.pushed(6)) == 6

    run(main)


def test_meta_next_holds_off_the_slow_path_but_not_an_earlier_expiry(
    redis_server: RedisServer,
) -> None:
    """A notify reads meta ``due`` and ``renewed`` only once ``next`` has come (the earlier of
    the two deadlines, never past now + 1/64 of the inbox TTL). An entry whose ttl ends before
    ``next`` brings both ``due`` and ``next`` forward to its end; one ending after ``next`` but
    before ``due`` brings ``due`` forward only; and the notify after ``next`` renews."""
    ttl_ms, slack_ms = 64_000, 1000

    async def main() -> None:
        async with redis_store(redis_server.url, 10, ttl_ms / 1000) as store:
            inbox, r, stream, meta = store.inbox, store.redis, STREAM, META
            assert r is not None

            def fields() -> dict[str, int]:
                got = r.hmget(meta, "due", "renewed", "next")
                return dict(zip(("due", "renewed", "next"), map(int, got), strict=True))

            def expiry(index: int) -> int:
                return int(r.xrange(stream)[index][1][b"x"])

            await inbox.notify("alice", envelope("plain"))
            start = fields()
            assert start["next"] == start["renewed"] + slack_ms
            assert start["due"] > start["next"]
            await inbox.notify("alice", envelope("later"), ttl=2)  # after next, before due
            later = fields()
            assert later["due"] == expiry(1) and later["next"] == start["next"]
            await inbox.notify("alice", envelope("soon"), ttl=0.01)  # before next
            soon = fields()
            assert soon["due"] == soon["next"] == expiry(2) < start["next"]
            await asyncio.sleep(0.05)
            await inbox.notify("alice", envelope("after"))  # next has come: the head looked at
            after = fields()
            assert after["renewed"] == start["renewed"]  # within the slack: not renewed
            assert after["due"] == int(r.xrange(stream)[0][1][b"t"]) + ttl_ms  # the head lives
            assert after["next"] == after["renewed"] + slack_ms
            await asyncio.sleep((after["next"] - int(time.time() * 1000) + 20) / 1000)
            r.pexpire(stream, 5000)
            await inbox.notify("alice", envelope("renewed"))  # the slack has gone by
            last = fields()
            assert last["renewed"] > start["renewed"] and r.pttl(stream) > ttl_ms
            assert last["next"] == min(last["due"], last["renewed"] + slack_ms)

    run(main)


def test_a_user_lives_on_one_cluster_shard(redis_cluster: LocalCluster) -> None:
    """Every key of a user is in the slot of the user's pub/sub name, so the scripts run (no
    CROSSSLOT) and SPUBLISH reaches that shard's subscribers."""

    async def main() -> None:
        router = Router.from_url(redis_cluster.url)
        inbox = RedisInbox(router, size=10, ttl=60)
        try:
            for user in ("alice", "bob", "carol", "dave"):
                sent = await inbox.notify(user, envelope(user), id="x", collapse_key="k")
                assert sent.seq == 1
                await inbox.ack(user, "phone", 1)
                await inbox.mark_read(user, 1)
                page = await inbox.read(user, since=0)
                assert [unpack(e)["data"] for e in page.entries] == [user]
                await inbox.schedule_fallback(user, 1, time.time() - 1)
            assert await inbox.claim_due() == []  # all acknowledged
        finally:
            await router.close()

    run(main)


def test_two_processes_never_claim_the_same_fallback(redis_server: RedisServer) -> None:
    async def main() -> None:
        routers = [Router.from_url(redis_server.url) for _ in range(2)]
        inboxes = [RedisInbox(r, size=1000, ttl=3600) for r in routers]
        try:
            for n in range(300):
                await inboxes[0].notify(f"u{n % 30}", envelope(n))
            now = time.time()
            for n in range(30):
                for seq in range(1, 11):
                    await inboxes[0].schedule_fallback(f"u{n}", seq, now - 1)

            async def drain(inbox: RedisInbox) -> list[tuple[str, int]]:
                got: list[tuple[str, int]] = []
                while batch := await inbox.claim_due(limit=7):
                    got += [(d.user, d.seq) for d in batch]
                return got

            a, b = await asyncio.gather(drain(inboxes[0]), drain(inboxes[1]))
            assert not set(a) & set(b)
            assert len(a) + len(b) == 300
        finally:
            for router in routers:
                await router.close()

    run(main)


def test_notify_reports_collapses_expiries_and_the_inbox_length(check: Callable[..., None]) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        first = await inbox.notify("alice", envelope("soon gone"), ttl=0.05)
        assert (first.collapsed, first.expired, first.length) == (False, 0, 1)
        badge = await inbox.notify("alice", envelope("3 unread"), collapse_key="badge")
        assert (badge.collapsed, badge.length) == (False, 2)
        await asyncio.sleep(0.1)  # the first one's ttl passes
        again = await inbox.notify("alice", envelope("4 unread"), collapse_key="badge")
        assert (again.collapsed, again.expired, again.length) == (True, 1, 1)
        known = await inbox.notify("alice", envelope("x"), id="k")
        dup = await inbox.notify("alice", envelope("x"), id="k")
        assert dup.duplicate and dup.length == known.length == 2

    check(body)


def test_a_read_drops_the_expired_entries_it_meets_and_counts_each_once(
    check: Callable[..., None],
) -> None:
    async def body(store: Store) -> None:
        inbox = store.inbox
        await inbox.notify("alice", envelope("kept"))
        await inbox.notify("alice", envelope("badge 1"), collapse_key="badge", ttl=0.05)
        await inbox.notify("alice", envelope("soon gone"), ttl=0.05)
        await inbox.notify("alice", envelope("last"))
        await asyncio.sleep(0.1)  # the ttl of entries 2 and 3 passes
        past = await inbox.read("alice", since=2)  # meets entry 3 only
        assert [unpack(e)["data"] for e in past.entries] == ["last"] and past.expired == 1
        first = await inbox.read("alice", since=0)
        assert [unpack(e)["data"] for e in first.entries] == ["kept", "last"]
        assert first.expired == 1 and first.last == 4  # entry 2; entry 3 was dropped already
        again = await inbox.read("alice", since=0, device="phone")
        assert again.expired == 0 and len(again.entries) == 2  # another reader: nothing again
        # The expired entry's collapse key was forgotten with it: nothing left to replace.
        badge = await inbox.notify("alice", envelope("badge 2"), collapse_key="badge")
        assert (badge.collapsed, badge.expired, badge.length) == (False, 0, 3)

    check(body)


def test_a_stored_entry_keeps_its_times_as_integer_milliseconds(
    redis_server: RedisServer,
) -> None:
    """Each stream entry holds ``t`` (ms stored, Redis's clock) and, with a ttl, ``x`` (ms it
    expires) as plain integers, whatever the script passes them as; an entry without a ttl has
    no ``x``; and the stream is cut by the size it was given (whole nodes: at most one node of
    100 more)."""

    async def main() -> None:
        async with redis_store(redis_server.url, 150, 3600) as store:
            inbox, r = store.inbox, store.redis
            assert r is not None
            stream = "{hub:user:alice}:inbox"
            before = int(time.time() * 1000) - 5
            await inbox.notify("alice", envelope("forever"))
            await inbox.notify("alice", envelope("short"), ttl=2.5)
            after = int(time.time() * 1000) + 5
            (_, plain), (_, timed) = r.xrange(stream)
            assert set(plain) == {b"e", b"t"} and set(timed) == {b"e", b"t", b"x"}
            assert timed[b"x"].isdigit()
            for fields in (plain, timed):
                assert fields[b"t"].isdigit() and before <= int(fields[b"t"]) <= after
            assert int(timed[b"x"]) == int(timed[b"t"]) + 2500
            for n in range(400):
                await inbox.notify("alice", envelope(n))
            assert 150 <= r.xlen(stream) <= 250

    run(main)


def test_the_script_takes_two_keys_and_five_arguments_unless_the_notify_names_more(
    redis_server: RedisServer,
) -> None:
    """The documented layout from another language's point of view: a plain notify is 2 keys
    and 5 arguments, the channel taken from the stream's name; an id or a collapse key needs
    the 5 keys; a call laid out wrongly (too few keys, the older 9-argument layout, no size) is
    refused with a clear error before it writes anything."""
    from hub.inbox import NOTIFY_SCRIPT

    r = redis.Redis.from_url(redis_server.url)
    script = r.register_script(NOTIFY_SCRIPT.text)
    base = "{hub:user:carol}:inbox"
    keys2 = [base, base + ":meta"]
    keys5 = [*keys2, base + ":ids", base + ":idt", base + ":keys"]
    pubsub = r.pubsub()
    pubsub.subscribe("hub:user:carol")
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"
    try:
        reply = script(keys2, [envelope("plain"), 10, 60_000, "ep0ch-01", 0])
        assert reply == [1, b"ep0ch-01", 1, 0, 0, 0, 1]
        push = pubsub.get_message(timeout=1)
        assert push["channel"] == b"hub:user:carol"
        assert unpack(push["data"]) == {"data": "plain", "inbox": {"seq": 1, "epoch": "ep0ch-01"}}
        script(keys2, [envelope("timed"), 10, 60_000, "other", 0, "", "", 5_000])
        assert [set(f) for _, f in r.xrange(base)] == [{b"e", b"t"}, {b"e", b"t", b"x"}]
        assert script(keys5, [envelope("i"), 10, 60_000, "x", 0, "n-1", "badge"])[0] == 3
        assert script(keys5, [envelope("i"), 10, 60_000, "x", 0, "n-1", "badge"])[3] == 1

        wrong = [
            (keys2, [envelope("no keys"), 10, 60_000, "x", 0, "n-2"], "needs 5 keys"),
            (keys2, [envelope("no keys"), 10, 60_000, "x", 0, "", "badge"], "needs 5 keys"),
            (keys5, ["hub:user:carol", envelope("old"), "", "", 0, 10, 60_000, "x", 0], "map"),
            (keys2, [envelope("no size"), "", 60_000, "x", 0], "integers"),
            (keys2, [envelope("short")], "integers"),
            (keys2, [], "map"),
        ]
        for keys, args, why in wrong:
            with pytest.raises(redis.ResponseError, match=why):
                script(keys, args)
        assert r.hget(base + ":meta", "seq") == b"3" and r.xlen(base) == 3
    finally:
        pubsub.close()
        r.close()


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize(
    "fields",
    [{}, {"id": "n-1"}, {"collapse_key": "badge"}, {"ttl": 2.5}, {"id": "é", "collapse_key": "k"}],
)
def test_the_hand_packed_notify_is_the_documented_call_byte_for_byte(
    fields: dict[str, Any], sharded: bool
) -> None:
    """``NotifyCommands`` packs a notify's ``EVALSHA`` by hand (a hot path); it must be what the
    general packer makes of ``notify_args`` (the documented keys and arguments), for every kind
    of notify and for a cluster, with the user cache cold and warm."""
    from hub.inbox import NOTIFY_SCRIPT, NotifyCommands, notify_args
    from hub.redis.resp import pack_command
    from hub.redis.wire import Names

    commands = NotifyCommands(1000, 3600.0, sharded)
    for _ in range(2):
        packed, epoch = commands.packed(b"hub:user:carol", ENVELOPE, **fields)
        args = notify_args(
            Names("hub"), "carol", ENVELOPE, size=1000, inbox_ttl=3600.0, sharded=sharded,
            epoch=epoch, **fields,
        )  # fmt: skip
        assert packed == pack_command(b"EVALSHA", NOTIFY_SCRIPT.sha_bytes, *args)


def test_ids_of_a_lost_epoch_are_swept_by_the_first_notify_that_names_one(
    redis_server: RedisServer,
) -> None:
    """A plain notify that finds no meta starts a new epoch without the id and collapse-key
    keys (it does not declare them); ids and keys left from the lost epoch then must not make
    a new notify look like a retry, or collapse an entry that is not there."""

    async def main() -> None:
        async with redis_store(redis_server.url, 100, 3600) as store:
            inbox, r = store.inbox, store.redis
            assert r is not None
            base = "{hub:user:dave}:inbox"
            first = await inbox.notify("dave", envelope("a"), id="n-1", collapse_key="k")
            r.delete(base + ":meta")  # evicted, say; ids and keys stay
            second = await inbox.notify("dave", envelope("b"))
            assert second.epoch != first.epoch and second.seq == 1
            third = await inbox.notify("dave", envelope("c"), id="n-1", collapse_key="k")
            assert (third.seq, third.duplicate, third.collapsed) == (2, False, False)
            assert r.hgetall(base + ":ids") == {b"n-1": b"2"}
            assert not r.hexists(base + ":meta", "sweep")
            fourth = await inbox.notify("dave", envelope("d"), id="n-1")
            assert (fourth.seq, fourth.duplicate) == (2, True)

    run(main)


def test_trimming_by_stream_nodes_never_shows_more_than_the_size(
    redis_server: RedisServer,
) -> None:
    """The notify trims whole stream nodes, so the stream may hold a few more entries than the
    size: reads, catch-up pages and fallbacks see only the newest ``size``."""

    async def main() -> None:
        async with redis_store(redis_server.url, 5, 3600) as store:
            inbox = store.inbox
            assert store.redis is not None
            for n in range(300):
                await inbox.notify("alice", envelope(n), collapse_key=f"k{n}")
            assert store.redis.xlen("{hub:user:alice}:inbox") >= 5
            page = await inbox.read("alice", since=0)
            assert [unpack(e)["data"] for e in page.entries] == [295, 296, 297, 298, 299]
            first = await inbox.read("alice", since=0, limit=2)
            assert [unpack(e)["data"] for e in first.entries] == [295, 296]
            oldest = int(store.redis.xrange("{hub:user:alice}:inbox", count=1)[0][0].split(b"-")[0])
            await inbox.schedule_fallback("alice", oldest, time.time() - 1)
            await inbox.schedule_fallback("alice", 300, time.time() - 1)
            due = {d.seq: d.push for d in await inbox.claim_due()}
            assert due.keys() == {oldest, 300}
            assert (oldest == 296) == (due[oldest] is not None)  # kept only if in the newest 5
            assert due[300] is not None and unpack(due[300])["data"] == 299
            # Collapse keys of trimmed entries are forgotten past twice the size (plus a node).
            assert store.redis.hlen("{hub:user:alice}:inbox:keys") <= 2 * 5 + 256 + 1

    run(main)


def test_a_signing_store_signs_its_pushes_and_opens_only_signed_entries(
    redis_server: RedisServer,
) -> None:
    from hub.errors import BadSignature
    from hub.redis.wire import seal

    key = b"k" * 32

    async def main() -> None:
        router = Router.from_url(redis_server.url)
        inbox = RedisInbox(router, size=10, ttl=60, signing_key=key)
        try:
            done = await inbox.notify("alice", envelope("signed"), id="i")
            (raw,) = (await inbox.read("alice")).entries
            assert raw[0] == 0x93  # [envelope, mac, {"inbox": ...}]
            opened = inbox.open("alice", raw)
            assert opened == {"data": "signed", "inbox": {"seq": 1, "epoch": done.epoch, "id": "i"}}
            with pytest.raises(BadSignature):
                inbox.open("bob", raw)  # signed for alice's channel only
            with pytest.raises(BadSignature):
                inbox.open("alice", msgpack.packb({"data": "unsigned", "inbox": {"seq": 2}}))
            other = seal(b"o" * 32, b"hub:user:alice", envelope("x"))
            with pytest.raises(BadSignature):
                inbox.open("alice", other)
            assert inbox.bad_signatures == 3
            assert await inbox.mark_read("alice", 1) == 1
        finally:
            await router.close()

    run(main)
