"""A TCP echo server for the benchmarks, run as its own process (`python -m
bench.echo_server`) so its CPU is not charged to the benchmark client. One process, one
event loop (uvloop), any number of connections; prints "echo listening on PORT".
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check.
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close our side too


async def serve() -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
    print(f"echo listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stopped.wait()


if __name__ == "__main__":
    uvloop.run(serve())
    sys.exit(0)
