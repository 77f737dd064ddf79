"""`portcullis launch`: present a ticket to the gateway, then carry every connection
made to a local listener as a stream of that one launch.

The ticket is redeemed once, when the launch connects; the connection then stays
open for as many TCP connections as the application makes, until it is stopped.
"""

from __future__ import annotations

import asyncio
import shlex
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

from portcullis.errors import ClientError
from portcullis.net import websocket
from portcullis.net.muxsession import MuxSession
from portcullis.proto import mux
from portcullis.proto.launchfile import LaunchFile
from portcullis.proto.mux import MuxConnection

HELLO_TIMEOUT = 15.0


def foreign_gateway(launch: LaunchFile, signed_in_url: str) -> str | None:
    """A note when the launch goes to another gateway than the one signed in to (a
    `portcullis://` link may come from any web page), else None."""
    def where(url: str) -> tuple[str, int]:
        parts = urlsplit(url)
        return (parts.hostname or "").lower(), parts.port or 443

    there, here = where(launch.gateway_url), where(signed_in_url)
    if there == here:
        return None
    return (f"this launch goes to the gateway {there[0]}:{there[1]}, not to "
            f"{here[0]}:{here[1]} where you signed in; stop it (Ctrl-C) if you did not "
            "expect that")


async def connect_launch(launch: LaunchFile, tls: ssl.SSLContext) -> MuxSession:
    """Connect to the gateway and redeem the ticket; ClientError says why if refused."""
    carrier = await websocket.connect(websocket.websocket_url(launch.gateway_url), tls)
    codec = MuxConnection("client")
    codec.send_hello({"version": 1, "ticket": launch.ticket})
    session = MuxSession(codec)
    carrier.attach(session)
    try:
        await asyncio.wait_for(asyncio.shield(session.hello), HELLO_TIMEOUT)
    except (TimeoutError, ConnectionError):
        session.close(mux.Reason.CANCELLED, "no answer")
        if session.goaway is not None:
            raise ClientError("the gateway refused the launch: the ticket is expired, already "
                              "used, or not valid here; launch the resource again") from None
        raise ClientError("the gateway did not answer the launch in time") from None
    return session


async def run_launch(launch: LaunchFile, tls: ssl.SSLContext, *, host: str, port: int,
                     on_listening: Callable[[str, int], None],
                     on_refused: Callable[[str], None] | None = None,
                     command: str | None = None) -> int:
    """Serve the local listener until the launch ends, the command exits, or we're stopped.

    Returns the exit status of `command`, or 0.
    """
    try:
        argv = shlex.split(command) if command is not None else None
    except ValueError as exc:
        raise ClientError(f"--exec: {exc}") from None
    session = await connect_launch(launch, tls)
    if on_refused is not None:
        session.on_refused = lambda reason, message: on_refused(
            f"{message or 'refused'} ({reason.name.lower().replace('_', ' ')})")
    loop = asyncio.get_running_loop()
    server: asyncio.Server | None = None
    status = 0
    try:
        try:
            server = await loop.create_server(
                lambda: session.open_local(mux.Protocol.TCP, "", 0), host, port)
        except OSError as exc:
            raise ClientError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        on_listening(bound_host, bound_port)
        if argv is not None:
            process = await start_viewer(argv, bound_host, bound_port)
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
        if server is not None:
            server.close()
        session.close(mux.Reason.CANCELLED, "client stopped")
    if session.goaway is not None and session.goaway[0] != mux.Reason.CANCELLED:
        raise ClientError(f"the gateway ended the launch: {session.goaway[1] or 'closed'}")
    if session.ended_here is not None and session.ended_here[0] == mux.Reason.TIMED_OUT:
        raise ClientError(f"the gateway stopped answering ({session.ended_here[1]}); "
                          "launch the resource again")
    return status


async def start_viewer(argv: list[str], host: str, port: int) -> asyncio.subprocess.Process:
    """`--exec`: the program started with `{host}` and `{port}` replaced by where it
    connects (our local listener)."""
    argv = [part.replace("{host}", host).replace("{port}", str(port)) for part in argv]
    try:
        return await asyncio.create_subprocess_exec(*argv)
    except OSError as exc:
        raise ClientError(f"--exec: cannot start {argv[0]}: {exc.strerror}") from None
