"""An idle connection costs the server under 8 KiB of Python memory, also once the handler gave
it attributes of its own (``websocket.user = ...``), the pattern websockets' docs teach.

The server runs in a subprocess of its own so that only its allocations are counted
(``tracemalloc``: every Python object the connections hold, their handler tasks included); the
clients are raw sockets in this process that complete the opening handshake and then idle.
"""

from __future__ import annotations

import asyncio
import json
import sys
from types import ModuleType

import pytest
from wshelp import open_raw, read_response, run, upgrade_request, within

CONNECTIONS = 300
BUDGET = 8 * 1024  # bytes per idle connection (docs/ws-core.md, docs/benchmarks.md)

SERVER = """
import asyncio, gc, importlib, json, sys, tracemalloc

tracemalloc.start()
websockets = importlib.import_module(sys.argv[1])
ready = 0

async def handler(ws):
    global ready
    ws.user = "alice"  # attributes of one's own, as a handler or process_request sets them
    ws.authenticated = True
    ready += 1
    await ws.wait_closed()

async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with websockets.serve(handler, "127.0.0.1", 0, compression=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await reader.readline()  # the parent is about to connect
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        print("base", flush=True)
        n = int(await reader.readline())
        while ready < n:
            await asyncio.sleep(0.01)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        print(json.dumps({"per_connection": (after - before) / n, "open": len(server.connections)}),
              flush=True)
        await reader.readline()

asyncio.run(main())
"""


@pytest.mark.hub_only("a websockets connection holds about twice that")
def test_idle_connection_with_custom_attributes_stays_under_8_kib(websockets: ModuleType) -> None:
    async def main() -> dict[str, float]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            SERVER,
            websockets.__name__,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        peers = []
        try:
            port = int(await within(proc.stdout.readline(), 20))
            proc.stdin.write(b"go\n")
            assert await within(proc.stdout.readline()) == b"base\n"
            for _ in range(CONNECTIONS):
                reader, writer = await open_raw("127.0.0.1", port)
                writer.write(upgrade_request())
                assert (await read_response(reader)).status == 101
                peers.append(writer)
            proc.stdin.write(f"{CONNECTIONS}\n".encode())
            result: dict[str, float] = json.loads(await within(proc.stdout.readline(), 20))
            proc.stdin.write(b"done\n")
            return result
        finally:
            for writer in peers:
                writer.close()
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    result = run(main, timeout=60)
    assert result["open"] == CONNECTIONS
    assert result["per_connection"] < BUDGET, result
