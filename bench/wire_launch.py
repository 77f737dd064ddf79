"""One launch driven at the wire level, as the client does it but without a local
listener: ticket request (POST …/launch), WebSocket connect, HELLO with the ticket,
wait for the gateway's HELLO (the ticket was redeemed), OPEN one stream, wait for
ACCEPT, send one byte, wait for it to come back from the echo server behind the
resource.

It uses the client's own WebSocket carrier (`portcullis.net.websocket`) and codec, so
the benchmark client costs what `portcullis launch` costs, not more. Used by the
launch-rate benchmark (open, then close) and the idle-memory benchmark (open, keep
idle, close at the end). Every wait is bounded by STEP_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import httpx

from portcullis.net import websocket
from portcullis.net.websocket import WebSocketMux
from portcullis.proto import mux
from portcullis.proto.launchfile import parse_launch_file
from portcullis.proto.mux import MuxConnection

STEP_TIMEOUT = 15.0


class LaunchFailed(Exception):
    pass


class WireLaunch:
    """Stands where a MuxSession would: the carrier hands it whole messages."""

    def __init__(self, carrier: WebSocketMux) -> None:
        self.carrier = carrier
        self.codec = MuxConnection("client")
        self.events: list[mux.Event] = []
        self.arrived = asyncio.Event()
        self.gone = False
        self.stream_id = 0
        self.seconds = 0.0  # from the ticket request to the first byte back

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
            carrier = await websocket.connect(launch.gateway_url, tls)
        wire = cls(carrier)
        carrier.attach(wire)  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                wire.codec.send_hello({"version": 1, "ticket": launch.ticket})
                wire.flush()
                await wire.until(mux.HelloReceived)
                wire.stream_id = wire.codec.open_stream(mux.Protocol.TCP, "", 0)
                wire.flush()
                await wire.until(mux.StreamAccepted)
                wire.codec.send_data(wire.stream_id, b"x")
                wire.flush()
                received = await wire.until(mux.DataReceived)
                assert isinstance(received, mux.DataReceived)
                wire.codec.consumed(wire.stream_id, len(received.data))
                if bytes(received.data) != b"x":
                    raise LaunchFailed(f"echo answered {bytes(received.data)!r}")
        except BaseException:
            wire.close()
            raise
        wire.seconds = time.perf_counter() - started
        return wire

    # -- what the carrier calls ----------------------------------------------------------
    def attach(self, carrier: object) -> None:
        pass

    def receive_message(self, message: bytes) -> None:
        self.codec.receive_data(message, time.monotonic())
        self.events.extend(self.codec.events_received())
        self.flush()  # PONGs, WINDOW updates
        self.arrived.set()

    def carrier_closed(self) -> None:
        self.gone = True
        self.arrived.set()

    def pause_sources(self) -> None:
        pass

    def resume_sources(self) -> None:
        pass

    # -- driving it ----------------------------------------------------------------------
    def flush(self) -> None:
        chunks = self.codec.data_to_send()
        if chunks:
            self.carrier.send_message(chunks)

    def close(self) -> None:
        """GOAWAY(CANCELLED) and a WebSocket close, as `portcullis launch` does on exit."""
        if not self.codec.closed:
            self.codec.send_goaway(mux.Reason.CANCELLED, "benchmark done")
            self.flush()
        self.carrier.close(1000, "benchmark done")

    async def until(self, kind: type[mux.Event]) -> mux.Event:
        for _ in range(1000):  # a launch takes a few messages; stop a chatty peer
            while self.events:
                event = self.events.pop(0)
                if isinstance(event, mux.GoAwayReceived | mux.StreamRefused | mux.StreamReset):
                    raise LaunchFailed(f"gateway: {event}")
                if isinstance(event, kind):
                    return event
            if self.gone:
                raise LaunchFailed("the gateway closed the connection")
            self.arrived.clear()
            await self.arrived.wait()
        raise LaunchFailed(f"no {kind.__name__} in 1000 messages")
