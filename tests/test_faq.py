"""Every answer of the server FAQ (seeds/003_*), checked over real sockets with a real client.

Each test runs the FAQ's snippet (or the fixed version it recommends) against the implementation
under test and asserts what the answer promises, plus the connection semantics the answers rely on
(close codes, ``async for`` endings, ``recv`` concurrency, ``ping`` latency, server shutdown).
"""

from __future__ import annotations

import asyncio
import functools
import http
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from wshelp import STEP, address, raw_exchange, run, upgrade_request, uri, within

REPO = Path(__file__).resolve().parent.parent


async def echo(websocket: Any) -> None:
    """The FAQ's echo handler."""
    async for message in websocket:
        await websocket.send(message)


# --- Why does the server close the connection prematurely? ---


def test_handler_returning_early_closes_with_1000(websockets: ModuleType) -> None:
    """A handler that only spawns a task returns at once, and the connection closes with 1000."""

    async def main() -> None:
        work_started = asyncio.Event()

        async def do_some_work() -> None:
            work_started.set()

        async def handler(websocket: Any) -> None:
            asyncio.create_task(do_some_work())  # noqa: RUF006 - the FAQ's mistake, on purpose

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                with pytest.raises(ConnectionClosedOK) as caught:
                    await within(client.recv())
                assert caught.value.rcvd is not None
                assert caught.value.rcvd.code == 1000
            await within(work_started.wait())

    run(main)


def test_handler_awaiting_its_work_keeps_connection(websockets: ModuleType) -> None:
    """The FAQ's fix: awaiting the work keeps the connection open until the work is done."""

    async def main() -> None:
        async def do_some_work(websocket: Any) -> None:
            name = await websocket.recv()
            await websocket.send(f"worked for {name}")

        async def handler(websocket: Any) -> None:
            await do_some_work(websocket)

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.send("ann"))
                assert await within(client.recv()) == "worked for ann"
                with pytest.raises(ConnectionClosedOK):
                    await within(client.recv())
            assert client.close_code == 1000

    run(main)


# --- Why does the server close the connection after one message? ---


def test_one_message_handler_closes_after_first_message(websockets: ModuleType) -> None:
    """A handler that receives once then returns closes the connection with 1000."""

    async def main() -> None:
        seen: list[str] = []

        async def handler(websocket: Any) -> None:
            seen.append(await websocket.recv())

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.send("first"))
                with pytest.raises(ConnectionClosedOK) as caught:
                    await within(client.recv())
                assert caught.value.rcvd is not None
                assert caught.value.rcvd.code == 1000
            assert seen == ["first"]

    run(main)


def test_loop_handler_processes_every_message(websockets: ModuleType) -> None:
    """The FAQ's fix: ``async for message in websocket`` sees every message, in order."""

    async def main() -> None:
        seen: list[str] = []
        finished = asyncio.Event()

        async def handler(websocket: Any) -> None:
            async for message in websocket:
                seen.append(message)
            finished.set()

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                for i in range(20):
                    await within(client.send(f"m{i}"))
            await within(finished.wait())
            assert seen == [f"m{i}" for i in range(20)]

    run(main)


# --- Why can only one client connect at a time? ---


