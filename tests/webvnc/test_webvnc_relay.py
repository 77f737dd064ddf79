"""The gateway's VNC relay over real sockets: a WebSocket from a client (the `websockets`
library, as a browser would speak it) joined to a TCP server. Bytes arrive intact both
ways; a client that stops reading stops the server's bytes (back-pressure, memory flat);
a server that sends a password-protected handshake is answered by the bridge."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.http11 import Request

from portcullis.gateway.upgrade import websocket_protocol_class
from portcullis.net.websocket import WebSocketMux
from portcullis.proto.rfb import vnc_authentication_response
from portcullis.webvnc import relay as relay_module
from portcullis.webvnc.relay import ServerConnection, ViewerRelay

TOTAL = 48 * 1024 * 1024   # what the server offers when it floods
CHUNK = 256 * 1024


@asynccontextmanager
async def relay_to(server_port: int, password: bytes | None = None
                   ) -> AsyncIterator[tuple[str, list[ViewerRelay]]]:
    """A WebSocket listener whose connections are relayed to 127.0.0.1:server_port once
    their first message (the ticket, not checked here) arrives."""
    loop = asyncio.get_running_loop()
    relays: list[ViewerRelay] = []
    tasks: set[asyncio.Task[None]] = set()

    async def dial(relay: ViewerRelay) -> None:
        await relay.ticket
        transport, _ = await loop.create_connection(lambda: ServerConnection(relay),
                                                    "127.0.0.1", server_port)
        relay.connected(transport, password)

    def opened(carrier: WebSocketMux, request: Request) -> None:
        relay = ViewerRelay(carrier)
        carrier.attach(relay)
        relays.append(relay)
        task = asyncio.ensure_future(dial(relay))
        tasks.add(task)

    server = await loop.create_server(websocket_protocol_class({"/vnc": opened}),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/vnc", relays
    finally:
        for relay in relays:
            relay.end(1000, "", "test over")   # type: ignore[arg-type]
        server.close()
        for task in tasks:
            task.cancel()


@asynccontextmanager
async def tcp_server(handler: object) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@asynccontextmanager
async def viewer(handler: object, password: bytes | None = None, **options: object
                 ) -> AsyncIterator[tuple[ClientConnection, list[ViewerRelay]]]:
    """A client's WebSocket, relayed to a TCP server running `handler`; the ticket sent."""
    async with tcp_server(handler) as server_port, \
            relay_to(server_port, password) as (url, relays), \
            connect(url, **options) as websocket:  # type: ignore[arg-type]
        await websocket.send(b"ticket")
        yield websocket, relays


async def read_bytes(websocket: ClientConnection, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        message = await asyncio.wait_for(websocket.recv(), 10)
        assert isinstance(message, bytes)
        received += message
    return bytes(received)


async def test_a_client_that_stops_reading_stops_the_server() -> None:
    offered = os.urandom(CHUNK)
    written = 0
    done = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        for _ in range(TOTAL // CHUNK):
            writer.write(offered)
            await writer.drain()   # blocks while the gateway does not read
            written += CHUNK
        done.set()
        await reader.read()

    # A small queue: the client reads its socket only as the test takes messages.
    async with viewer(flood, max_queue=4, max_size=None) as (websocket, _):
        await asyncio.sleep(1.0)   # the client reads nothing meanwhile
        held = written
        assert held < TOTAL // 3, f"the server wrote {held} bytes to a stalled client"
        digest = hashlib.sha256()
        received = 0
        while received < TOTAL:
            message = await asyncio.wait_for(websocket.recv(), 10)
            assert isinstance(message, bytes)
            digest.update(message)
            received += len(message)
        await asyncio.wait_for(done.wait(), 10)
    assert received == TOTAL
    assert digest.digest() == hashlib.sha256(offered * (TOTAL // CHUNK)).digest()


async def test_bytes_from_the_client_reach_the_server_in_order() -> None:
    arrived = bytearray()
    expected = b"".join(bytes([n]) * 1000 for n in range(200))
    finished = asyncio.Event()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        while len(arrived) < len(expected):
            data = await reader.read(65536)
            if not data:
                break
            arrived.extend(data)
        finished.set()

    async with viewer(collect) as (websocket, _):
        assert await read_bytes(websocket, 12) == b"RFB 003.008\n"
        for start in range(0, len(expected), 1000):
            await websocket.send(expected[start:start + 1000])
        await asyncio.wait_for(finished.wait(), 10)
    assert bytes(arrived) == expected


async def test_the_bridge_answers_the_servers_password_then_steps_aside() -> None:
    challenge = bytes(range(16))
    answered = asyncio.get_running_loop().create_future()

    async def vnc_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await reader.readexactly(12)
        writer.write(b"\x01\x02")
        assert await reader.readexactly(1) == b"\x02"
        writer.write(challenge)
        answered.set_result(await reader.readexactly(16))
        writer.write(b"\x00\x00\x00\x00")
        assert await reader.readexactly(1) == b"\x01"   # ClientInit, shared
        writer.write(b"ServerInit")
        await writer.drain()
        await reader.read()

    async with viewer(vnc_server, b"pw") as (websocket, _):
        assert await read_bytes(websocket, 12) == b"RFB 003.008\n"
        await websocket.send(b"RFB 003.008\n")
        assert await read_bytes(websocket, 2) == b"\x01\x01"   # None, alone
        await websocket.send(b"\x01")
        assert await read_bytes(websocket, 4) == b"\x00\x00\x00\x00"
        await websocket.send(b"\x01")
        assert await read_bytes(websocket, 10) == b"ServerInit"
    assert answered.result() == vnc_authentication_response(b"pw", challenge)


async def test_a_server_that_closes_ends_the_websocket() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        await writer.drain()
        writer.close()

    async with viewer(closing) as (websocket, relays):
        assert await read_bytes(websocket, 12) == b"RFB 003.008\n"
        await asyncio.wait_for(websocket.wait_closed(), 5)
        assert websocket.close_code == 1000
    assert relays[0].ended == "the VNC server closed the connection"


async def test_a_server_stalling_in_the_password_handshake_is_given_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "HANDSHAKE_SECONDS", 0.3)

    async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")   # then nothing: no security types ever
        await reader.read()

    async with viewer(stalling, b"pw") as (websocket, relays):
        await asyncio.wait_for(websocket.wait_closed(), 5)
    assert relays[0].ended == "the RFB handshake did not finish"
