"""The usage examples of the spec (seeds/002_*), run as written with only the import changed.

The ``websockets`` fixture stands for ``import hub.ws as websockets``. Each example binds port 0
instead of 8765 and, instead of ``await asyncio.Future()``, is driven by a real ``websockets``
client, so what passes here is what an application copying the example gets.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect, unix_connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from wshelp import run, uri, within

AUTH = "Basic YWRtaW46c2VjcmV0MTIz"  # admin:secret123, as printed by the example


def test_echo_server(websockets: ModuleType) -> None:
    """Basic echo: every message comes back prefixed, in order, until the client leaves."""

    async def echo_handler(websocket: Any) -> None:
        async for message in websocket:
            await websocket.send(f"Echo: {message}")

    async def main() -> None:
        async with websockets.serve(echo_handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                for text in ["hello", "", "ünïcödé ✓", "x" * 1000]:
                    await within(client.send(text))
                    assert await within(client.recv()) == f"Echo: {text}"
            # The handler's loop ended cleanly, so the server closed with 1000 both ways.
            assert client.close_code == 1000

    run(main)


def test_chat_server_broadcasts(websockets: ModuleType) -> None:
    """Chat: a JSON message reaches every client; bad JSON gets an error only to its sender."""
    clients: set[Any] = set()

    async def chat_handler(websocket: Any) -> None:
        clients.add(websocket)
        try:
            async for message in websocket:
                try:
                    data = json.loads(message)
                    chat_message = {
                        "user": data.get("user", "Anonymous"),
                        "message": data.get("message", ""),
                        "timestamp": asyncio.get_event_loop().time(),
                    }
                    websockets.broadcast(clients, json.dumps(chat_message))
                except json.JSONDecodeError:
                    await websocket.send(json.dumps({"error": "Invalid JSON format"}))
        except websockets.ConnectionClosedError:
            pass
        finally:
            clients.discard(websocket)

    async def main() -> None:
        async with websockets.serve(
            chat_handler, "localhost", 0, ping_interval=30, ping_timeout=10, max_size=1024 * 10
        ) as server:
            async with connect(uri(server)) as ann, connect(uri(server)) as bob:
                # An error reply proves each handler runs, hence that each client is registered.
                for client in (ann, bob):
                    await within(client.send("not json"))
                    assert json.loads(await within(client.recv())) == {
                        "error": "Invalid JSON format"
                    }
                await within(ann.send(json.dumps({"user": "ann", "message": "hi all"})))
                for client in (ann, bob):
                    got = json.loads(await within(client.recv()))
                    assert got["user"] == "ann"
                    assert got["message"] == "hi all"
                    assert isinstance(got["timestamp"], float)
                await within(bob.send(json.dumps({"message": "anon"})))
                for client in (ann, bob):
                    got = json.loads(await within(client.recv()))
                    assert (got["user"], got["message"]) == ("Anonymous", "anon")
                assert len(clients) == 2

    run(main)


def test_chat_server_drops_departed_and_oversized_clients(websockets: ModuleType) -> None:
    """Chat: max_size=10 KiB closes an oversized sender with 1009; the others keep chatting."""
    clients: set[Any] = set()
    gone = asyncio.Queue[Any]()

    async def chat_handler(websocket: Any) -> None:
        clients.add(websocket)
        try:
            async for message in websocket:
                data = json.loads(message)
                websockets.broadcast(clients, json.dumps({"message": data.get("message", "")}))
        except websockets.ConnectionClosedError:
            pass
        finally:
            clients.discard(websocket)
            gone.put_nowait(websocket)

    async def main() -> None:
        async with websockets.serve(
            chat_handler, "localhost", 0, ping_interval=30, ping_timeout=10, max_size=1024 * 10
        ) as server:
            async with connect(uri(server)) as ann, connect(uri(server)) as bob:
                await within(bob.send(json.dumps({"message": "x" * 20_000})))
                with pytest.raises(ConnectionClosedError) as caught:
                    await within(bob.recv())
                assert caught.value.rcvd is not None
                assert caught.value.rcvd.code == 1009
                await within(gone.get())
                await within(ann.send(json.dumps({"message": "still here"})))
                assert json.loads(await within(ann.recv())) == {"message": "still here"}
                assert len(clients) == 1

    run(main)


@pytest.mark.hub_only(
    "websockets.basic_auth is a process_request factory, not a decorator, and its serve() "
    "has no extra_headers"
)
def test_authenticated_server(websockets: ModuleType) -> None:
    """@basic_auth guards the handler: 401 without or with wrong credentials, welcome with them."""
    basic_auth = websockets.basic_auth  # the example's `from websockets import basic_auth`

    @basic_auth("admin", "secret123")
    async def protected_handler(websocket: Any) -> None:
        await websocket.send("Welcome! You are authenticated.")
        async for message in websocket:
            if message.lower() == "status":
                await websocket.send("Server is running normally")
            else:
                await websocket.send(f"Received: {message}")

    async def main() -> None:
        async with websockets.serve(
            protected_handler, "localhost", 0, extra_headers={"Server": "MyWebSocketServer/1.0"}
        ) as server:
            for headers in ({}, {"Authorization": "Basic YWRtaW46d3Jvbmc="}):  # admin:wrong
                with pytest.raises(InvalidStatus) as caught:
                    await within(connect(uri(server), additional_headers=headers))
                assert caught.value.response.status_code == 401
                challenge = caught.value.response.headers.get("WWW-Authenticate", "")
                assert challenge.startswith("Basic ")
                assert "realm=" in challenge

            async with connect(uri(server), additional_headers={"Authorization": AUTH}) as client:
                assert client.response.headers.get_all("Server") == ["MyWebSocketServer/1.0"]
                assert await within(client.recv()) == "Welcome! You are authenticated."
                await within(client.send("STATUS"))
                assert await within(client.recv()) == "Server is running normally"
                await within(client.send("hello"))
                assert await within(client.recv()) == "Received: hello"

            # Credentials in the URI are how many clients send Basic auth.
            host_port = uri(server).removeprefix("ws://")
            async with connect(f"ws://admin:secret123@{host_port}") as client:
                assert await within(client.recv()) == "Welcome! You are authenticated."

    run(main)


def _api_server(websockets: ModuleType) -> tuple[Any, Any]:
    """The custom-request-processing example's hook and handler, verbatim."""

    async def process_request(connection: Any, request: Any) -> Any:
        api_key = request.headers.get("X-API-Key")
        if not api_key or api_key != "valid-api-key":
            return websockets.Response(403, "Forbidden", b"Invalid API key")
        return None

    async def api_handler(websocket: Any) -> None:
        await websocket.send("API connection established")
        async for message in websocket:
            if message.startswith("GET /"):
                await websocket.send('{"status": "success", "data": "..."}')
            else:
                await websocket.send('{"error": "Unknown command"}')

    return process_request, api_handler


