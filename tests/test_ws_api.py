"""The parts of the websockets server API a handler reaches for beyond recv/send: streaming
receive, ``async with``, connection factories and options, attributes of one's own, the logger,
argument checks and the words of its exceptions, and what happens once the transport is gone.

A real ``websockets`` client is always on the other end.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from wshelp import run, uri, within


def _serve_one(websockets: ModuleType, handler: Any, **kwargs: Any) -> Any:
    return websockets.serve(handler, "127.0.0.1", 0, **kwargs)


def test_recv_streaming_hands_out_frames_as_they_arrive(websockets: ModuleType) -> None:
    """``recv_streaming()`` yields each frame of a fragmented message when it arrives, then the
    next call yields the next message; ``decode=`` converts like ``recv``."""
    got: list[Any] = []
    first_seen = asyncio.Event()

    async def handler(ws: Any) -> None:
        async for fragment in ws.recv_streaming():
            got.append(fragment)
            first_seen.set()
        got.append(await ws.recv())
        got.append([f async for f in ws.recv_streaming(decode=False)])
        await ws.send("done")
        await ws.wait_closed()

    async def main() -> None:
        async with _serve_one(websockets, handler) as server:
            async with connect(uri(server)) as client:
                gate = asyncio.get_running_loop().create_future()

                async def fragments() -> Any:
                    yield "ab"
                    await gate
                    yield "cd"

                sending = asyncio.create_task(client.send(fragments()))
                await within(first_seen.wait())
                assert got == ["ab"]  # the second fragment does not exist yet
                gate.set_result(None)
                await within(sending)
                await client.send("whole")
                await client.send("é")
                assert await within(client.recv()) == "done"
        assert got[:3] == ["ab", "cd", ""]  # the client ends with an empty final frame
        assert got[3:] == ["whole", ["é".encode()]]

    run(main)


def test_recv_streaming_during_recv_is_a_concurrency_error(websockets: ModuleType) -> None:
    outcome: dict[str, str] = {}

    async def handler(ws: Any) -> None:
        waiting = asyncio.create_task(ws.recv())
        await asyncio.sleep(0.01)
        try:
            async for _ in ws.recv_streaming():
                pass
        except websockets.ConcurrencyError as exc:
            outcome["error"] = str(exc)
        waiting.cancel()
        await ws.close()

    async def main() -> None:
        async with _serve_one(websockets, handler) as server:
            async with connect(uri(server)) as client:
                await within(client.wait_closed())
        assert outcome["error"] == (
            "cannot call recv_streaming while another coroutine is already running recv or "
            "recv_streaming"
        )

    run(main)


@pytest.mark.parametrize(("raises", "code"), [(False, 1000), (True, 1011)])
def test_async_with_connection_closes_it(websockets: ModuleType, raises: bool, code: int) -> None:
    """``async with websocket:`` closes with 1000, or 1011 when the block raised."""

    async def handler(ws: Any) -> None:
        try:
            async with ws as same:
                assert same is ws
                await ws.send("inside")
                if raises:
                    raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert ws.state.name == "CLOSED"

    async def main() -> None:
        async with _serve_one(websockets, handler) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == "inside"
                await within(client.wait_closed())
                assert client.close_code == code

    run(main)


def test_create_connection_factory_and_constructor_options(websockets: ModuleType) -> None:
    """``serve(create_connection=...)`` gets the arguments ``ServerConnection`` takes, so a
    subclass can add behaviour and override one option (``close_timeout``) keeping the rest."""

    class Tagged(websockets.ServerConnection):  # type: ignore[name-defined,misc]
        def tag(self) -> str:
            return "tagged"

    def factory(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["close_timeout"] == 3 and kwargs["ping_interval"] is None
        return Tagged(*args, **{**kwargs, "close_timeout": 0.5})

    seen: dict[str, Any] = {}

    async def handler(ws: Any) -> None:
        seen.update(tag=ws.tag(), close_timeout=ws.close_timeout, ping_interval=ws.ping_interval)
        await ws.send("hi")

    async def main() -> None:
        async with _serve_one(
            websockets, handler, close_timeout=3, ping_interval=None, create_connection=factory
        ) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == "hi"
        assert seen == {"tag": "tagged", "close_timeout": 0.5, "ping_interval": None}

    run(main)


def test_custom_attributes_from_process_request(websockets: ModuleType) -> None:
    """``process_request`` may stash data on the connection (``websocket.user = ...``) for the
    handler, as websockets' documentation shows."""

    def process_request(ws: Any, request: Any) -> None:
        ws.user = request.headers.get("X-User", "anonymous")

    async def handler(ws: Any) -> None:
        await ws.send(ws.user)

    async def main() -> None:
        async with _serve_one(websockets, handler, process_request=process_request) as server:
            async with connect(uri(server), additional_headers={"X-User": "alice"}) as client:
                assert await within(client.recv()) == "alice"

    run(main)