def test_async_sleep_handlers_run_concurrently(websockets: ModuleType) -> None:
    """With ``await asyncio.sleep`` two handlers overlap in time instead of running in turn."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        spans: list[tuple[float, float]] = []

        async def handler(websocket: Any) -> None:
            await websocket.recv()
            start = loop.time()
            await asyncio.sleep(0.3)
            spans.append((start, loop.time()))
            await websocket.send("done")

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as one, connect(uri(server)) as two:
                await within(asyncio.gather(one.send("go"), two.send("go")))
                replies = await within(asyncio.gather(one.recv(), two.recv()))
        assert replies == ["done", "done"]
        (start1, end1), (start2, end2) = spans
        assert start1 < end2 and start2 < end1, f"handlers ran one after the other: {spans}"

    run(main)


def test_firehose_with_sleep_zero_does_not_starve_others(websockets: ModuleType) -> None:
    """A handler sending continuously but yielding with sleep(0) leaves room for other clients."""

    async def main() -> None:
        async def handler(websocket: Any) -> None:
            if websocket.request.path == "/firehose":
                while True:
                    await websocket.send("firehose!")
                    await asyncio.sleep(0)
            else:
                await echo(websocket)

        async with websockets.serve(handler, "localhost", 0) as server:
            # An unbounded client queue keeps reading, so the close frame behind the flood is seen.
            async with connect(uri(server, "/firehose"), max_queue=None) as hose:
                for _ in range(10):
                    assert await within(hose.recv()) == "firehose!"
                async with connect(uri(server, "/echo")) as other:
                    await within(other.send("still served"))
                    assert await within(other.recv()) == "still served"

    run(main)


# --- How do I send a message to all users? ---


def test_send_to_all_users_with_broadcast(websockets: ModuleType) -> None:
    """CONNECTIONS set + broadcast(): every connected client gets it; departed ones drop out."""

    async def main() -> None:
        CONNECTIONS: set[Any] = set()  # the FAQ's name
        changed = asyncio.Queue[int]()

        async def handler(websocket: Any) -> None:
            CONNECTIONS.add(websocket)
            changed.put_nowait(len(CONNECTIONS))
            try:
                await websocket.wait_closed()
            finally:
                CONNECTIONS.remove(websocket)
                changed.put_nowait(len(CONNECTIONS))

        def message_all(message: str) -> None:
            websockets.broadcast(CONNECTIONS, message)

        async def until(count: int) -> None:
            while await within(changed.get()) != count:
                pass

        async with websockets.serve(handler, "localhost", 0) as server:
            clients = [await within(connect(uri(server))) for _ in range(3)]
            await until(3)
            message_all("to everyone")
            for client in clients:
                assert await within(client.recv()) == "to everyone"
            await within(clients[0].close())
            await until(2)
            message_all(b"binary too")
            for client in clients[1:]:
                assert await within(client.recv()) == b"binary too"
            for client in clients[1:]:
                await within(client.close())
            await until(0)

    run(main)


def test_broadcast_skips_closed_connections(websockets: ModuleType) -> None:
    """broadcast() ignores connections that are closed instead of raising."""

    async def main() -> None:
        kept: list[Any] = []
        got_two = asyncio.Event()

        async def handler(websocket: Any) -> None:
            kept.append(websocket)
            if len(kept) == 2:
                got_two.set()
            await websocket.wait_closed()

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as one, connect(uri(server)) as two:
                await within(got_two.wait())
                await within(one.close())
                await within(kept[0].wait_closed())
                websockets.broadcast(kept, "survivors only")
                assert await within(two.recv()) == "survivors only"

    run(main)


@pytest.mark.hub_only("websockets>=14 names it Server.connections")
def test_server_websockets_lists_open_connections(websockets: ModuleType) -> None:
    """``Server.websockets`` (spec 002) is the set of open connections, for app-wide messages."""

    async def main() -> None:
        arrived = asyncio.Queue[Any]()

        async def handler(websocket: Any) -> None:
            arrived.put_nowait(websocket)
            await websocket.wait_closed()

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as one, connect(uri(server)) as two:
                conns = {await within(arrived.get()), await within(arrived.get())}
                assert set(server.websockets) == conns
                websockets.broadcast(server.websockets, "via server.websockets")
                for client in (one, two):
                    assert await within(client.recv()) == "via server.websockets"
                await within(one.close())
                async with asyncio.timeout(STEP):
                    while len(set(server.websockets)) != 1:
                        await asyncio.sleep(0.01)

    run(main)


def test_send_to_some_users(websockets: ModuleType) -> None:
    """The channel/topic answer: pick recipients from the per-user dict, broadcast to them."""

    async def main() -> None:
        CONNECTIONS: dict[str, Any] = {}  # the FAQ's name
        joined = asyncio.Queue[str]()

        async def handler(websocket: Any) -> None:
            user_id = websocket.request.path.strip("/")
            CONNECTIONS[user_id] = websocket
            joined.put_nowait(user_id)
            try:
                await websocket.wait_closed()
            finally:
                del CONNECTIONS[user_id]

        async with websockets.serve(handler, "localhost", 0) as server:
            names = ["ann", "bob", "cat"]
            clients = {name: await within(connect(uri(server, f"/{name}"))) for name in names}
            for _ in names:
                await within(joined.get())
            websockets.broadcast([CONNECTIONS[n] for n in ("ann", "cat")], "topic: cats")
            websockets.broadcast([CONNECTIONS["bob"]], "topic: dogs")
            assert await within(clients["ann"].recv()) == "topic: cats"
            assert await within(clients["cat"].recv()) == "topic: cats"
            assert await within(clients["bob"].recv()) == "topic: dogs"
            for client in clients.values():
                await within(client.close())

    run(main)


# --- How do I send a message to a single user? ---


def test_send_to_single_user(websockets: ModuleType) -> None:
    """CONNECTIONS dict + send(): only that user gets it; after they leave, send raises."""

    async def main() -> None:
        CONNECTIONS: dict[str, Any] = {}  # the FAQ's name
        joined = asyncio.Queue[str]()
        left = asyncio.Queue[str]()

        async def handler(websocket: Any) -> None:
            user_id = websocket.request.path.strip("/")
            CONNECTIONS[user_id] = websocket
            joined.put_nowait(user_id)
            try:
                await websocket.wait_closed()
            finally:
                del CONNECTIONS[user_id]
                left.put_nowait(user_id)

        async def message_user(user_id: str, message: str) -> None:
            websocket = CONNECTIONS[user_id]
            await websocket.send(message)

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server, "/alice")) as alice:
                async with connect(uri(server, "/bob")) as bob:
                    assert {await within(joined.get()), await within(joined.get())} == {
                        "alice",
                        "bob",
                    }
                    await within(message_user("bob", "just for bob"))
                    assert await within(bob.recv()) == "just for bob"
                    await within(message_user("alice", "just for alice"))
                    assert await within(alice.recv()) == "just for alice"
                    stale = CONNECTIONS["bob"]
                assert await within(left.get()) == "bob"
                with pytest.raises(KeyError):
                    await message_user("bob", "too late")
                with pytest.raises(websockets.ConnectionClosed):
                    await within(stale.send("too late"))
                await within(message_user("alice", "alice still here"))
                assert await within(alice.recv()) == "alice still here"

    run(main)


# --- How do I pass arguments to the connection handler? ---


def test_functools_partial_handler(websockets: ModuleType) -> None:
    """A handler bound with functools.partial receives its extra keyword argument."""

    async def main() -> None:
        async def handler(websocket: Any, extra_argument: int) -> None:
            await websocket.send(str(extra_argument))

        bound_handler = functools.partial(handler, extra_argument=42)
        async with websockets.serve(bound_handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                assert await within(client.recv()) == "42"

    run(main)


# --- How do I access the request path? ---


def _router(get_path: Any) -> Any:
    """The FAQ's routing handler, reading the path with ``get_path``."""

    async def blue_handler(websocket: Any) -> None:
        await websocket.send("blue")

    async def green_handler(websocket: Any) -> None:
        await websocket.send("green")

    async def handler(websocket: Any) -> None:
        if get_path(websocket) == "/blue":
            await blue_handler(websocket)
        elif get_path(websocket) == "/green":
            await green_handler(websocket)
        else:
            return

    return handler


