"""WebSocket connections that carry one mux session (or, for VNC in the browser, one
relayed byte stream), as asyncio Protocols.

The handshakes, control frames and closing are the `websockets` library's sans-I/O
protocol; this module moves bytes between it, the transport and the `MuxSession`: no
ASGI queue, no task per message, no per-message pause/resume. Data frames, nearly every
byte, take a shorter way both ways: written with a header of ours (`send_message`), and
read by `proto.wsframes.FrameReader` out of a buffer the transport decrypts into (a
`BufferedProtocol`), one copy per message where the library's parser makes three. That is
where a tunnel's throughput is won (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Protocol, cast
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as WebSocketProtocol
from websockets.protocol import Side, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

try:  # the C implementation; the library ships a pure-Python fallback
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from portcullis.errors import ClientError
from portcullis.net.muxsession import DEFAULT_MAX_MESSAGE, MessageCarrier
from portcullis.net.tls import describe_tls_failure
from portcullis.proto.mux import Limits
from portcullis.proto.wsframes import ControlFrame, FrameReader

# What either side accepts in one WebSocket message: our coalesced messages plus a frame.
MAX_WEBSOCKET_MESSAGE = DEFAULT_MAX_MESSAGE + Limits().max_frame_payload + 64
CLOSE_TIMEOUT = 2.0
HANDSHAKE_READ = 16 * 1024   # reads before the data path takes over: the HTTP handshake

Message = bytes | bytearray | memoryview


class MessageSession(Protocol):
    """What a WebSocket's binary messages are for: a mux session (`MuxSession`), or the
    byte relay of a VNC viewer (`webvnc.relay`)."""

    def attach(self, carrier: MessageCarrier) -> None: ...

    def receive_message(self, message: Message) -> None: ...

    def carrier_closed(self) -> None:
        """The WebSocket is gone."""
        ...

    def pause_sources(self) -> None:
        """The WebSocket's send buffer is full: stop reading what feeds it."""
        ...

    def resume_sources(self) -> None: ...