def test_logger_is_an_adapter_naming_the_connection(
    websockets: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    """``websocket.logger`` is a LoggerAdapter over the server's logger; its records carry the
    connection as ``websocket``."""
    base = logging.getLogger("test.ws.api")
    markers: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            markers.append(record.websocket.marker)  # type: ignore[attr-defined]

    capture = Capture()
    base.addHandler(capture)

    async def handler(ws: Any) -> None:
        assert isinstance(ws.logger, logging.LoggerAdapter)
        ws.marker = "me"
        ws.logger.warning("hello from the handler")

    async def main() -> None:
        async with _serve_one(websockets, handler, logger=base) as server:
            async with connect(uri(server)) as client:
                await within(client.wait_closed())

    try:
        with caplog.at_level(logging.WARNING, logger="test.ws.api"):
            run(main)
    finally:
        base.removeHandler(capture)
    records = [r for r in caplog.records if r.getMessage() == "hello from the handler"]
    assert len(records) == 1 and records[0].name == "test.ws.api"
    assert markers == ["me"]


def test_argument_errors_are_worded_as_websockets_words_them(websockets: ModuleType) -> None:
    """Wrong arguments fail at once, with websockets' exception types and messages: a str as
    ``subprotocols`` (it would match by substring), ``basic_auth`` without (or with both)
    credential sources, credentials of the wrong type, and ``pong([])`` / ``ping([])``."""

    async def handler(ws: Any) -> None:
        errors = []
        for call in (ws.pong([]), ws.ping([])):
            try:
                await call
            except TypeError:
                errors.append("TypeError")
        await ws.send(",".join(errors))

    async def main() -> None:
        with pytest.raises(TypeError, match=r"^subprotocols must be a list, not a str$"):
            await websockets.serve(handler, "127.0.0.1", 0, subprotocols="chat")
        with pytest.raises(ValueError, match=r"^provide either credentials or check_credentials$"):
            websockets.basic_auth()
        with pytest.raises(ValueError, match=r"^provide either credentials or check_credentials$"):
            websockets.basic_auth(credentials=("a", "b"), check_credentials=lambda u, p: True)
        with pytest.raises(TypeError, match=r"^invalid credentials argument: 42$"):
            websockets.basic_auth(credentials=42)
        async with _serve_one(websockets, handler) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == "TypeError,TypeError"

    run(main)


def test_closed_exception_reads_like_websockets(websockets: ModuleType) -> None:
    """After a normal closing handshake the handler's exception says ``1000 (OK)``, and a close
    code the handler picks is named the same way (``1001 (going away)``)."""
    texts: list[str] = []

    async def handler(ws: Any) -> None:
        await ws.close(1001, "bye")
        try:
            await ws.recv()
        except websockets.ConnectionClosedOK as exc:
            texts.append(str(exc))

    async def handler_ok(ws: Any) -> None:
        await ws.close()
        try:
            await ws.send("late")
        except websockets.ConnectionClosedOK as exc:
            texts.append(str(exc))

    async def main() -> None:
        for h in (handler, handler_ok):
            async with _serve_one(websockets, h) as server:
                async with connect(uri(server)) as client:
                    await within(client.wait_closed())

    run(main)
    assert texts == [
        "sent 1001 (going away) bye; then received 1001 (going away) bye",
        "sent 1000 (OK); then received 1000 (OK)",
    ]


def test_wait_closed_waits_for_handlers_outliving_their_connection(
    websockets: ModuleType,
) -> None:
    """``Server.wait_closed()`` returns only once every handler returned, even one still busy
    after its connection closed."""
    finished: list[str] = []

    async def handler(ws: Any) -> None:
        await ws.recv()
        await ws.close()
        await asyncio.sleep(0.3)  # cleanup after the connection is gone
        finished.append("handler")

    async def main() -> None:
        server = await websockets.serve(handler, "127.0.0.1", 0)
        async with connect(uri(server)) as client:
            await client.send("go")
            await within(client.wait_closed())
        server.close()
        await within(server.wait_closed())
        finished.append("wait_closed")

    run(main)
    assert finished == ["handler", "wait_closed"]


def test_after_write_eof_sending_raises_connection_closed(websockets: ModuleType) -> None:
    """Once the transport cannot write (``write_eof()`` here, a dead socket in production),
    ``pong()`` raises ConnectionClosedError with the transport's error as its cause, broadcast
    skips the connection, now closed, without a word even when asked to raise, and ``close()``
    returns quietly."""
    outcome: dict[str, Any] = {}

    async def handler(ws: Any) -> None:
        await asyncio.sleep(0)  # past the loop turn that wrote the handshake answer
        ws.transport.write_eof()
        try:
            await ws.pong()
        except websockets.ConnectionClosedError as exc:
            outcome["pong"] = (type(exc.__cause__).__name__, str(exc.__cause__))
        websockets.broadcast([ws], "skipped")
        try:
            websockets.broadcast([ws], "reported", raise_exceptions=True)
        except ExceptionGroup as group:
            outcome["broadcast"] = [type(e).__name__ for e in group.exceptions]
        await ws.close()
        outcome["closed"] = ws.state.name

    async def main() -> None:
        async with _serve_one(websockets, handler) as server:
            async with connect(uri(server)) as client:
                await within(client.wait_closed())

    run(main)
    assert outcome["pong"] == ("RuntimeError", "Cannot call write() after write_eof()")
    assert "broadcast" not in outcome
    assert outcome["closed"] == "CLOSED"


def test_after_the_peer_reset_calls_raise_connection_closed(websockets: ModuleType) -> None:
    """A transport lost to a reset: ``recv()``, ``pong()``, ``ping()`` and ``send()`` raise
    ConnectionClosedError caused by the reset, ``broadcast()`` skips the connection without a
    word, and ``close()`` returns."""
    outcome: dict[str, Any] = {}
    done = asyncio.Event()

    async def handler(ws: Any) -> None:
        calls = {"recv": ws.recv, "pong": ws.pong, "ping": ws.ping, "send": lambda: ws.send("x")}
        for name, call in calls.items():
            try:
                await call()
            except websockets.ConnectionClosedError as exc:
                outcome[name] = type(exc.__cause__).__name__
        websockets.broadcast([ws], "skipped")
        await ws.close()
        outcome["state"] = ws.state.name
        done.set()

    async def main() -> None:
        async with _serve_one(websockets, handler) as server:
            client = await connect(uri(server))
            sock = client.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.transport.abort()  # a RST, as from a peer that crashed
            await within(done.wait())

    run(main)
    reset = "ConnectionResetError"
    assert outcome == dict(recv=reset, pong=reset, ping=reset, send=reset, state="CLOSED")


@pytest.mark.hub_only("websockets leaves the connection open after the failed write")
def test_broadcast_write_failure_is_reported_with_its_cause(websockets: ModuleType) -> None:
    """The first broadcast after the transport broke reports a RuntimeError caused by the
    transport's error; the connection is closed from then on."""
    outcome: dict[str, Any] = {}

    async def handler(ws: Any) -> None:
        await asyncio.sleep(0)  # a new loop turn: the broadcast writes straight through
        ws.transport.write_eof()
        try:
            websockets.broadcast([ws], "x", raise_exceptions=True)
        except ExceptionGroup as group:
            error = group.exceptions[0]
            outcome["error"] = (type(error).__name__, str(error), str(error.__cause__))
        outcome["state"] = ws.state.name

    async def main() -> None:
        async with _serve_one(websockets, handler) as server:
            async with connect(uri(server)) as client:
                await within(client.wait_closed())

    run(main)
    assert outcome["error"] == (
        "RuntimeError",
        "failed to write message",
        "Cannot call write() after write_eof()",
    )
    assert outcome["state"] == "CLOSED"


@pytest.mark.hub_only("websockets' new asyncio serve() has no read_limit (only the legacy one)")
def test_read_limit_stops_reading_while_unread_messages_pile_up(websockets: ModuleType) -> None:
    """``read_limit`` (of the legacy API) acts: with no message-count limit, the server stops
    reading from a client whose unread messages reach that many bytes, and reads again once the
    handler caught up, losing nothing. Without it, reading goes on."""
    seen: dict[str, Any] = {}
    total = 200

    def handler_for(name: str) -> Any:
        async def handler(ws: Any) -> None:
            await asyncio.sleep(0.5)  # the client sends everything meanwhile
            seen[name] = ws.transport.is_reading()
            got = [await ws.recv() for _ in range(total)]
            seen[name + " intact"] = got == [bytes([i]) * 16384 for i in range(total)]
            await ws.send("done")

        return handler

    async def main() -> None:
        for name, kwargs in (("limited", {"read_limit": 65536}), ("unlimited", {})):
            async with websockets.serve(
                handler_for(name), "127.0.0.1", 0, max_queue=None, compression=None, **kwargs
            ) as server:
                async with connect(uri(server), compression=None) as client:
                    for i in range(total):
                        await client.send(bytes([i]) * 16384)
                    assert await within(client.recv(), 20) == "done"

    run(main)
    assert seen == {
        "limited": False,
        "limited intact": True,
        "unlimited": True,
        "unlimited intact": True,
    }
