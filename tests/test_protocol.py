"""The sans-I/O server protocol: close codes for bad frames, handshake answers, deflate."""

from __future__ import annotations

import zlib

import pytest
from sansio import (
    handshake_request,
    masked,
    open_protocol,
    sent_close_code,
    sent_close_code_from,
)

from hub.ws import Limits, ServerPerMessageDeflateFactory
from hub.ws.frames import Close, Opcode
from hub.ws.protocol import CLOSED, CLOSING, OPEN, ServerProtocol, accept_key


def test_accept_key_rfc_example() -> None:
    # RFC 6455 section 1.3
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_text_and_binary_messages() -> None:
    p = open_protocol()
    p.receive_data(masked(Opcode.TEXT, "héllo".encode()) + masked(Opcode.BINARY, b"\x00\xff"))
    frames = p.events_received()
    assert [(f.opcode, f.data, f.text) for f in frames] == [
        (Opcode.TEXT, "héllo".encode(), "héllo"),
        (Opcode.BINARY, b"\x00\xff", None),
    ]


def test_ping_is_answered_with_same_payload() -> None:
    p = open_protocol()
    p.receive_data(masked(Opcode.PING, b"abc"))
    assert p.data_to_send() == [b"\x8a\x03abc"]


def test_client_close_is_echoed_then_eof() -> None:
    p = open_protocol()
    p.receive_data(masked(Opcode.CLOSE, Close(1001, "bye").serialize()))
    assert p.data_to_send() == [b"\x88\x05\x03\xe9bye", b""]
    assert p.state is CLOSING
    p.receive_eof()
    assert p.state is CLOSED
    assert (p.close_code, p.close_reason) == (1001, "bye")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (bytes([0x83, 0x80]) + b"abcd", 1002),  # reserved opcode 3
        (bytes([0x81, 0x02]) + b"hi", 1002),  # unmasked client frame
        (bytes([0x09, 0x80]) + b"abcd", 1002),  # fragmented ping
        (bytes([0xC1, 0x80]) + b"abcd", 1002),  # rsv1 without deflate
        (bytes([0xA1, 0x80]) + b"abcd", 1002),  # rsv2
        (bytes([0x89, 0xFE, 0x00, 0x7E]) + b"abcd" + bytes(126), 1002),  # ping too long
        (masked(Opcode.CONT, b"x"), 1002),  # continuation without a message
        (masked(Opcode.TEXT, b"a", fin=False) + masked(Opcode.TEXT, b"b"), 1002),
        (masked(Opcode.TEXT, b"\xff"), 1007),  # invalid utf-8
        (masked(Opcode.TEXT, b"\xe2\x82", fin=False) + masked(Opcode.CONT, b"("), 1007),
        (masked(Opcode.CLOSE, b"\x03"), 1002),  # close payload of one byte
        (masked(Opcode.CLOSE, b"\x03\xec"), 1002),  # close code 1004
        (masked(Opcode.CLOSE, b"\x03\xe8\xff"), 1007),  # reason not utf-8
    ],
)
def test_bad_frames_get_the_right_close_code(data: bytes, code: int) -> None:
    p = open_protocol()
    p.receive_data(data)
    assert sent_close_code(p) == code
    assert p.state is CLOSING


def test_invalid_utf8_fails_before_the_frame_ends() -> None:
    """Fail fast: bad bytes in the first chunk of a long text frame close with 1007 at once."""
    p = open_protocol()
    frame = masked(Opcode.TEXT, b"ok\xc0\xaf" + b"x" * 1000)
    p.receive_data(frame[:20])
    assert sent_close_code(p) == 1007


def test_too_big_is_refused_from_the_header() -> None:
    p = open_protocol(max_size=1000)
    header_only = bytes([0x82, 0xFE]) + (2000).to_bytes(2, "big") + b"abcd"
    p.receive_data(header_only)  # no payload byte sent yet
    assert sent_close_code(p) == 1009


def test_too_big_across_fragments() -> None:
    p = open_protocol(max_size=1000)
    p.receive_data(masked(Opcode.BINARY, bytes(600), fin=False))
    p.receive_data(masked(Opcode.CONT, bytes(600)))
    assert sent_close_code(p) == 1009


DEFLATE_OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"


def _deflate(data: bytes, wbits: int = 12) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_deflate_round_trip_and_bomb_is_1009() -> None:
    p = open_protocol(DEFLATE_OFFER, extensions=[ServerPerMessageDeflateFactory()], max_size=4096)
    p.receive_data(masked(Opcode.TEXT, _deflate(b"a" * 4000), rsv1=True))
    (frame,) = p.events_received()
    assert frame.text == "a" * 4000
    bomb = _deflate(b"a" * 100_000)  # a few hundred bytes on the wire
    assert len(bomb) < 4096
    p.receive_data(masked(Opcode.BINARY, bomb, rsv1=True))
    assert sent_close_code(p) == 1009