def test_route_on_request_path(websockets: ModuleType) -> None:
    """``websocket.request.path`` routes connections (the newer spelling)."""

    async def main() -> None:
        async with websockets.serve(_router(lambda ws: ws.request.path), "localhost", 0) as server:
            for path in ("/blue", "/green"):
                async with connect(uri(server, path)) as client:
                    assert await within(client.recv()) == path.strip("/")
            async with connect(uri(server, "/red")) as client:
                with pytest.raises(ConnectionClosedOK):
                    await within(client.recv())
            assert client.close_code == 1000

    run(main)


@pytest.mark.hub_only("websockets>=14 ServerConnection has no .path (legacy API only)")
def test_route_on_path_attribute(websockets: ModuleType) -> None:
    """``websocket.path`` routes connections, as the FAQ's snippet writes it."""

    async def main() -> None:
        async with websockets.serve(_router(lambda ws: ws.path), "localhost", 0) as server:
            for path in ("/blue", "/green"):
                async with connect(uri(server, path)) as client:
                    assert await within(client.recv()) == path.strip("/")
            async with connect(uri(server, "/red")) as client:
                with pytest.raises(ConnectionClosedOK):
                    await within(client.recv())

    run(main)


def test_request_path_keeps_query_string(websockets: ModuleType) -> None:
    """``request.path`` is the request target as sent, query string included."""

    async def main() -> None:
        async def handler(websocket: Any) -> None:
            await websocket.send(websocket.request.path)

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server, "/room/1?token=abc")) as client:
                assert await within(client.recv()) == "/room/1?token=abc"

    run(main)


