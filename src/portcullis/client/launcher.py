"""`portcullis launch`: present a ticket to the gateway, then carry every connection
made to a local listener as a stream of that one launch.

The ticket is redeemed once, when the launch connects; the connection then stays
open for as many TCP connections as the application makes, until it is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import ssl
from collections.abc import Callable

import websockets
from websockets.asyncio.client import ClientConnection

from portcullis.errors import ClientError, ProtocolError
from portcullis.net.muxsession import MuxSession
from portcullis.net.tls import describe_tls_failure
from portcullis.proto import mux
from portcullis.proto.launchfile import LaunchFile
from portcullis.proto.mux import Limits, MuxConnection

HELLO_TIMEOUT = 15.0


class WebSocketClientChannel:
    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection

    async def send(self, message: bytes) -> None:
        await self._connection.send(message)

    async def receive(self) -> bytes | None:
        try:
            message = await self._connection.recv()
        except websockets.ConnectionClosed:
            return None
        if isinstance(message, str):
            raise ProtocolError("text message on a binary mux channel")
        return message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._connection.close(code, reason)


def websocket_url(gateway: str) -> str:
    return gateway.replace("https://", "wss://", 1) if gateway.startswith("https://") else gateway


async def connect_launch(launch: LaunchFile, tls: ssl.SSLContext) -> MuxSession:
    """Connect to the gateway and redeem the ticket; ClientError says why if refused."""
    url = websocket_url(launch.gateway_url)
    limits = Limits()
    try:
        connection = await websockets.connect(
            url, ssl=tls, compression=None, max_size=limits.max_frame_payload * 4 + 4096,
            open_timeout=15, ping_interval=20, ping_timeout=20,
            write_limit=limits.initial_window)
    except (OSError, websockets.InvalidHandshake, TimeoutError) as exc:
        explained = describe_tls_failure(exc, url)
        raise ClientError(explained or f"cannot connect to the gateway at {url}: {exc}") from None
    codec = MuxConnection("client", limits)
    codec.send_hello({"version": 1, "ticket": launch.ticket})
    session = MuxSession(codec, WebSocketClientChannel(connection))
    session.start()
    try:
        await asyncio.wait_for(asyncio.shield(session.hello), HELLO_TIMEOUT)
    except (TimeoutError, asyncio.CancelledError):
        await connection.close()
        if session.goaway is not None:
            raise ClientError("the gateway refused the launch: the ticket is expired, already "
                              "used, or not valid here; launch the resource again") from None
        raise ClientError("the gateway did not answer the launch in time") from None
    return session


async def run_launch(launch: LaunchFile, tls: ssl.SSLContext, *, host: str, port: int,
                     on_listening: Callable[[str, int], None],
                     command: str | None = None) -> int:
    """Serve the local listener until the launch ends, the command exits, or we're stopped.

    Returns the exit status of `command`, or 0.
    """
    session = await connect_launch(launch, tls)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: session.open_local(mux.Protocol.TCP, "", 0), host, port)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    on_listening(bound_host, bound_port)
    status = 0
    try:
        if command is not None:
            argv = [part.replace("{host}", bound_host).replace("{port}", str(bound_port))
                    for part in shlex.split(command)]
            process = await asyncio.create_subprocess_exec(*argv)
            ended = asyncio.ensure_future(session.closed.wait())
            waited = asyncio.ensure_future(process.wait())
            await asyncio.wait({ended, waited}, return_when=asyncio.FIRST_COMPLETED)
            if waited.done():
                status = waited.result()
            else:
                process.terminate()
                await process.wait()
                status = 1
            ended.cancel()
        else:
            await session.closed.wait()
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await session.close(mux.Reason.CANCELLED, "client stopped")
    if session.goaway is not None and session.goaway[0] != mux.Reason.CANCELLED:
        raise ClientError(f"the gateway ended the launch: {session.goaway[1] or 'closed'}")
    return status
