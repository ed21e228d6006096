"""Property-based fuzzing (hypothesis) of the input surfaces hub serve takes from outside the
WebSocket protocol: HTTP API requests (bodies and headers, over real sockets to a real process)
and Redis payloads (envelopes and control messages: through a private Redis into a real process,
and straight into ``hub.redis.wire``, the one function every payload from Redis passes). Each input
gets an answer or a counted drop, never an exception escaping a handler, never a traceback."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import pytest
from hubfix import client, metric, scrape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servefix import API_KEY, SECRET, Served, hub_serve, raw_http
from wshelp import run

from hub.errors import BadEnvelope, BadSignature
from hub.redis.wire import Envelopes, inbox_mark, open_control, open_join_leave, seal
from hub.tokens import mint_token

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

CONFIG = """
[namespaces.feed]
history_size = 20
history_ttl = 300
publish = true

[namespaces.room]
presence = true
join_leave = true
"""
KEY = b"fuzzing-signing-key-0123456789abcdef0123"


def fuzz(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# -- values -----------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ("data", "offset", "epoch", "ts", "event", "join", "leave", "op", "user", "code", "reason")
#: Maps that look like envelopes and control messages, with each field any value or a likely one.
likely = {
    "offset": st.integers(min_value=-3, max_value=2**63) | values,
    "epoch": st.text(max_size=70) | values,
    "op": st.sampled_from(["disconnect", "admin.heartbeat", "rebalance"]) | values,
    "user": st.sampled_from(["", "u1", "u2"]) | values,
    "code": st.integers(min_value=3990, max_value=5010) | values,
    "reason": st.text(max_size=130) | values,
    "join": st.lists(st.fixed_dictionaries({"user": values, "client": values}), max_size=2)
    | values,
}
envelopes = st.fixed_dictionaries({}, optional={f: likely.get(f, values) for f in FIELDS})


def packable(obj: Any) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


inner_payloads = st.one_of(
    st.binary(max_size=64),
    envelopes.map(packable).filter(lambda b: b is not None),
    values.map(packable).filter(lambda b: b is not None),
)
#: A plain notify's push (docs/inbox.md): 0xc1, "<seq>-0 <epoch> ", the envelope; near misses
#: (another seq, an epoch too long or not text, a head cut short, a second head) and garbage.
headed = st.one_of(
    st.builds(
        lambda seq, epoch, inner: b"\xc1" + seq + b" " + epoch + b" " + inner,
        st.sampled_from([b"1-0", b"7-0", b"0-0", b"-1-0", b"7-1", b"7", b"", b"9" * 30 + b"-0"])
        | st.binary(max_size=24),
        st.sampled_from([b"e", b"x" * 64, b"x" * 65, b"\xff\xfe"]) | st.binary(max_size=70),
        inner_payloads | inner_payloads.map(lambda p: b"\xc1" + p),
    ),
    st.binary(max_size=40).map(lambda b: b"\xc1" + b),
)
payloads = st.one_of(inner_payloads, headed)


# -- straight into hub.redis.wire --------------------------------------------------------------


@fuzz(100)
@given(
    payload=payloads,
    keyed=st.booleans(),
    name=st.sampled_from([b"hub:ch:x", b"hub:ctl", b"hub:user:u"]),
)
def test_any_payload_opens_to_a_checked_map_or_a_bad_envelope(
    payload: bytes, keyed: bool, name: bytes
) -> None:
    """What the bridge does with each message: open, then check the fields it will use."""
    opener = Envelopes(KEY if keyed else None)
    try:
        envelope = opener.open(name, payload)
        assert type(envelope) is dict
        if "inbox" in envelope and name == b"hub:user:u":
            mark = inbox_mark(envelope)
            assert type(mark["epoch"]) is str and 0 < len(mark["epoch"]) <= 64
            assert "seq" in mark or "read" in mark
            if "seq" in mark:
                assert type(mark["seq"]) is int and mark["seq"] > 0 and "data" in envelope
        elif name == b"hub:ctl":
            kind, args = open_control(envelope)
            if kind == "disconnect":
                user, code, reason = args
                assert type(user) is str and user and 4000 <= code <= 4999
                assert len(reason.encode()) <= 120
        elif "data" in envelope:
            meta = opener.meta(envelope)
            if "offset" in meta:
                assert type(meta["offset"]) is int and meta["offset"] > 0
                assert type(meta["epoch"]) is str and 0 < len(meta["epoch"]) <= 64
            if "ts" in meta:
                assert type(meta["ts"]) in (int, float) and math.isfinite(meta["ts"])
        else:
            join, leave = open_join_leave(envelope)
            assert all(type(e["user"]) is str for e in [*join, *leave])
    except BadEnvelope:
        pass  # dropped and counted by the bridge: the one other outcome allowed


@fuzz(60)
@given(envelope=envelopes, name=st.binary(min_size=1, max_size=30), other=st.binary(max_size=30))
def test_signed_payloads_open_only_with_the_key_and_the_channel_they_were_signed_for(
    envelope: dict[str, Any], name: bytes, other: bytes
) -> None:
    packed = packable(envelope)
    if packed is None:
        return
    sealed = seal(KEY, name, packed)
    for opener in (Envelopes(KEY), Envelopes(None)):  # a hub without a key takes it unchecked
        assert packable(opener.open(name, sealed)) == packed  # (NaN != NaN: compare bytes)
    with pytest.raises(BadSignature):
        Envelopes(b"x" * 32).open(name, sealed)
    if other != name:
        with pytest.raises(BadSignature):
            Envelopes(KEY).open(other, sealed)
    with pytest.raises(BadSignature):
        Envelopes(KEY).open(name, packed)


# -- through a private Redis into a real hub serve ---------------------------------------------

CHANNELS = [
    "hub:ch:news",
    "hub:ch:feed:f",
    "hub:ch:room:r",
    "hub:user:watcher",
    "hub:all",
    "hub:ctl",
]


def check_push(push: Any) -> None:
    """What a client may get: pushes the protocol describes, never a field of a wrong type."""
    assert isinstance(push, dict) and "id" not in push, push
    if "offset" in push or "epoch" in push:
        assert type(push["offset"]) is int and push["offset"] > 0, push
        assert type(push["epoch"]) is str, push
    if "ts" in push:
        assert type(push["ts"]) in (int, float), push
    if "event" in push:
        assert type(push["event"]) is str, push
    for key in ("join", "leave"):
        for entry in push.get(key, []):
            assert type(entry["user"]) is str and type(entry["client"]) is str, push


@pytest.mark.parametrize("signing", [False, True], ids=["unsigned", "signed"])
def test_fuzzed_redis_payloads_never_break_the_hub(
    tmp_path: Path, redis_server: RedisServer, signing: bool
) -> None:
    key = {"redis_signing_key": KEY.decode()} if signing else {}
    r = redis_server.client()
    with hub_serve(tmp_path, CONFIG, redis_server.url, **key) as hub:
        sent: list[tuple[str, bytes]] = []

        @fuzz(40)
        @given(batch=st.lists(st.tuples(st.sampled_from(CHANNELS), payloads), max_size=8))
        def publish(batch: list[tuple[str, bytes]]) -> None:
            for name, payload in batch:
                if signing:  # half of them signed right, so that their fields are checked too
                    payload = seal(KEY, name.encode(), payload) if len(payload) % 2 else payload
                r.publish(name, payload)
                sent.append((name, payload))

        async def main() -> None:
            token = mint_token("watcher", SECRET)
            async with client(hub, token=token) as watcher:  # type: ignore[arg-type]
                for channel in ("news", "feed:f", "room:r"):
                    await watcher.call("subscribe", channel=channel)
                publish()
                marker = msgpack.packb({"data": "marker"})
                r.publish("hub:ch:news", seal(KEY, b"hub:ch:news", marker) if signing else marker)
                while True:
                    push = await watcher.push()
                    check_push(push)
                    if push.get("channel") == "news" and push.get("data") == "marker":
                        break
            samples = await scrape(hub)  # type: ignore[arg-type]
            assert metric(samples, "hub_bridge_handler_errors_total") == 0
            dropped = metric(samples, "hub_bridge_malformed_total") + metric(
                samples, "hub_bridge_bad_signatures_total"
            )
            assert 0 < dropped <= len(sent)

        run(main, timeout=300)
        hub.assert_clean()


# -- HTTP API bodies and headers, over real sockets ---------------------------------------------

ENDPOINTS = [
    "/api/publish",
    "/api/broadcast",
    "/api/send",
    "/api/disconnect",
    "/api/history",
    "/api/presence",
    "/api/presence_stats",
    "/api/stats",
    "/metrics",
    "/healthz",
    "/nope",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=15,
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "channel": st.sampled_from(["news", "feed:f", "room:r", "a b", ""]) | json_values,
            "data": json_values,
            "user": st.sampled_from(["u1", ""]) | json_values,
            "code": st.integers(min_value=3990, max_value=5010) | json_values,
            "reason": st.text(max_size=130) | json_values,
            "limit": st.integers(min_value=-2, max_value=30) | json_values,
            "since": st.fixed_dictionaries({"offset": json_values, "epoch": json_values})
            | json_values,
        },
    ).map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=80),
)
header_names = st.sampled_from(
    ["Content-Type", "X-API-Key", "Authorization", "Content-Length", "Transfer-Encoding", "Host"]
) | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=12)
header_values = st.binary(max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v)
ALLOWED = {200, 304, 400, 401, 403, 404, 405, 413, 415, 422, 431, 503}


@pytest.fixture(scope="module")
def api_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with hub_serve(tmp_path_factory.mktemp("fuzz-http"), CONFIG) as hub:
        yield hub


@fuzz(150)
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "OPTIONS"]),
    path=st.sampled_from(ENDPOINTS),
    body=bodies,
    key=st.sampled_from([API_KEY, "wrong", None]),
    content_type=st.sampled_from(["application/json", "text/plain", None]),
    extra=st.lists(st.tuples(header_names, header_values), max_size=3),
)
def test_fuzzed_http_requests_get_an_answer_never_a_500(
    api_hub: Served,
    method: str,
    path: str,
    body: bytes,
    key: str | None,
    content_type: str | None,
    extra: list[tuple[str, bytes]],
) -> None:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    if key is not None:
        lines.append(b"X-API-Key: " + key.encode())
    if content_type is not None:
        lines.append(b"Content-Type: " + content_type.encode())
    lines += [name.encode() + b": " + value for name, value in extra]
    lines.append(b"Content-Length: %d" % len(body))
    request = b"\r\n".join(lines) + b"\r\n\r\n" + body
    answer = raw_http(api_hub.port, request)
    status_line = answer.partition(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1.1 "), (request, answer)
    status = int(status_line.split()[1])
    assert status in ALLOWED, (request, answer)
    api_hub.assert_clean()