# --- How do I access HTTP headers? ---


def test_headers_in_process_request_and_handler(websockets: ModuleType) -> None:
    """New style: ``process_request(connection, request)`` and ``websocket.request.headers``."""

    async def main() -> None:
        seen: list[str] = []

        async def process_request(connection: Any, request: Any) -> None:
            seen.append(request.headers["Authorization"])

        async def handler(websocket: Any) -> None:
            await websocket.send(websocket.request.headers["Authorization"])
            await websocket.send(websocket.request.headers["x-custom"])  # case-insensitive

        async with websockets.serve(
            handler, "localhost", 0, process_request=process_request
        ) as server:
            headers = {"Authorization": "Bearer t0k3n", "X-Custom": "yes"}
            async with connect(uri(server), additional_headers=headers) as client:
                assert await within(client.recv()) == "Bearer t0k3n"
                assert await within(client.recv()) == "yes"
        assert seen == ["Bearer t0k3n"]

    run(main)


@pytest.mark.hub_only(
    "websockets>=14 has no legacy process_request(path, request_headers) nor "
    ".request_headers / .response_headers"
)
def test_headers_legacy_spelling(websockets: ModuleType) -> None:
    """The FAQ's spelling: ``process_request(path, request_headers)``, ``request_headers``."""

    async def main() -> None:
        seen: list[tuple[str, str]] = []

        async def process_request(path: str, request_headers: Any) -> None:
            authorization = request_headers["Authorization"]
            seen.append((path, authorization))

        async def handler(websocket: Any) -> None:
            authorization = websocket.request_headers["Authorization"]
            await websocket.send(authorization)
            await websocket.send(websocket.response_headers["Upgrade"].lower())
            await websocket.send(websocket.response_headers["X-Extra"])

        async with websockets.serve(
            handler,
            "localhost",
            0,
            process_request=process_request,
            extra_headers={"X-Extra": "from server"},
        ) as server:
            headers = {"Authorization": "Basic YWRtaW46c2VjcmV0MTIz"}
            async with connect(uri(server, "/legacy"), additional_headers=headers) as client:
                assert await within(client.recv()) == "Basic YWRtaW46c2VjcmV0MTIz"
                assert await within(client.recv()) == "websocket"
                assert await within(client.recv()) == "from server"
        assert seen == [("/legacy", "Basic YWRtaW46c2VjcmV0MTIz")]

    run(main)


def test_response_headers_seen_by_handler(websockets: ModuleType) -> None:
    """``websocket.response.headers`` holds what the client actually received."""

    async def main() -> None:
        async def handler(websocket: Any) -> None:
            await websocket.send(websocket.response.headers["Sec-WebSocket-Accept"])

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                sent = client.response.headers["Sec-WebSocket-Accept"]
                assert await within(client.recv()) == sent

    run(main)


# --- How do I set HTTP headers? ---


@pytest.mark.hub_only("websockets>=14 serve() has no extra_headers")
def test_extra_headers(websockets: ModuleType) -> None:
    """``extra_headers`` adds arbitrary response headers to the handshake."""

    async def main() -> None:
        extra = {"X-Hub-Node": "node-7", "Cache-Control": "no-store"}
        async with websockets.serve(echo, "localhost", 0, extra_headers=extra) as server:
            async with connect(uri(server)) as client:
                assert client.response.headers["X-Hub-Node"] == "node-7"
                assert client.response.headers["Cache-Control"] == "no-store"
                await within(client.send("still a websocket"))
                assert await within(client.recv()) == "still a websocket"
        pairs = [("X-Pair", "a"), ("X-Pair", "b")]
        async with websockets.serve(echo, "localhost", 0, extra_headers=pairs) as server:
            async with connect(uri(server)) as client:
                assert client.response.headers.get_all("X-Pair") == ["a", "b"]

    run(main)


