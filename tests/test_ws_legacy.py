"""The older server API of websockets, as code written for ``websockets.server.serve`` uses it:
``ws_handler(websocket, path)``, ``websocket.path`` and ``request_headers``, ``extra_headers``,
``create_protocol=`` with a ``WebSocketServerProtocol`` subclass overriding the handshake hooks,
and ``read_limit`` / ``write_limit``, which must act where they are accepted.

Everything goes through ``websockets.server`` (``hub.ws.server`` here), with a real websockets
client on the other end. Under ``HUB_TEST_IMPL=websockets`` the same tests run against that
library's legacy server.
"""

from __future__ import annotations

import asyncio
import http
import importlib
import warnings
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from wshelp import raw_exchange, run, upgrade_request, uri, within

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # websockets' legacy API


def legacy(websockets: ModuleType) -> Any:
    """``websockets.server``: where the older API lives (``hub.ws.server`` for us)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(f"{websockets.__name__}.server")


def test_handler_with_path_sees_path_and_request_headers(websockets: ModuleType) -> None:
    """A two-argument handler gets the request path (query included) as ``path``, the same as
    ``websocket.path``, and the request headers as ``websocket.request_headers``."""
    seen: dict[str, Any] = {}

    async def ws_handler(websocket: Any, path: str) -> None:
        seen["path"] = path
        seen["websocket.path"] = websocket.path
        seen["header"] = websocket.request_headers["X-Room"]
        await websocket.send(await websocket.recv())

    async def main() -> None:
        async with legacy(websockets).serve(ws_handler, "127.0.0.1", 0) as server:
            target = uri(server, "/rooms/7?lang=fr")
            async with connect(target, additional_headers={"X-Room": "seven"}) as client:
                await client.send("ping")
                assert await within(client.recv()) == "ping"

    run(main)
    assert seen == {
        "path": "/rooms/7?lang=fr",
        "websocket.path": "/rooms/7?lang=fr",
        "header": "seven",
    }


@pytest.mark.parametrize("form", ["mapping", "pairs", "callable"])
def test_extra_headers_reach_the_response(websockets: ModuleType, form: str) -> None:
    """``extra_headers`` as a mapping, as pairs, or as ``f(path, request_headers)``."""

    def per_request(path: str, request_headers: Any) -> dict[str, str]:
        return {"X-Path": path, "X-Echo": request_headers["X-Ask"]}

    extra: Any = {
        "mapping": {"X-Path": "/fixed", "X-Echo": "fixed"},
        "pairs": [("X-Path", "/fixed"), ("X-Echo", "fixed")],
        "callable": per_request,
    }[form]

    async def ws_handler(websocket: Any, path: str) -> None:
        await websocket.wait_closed()

    async def main() -> None:
        async with legacy(websockets).serve(
            ws_handler, "127.0.0.1", 0, extra_headers=extra
        ) as server:
            async with connect(uri(server, "/there"), additional_headers={"X-Ask": "hi"}) as c:
                headers = c.response.headers
                if form == "callable":
                    assert (headers["X-Path"], headers["X-Echo"]) == ("/there", "hi")
                else:
                    assert (headers["X-Path"], headers["X-Echo"]) == ("/fixed", "fixed")

    run(main)


def test_create_protocol_subclass_overrides_process_request(websockets: ModuleType) -> None:
    """A ``WebSocketServerProtocol`` subclass given as ``create_protocol`` answers a health check
    from its own ``process_request(path, request_headers)``, refuses a request missing a
    header, lets the others through, and is the object the handler gets."""
    classes: list[type] = []
    base = legacy(websockets).WebSocketServerProtocol

    class Checked(base):  # type: ignore[misc, valid-type]
        async def process_request(self, path: str, request_headers: Any) -> Any:
            if path == "/health":
                return http.HTTPStatus.OK, [("Content-Type", "text/plain")], b"ok\n"
            if "X-Token" not in request_headers:
                return http.HTTPStatus.UNAUTHORIZED, [], b"no token\n"
            self.token = request_headers["X-Token"]  # kept for the handler, as the docs suggest
            return None

    async def ws_handler(websocket: Any, path: str) -> None:
        classes.append(type(websocket))
        await websocket.send(websocket.token)

    async def main() -> None:
        async with legacy(websockets).serve(
            ws_handler, "127.0.0.1", 0, create_protocol=Checked
        ) as server:
            health = await raw_exchange(server, upgrade_request("/health"))
            assert (health.status, health.body) == (200, b"ok\n")
            with pytest.raises(InvalidStatus) as refused:
                async with connect(uri(server)):
                    pass
            assert refused.value.response.status_code == 401
            async with connect(uri(server), additional_headers={"X-Token": "t-1"}) as client:
                assert await within(client.recv()) == "t-1"

    run(main)
    assert classes == [Checked]


def test_create_protocol_subclass_overrides_select_subprotocol(websockets: ModuleType) -> None:
    """``select_subprotocol(client_subprotocols, server_subprotocols)`` overridden in the
    subclass picks the subprotocol: here the client's least preferred one."""
    base = legacy(websockets).WebSocketServerProtocol

    class LastChoice(base):  # type: ignore[misc, valid-type]
        def select_subprotocol(self, client_subprotocols: Any, server_subprotocols: Any) -> Any:
            shared = [p for p in client_subprotocols if p in server_subprotocols]
            return shared[-1] if shared else None

    async def ws_handler(websocket: Any, path: str) -> None:
        await websocket.send(websocket.subprotocol)

    async def main() -> None:
        async with legacy(websockets).serve(
            ws_handler,
            "127.0.0.1",
            0,
            subprotocols=["chat.v1", "chat.v2"],
            create_protocol=LastChoice,
        ) as server:
            async with connect(uri(server), subprotocols=["chat.v2", "chat.v1"]) as client:  # type: ignore[list-item]
                assert client.subprotocol == "chat.v1"
                assert await within(client.recv()) == "chat.v1"

    run(main)


