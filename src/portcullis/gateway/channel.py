"""A Starlette WebSocket as the mux's message channel."""

from __future__ import annotations

import contextlib

from starlette.websockets import WebSocket

from portcullis.errors import ProtocolError


class WebSocketChannel:
    def __init__(self, websocket: WebSocket) -> None:
        self._websocket = websocket
        self._receive = websocket.receive
        self._send = websocket.send

    async def send(self, message: bytes) -> None:
        # A peer that has gone is noticed by receive(), which then ends the session;
        # what was still queued for it has nowhere to go.
        with contextlib.suppress(Exception):
            await self._send({"type": "websocket.send", "bytes": message})

    async def receive(self) -> bytes | None:
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        if data is None:
            raise ProtocolError("text message on a binary mux channel")
        result: bytes = data
        return result

    async def close(self, code: int = 1000, reason: str = "") -> None:
        with contextlib.suppress(Exception):  # already closed by the peer: nothing to do
            await self._websocket.close(code, reason)