def test_server_header_default_override_and_removal(websockets: ModuleType) -> None:
    """A Server header is sent by default; ``server_header`` replaces it, None removes it."""

    async def main() -> None:
        async with websockets.serve(echo, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                assert client.response.headers.get("Server")
        async with websockets.serve(echo, "localhost", 0, server_header="hub-test/1") as server:
            async with connect(uri(server)) as client:
                assert client.response.headers.get_all("Server") == ["hub-test/1"]
        async with websockets.serve(echo, "localhost", 0, server_header=None) as server:
            async with connect(uri(server)) as client:
                assert "Server" not in client.response.headers

    run(main)


# --- How do I get the IP address of the client? ---


def test_remote_address_is_client_address(websockets: ModuleType) -> None:
    """``websocket.remote_address`` is the client's (ip, port); local_address is the server's."""

    async def main() -> None:
        async def handler(websocket: Any) -> None:
            remote_ip = websocket.remote_address[0]
            await websocket.send(f"{remote_ip} {websocket.remote_address[1]}")
            await websocket.send(f"{websocket.local_address[0]} {websocket.local_address[1]}")

        async with websockets.serve(handler, "127.0.0.1", 0) as server:
            async with connect(uri(server)) as client:
                ip, port = client.local_address[:2]
                assert await within(client.recv()) == f"{ip} {port}"
                host, server_port = address(server)
                assert await within(client.recv()) == f"{host} {server_port}"

    run(main)


# --- How do I set the IP addresses that my server listens on? ---


def test_bind_single_host(websockets: ModuleType) -> None:
    """``host="127.0.0.1"`` binds exactly that address."""

    async def main() -> None:
        server = await within(websockets.serve(echo, host="127.0.0.1", port=0))
        try:
            assert {s.getsockname()[0] for s in server.sockets} == {"127.0.0.1"}
            async with connect(uri(server)) as client:
                await within(client.send("bound"))
                assert await within(client.recv()) == "bound"
        finally:
            server.close()
            await within(server.wait_closed())

    run(main)


def test_bind_host_list(websockets: ModuleType) -> None:
    """A list of hosts binds each of them (serve passes host to create_server)."""

    async def main() -> None:
        hosts = ["127.0.0.1", "::1"]
        async with websockets.serve(echo, host=hosts, port=0) as server:
            names = [s.getsockname() for s in server.sockets]
            assert {name[0] for name in names} == set(hosts)
            for name in names:
                host = f"[{name[0]}]" if ":" in name[0] else name[0]
                async with connect(f"ws://{host}:{name[1]}/") as client:
                    await within(client.send(name[0]))
                    assert await within(client.recv()) == name[0]

    run(main)


def test_create_server_kwargs_pass_through(websockets: ModuleType) -> None:
    """``family=socket.AF_INET`` (a create_server argument) is honoured, per the FAQ."""
    import socket

    async def main() -> None:
        async with websockets.serve(echo, "localhost", 0, family=socket.AF_INET) as server:
            assert {s.family for s in server.sockets} == {socket.AF_INET}
            async with connect(uri(server)) as client:
                await within(client.send("v4"))
                assert await within(client.recv()) == "v4"

    run(main)


# --- How do I close a connection? / How do I stop a server? ---


SIGTERM_SERVER = textwrap.dedent(
    """
    import asyncio
    import os
    import signal
    import sys

    if os.environ.get("HUB_TEST_IMPL") == "websockets":
        import websockets
    else:
        import hub.ws as websockets

    async def echo(websocket):
        async for message in websocket:
            await websocket.send(message)

    async def server():
        # Set the stop condition when receiving SIGTERM.
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)

        async with websockets.serve(echo, "localhost", 0) as srv:
            print(srv.sockets[0].getsockname()[1], flush=True)
            await stop

    asyncio.run(server())
    print("clean exit", flush=True)
    """
)


def test_sigterm_stops_server_and_closes_clients_with_1001(
    websockets: ModuleType, tmp_path: Path
) -> None:
    """The FAQ's SIGTERM server: SIGTERM closes clients with 1001 and the process exits 0."""
    script = tmp_path / "shutdown_server.py"
    script.write_text(SIGTERM_SERVER)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tmp_path,
        )
        assert proc.stdout is not None
        try:
            port = int(await within(proc.stdout.readline(), 15))
            async with connect(f"ws://localhost:{port}/") as client:
                await within(client.send("before"))
                assert await within(client.recv()) == "before"
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosedOK) as caught:
                    await within(client.recv())
                assert caught.value.rcvd is not None
                assert caught.value.rcvd.code == 1001
            out, err = await within(proc.communicate(), 15)
            assert proc.returncode == 0, err.decode()
            assert out.decode().strip() == "clean exit"
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    run(main, 40)


