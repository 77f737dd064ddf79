"""A WebSocket echo server for the benchmarks (the `websockets` library), run as its own
process (`python -m bench.websocket_echo`) so that its memory and CPU are not charged to
a proxy in front of it. Any path; prints "websocket echo listening on PORT".
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


async def echo(connection: ServerConnection) -> None:
    try:
        async for message in connection:
            await connection.send(message)
    except ConnectionClosed:
        pass


async def main() -> None:
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    # No keep-alive pings: idle connections stay idle while memory is read.
    async with serve(echo, "127.0.0.1", 0, ping_interval=None, backlog=1024) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(f"websocket echo listening on {port}", flush=True)
        await stopped.wait()


if __name__ == "__main__":
    uvloop.run(main())
    sys.exit(0)
