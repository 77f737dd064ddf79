"""The console proxy: `portcullis shadow DEVICE` on the operator's machine.

It asks the hub (through the gateway, as the signed-in operator) for a signed request
bound to a fresh ephemeral key, connects to the device proxy over mutual TLS (the
device's registered certificate pinned by fingerprint, the console certificate the hub
just issued presented), sends the request, and on ACCEPT relays one local viewer's
connection over the channel. The viewer knows no TLS: it connects to a loopback port.

Nothing is sent to a device whose certificate is not the registered one; every failure
is reported to the hub (for its audit trail) and becomes a ClientError for the operator.
The ephemeral key never leaves this process except as a 0600 file that exists only
while the TLS context loads it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import os
import shlex
import socket
import ssl
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, cast

import httpx

from portcullis.client.launcher import start_viewer
from portcullis.client.state import ClientState
from portcullis.errors import ClientError
from portcullis.net import websocket
from portcullis.net.muxsession import MuxSession
from portcullis.net.peeruid import proc_net_tcp_available, socket_owner_uid
from portcullis.net.tls import client_context, describe_tls_failure
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason
from portcullis.proto.shadow import Accepted, ChannelFailed, Refused, ShadowChannel
from portcullis.shadow.bridge import Bridge
from portcullis.shadow.certificates import console_csr, private_key_pem
from portcullis.shadow.hublink import DIAL_OUT

CONNECT_TIMEOUT = 15.0
ANSWER_TIMEOUT = 90.0     # the device may ask its user for consent first
VIEWER_WAIT = 300.0       # how long the channel waits for the viewer to connect
MAX_EARLY_BYTES = 1 << 20   # what the device may send before the viewer connects
_API = "/api/v1/shadow"


@dataclass(frozen=True)
class ShadowGrant:
    """The hub's answer to a shadow request."""

    request: bytes
    request_id: str
    certificate: bytes
    device: str
    device_fingerprint: str
    address: tuple[str, int] | None   # None: the device dials out, reached via the gateway