def test_server_close_closes_connections_with_1001(websockets: ModuleType) -> None:
    """``Server.close()`` closes open connections with 1001 (going away)."""

    async def main() -> None:
        handler_done = asyncio.Event()

        async def handler(websocket: Any) -> None:
            try:
                await echo(websocket)
            finally:
                handler_done.set()

        server = await within(websockets.serve(handler, "localhost", 0))
        async with connect(uri(server)) as client:
            await within(client.send("hi"))
            assert await within(client.recv()) == "hi"
            server.close()
            with pytest.raises(ConnectionClosedOK) as caught:
                await within(client.recv())
            assert caught.value.rcvd is not None
            assert caught.value.rcvd.code == 1001
        await within(server.wait_closed())
        assert handler_done.is_set()

    run(main)


def test_exiting_serve_context_closes_connections_with_1001(websockets: ModuleType) -> None:
    """Leaving ``async with serve(...)`` stops the server: clients see 1001, port is freed."""

    async def main() -> None:
        async with websockets.serve(echo, "localhost", 0) as server:
            client = await within(connect(uri(server)))
            host, port = address(server)
        with pytest.raises(ConnectionClosedOK) as caught:
            await within(client.recv())
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1001
        with pytest.raises(OSError):
            await within(asyncio.open_connection(host, port))

    run(main)


# --- How do I stop a server while keeping existing connections open? ---


@pytest.mark.hub_only("websockets>=14 Server.close() returns None, so it can't be awaited")
def test_close_without_closing_connections(websockets: ModuleType) -> None:
    """``await server.close(close_connections=False)``: no new clients, old ones keep going."""

    async def main() -> None:
        server = await within(websockets.serve(echo, "localhost", 0))
        host, port = address(server)
        async with connect(uri(server)) as client:
            closing = asyncio.ensure_future(server.close(close_connections=False))
            # Wait (bounded) until the listening socket is gone.
            async with asyncio.timeout(STEP):
                while True:
                    try:
                        _, writer = await asyncio.open_connection(host, port)
                    except OSError:
                        break
                    writer.close()
                    await asyncio.sleep(0.01)
            await within(client.send("still open"))
            assert await within(client.recv()) == "still open"
            assert client.close_code is None
        assert client.close_code == 1000
        await within(closing)
        await within(server.wait_closed())

    run(main)


# --- How do I implement a health check? ---