def test_deflate_rsv1_on_continuation_is_1002() -> None:
    p = open_protocol(DEFLATE_OFFER, extensions=[ServerPerMessageDeflateFactory()])
    p.receive_data(masked(Opcode.TEXT, b"a", fin=False) + masked(Opcode.CONT, b"b", rsv1=True))
    assert sent_close_code(p) == 1002


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        ("permessage-deflate", "permessage-deflate; server_no_context_takeover"),
        (
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=12",
        ),
        (
            "permessage-deflate; server_max_window_bits=10; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
            "server_max_window_bits=10",
        ),
        # An offer the server cannot honour is declined; the next one is taken.
        (
            "permessage-deflate; server_max_window_bits=8, permessage-deflate",
            "permessage-deflate; server_no_context_takeover",
        ),
        ("permessage-deflate; foo=1", None),
        ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", None),
        ("x-webkit-deflate-frame", None),
    ],
)
def test_deflate_negotiation(offer: str, answer: str | None) -> None:
    p = open_protocol(
        f"Sec-WebSocket-Extensions: {offer}\r\n", extensions=[ServerPerMessageDeflateFactory()]
    )
    assert p.state is OPEN
    # Re-run the negotiation on a fresh protocol to read the response header.
    q = ServerProtocol(extensions=[ServerPerMessageDeflateFactory()])
    q.receive_data(handshake_request(extra=f"Sec-WebSocket-Extensions: {offer}\r\n"))
    (request,) = q.events_received()
    response = q.accept(request)
    assert response.headers.get("Sec-WebSocket-Extensions") == answer


def _answer(request: bytes, **kwargs: object) -> int | None:
    p = ServerProtocol(**kwargs)  # type: ignore[arg-type]
    p.receive_data(request)
    events = p.events_received()
    if events:
        p.send_response(p.accept(events[0]))  # type: ignore[arg-type]
    out = b"".join(p.data_to_send())
    return int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else None


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (handshake_request(), 101),
        (handshake_request().replace(b"GET", b"POST", 1), 405),
        (handshake_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 505),
        (handshake_request().replace(b"HTTP/1.1", b"HTTP/2.0", 1), 505),
        (handshake_request().replace(b"Upgrade: websocket\r\n", b""), 426),
        (handshake_request().replace(b"Connection: Upgrade", b"Connection: close"), 426),
        (handshake_request(key="tooshort"), 400),
        (handshake_request().replace(b"Sec-WebSocket-Key", b"X-Key"), 400),
        (handshake_request().replace(b"Version: 13", b"Version: 8"), 400),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n", 414),
        (handshake_request(extra="X-Big: " + "b" * 9000 + "\r\n"), 431),
        (handshake_request(extra="".join(f"X-{i}: v\r\n" for i in range(200))), 431),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
    ],
)
def test_handshake_statuses(request_bytes: bytes, status: int) -> None:
    assert _answer(request_bytes) == status


def test_origin_check() -> None:
    good = handshake_request(extra="Origin: https://ok.example\r\n")
    bad = handshake_request(extra="Origin: https://evil.example\r\n")
    assert _answer(good, origins=["https://ok.example"]) == 101
    assert _answer(bad, origins=["https://ok.example"]) == 403
    assert _answer(handshake_request(), origins=["https://ok.example"]) == 403
    assert _answer(handshake_request(), origins=[None]) == 101


def test_limits_are_configurable() -> None:
    request = handshake_request(extra="X-Big: " + "b" * 3000 + "\r\n")
    assert _answer(request, limits=Limits(max_line=2048)) == 431


def test_subprotocol_selection() -> None:
    p = open_protocol("Sec-WebSocket-Protocol: b, a\r\n", subprotocols=["a", "b"])
    assert p.subprotocol == "b"  # the client's preference among those supported
    offer = handshake_request(extra="Sec-WebSocket-Protocol: x\r\n")
    assert _answer(offer, subprotocols=["a"]) == 400
    assert _answer(handshake_request(), subprotocols=["a"]) == 101


def test_frames_sent_before_101_wait_for_the_decision() -> None:
    p = ServerProtocol()
    p.receive_data(handshake_request() + masked(Opcode.TEXT, b"early"))
    (request,) = p.events_received()
    p.send_response(p.accept(request))
    (frame,) = p.events_received()
    assert frame.text == "early"


def test_eof_without_close_is_abnormal() -> None:
    p = open_protocol()
    p.receive_eof()
    assert p.state is CLOSED
    assert p.close_code == 1006


def test_deferred_failure_lets_earlier_messages_be_answered_first() -> None:
    p = open_protocol(defer_failures=True)
    p.receive_data(masked(Opcode.TEXT, b"hello") + bytes([0x85, 0x80]) + b"abcd")
    (frame,) = p.events_received()
    assert frame.text == "hello"
    assert p.state is OPEN and p.pending_failure is not None
    p.send_text(b"hello")  # the application answers the message received before the error
    p.apply_pending_failure()
    out = p.data_to_send()
    assert out[0] == b"\x81\x05hello"
    assert sent_close_code_from(out[1:]) == 1002


def test_deferred_failure_without_earlier_messages_is_immediate() -> None:
    p = open_protocol(defer_failures=True)
    p.receive_data(bytes([0x85, 0x80]) + b"abcd")
    assert p.pending_failure is None
    assert sent_close_code(p) == 1002
