"""One launch driven at the wire level, as the client does it but without MuxSession:
ticket request (POST …/launch), WebSocket connect, HELLO with the ticket, wait for the
gateway's HELLO (the ticket was redeemed), OPEN one stream, wait for ACCEPT, send one
byte, wait for it to come back from the echo server behind the resource.

Used by the launch-rate benchmark (open, then close) and the idle-memory benchmark
(open, keep idle, close at the end). Every wait is bounded by STEP_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from portcullis.proto import mux
from portcullis.proto.launchfile import parse_launch_file
from portcullis.proto.mux import MuxConnection

STEP_TIMEOUT = 15.0
LIMITS = mux.Limits()


class LaunchFailed(Exception):
    pass


@dataclass
class WireLaunch:
    websocket: ClientConnection
    codec: MuxConnection
    stream_id: int
    seconds: float  # from the ticket request to the first byte back

    @classmethod
    async def open(cls, api: httpx.AsyncClient, resource: str,
                   tls: ssl.SSLContext) -> WireLaunch:
        started = time.perf_counter()
        async with asyncio.timeout(STEP_TIMEOUT):
            response = await api.post(f"/api/v1/resources/{resource}/launch")
            if response.status_code != 200:
                raise LaunchFailed(f"ticket request: {response.status_code} "
                                   f"{response.text[:200]}")
            launch = parse_launch_file(response.content)
            # The same connection options as portcullis.client.launcher, minus the
            # keep-alive pings (the benchmarks measure the gateway, not ping traffic).
            websocket = await websockets.connect(
                launch.gateway_url, ssl=tls, compression=None,
                max_size=LIMITS.max_frame_payload * 4 + 4096, ping_interval=None,
                write_limit=LIMITS.initial_window)
        wire = cls(websocket, MuxConnection("client", LIMITS), 0, 0.0)
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                wire.codec.send_hello({"version": 1, "ticket": launch.ticket})
                await wire._flush()
                await wire._until(mux.HelloReceived)
                wire.stream_id = wire.codec.open_stream(mux.Protocol.TCP, "", 0)
                await wire._flush()
                await wire._until(mux.StreamAccepted)
                wire.codec.send_data(wire.stream_id, b"x")
                await wire._flush()
                received = await wire._until(mux.DataReceived)
                assert isinstance(received, mux.DataReceived)
                wire.codec.consumed(wire.stream_id, len(received.data))
                if bytes(received.data) != b"x":
                    raise LaunchFailed(f"echo answered {bytes(received.data)!r}")
        except BaseException:
            await wire.close()
            raise
        wire.seconds = time.perf_counter() - started
        return wire

    async def close(self) -> None:
        """GOAWAY(CANCELLED) and a WebSocket close, as `portcullis launch` does on exit."""
        with contextlib.suppress(Exception):
            self.codec.send_goaway(mux.Reason.CANCELLED, "benchmark done")
            await self._flush()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(STEP_TIMEOUT):
                await self.websocket.close()

    async def _flush(self) -> None:
        chunks = self.codec.data_to_send()
        if chunks:
            await self.websocket.send(b"".join(chunks))

    async def _until(self, kind: type[mux.Event]) -> mux.Event:
        for _ in range(1000):  # a launch takes a few messages; stop a chatty peer
            message = await self.websocket.recv()
            if isinstance(message, str):
                raise LaunchFailed("text message on the mux channel")
            self.codec.receive_data(message)
            found: mux.Event | None = None
            for event in self.codec.events_received():
                if isinstance(event, mux.GoAwayReceived | mux.StreamRefused | mux.StreamReset):
                    raise LaunchFailed(f"gateway: {event}")
                if isinstance(event, kind) and found is None:
                    found = event
            await self._flush()  # PONGs, WINDOW updates
            if found is not None:
                return found
        raise LaunchFailed(f"no {kind.__name__} in 1000 messages")