async def _check_health(websockets: ModuleType, health_check: Any) -> None:
    async with websockets.serve(echo, "localhost", 0, process_request=health_check) as server:
        # A load balancer sends a plain GET, not an upgrade.
        plain = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
        response = await raw_exchange(server, plain)
        assert (response.status, response.body) == (200, b"OK\n")
        # So does a probe that happens to look like an upgrade.
        response = await raw_exchange(server, upgrade_request("/healthz"))
        assert (response.status, response.body) == (200, b"OK\n")
        # Other paths remain WebSocket endpoints.
        async with connect(uri(server, "/")) as client:
            await within(client.send("ws"))
            assert await within(client.recv()) == "ws"
        response = await raw_exchange(server, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert response.status == 426


@pytest.mark.hub_only("websockets>=14 process_request must return a Response, not a tuple")
def test_health_check_new_style(websockets: ModuleType) -> None:
    """``process_request(connection, request)`` returning ``(status, headers, body)``."""

    async def health_check(connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return http.HTTPStatus.OK, [], b"OK\n"
        return None

    run(lambda: _check_health(websockets, health_check))


@pytest.mark.hub_only("websockets>=14 has no legacy process_request(path, request_headers)")
def test_health_check_legacy_signature(websockets: ModuleType) -> None:
    """The FAQ's exact ``health_check(path, request_headers)``, detected by its parameter name."""

    async def health_check(path: str, request_headers: Any) -> Any:
        if path == "/healthz":
            return http.HTTPStatus.OK, [], b"OK\n"

    run(lambda: _check_health(websockets, health_check))


# --- Connection semantics the answers rely on ---


def test_handler_exception_closes_with_1011(websockets: ModuleType) -> None:
    """A handler that raises closes the connection with 1011 (internal error)."""

    async def main() -> None:
        async def handler(websocket: Any) -> None:
            await websocket.recv()
            raise ValueError("boom")

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.send("trigger"))
                with pytest.raises(ConnectionClosedError) as caught:
                    await within(client.recv())
                assert caught.value.rcvd is not None
                assert caught.value.rcvd.code == 1011
            # The server survives it.
            async with connect(uri(server)) as client:
                await within(client.send("again"))
                with pytest.raises(ConnectionClosedError):
                    await within(client.recv())

    run(main)


def test_concurrent_recv_raises_runtime_error(websockets: ModuleType) -> None:
    """Two tasks calling recv() at once: the second gets a clear RuntimeError subclass."""

    async def main() -> None:
        async def handler(websocket: Any) -> None:
            first = asyncio.create_task(websocket.recv())
            await asyncio.sleep(0)  # let the first recv start waiting
            try:
                await websocket.recv()
            except RuntimeError as exc:
                await websocket.send(f"{type(exc).__name__}: {exc}")
            else:
                await websocket.send("no error")
            await websocket.send(f"first got {await first}")

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                report = await within(client.recv())
                name, _, message = report.partition(": ")
                assert name != "RuntimeError", "expected a dedicated RuntimeError subclass"
                assert name != "no error"
                assert "recv" in message
                await within(client.send("payload"))
                assert await within(client.recv()) == "first got payload"

    run(main)


def test_ping_returns_awaitable_latency(websockets: ModuleType) -> None:
    """``await websocket.ping()`` gives an awaitable; awaiting it gives the latency in seconds."""

    async def main() -> None:
        async def handler(websocket: Any) -> None:
            pong_waiter = await websocket.ping()
            latency = await pong_waiter
            await websocket.send(f"{type(latency).__name__} {latency!r}")
            pong_waiter = await websocket.ping(b"with data")
            await pong_waiter
            await websocket.send("pinged twice")
            await websocket.wait_closed()

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                kind, value = (await within(client.recv())).split(" ")
                assert kind == "float"
                assert 0 <= float(value) < STEP
                assert await within(client.recv()) == "pinged twice"

    run(main)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (1000, "ended"),
        (1001, "ended"),
        (1011, "ConnectionClosedError 1011"),
        (4000, "ConnectionClosedError 4000"),
    ],
)
def test_async_for_ending_depends_on_close_code(
    websockets: ModuleType, code: int, expected: str
) -> None:
    """``async for`` ends quietly on 1000/1001 and raises ConnectionClosedError otherwise."""

    async def main() -> None:
        outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler(websocket: Any) -> None:
            try:
                async for message in websocket:
                    await websocket.send(message)
            except websockets.ConnectionClosedError as exc:
                received = exc.rcvd.code if exc.rcvd is not None else None
                outcome.set_result(f"ConnectionClosedError {received}")
            except Exception as exc:
                outcome.set_result(f"unexpected {type(exc).__name__}")
            else:
                outcome.set_result("ended")

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.send("x"))
                assert await within(client.recv()) == "x"
                await within(client.close(code, "bye"))
            assert await within(outcome) == expected

    run(main)


def test_recv_after_normal_close_raises_connection_closed_ok(websockets: ModuleType) -> None:
    """After a 1000 close, ``recv()`` raises ConnectionClosedOK carrying code and reason."""

    async def main() -> None:
        report: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def handler(websocket: Any) -> None:
            try:
                await websocket.recv()
            except websockets.ConnectionClosedOK as exc:
                assert exc.rcvd is not None
                report.set_result(f"{exc.rcvd.code} {exc.rcvd.reason}")
            await websocket.wait_closed()
            assert websocket.close_code == 1000
            assert websocket.close_reason == "done here"

        async with websockets.serve(handler, "localhost", 0) as server:
            async with connect(uri(server)) as client:
                await within(client.close(1000, "done here"))
            assert await within(report) == "1000 done here"

    run(main)
