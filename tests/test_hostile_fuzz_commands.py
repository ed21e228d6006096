"""Property-based fuzzing of what clients send a real ``hub serve``: commands in JSON and
msgpack (well-formed or not, right or wrong types, any op), raw frames, and tokens (garbage, and
validly signed ones with arbitrary claims).

Every input gets a reply (a result or an error with a known code), a close with the code the
protocol gives it (4502 for repeated bad commands, 4500 / 4002 for a refused token), or opens a
connection; never an exception escaping a handler: ``hub_command_failures_total`` stays 0 and
the hub's log holds no traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from collections.abc import Iterator
from typing import Any

import jwt
import msgpack
import pytest
from hubfix import SECRET, metric, scrape
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procfix import ServedHub, hub_serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from wshelp import run

from hub.errors import CloseCode, ErrorCode

TOML = f"""
token_secret = "{SECRET}"
command_rate = 0   # the fuzzer sends as fast as it can: no rate limit here
auth_failures = 0  # nor a budget of failed authentications

[namespaces.feed]
history_size = 5
history_ttl = 60
publish = true

[namespaces.room]
publish = "token"
presence = true
join_leave = true

[namespaces.locked]
subscribe = "token"
publish = true

[namespaces.dm]
personal = true
publish = true
"""

OPS = ["subscribe", "unsubscribe", "publish", "history", "presence", "presence_stats"]
CHANNELS = ["news", "feed:1", "room:1", "locked:1", "dm:fuzzer", "dm:other", "nope:x", ""]
CODES = {int(c) for c in ErrorCode}
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values both codecs carry (msgpack: integers within 64 bits; bytes only in msgpack).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
since = values | st.fixed_dictionaries(
    {"offset": st.integers(min_value=-5, max_value=2**64 - 1), "epoch": st.text(max_size=70)}
)
commands = st.fixed_dictionaries(
    {
        "op": st.sampled_from(OPS) | values,
        "id": st.integers(min_value=-(2**63), max_value=2**63) | values,
    },
    optional={
        "channel": st.sampled_from(CHANNELS) | st.text(max_size=300) | values,
        "data": values | st.binary(max_size=20),
        "since": since,
        "limit": st.integers(min_value=-3, max_value=2**64 - 1) | values,
        "from": values,
    },
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedHub]:
    with hub_serve(tmp_path_factory.mktemp("fuzz"), TOML) as hub:
        yield hub
        assert metric(run(lambda: scrape(hub)), "hub_command_failures_total") == 0


def url(hub: ServedHub, token: str) -> str:
    return f"ws://127.0.0.1:{hub.port}/ws?token={urllib.parse.quote(token, safe='')}"


class Fuzzer:
    """One connection per protocol, reopened when the hub closes it for abuse."""

    TOKEN = jwt.encode(
        {"sub": "fuzzer", "channels": ["locked:*"], "publish": ["room:*"], "info": {"n": 1}},
        SECRET,
        algorithm="HS256",
    )

    def __init__(self, hub: ServedHub, proto: str) -> None:
        self.hub, self.proto = hub, proto
        self.ws: ClientConnection | None = None

    def connection(self) -> ClientConnection:
        if self.ws is None:
            # Entered by hand: it outlives one ``with`` block (websockets 17 warns about a sync
            # connection used without entering it; ``close()`` below is the exit).
            self.ws = connect(
                url(self.hub, self.TOKEN),
                subprotocols=[self.proto],  # type: ignore[list-item]
                compression=None,
                open_timeout=5,
                close_timeout=2,
                max_size=None,
            ).__enter__()
        return self.ws

    def exchange(self, message: str | bytes) -> None:
        """Send one message; its reply must be a result or a known error (pushes on the way are
        skipped), or the connection is closed with 4502 for abuse."""
        ws = self.connection()
        try:
            ws.send(message)
            while True:
                raw = ws.recv(timeout=5)
                reply = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
                if isinstance(reply, dict) and "id" in reply:
                    break
        except ConnectionClosed as exc:
            self.ws = None
            assert exc.rcvd is not None and exc.rcvd.code == CloseCode.BAD_REQUEST, exc
            return
        assert ("result" in reply) != ("error" in reply), reply
        if "error" in reply:
            error = reply["error"]
            assert error["code"] in CODES - {int(ErrorCode.INTERNAL)}, reply
            assert isinstance(error["message"], str) and len(error["message"]) <= 200, reply

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


def test_fuzzed_json_commands_get_a_reply_never_a_traceback(fuzzed: ServedHub) -> None:
    fuzzer = Fuzzer(fuzzed, "hub.v1.json")

    @SETTINGS
    @given(command=commands | values, raw=st.none() | st.text(max_size=50))
    def check(command: Any, raw: str | None) -> None:
        if raw is not None:
            fuzzer.exchange(raw)  # not JSON, or JSON of any shape
        try:
            text = json.dumps(command)
        except (TypeError, ValueError):  # bytes: JSON cannot carry them
            text = json.dumps(command, default=lambda b: list(b))
        fuzzer.exchange(text)

    try:
        check()
    finally:
        fuzzer.close()
    assert "Traceback" not in fuzzed.log()


def test_fuzzed_msgpack_commands_get_a_reply_never_a_traceback(fuzzed: ServedHub) -> None:
    fuzzer = Fuzzer(fuzzed, "hub.v1.msgpack")

    @SETTINGS
    @given(command=commands | values, raw=st.none() | st.binary(max_size=50))
    def check(command: Any, raw: bytes | None) -> None:
        if raw is not None:
            fuzzer.exchange(raw)  # not msgpack, or msgpack of any shape
        fuzzer.exchange(msgpack.packb(command, use_bin_type=True))

    try:
        check()
    finally:
        fuzzer.close()
    assert "Traceback" not in fuzzed.log()


#: Numbers at the edges of what JSON, Python and time arithmetic take.
EDGES = [10**400, -(10**400), 2**63, 2**64, 1e308, float("inf"), float("-inf"), float("nan"), 0]


def sign(claims: dict[str, Any]) -> str:
    """An HS256 JWT over any JSON claims, signed by hand: PyJWT's encoder refuses some of the
    very claims the hub must survive (a number as ``iss``, ``Infinity`` as ``exp``)."""

    def part(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    signing_input = part(b'{"alg":"HS256","typ":"JWT"}') + "." + part(json.dumps(claims).encode())
    digest = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + part(digest)


CLAIMS = ["sub", "exp", "iat", "nbf", "channels", "publish", "info", "iss", "aud"]
claim_values = st.sampled_from(EDGES) | values | st.integers() | st.floats()
# Each known claim present about half the time, with an edge value often; other keys too.
claims = st.fixed_dictionaries(
    {},
    optional=dict.fromkeys(CLAIMS, claim_values),  # type: ignore[arg-type]
).flatmap(
    lambda known: st.dictionaries(st.text(max_size=5), values, max_size=2).map(
        lambda extra: {**extra, **known}
    )
)


def test_fuzzed_tokens_open_or_close_with_their_code_never_a_traceback(
    fuzzed: ServedHub,
) -> None:
    """Garbage tokens and validly signed ones with arbitrary claims: the connection either
    opens (and answers a command) or is closed with 4500 / 4002."""

    @SETTINGS
    @given(
        token=st.text(max_size=300)
        | claims.map(sign)
        | claims.map(lambda c: sign({**c, "sub": "x"}))
        # One claim at a time at an edge: a valid token but for that one claim.
        | st.tuples(st.sampled_from(CLAIMS[1:]), st.sampled_from(EDGES)).map(
            lambda kv: sign({"sub": "x", kv[0]: kv[1]})
        )
    )
    def check(token: str) -> None:
        with connect(url(fuzzed, token), compression=None, open_timeout=5) as ws:
            try:
                ws.send(json.dumps({"op": "subscribe", "channel": "news", "id": 1}))
                reply = json.loads(ws.recv(timeout=5))
            except ConnectionClosed as exc:
                assert exc.rcvd is not None, exc
                assert exc.rcvd.code in (CloseCode.UNAUTHORIZED, CloseCode.TOKEN_EXPIRED), exc
                return
            assert reply == {"id": 1, "result": {}}, reply

    check()
    assert "Traceback" not in fuzzed.log()