def test_process_request_accepts_valid_key(websockets: ModuleType) -> None:
    """process_request returning None lets the upgrade proceed, with compression negotiated."""
    process_request, api_handler = _api_server(websockets)

    async def main() -> None:
        async with websockets.serve(
            api_handler, "localhost", 0, process_request=process_request, compression="deflate"
        ) as server:
            headers = {"X-API-Key": "valid-api-key"}
            async with connect(uri(server), additional_headers=headers) as client:
                extensions = client.response.headers.get("Sec-WebSocket-Extensions", "")
                assert extensions.startswith("permessage-deflate")
                assert await within(client.recv()) == "API connection established"
                await within(client.send("GET /items"))
                assert json.loads(await within(client.recv())) == {
                    "status": "success",
                    "data": "...",
                }
                await within(client.send("DELETE /items"))
                assert json.loads(await within(client.recv())) == {"error": "Unknown command"}

    run(main)


@pytest.mark.hub_only("websockets.Response takes headers as its third argument, not the body")
def test_process_request_rejects_with_response(websockets: ModuleType) -> None:
    """Response(403, "Forbidden", b"...") is sent as is: status, reason, body reach the client."""
    process_request, api_handler = _api_server(websockets)

    async def main() -> None:
        async with websockets.serve(
            api_handler, "localhost", 0, process_request=process_request, compression="deflate"
        ) as server:
            for headers in ({}, {"X-API-Key": "wrong"}):
                with pytest.raises(InvalidStatus) as caught:
                    await within(connect(uri(server), additional_headers=headers))
                response = caught.value.response
                assert response.status_code == 403
                assert response.reason_phrase == "Forbidden"
                assert response.body == b"Invalid API key"

    run(main)


def test_unix_socket_server(websockets: ModuleType, tmp_path: Path) -> None:
    """unix_serve listens on a filesystem path; a client connecting there gets the echo."""
    socket_path = str(tmp_path / "websocket.sock")

    async def unix_handler(websocket: Any) -> None:
        await websocket.send("Connected via Unix socket")
        async for message in websocket:
            await websocket.send(f"Unix echo: {message}")

    async def main() -> None:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        async with websockets.unix_serve(unix_handler, socket_path):
            assert os.path.exists(socket_path)
            async with unix_connect(socket_path) as client:
                assert await within(client.recv()) == "Connected via Unix socket"
                await within(client.send("over the socket"))
                assert await within(client.recv()) == "Unix echo: over the socket"
            assert isinstance(client.close_code, int)
        with pytest.raises(OSError):
            await within(unix_connect(socket_path))

    run(main)


def test_echo_handler_exits_cleanly_on_client_close(websockets: ModuleType) -> None:
    """The examples' ``async for`` loop ends without error when the client closes normally."""

    async def main() -> None:
        done = asyncio.get_running_loop().create_future()

        async def echo_handler(websocket: Any) -> None:
            try:
                async for message in websocket:
                    await websocket.send(f"Echo: {message}")
            except Exception as exc:  # the test reports it rather than the server's log
                done.set_result(f"raised {type(exc).__name__}")
                raise
            done.set_result("ended")

        async with websockets.serve(echo_handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.send("one"))
                assert await within(client.recv()) == "Echo: one"
            assert await within(done) == "ended"
            with pytest.raises(ConnectionClosedOK):
                await within(client.recv())

    run(main)