class WebSocketMux(asyncio.BufferedProtocol):
    """One WebSocket connection carrying one session of binary messages (client or
    server side).

    Until the handshake is done every byte goes to the library; from then on the
    transport reads into the `FrameReader`'s buffer, which hands control frames back to
    the library (which answers PINGs and runs the closing handshake) and binary messages
    to the session. After a close or a failure the library has the bytes again (it
    discards them).
    """

    def __init__(self, websocket: WebSocketProtocol, *,
                 on_request: Callable[[WebSocketMux, Request], None] | None = None) -> None:
        self.websocket = websocket
        self._on_request = on_request
        self.transport: asyncio.Transport | None = None
        self.session: MessageSession | None = None
        self.handshake: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._early: list[Message] = []
        self._fragments: list[Message] = []
        self._reader: FrameReader | None = None   # the data path, once open
        self._scratch: bytearray | None = None    # where reads land before that

    def peer_host(self) -> str:
        """The address of the other end, as audit lines name a client ("unknown" before
        the connection is made)."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else "unknown"

    # -- MessageCarrier ----------------------------------------------------------------
    def send_message(self, chunks: Sequence[Message]) -> None:
        """Send the chunks as one binary message, without joining them.

        Data frames are framed here rather than by `send_binary`, which would copy the
        payload three times (join, mask, BytesIO); the library still does the handshake,
        control frames, parsing and closing. A client masks each chunk with the mask
        rotated to the chunk's offset, which is the one copy masking requires.
        """
        transport = self.transport
        if self.websocket.state is not State.OPEN or transport is None:
            return   # closing: nowhere to send, and the session is ending anyway
        size = sum(map(len, chunks))
        if self.websocket.side is Side.SERVER:
            transport.writelines([_frame_header(size, b""), *chunks])
            return
        mask = os.urandom(4)
        masked: list[Message] = [_frame_header(size, mask)]
        offset = 0
        for chunk in chunks:
            turn = offset % 4
            masked.append(apply_mask(chunk, mask[turn:] + mask[:turn]))
            offset += len(chunk)
        transport.writelines(masked)

    def close(self, code: int, reason: str) -> None:
        if self.websocket.state is State.OPEN:
            self.websocket.send_close(code, reason)
            self.write_pending()
        if self.transport is not None:
            # abort, not close: a peer that stopped reading would keep the socket (and
            # its unsent buffer) forever, as close() waits for the buffer to drain.
            asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self.transport.abort)

    def attach(self, session: MessageSession) -> None:
        self.session = session
        session.attach(self)
        early, self._early = self._early, []
        for message in early:
            session.receive_message(message)

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._reader is not None:
            return self._reader.get_buffer(sizehint)
        if self._scratch is None:
            self._scratch = bytearray(HANDSHAKE_READ)
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        reader = self._reader
        if reader is None:
            assert self._scratch is not None
            self.data_received(bytes(memoryview(self._scratch)[:nbytes]))
            return
        self._take(reader, reader.buffer_updated(nbytes))

    def data_received(self, data: bytes) -> None:
        """Bytes not read into our buffer: the handshake (uvicorn hands over the request
        it parsed), and whatever follows a close."""
        if self._reader is not None:
            self._take(self._reader, self._reader.feed(data))
            return
        websocket = self.websocket
        websocket.receive_data(data)
        for event in websocket.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Request) and self._on_request is not None:
                self._on_request(self, event)   # server: route, then accept or reject
            elif isinstance(event, Response) and not self.handshake.done():
                self.handshake.set_result(event)   # client: the handshake's answer
        self.write_pending()
        if self._closing():
            self._closed()
        elif websocket.state is State.OPEN and _at_frame_boundary(websocket):
            self._reader = FrameReader(
                masked=websocket.side is Side.SERVER, unmask=apply_mask,
                max_message=websocket.max_message_size or MAX_WEBSOCKET_MESSAGE)
            self._scratch = None

    def eof_received(self) -> bool | None:
        self.websocket.receive_eof()
        self.write_pending()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.handshake.done():
            if self._on_request is None:   # a client is waiting for the answer
                self.handshake.set_exception(ConnectionError("closed during the handshake"))
            else:
                self.handshake.cancel()
        self._closed()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_sources()

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_sources()

    # -- internals -------------------------------------------------------------------
    def _take(self, reader: FrameReader, found: list[bytes | ControlFrame]) -> None:
        """What the FrameReader found: messages to the session, control frames to the
        library, until a close; then the frame it could not take, if any, fails the
        connection as the library would."""
        websocket = self.websocket
        for item in found:
            if isinstance(item, ControlFrame):
                websocket.receive_data(item.raw)
                websocket.events_received()   # PINGs are answered by the library itself
                self.write_pending()
                if websocket.close_rcvd is not None or websocket.state is not State.OPEN:
                    self._reader = None   # the library discards what follows
                    if self._closing():
                        self._closed()
                    return
            elif self.session is None:
                self._early.append(item)
            else:
                self.session.receive_message(item)
        if reader.failure is not None:
            self._fail(reader.failure.code, reader.failure.reason)

    def _fail(self, code: int, reason: str) -> None:
        self._reader = None
        self.websocket.fail(code, reason)
        self.write_pending()
        if self._closing():
            self._closed()

    def _closing(self) -> bool:
        websocket = self.websocket
        return websocket.state is State.CLOSED or (websocket.close_expected() and
                                                   websocket.state is not State.CONNECTING)

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.BINARY or frame.opcode is Opcode.CONT:
            if not frame.fin:   # a peer may fragment; websockets enforces max_size
                self._fragments.append(frame.data)
                return
            message = frame.data
            if self._fragments:
                message = b"".join([*self._fragments, frame.data])
                self._fragments = []
            if self.session is None:
                self._early.append(message)
            else:
                self.session.receive_message(message)
        elif frame.opcode is Opcode.TEXT:
            self.websocket.fail(1003, "binary messages only")

    def write_pending(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.websocket.data_to_send():
            if data:
                transport.write(data)
            else:   # the library's signal that the closing handshake is done
                transport.close()
                return

    def _closed(self) -> None:
        if self.session is not None:
            self.session.carrier_closed()


def _at_frame_boundary(websocket: WebSocketProtocol) -> bool:
    """Whether the library's parser waits for the start of a frame with nothing buffered,
    so that the FrameReader can take the byte stream over from here. (Its generator
    waits in `StreamReader.at_eof` only there; if a library version differs, the answer
    is False and the library keeps parsing: slower, still right.)"""
    innermost: object = websocket.parser
    while (inner := getattr(innermost, "gi_yieldfrom", None)) is not None:
        innermost = inner   # the handshake's parser delegates to the frame parser
    code = getattr(innermost, "gi_code", None)
    return (not websocket.reader.buffer and code is not None
            and code.co_name == "at_eof")


def _frame_header(size: int, mask: bytes) -> bytes:
    """RFC 6455 header of a final binary frame (FIN, opcode 2), masked if `mask`."""
    mask_bit = 0x80 if mask else 0
    if size < 126:
        return struct.pack("!BB", 0x82, mask_bit | size) + mask
    if size < 65536:
        return struct.pack("!BBH", 0x82, mask_bit | 126, size) + mask
    return struct.pack("!BBQ", 0x82, mask_bit | 127, size) + mask


# -- client side ---------------------------------------------------------------------
def websocket_url(url: str, path: str = "") -> str:
    """wss:// for an https:// gateway URL (launch files and sign-ins may give either),
    ws:// for a plain http:// one."""
    if url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    elif url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    return url.rstrip("/") + path if path else url