class ConsoleProxy:
    """One shadowing of `device` by the operator signed in as `state`."""

    def __init__(self, state: ClientState, device: str, *,
                 say: Callable[[str], None] = print,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 answer_timeout: float = ANSWER_TIMEOUT) -> None:
        self.state = state
        self.device = device
        self._say = say
        self._connect_timeout = connect_timeout
        self._answer_timeout = answer_timeout
        self._http = httpx.AsyncClient(
            base_url=state.url.rstrip("/"), timeout=30.0,
            verify=client_context(Path(state.ca_file) if state.ca_file else None),
            headers={"authorization": f"Bearer {state.token}"})
        self.session_id: str | None = None
        self._carried: CarriedChannel | None = None

    async def run(self, *, host: str = "127.0.0.1", port: int = 0, command: str | None = None,
                  on_listening: Callable[[str, int], None] | None = None) -> int:
        """Open the channel, serve one viewer; the viewer command's exit status (or 0)."""
        try:
            argv = shlex.split(command) if command is not None else None
        except ValueError as exc:
            raise ClientError(f"--exec: {exc}") from None
        try:
            key_pem, grant = await self.ask_hub()
            transport, channel = await self.open_channel(grant, key_pem)
            return await self._serve_viewer(grant, transport, channel, host, port, argv,
                                            on_listening)
        finally:
            if self._carried is not None:
                self._carried.close()
            await self._http.aclose()

    # -- the hub ------------------------------------------------------------------------------
    async def ask_hub(self) -> tuple[bytes, ShadowGrant]:
        key, csr = console_csr()
        body = await self._ask({"device": self.device, "csr": csr.decode("ascii")})
        try:
            device = body["device"]
            address: tuple[str, int] | None = None
            if device["address"] != DIAL_OUT:
                host, _, port = str(device["address"]).rpartition(":")
                address = (host.strip("[]"), int(port))
            grant = ShadowGrant(base64.b64decode(body["request"], validate=True),
                                str(body["request_id"]), str(body["certificate"]).encode(),
                                str(device["name"]), str(device["fingerprint"]), address)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise ClientError("the gateway's answer to the shadow request is incomplete; is "
                              "its shadow hub of this version?") from None
        return private_key_pem(key), grant

    async def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The hub's signed request for this console's key (its JSON answer)."""
        return await self._post(f"{_API}/requests", payload)

    async def report(self, grant: ShadowGrant, problem: str, detail: str) -> None:
        """Tell the hub why this shadowing failed (its audit trail); never raises."""
        with contextlib.suppress(ClientError):
            await self._post(f"{_API}/requests/{grant.request_id}/report",
                             {"problem": problem, "detail": detail})

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            explained = describe_tls_failure(exc, self.state.url)
            raise ClientError(explained or f"cannot reach {self.state.url}: {exc}") from None
        if response.status_code == 401:
            raise ClientError("your session has ended: sign in again with 'portcullis login'")
        if response.status_code >= 400:
            try:
                error = str(response.json().get("error"))
            except (ValueError, AttributeError):
                error = response.text[:200]
            raise ClientError(f"cannot shadow {self.device}: {error}")
        body = response.json() if response.content else {}
        return body if isinstance(body, dict) else {}

    # -- the channel --------------------------------------------------------------------------
    async def open_channel(self, grant: ShadowGrant, key_pem: bytes
                           ) -> tuple[asyncio.Transport, ConsoleChannel]:
        """Connect, check the device's certificate, send the request, wait for ACCEPT."""
        loop = asyncio.get_running_loop()
        tls = _console_tls(grant.certificate, key_pem)
        channel = ConsoleChannel(self._answer_timeout)
        if grant.address is None:
            where = "the device (through the hub)"
            sock = await self._through_hub(grant)
            connecting = loop.create_connection(lambda: channel, sock=sock, ssl=tls,
                                                server_hostname=grant.device)
        else:
            host, port = grant.address
            where = f"{host}:{port}"
            connecting = self._connect_direct(channel, host, port, tls, grant.device)
        try:
            transport, _ = await asyncio.wait_for(connecting, self._connect_timeout)
        except (OSError, TimeoutError) as exc:
            await self._connect_failed(grant, where, exc)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        presented = "sha256:" + hashlib.sha256(der or b"").hexdigest()
        if der is None or presented != grant.device_fingerprint:
            transport.abort()
            detail = f"{where} presented {presented}, not the registered {grant.device_fingerprint}"
            await self.report(grant, "device-certificate", detail)
            raise ClientError(f"cannot shadow {grant.device}: the device at {where} presented "
                              f"a certificate with fingerprint {presented}, not the "
                              f"registered {grant.device_fingerprint}; nothing was sent. "
                              "It is another machine, or the device was re-keyed: ask an "
                              "administrator")
        channel.send(grant.request)
        outcome = await channel.answer
        if isinstance(outcome, Refused):
            await self.report(grant, "refused", outcome.reason)
            raise ClientError(f"{grant.device} refused the shadowing: {outcome.reason}")
        if isinstance(outcome, ChannelFailed):
            await self.report(grant, "protocol", outcome.reason)
            raise ClientError(f"the shadow channel to {grant.device} failed: {outcome.reason}")
        self.session_id = outcome.session_id
        return transport, channel

    async def _connect_direct(self, channel: ConsoleChannel, host: str, port: int,
                              tls: ssl.SSLContext, server_name: str
                              ) -> tuple[asyncio.Transport, ConsoleChannel]:
        """The TLS connection to a device this console reaches itself (OSError or
        ssl.SSLError if it cannot be made)."""
        return await asyncio.get_running_loop().create_connection(
            lambda: channel, host, port, ssl=tls, server_hostname=server_name)

    async def _connect_failed(self, grant: ShadowGrant, where: str,
                              exc: OSError | TimeoutError) -> NoReturn:
        """Report why the connection to the device failed, and raise ClientError."""
        why = self._carried.why_not() if self._carried is not None else None
        if why is not None:   # the hub or the agent refused the carried stream
            await self.report(grant, "unreachable", why)
            raise ClientError(f"cannot shadow {grant.device}: {why}")
        if isinstance(exc, ssl.SSLError):
            detail = f"the TLS handshake with {where} failed: {exc.reason or exc}"
            await self.report(grant, "protocol", detail)
            raise ClientError(f"cannot shadow {grant.device}: {detail} (the device refused "
                              "this console's certificate, or it is no Portcullis device "
                              "proxy)")
        why = getattr(exc, "strerror", None) or str(exc) or "timed out"
        detail = f"cannot connect to {where}: {why}"
        await self.report(grant, "unreachable", detail)
        raise ClientError(f"cannot shadow {grant.device}: {detail}; is its agent "
                          "running and port reachable from here?")

    async def _through_hub(self, grant: ShadowGrant) -> socket.socket:
        """A socket whose bytes the gateway carries to the device's agent (which dials
        out to the hub): the TLS and the channel run over it as over a direct one."""
        try:
            self._carried = await carry_to_device(self.state, grant.request_id, grant.device,
                                                  timeout=self._connect_timeout)
        except ClientError as exc:
            await self.report(grant, "unreachable", str(exc))
            raise
        return self._carried.socket

    async def _serve_viewer(self, grant: ShadowGrant, device: asyncio.Transport,
                            channel: ConsoleChannel, host: str, port: int,
                            argv: list[str] | None,
                            on_listening: Callable[[str, int], None] | None) -> int:
        loop = asyncio.get_running_loop()
        viewer = _ViewerListener()
        try:
            server = await loop.create_server(lambda: viewer.protocol(), host, port)
        except OSError as exc:
            device.close()
            raise ClientError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        bound_host, bound_port = server.sockets[0].getsockname()[:2]
        (on_listening or (lambda h, p: self._say(f"{grant.device}: listening on {h}:{p}")))(
            bound_host, bound_port)
        process: asyncio.subprocess.Process | None = None
        if argv is not None:
            try:
                process = await start_viewer(argv, bound_host, bound_port)
            except ClientError:
                server.close()
                device.close()
                raise
        waits: set[asyncio.Future[Any]] = {viewer.connected, channel.lost}
        if process is not None:
            waits.add(asyncio.ensure_future(process.wait()))
        try:
            await asyncio.wait(waits, timeout=VIEWER_WAIT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.close()   # one viewer only
        if not viewer.connected.done():
            device.close()
            if process is not None:
                return await _stopped(process)
            raise ClientError(f"the channel to {grant.device} ended before a viewer connected"
                              if channel.lost.done() else
                              f"no viewer connected within {VIEWER_WAIT:g} s")
        viewer_transport, viewer_pending = viewer.connected.result()
        bridge = Bridge(viewer_transport, device, first_pending=viewer_pending,
                        second_pending=channel.take_pending())
        waits = {bridge.closed}
        if process is not None:
            waits.add(asyncio.ensure_future(process.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if process is None:
            return 0
        if process.returncode is None:
            # The channel ended: a viewer normally exits on its own; give it a moment.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5.0)
        if not bridge.closed.done():
            bridge.close("the viewer exited")
            await bridge.closed
        return await _stopped(process)


async def _stopped(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.terminate()
    return await process.wait()


def _console_tls(certificate: bytes, key_pem: bytes) -> ssl.SSLContext:
    """Client context presenting the console certificate. The device's certificate is
    self-signed, so no chain is checked: it is pinned by fingerprint after the handshake
    (before a byte is sent) instead."""
    with tempfile.TemporaryDirectory(prefix="portcullis-console-") as directory:
        cert_file, key_file = Path(directory) / "console.crt", Path(directory) / "console.key"
        key_file.touch(mode=0o600)
        key_file.write_bytes(key_pem)
        cert_file.write_bytes(certificate)
        context = client_context(None, cert_file=cert_file, key_file=key_file,
                                 check_hostname=False)
    context.verify_mode = ssl.CERT_NONE
    return context


class ConsoleChannel(asyncio.Protocol):
    """The TLS connection to the device until the viewer is bridged to it."""

    def __init__(self, answer_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._codec = ShadowChannel("console", now=loop.time(), answer_timeout=answer_timeout)
        self.answer: asyncio.Future[Accepted | Refused | ChannelFailed] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def send(self, signed: bytes) -> None:
        assert self._transport is not None
        self._codec.send_request(signed, now=asyncio.get_running_loop().time())
        self._transport.write(self._codec.data_to_send())
        deadline = self._codec.get_timer()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        self._codec.handle_timer(asyncio.get_running_loop().time())
        self._events()

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            # Before the viewer is there. Reading goes on (so that the device ending the
            # channel is noticed now, not when a viewer arrives) up to a bound: a VNC
            # server says 12 bytes and waits for its viewer.
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > MAX_EARLY_BYTES and self._transport is not None:
                self._transport.pause_reading()
            return
        self._codec.receive_data(data)
        self._events()

    def _events(self) -> None:
        assert self._transport is not None
        while (event := self._codec.next_event()) is not None:
            if self.answer.done():
                continue
            if isinstance(event, Accepted):
                # Whatever the device sends next waits for the viewer.
                if event.leftover:
                    self._pending.append(event.leftover)
                self.answer.set_result(event)
            elif isinstance(event, Refused | ChannelFailed):
                self.answer.set_result(event)
                self._transport.close()
        if self.answer.done() and self._timer is not None:
            self._timer.cancel()

    def take_pending(self) -> bytes:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return data

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.answer.done():
            # With TLS 1.3 a device that refuses the console certificate does so after
            # the client's handshake is over: this is where the operator learns of it.
            self.answer.set_result(ChannelFailed(
                "the device closed the connection without answering"
                + (f" ({exc})" if exc else "")
                + ": it refused this console's certificate (not issued by its hub's "
                  "console CA?), or its agent stopped; the agent's audit log says which"))
        if not self.lost.done():
            self.lost.set_result(None)


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _ViewerListener:
    """The local listener's one viewer; later connections are closed at once.

    The loopback port is open to every user of this machine, and the channel behind it
    shows the device's screen: only a viewer run by this OS user is taken (the owner of
    the peer's socket, from /proc/net/tcp); another user's connection is closed and the
    listener waits on. Where the kernel does not list socket owners, any is taken."""

    def __init__(self, warn: Callable[[str], None] = _warn, uid: int | None = None) -> None:
        self.connected: asyncio.Future[tuple[asyncio.Transport, bytes]] = \
            asyncio.get_running_loop().create_future()
        self._warn = warn
        self._uid = os.getuid() if uid is None else uid
        self._check_owner = proc_net_tcp_available()

    def protocol(self) -> asyncio.Protocol:
        return _Viewer(self)

    def owner_refused(self, transport: asyncio.BaseTransport) -> bool:
        """Whether `transport` comes from another user's program (then closed, and said)."""
        if not self._check_owner:
            return False
        peer, ours = transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        if not peer or not ours:
            return True
        owner = socket_owner_uid((str(peer[0]), int(peer[1])), (str(ours[0]), int(ours[1])))
        if owner == self._uid:
            return False
        self._warn(f"closed a viewer connection from {peer[0]}:{peer[1]}: it is "
                   + (f"run by uid {owner}, not by you (uid {self._uid})" if owner is not None
                      else "not a socket this system lists (gone already?)")
                   + "; waiting for your viewer")
        return True


class _Viewer(asyncio.Protocol):
    def __init__(self, listener: _ViewerListener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        if self._listener.connected.done() or self._listener.owner_refused(transport):
            transport.close()
            return
        transport.pause_reading()   # the bridge resumes it
        self._listener.connected.set_result((transport, b""))


# -- devices behind NAT ----------------------------------------------------------------------
CHANNEL_PATH = "/api/v1/shadow/channel"   # served by shadow.dialout on the gateway's port


@dataclass
class CarriedChannel:
    """The console's end of a channel the gateway carries: `socket` is one end of a
    socket pair whose other end is a mux stream on the WebSocket to the gateway."""

    socket: socket.socket
    session: MuxSession
    refused: list[str]   # what the hub or the agent said, refusing the stream

    def why_not(self) -> str | None:
        """Why the carried stream is gone, when the far side said so."""
        if self.refused:
            return self.refused[0]
        if self.session.goaway is not None:
            return self.session.goaway[1] or self.session.end_reason()
        return None

    def close(self) -> None:
        self.session.close(Reason.CANCELLED, "the console ended the channel")


async def carry_to_device(state: ClientState, request_id: str, device: str, *,
                          timeout: float = CONNECT_TIMEOUT) -> CarriedChannel:
    """Open the gateway's channel to a dial-out device for the request `request_id`.

    A socket pair joins the channel code to the mux stream (the stream's `StreamBridge`
    takes one end as its socket, with the mux's credit as back-pressure), so the TLS
    client, the pinning and the shadow channel stay the one code path of a direct
    connection. The sign-in token goes in the mux HELLO, never in the URL."""
    # Plain ws:// only for a gateway URL that is plain itself (as the HTTP calls are).
    tls = (None if state.url.startswith(("http://", "ws://"))
           else client_context(Path(state.ca_file) if state.ca_file else None))
    carrier = await websocket.connect(websocket.websocket_url(state.url, CHANNEL_PATH), tls,
                                      timeout=timeout)
    codec = MuxConnection("client")
    codec.send_hello({"session": state.token, "request": request_id})
    session = MuxSession(codec)
    carrier.attach(session)
    hello = await session.hello_within(timeout)
    if hello is None:
        why = session.goaway[1] if session.goaway else "it did not answer in time"
        session.close(Reason.CANCELLED, "no channel")
        raise ClientError(f"the gateway cannot carry the channel to {device}: {why}")
    ours, theirs = socket.socketpair()
    carried = CarriedChannel(ours, session, [])
    session.on_refused = lambda reason, message: carried.refused.append(message)
    bridge = session.open_local(mux.Protocol.TCP, device, 0)
    await asyncio.get_running_loop().connect_accepted_socket(lambda: bridge, theirs)
    return carried
