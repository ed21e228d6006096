"""A peer that does not finish the opening handshake within ``open_timeout`` is hung up on
politely: it reads EOF, as from websockets, not a connection reset.

Nothing has been sent to such a peer (the response is what stops the timer), so closing with a
FIN leaves no unsent data for the kernel to hold, unlike a peer the server gives up on later,
which is reset (see ``test_ws_send.py`` / the close timeout). The server's socket is released,
and other clients are served meanwhile.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import pytest
from websockets.asyncio.client import connect
from wshelp import address, open_raw, run, upgrade_request, uri, within


async def echo(ws: Any) -> None:
    async for message in ws:
        await ws.send(message)


@pytest.mark.parametrize(
    "data",
    [b"", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n", upgrade_request()[:-2]],
    ids=["silent", "stalled-mid-headers", "missing-last-line"],
)
def test_open_timeout_ends_with_eof_not_reset(websockets: ModuleType, data: bytes) -> None:
    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0, open_timeout=0.2) as server:
            reader, writer = await open_raw(*address(server))
            try:
                writer.write(data)
                await within(writer.drain())
                # A reset would raise ConnectionResetError here instead of returning b"".
                assert await within(reader.read()) == b""
            finally:
                writer.close()
            async with connect(uri(server)) as client:
                await client.send("served")
                assert await within(client.recv()) == "served"

    run(main)


def test_open_timeout_while_process_request_decides(websockets: ModuleType) -> None:
    """The timer runs while ``process_request`` is still deciding: the peer gets EOF and no
    response, and the next client is served as usual."""
    stalls = [True]

    async def process_request(connection: Any, request: Any) -> None:
        if stalls.pop():
            await asyncio.sleep(0.5)

    async def main() -> None:
        serving = websockets.serve(
            echo, "127.0.0.1", 0, open_timeout=0.1, process_request=process_request
        )
        async with serving as server:
            reader, writer = await open_raw(*address(server))
            try:
                writer.write(upgrade_request())
                assert await within(reader.read()) == b""
            finally:
                writer.close()
            stalls.append(False)
            async with connect(uri(server)) as client:
                await client.send("served")
                assert await within(client.recv()) == "served"

    run(main)


@pytest.mark.hub_only("Server.socket_count is ours")
def test_open_timeout_releases_the_socket(websockets: ModuleType) -> None:
    """Twenty silent peers: once their handshakes time out, the server holds no socket."""

    async def main() -> None:
        async with websockets.serve(echo, "127.0.0.1", 0, open_timeout=0.2) as server:
            peers = [await open_raw(*address(server)) for _ in range(20)]
            try:
                assert server.socket_count == 20
                for reader, _ in peers:
                    assert await within(reader.read()) == b""
                while server.socket_count:
                    await within(asyncio.sleep(0.01))
            finally:
                for _, writer in peers:
                    writer.close()

    run(main)
