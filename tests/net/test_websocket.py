"""WebSocketMux over real loopback sockets: our hand-framed data messages (masked by
the client, chunk by chunk) must arrive as the library parses them, intact."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest
from websockets.http11 import Request

from portcullis.net import websocket
from portcullis.net.websocket import WebSocketMux


class Recorder:
    """Stands in for a MuxSession: records whole messages."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.arrived = asyncio.Event()
        self.closed = asyncio.Event()

    def attach(self, carrier: object) -> None:
        pass

    def receive_message(self, message: bytes) -> None:
        self.messages.append(bytes(message))
        self.arrived.set()

    def carrier_closed(self) -> None:
        self.closed.set()

    def pause_sources(self) -> None:
        pass

    def resume_sources(self) -> None:
        pass


async def pair() -> tuple[WebSocketMux, WebSocketMux, Recorder, Recorder, asyncio.Server]:
    server_side: asyncio.Future[WebSocketMux] = asyncio.get_running_loop().create_future()
    server_recorder = Recorder()

    def opened(carrier: WebSocketMux, request: Request) -> None:
        carrier.attach(server_recorder)  # type: ignore[arg-type]
        server_side.set_result(carrier)

    def route(carrier: WebSocketMux, request: Request) -> None:
        if request.path == "/mux":
            websocket.accept(carrier, request, opened)
        else:
            websocket.reject(carrier, 404, "no\n")

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: WebSocketMux(websocket.server_websocket(), on_request=route), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await websocket.connect(f"ws://127.0.0.1:{port}/mux", None)
    client_recorder = Recorder()
    client.attach(client_recorder)  # type: ignore[arg-type]
    return client, await server_side, client_recorder, server_recorder, server


@pytest.mark.parametrize("sizes", [[0], [5], [125], [126], [65535], [65536], [1, 2, 3, 4, 5],
                                   [3, 70_000, 1, 200_000, 7], [1 << 20]])
async def test_chunked_messages_arrive_whole_both_ways(sizes: Sequence[int]) -> None:
    client, server, client_rec, server_rec, listener = await pair()
    # Both ends read data frames with the FrameReader once open (the data path).
    assert client._reader is not None and server._reader is not None
    rng = random.Random(len(sizes))
    chunks = [rng.randbytes(size) for size in sizes]
    client.send_message(chunks)
    server.send_message([memoryview(chunk) for chunk in chunks])
    await asyncio.wait_for(server_rec.arrived.wait(), 10)
    await asyncio.wait_for(client_rec.arrived.wait(), 10)
    assert server_rec.messages == [b"".join(chunks)]
    assert client_rec.messages == [b"".join(chunks)]
    client.close(1000, "done")
    await asyncio.wait_for(server_rec.closed.wait(), 10)
    listener.close()


async def test_unknown_path_is_refused_with_404() -> None:
    _, _, _, _, listener = await pair()
    port = listener.sockets[0].getsockname()[1]
    from portcullis.errors import ClientError

    with pytest.raises(ClientError, match="404"):
        await websocket.connect(f"ws://127.0.0.1:{port}/elsewhere", None)
    listener.close()


async def test_text_messages_close_the_connection() -> None:
    client, _, _, server_rec, listener = await pair()
    client.websocket.send_text(b"hello")
    client.write_pending()
    await asyncio.wait_for(server_rec.closed.wait(), 10)
    assert server_rec.messages == []
    listener.close()
