"""Property-based tests: any split of valid input gives the same events; random bytes never
raise anything but the documented outcome (an error response or a close frame)."""

from __future__ import annotations

import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sansio import handshake_request, masked, open_protocol

from hub.ws import ServerPerMessageDeflateFactory
from hub.ws.frames import Opcode
from hub.ws.protocol import CONNECTING, ServerProtocol

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed(protocol: ServerProtocol, data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        protocol.receive_data(data[start:point])
        start = point


def _events(protocol: ServerProtocol) -> list[tuple[int, bytes, bool, str | None]]:
    return [(f.opcode, f.data, f.fin, f.text) for f in protocol.events_received()]


# A message: text or binary, sent as one or more fragments, with pings between fragments.
message = st.one_of(
    st.tuples(st.just(Opcode.TEXT), st.lists(st.text(max_size=40), min_size=1, max_size=4)),
    st.tuples(st.just(Opcode.BINARY), st.lists(st.binary(max_size=300), min_size=1, max_size=4)),
)


def _encode(messages: list[tuple[Opcode, list[str | bytes]]], ping: bool) -> bytes:
    out = []
    for opcode, parts in messages:
        for i, part in enumerate(parts):
            data = part.encode() if isinstance(part, str) else part
            out.append(masked(opcode if i == 0 else Opcode.CONT, data, fin=i == len(parts) - 1))
            if ping:
                out.append(masked(Opcode.PING, b"p"))
    return b"".join(out)


@SETTINGS
@given(st.lists(message, max_size=6), st.booleans(), st.lists(st.integers(0, 10**6), max_size=20))
def test_any_split_of_frames_gives_the_same_events(
    messages: list[tuple[Opcode, list[str | bytes]]], ping: bool, cuts: list[int]
) -> None:
    data = _encode(messages, ping)
    whole = open_protocol()
    whole.receive_data(data)
    split = open_protocol()
    _feed(split, data, cuts)
    expected = _events(whole)
    got = _events(split)
    # Text arrives in pieces when a frame is split; compare the joined text per frame.
    assert [(o, d, f) for o, d, f, _ in got] == [(o, d, f) for o, d, f, _ in expected]
    assert [t or "" for *_, t in got] == [t or "" for *_, t in expected]
    assert b"".join(whole.data_to_send()) == b"".join(split.data_to_send())


@SETTINGS
@given(
    st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=5),
    st.lists(st.integers(0, 10**6), max_size=10),
)
def test_any_split_of_compressed_messages(payloads: list[bytes], cuts: list[int]) -> None:
    offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    comp = zlib.compressobj(6, zlib.DEFLATED, -12)  # the client keeps its context
    data = b""
    for payload in payloads:
        body = (comp.compress(payload) + comp.flush(zlib.Z_SYNC_FLUSH))[:-4]
        data += masked(Opcode.BINARY, body, rsv1=True)
    p = open_protocol(offer, extensions=[ServerPerMessageDeflateFactory()])
    _feed(p, data, cuts)
    assert [f.data for f in p.events_received()] == payloads


@SETTINGS
@given(st.binary(max_size=600), st.lists(st.integers(0, 10**6), max_size=10))
def test_random_frames_never_raise(garbage: bytes, cuts: list[int]) -> None:
    p = open_protocol(max_size=256)
    _feed(p, garbage, cuts)
    p.receive_eof()
    out = p.data_to_send()
    for chunk in out:
        if chunk[:1] == b"\x88":  # a close frame: its code must be one we document
            code = int.from_bytes(chunk[2:4], "big")
            assert code in (1002, 1007, 1009), code


request_line_part = st.sampled_from(
    [b"GET", b"POST", b"/", b"/chat?x=1", b"HTTP/1.1", b"HTTP/1.0", b" ", b"\r\n", b":", b"\n"]
)


@SETTINGS
@given(
    st.lists(st.one_of(request_line_part, st.binary(max_size=30)), max_size=30),
    st.lists(st.integers(0, 10**6), max_size=10),
)
def test_random_requests_get_an_http_answer_or_nothing(parts: list[bytes], cuts: list[int]) -> None:
    p = ServerProtocol()
    _feed(p, b"".join(parts), cuts)
    p.receive_eof()
    events = p.events_received()
    out = b"".join(p.data_to_send())
    if events:  # a well-formed request: the handshake decides
        assert p.state is not CONNECTING or out == b""
    elif out:
        status = int(out.split(b" ", 2)[1])
        assert status in (400, 405, 413, 414, 431, 505), out[:60]


@SETTINGS
@given(st.lists(st.integers(0, 10**6), max_size=15))
def test_any_split_of_a_request_gives_the_same_request(cuts: list[int]) -> None:
    data = handshake_request(path="/room?id=7", extra="X-Custom: a b c\r\nOrigin: http://x\r\n")
    whole = ServerProtocol()
    whole.receive_data(data)
    split = ServerProtocol()
    _feed(split, data, cuts)
    (a,) = whole.events_received()
    (b,) = split.events_received()
    assert (a.path, a.method, list(a.headers.items())) == (
        b.path,
        b.method,
        list(b.headers.items()),
    )