async def connect(url: str, tls: ssl.SSLContext | None, *,
                  timeout: float = 15.0) -> WebSocketMux:
    """Open a WebSocket to `url` and complete the handshake (`tls` None: plain ws://)."""
    uri = parse_uri(url)
    websocket = ClientProtocol(uri, max_size=MAX_WEBSOCKET_MESSAGE)
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    try:
        async with asyncio.timeout(timeout):
            _, carrier = await loop.create_connection(
                lambda: WebSocketMux(websocket), uri.host, uri.port, ssl=tls,
                server_hostname=parts.hostname if tls is not None else None)
            websocket.send_request(websocket.connect())
            carrier.write_pending()
            await carrier.handshake
    except TimeoutError:
        raise ClientError(f"the gateway at {url} did not answer in time") from None
    except (OSError, ssl.SSLError) as exc:
        explained = describe_tls_failure(exc, url)
        raise ClientError(explained or f"cannot connect to the gateway at {url}: {exc}") from None
    if websocket.handshake_exc is not None:
        status = (websocket.handshake_exc.response.status_code
                  if isinstance(websocket.handshake_exc, InvalidStatus) else None)
        with contextlib.suppress(Exception):
            if carrier.transport is not None:
                carrier.transport.close()
        raise ClientError(f"the gateway at {url} refused the WebSocket"
                          + (f" (HTTP {status})" if status else f": {websocket.handshake_exc}"))
    return carrier


# -- server side ---------------------------------------------------------------------
Opened = Callable[[WebSocketMux, Request], None]


def server_websocket() -> ServerProtocol:
    return ServerProtocol(max_size=MAX_WEBSOCKET_MESSAGE)


def accept(carrier: WebSocketMux, request: Request, opened: Opened) -> None:
    """Answer a WebSocket upgrade request and hand the open connection to `opened`."""
    websocket = carrier.websocket
    assert isinstance(websocket, ServerProtocol)
    response = websocket.accept(request)
    websocket.send_response(response)
    carrier.write_pending()
    if response.status_code == 101:
        opened(carrier, request)


def reject(carrier: WebSocketMux, status: int, text: str) -> None:
    websocket = carrier.websocket
    assert isinstance(websocket, ServerProtocol)
    websocket.send_response(websocket.reject(status, text))
    carrier.write_pending()