@pytest.mark.hub_only(
    "read_limit bounds the messages waiting for recv() here; in websockets' legacy server it "
    "sizes a byte buffer that only fills once max_queue is reached"
)
def test_read_limit_of_legacy_serve_stops_reading(websockets: ModuleType) -> None:
    """``read_limit`` given to the legacy ``serve()`` acts: with no message-count limit, reading
    stops once the unread messages reach that many bytes, then resumes without loss."""
    seen: dict[str, Any] = {}
    total = 100

    async def ws_handler(websocket: Any, path: str) -> None:
        await asyncio.sleep(0.5)  # the client sends everything meanwhile
        seen["reading"] = websocket.transport.is_reading()
        got = [await websocket.recv() for _ in range(total)]
        seen["intact"] = got == [bytes([i]) * 16384 for i in range(total)]
        await websocket.send("done")

    async def main() -> None:
        async with legacy(websockets).serve(
            ws_handler, "127.0.0.1", 0, read_limit=65536, max_queue=None, compression=None
        ) as server:
            async with connect(uri(server), compression=None) as client:
                for i in range(total):
                    await client.send(bytes([i]) * 16384)
                assert await within(client.recv(), 20) == "done"

    run(main)
    assert seen == {"reading": False, "intact": True}


def test_write_limit_bounds_what_waits_in_the_write_buffer(websockets: ModuleType) -> None:
    """``write_limit`` is the write buffer's high-water mark: sending to a client that reads
    slowly, the server holds at most about that much (plus the message being written) before
    ``send()`` waits; with a larger limit it holds more. Nothing is lost either way."""
    size, count = 256 * 1024, 160  # 40 MiB in all, more than the kernel's buffers take
    peaks: dict[int, int] = {}

    def handler_for(limit: int) -> Any:
        async def ws_handler(websocket: Any, path: str) -> None:
            peak = 0
            for i in range(count):
                await websocket.send(bytes([i % 256]) * size)
                peak = max(peak, websocket.transport.get_write_buffer_size())
            peaks[limit] = peak
            await websocket.wait_closed()

        return ws_handler

    async def main() -> None:
        for limit in (64 * 1024, 32 * 1024 * 1024):
            async with legacy(websockets).serve(
                handler_for(limit), "127.0.0.1", 0, write_limit=limit, compression=None
            ) as server:
                async with connect(uri(server), compression=None, max_queue=1) as client:
                    for i in range(count):
                        message = await within(client.recv())
                        assert message == bytes([i % 256]) * size
                        await asyncio.sleep(0.005)  # a slow reader: the server gets ahead

    run(main, timeout=60)
    small, large = peaks[64 * 1024], peaks[32 * 1024 * 1024]
    assert small <= 64 * 1024 + 2 * size, peaks
    assert large >= 8 * 1024 * 1024, peaks


def test_create_protocol_with_create_connection_is_a_type_error(websockets: ModuleType) -> None:
    """Both names for the connection factory at once: refused, not one silently ignored."""
    base = legacy(websockets).WebSocketServerProtocol

    async def ws_handler(websocket: Any, path: str) -> None:
        await websocket.wait_closed()

    async def main() -> None:
        with pytest.raises(TypeError):
            await legacy(websockets).serve(
                ws_handler, "127.0.0.1", 0, create_protocol=base, create_connection=base
            )

    run(main)
