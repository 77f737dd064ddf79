"""The gateway's VNC endpoint: a browser's WebSocket carrying RFB to one VNC server.

The page (noVNC) opens a WebSocket to `PATH` and sends, as its first binary message, the
ticket the portal issued for the resource (UTF-8). The gateway redeems it exactly as a
launch's (`gateway.launch.TicketGate`: single use, expiry, session alive, address
admitted), dials the resource's address through the Dialer, and then relays bytes: each
binary message from the browser is written to the server, each read from the server goes
to the browser as one binary message. A full send buffer on either side pauses reading
on the other (back-pressure both ways). With a `password_file`, `RfbPasswordBridge`
answers the server's VNC authentication and offers the browser None, until the handshake
is over. A server the gateway cannot reach refuses the viewer with an RFB security
failure and a reason, which noVNC shows.

WebSocket close codes the viewer page explains (see static/viewer.js): 1000 the VNC
server ended; 1008 ("denied") the ticket was refused; 4001 the sign-in session ended
(sign-out, an administrator, expiry), with why; 1011 the gateway failed.

A ticket for a shadowed device (resource `device:NAME`, issued by the device page)
opens the device's secure shadowing channel instead, the gateway acting as its console
proxy (`webvnc.device`); the relay is the same.

Never logs a ticket or a password; nothing sent to the browser names the server's
address.
"""

from __future__ import annotations

import asyncio
import time
from enum import IntEnum
from pathlib import Path

import structlog
from websockets.http11 import Request

from portcullis.audit import AuditTrail
from portcullis.config.model import Resource, Settings
from portcullis.errors import ClientError, DialError
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.gateway.launch import TicketGate
from portcullis.identity.sessions import Session
from portcullis.net.dialer import Dialer
from portcullis.net.muxsession import MessageCarrier
from portcullis.net.websocket import Message, WebSocketMux
from portcullis.proto.mux import Reason
from portcullis.proto.rfb import RfbPasswordBridge, RfbRefusal
from portcullis.shadow.hub import ShadowHub
from portcullis.sta.authority import TicketGrant
from portcullis.webvnc.device import DEVICE_PREFIX, open_device

log = structlog.get_logger("portcullis.webvnc")

PATH = "/api/v1/vnc"
MAX_TICKET_MESSAGE = 1024
# What a viewer may send before the server is connected (noVNC sends nothing until it
# has read the server's version; this only bounds a hostile one).
MAX_EARLY_BYTES = 64 * 1024
NOT_AVAILABLE = "the desktop's server is not available now; try again later"
# How long the gateway's own part of an RFB handshake (a refusal, the password bridge)
# may take: a viewer or server that stops answering in it holds nothing longer.
HANDSHAKE_SECONDS = 30.0


class CloseCode(IntEnum):
    SERVER_ENDED = 1000
    REFUSED = 1008
    INTERNAL = 1011
    SESSION_ENDED = 4001


def close_reason(text: str) -> str:
    """A WebSocket close reason fits in 123 bytes of UTF-8 (RFC 6455 5.5)."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


class ViewerRelay:
    """One browser's WebSocket joined to one VNC server: the bytes both ways, the
    back-pressure, the optional password bridge and every way it ends. The endpoint
    drives it (`ticket`, `connect`, `refuse`); the WebSocket and the server's transport
    feed it."""

    def __init__(self, websocket: WebSocketMux) -> None:
        self._websocket = websocket
        self.ticket: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()
        self.ended: str = ""              # why, for the audit
        self.sent = 0                     # bytes to the browser
        self.received = 0                 # bytes from the browser
        self._server: asyncio.Transport | None = None
        self._bridge: RfbPasswordBridge | None = None
        self._refusal: RfbRefusal | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._paused = False

    # -- the WebSocket's side (MessageSession) ---------------------------------------
    def attach(self, carrier: MessageCarrier) -> None:
        """The carrier is the WebSocket given at construction; nothing to keep."""

    def receive_message(self, message: Message) -> None:
        if self.closed.is_set():
            return
        if not self.ticket.done():
            if len(message) > MAX_TICKET_MESSAGE:
                self.ticket.set_result("")   # not a ticket: refused like a wrong one
            else:
                self.ticket.set_result(bytes(message).decode("utf-8", "replace"))
            return
        self.received += len(message)
        if self._refusal is not None:
            self._refusal.receive_data(message)
            self._flush_refusal()
        elif self._bridge is not None:
            self._bridge.receive_from_viewer(message)
            self._flush_bridge()
        elif self._server is not None:
            self._server.write(message)
        else:
            self._early.append(bytes(message))
            self._early_size += len(message)
            if self._early_size > MAX_EARLY_BYTES:
                self.end(CloseCode.REFUSED, "denied", "the viewer sent too much too early")

    def carrier_closed(self) -> None:
        if not self.closed.is_set():
            self._finish("the viewer closed the connection")

    def pause_sources(self) -> None:
        self._paused = True
        if self._server is not None:
            self._server.pause_reading()

    def resume_sources(self) -> None:
        self._paused = False
        if self._server is not None:
            self._server.resume_reading()

    # -- ending it (Endable: the session-ending event, an administrator) --------------
    def close(self, reason: Reason, message: str) -> None:
        self.end(CloseCode.SESSION_ENDED, message, f"ended: {message}")

    def byte_counts(self) -> tuple[int, int]:
        return self.sent, self.received

    @property
    def open_streams(self) -> int:
        return 1 if self._server is not None else 0

    def end(self, code: CloseCode, told: str, why: str) -> None:
        """Close the WebSocket with `code` and `told` (the viewer reads it), and the
        server's connection at once; `why` goes to the audit."""
        if self.closed.is_set():
            return
        self._websocket.close(code, close_reason(told))
        self._finish(why)

    def _finish(self, why: str) -> None:
        self.ended = why
        if self._server is not None:
            self._server.abort()   # at once: nothing the server still has is wanted
        if not self.ticket.done():
            self.ticket.cancel()
        self.closed.set()

    # -- the endpoint's side ----------------------------------------------------------
    def refuse(self, reason: str) -> None:
        """Answer the viewer as a VNC server refusing it with `reason` (noVNC shows it);
        close once it is told."""
        self._refusal = RfbRefusal(reason)
        self._bound_handshake()
        self._flush_refusal()
        early, self._early = self._early, []
        for message in early:
            self._refusal.receive_data(message)
        self._flush_refusal()

    def connected(self, transport: asyncio.Transport, password: bytes | None) -> None:
        """The server's connection is up: relay, through the bridge if there is a
        password, and hand on what the viewer sent meanwhile."""
        self._server = transport
        if self._paused:
            transport.pause_reading()
        if password is not None:
            self._bridge = RfbPasswordBridge(password)
            self._bound_handshake()
        early, self._early = self._early, []
        for message in early:
            self.receive_message(message)
            self.received -= len(message)   # counted when it arrived

    def _bound_handshake(self) -> None:
        def overdue() -> None:
            if self._refusal is not None or self._bridge is not None:
                self.end(CloseCode.SERVER_ENDED, "", "the RFB handshake did not finish")

        asyncio.get_running_loop().call_later(HANDSHAKE_SECONDS, overdue)

    def _send(self, data: bytes) -> None:
        if data:
            self.sent += len(data)
            self._websocket.send_message([data])

    def _flush_refusal(self) -> None:
        refusal = self._refusal
        assert refusal is not None
        self._send(refusal.data_to_send())
        if refusal.finished:
            self.end(CloseCode.SERVER_ENDED, "", "refused the viewer: server not available")

    def _flush_bridge(self) -> None:
        bridge = self._bridge
        assert bridge is not None
        to_server = bridge.data_to_server()
        if to_server and self._server is not None:
            self._server.write(to_server)
        self._send(bridge.data_to_viewer())
        if bridge.failure is not None:
            self.end(CloseCode.SERVER_ENDED, "", f"VNC handshake failed: {bridge.failure}")
        elif bridge.relaying:
            self._bridge = None   # the handshake is over: bytes go straight through

    # -- the server's side ------------------------------------------------------------
    def from_server(self, data: bytes) -> None:
        if self.closed.is_set():
            return
        if self._bridge is not None:
            self._bridge.receive_from_server(data)
            self._flush_bridge()
        else:
            self._send(data)

    def server_closed(self) -> None:
        if self.closed.is_set():
            return
        bridge = self._bridge
        if bridge is not None:
            # A server refusing the password closes at once: the viewer, greeted or not
            # yet, is still to be told why.
            self._server = None
            if not bridge.viewer_greeted:
                self._bridge = None
                self.refuse("the VNC server closed the connection during its handshake")
            return
        self.end(CloseCode.SERVER_ENDED, "the VNC server ended the session",
                 "the VNC server closed the connection")

    def server_buffer_full(self, full: bool) -> None:
        """The server reads slower than the browser types: stop reading the browser."""
        transport = self._websocket.transport
        if transport is not None:
            if full:
                transport.pause_reading()
            else:
                transport.resume_reading()


class ServerConnection(asyncio.Protocol):
    """The VNC server's side of a relay: its bytes, its end, its full buffer."""

    def __init__(self, relay: ViewerRelay) -> None:
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        self._relay.from_server(data)

    def eof_received(self) -> bool | None:
        self._relay.server_closed()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.server_closed()

    def pause_writing(self) -> None:
        self._relay.server_buffer_full(True)

    def resume_writing(self) -> None:
        self._relay.server_buffer_full(False)


class VncEndpoint:
    """The WebSocket endpoint at `PATH` (registered in the gateway's endpoints)."""

    def __init__(self, gate: TicketGate, dialer: Dialer, registry: ConnectionRegistry,
                 audit: AuditTrail, settings: Settings,
                 shadow_hub: ShadowHub | None = None) -> None:
        self._gate = gate
        self._hub = shadow_hub   # None: no hub in this process, no devices in the browser
        self._dialer = dialer
        self._registry = registry
        self._audit = audit
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()

    def opened(self, carrier: WebSocketMux, request: Request) -> None:
        client = carrier.peer_host()
        relay = ViewerRelay(carrier)
        carrier.attach(relay)
        task = asyncio.ensure_future(self._serve(relay, client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, relay: ViewerRelay, client: str) -> None:
        try:
            grant = await self._authorise(relay, client)
            if grant is None:
                return
            if grant.resource.startswith(DEVICE_PREFIX):
                await self._shadow(relay, grant, client)
            else:
                await self._relay(relay, grant, client)
        except Exception as exc:   # a store or STA failure: end it, never hang
            log.exception("VNC connection failed")
            self._audit.record("vnc.refused", client=client, reason=f"internal: {exc!r}")
            relay.end(CloseCode.INTERNAL, "the gateway cannot serve this now", "internal")

    async def _authorise(self, relay: ViewerRelay, client: str) -> TicketGrant | None:
        try:
            ticket = await asyncio.wait_for(relay.ticket,
                                            self._settings.gateway.ticket_wait_seconds)
        except (TimeoutError, asyncio.CancelledError):
            if not relay.closed.is_set():
                self._audit.record("vnc.refused", client=client, reason="no ticket presented")
            relay.end(CloseCode.REFUSED, "denied", "no ticket presented")
            return None
        grant = await self._gate.redeem(ticket, client, "vnc")
        device = grant is not None and grant.resource.startswith(DEVICE_PREFIX)
        if grant is not None and device and (self._hub is None
                                             or self._gate.sessions is None):
            self._audit.record("vnc.refused", client=client, user=grant.user,
                               resource=grant.resource, reason="no shadow hub here")
            grant = None
        elif grant is not None and not device and self._resource(grant.resource) is None:
            # A launch's ticket carries no RFB: only a vnc resource's opens here.
            self._audit.record("vnc.refused", client=client, user=grant.user,
                               resource=grant.resource, reason="not a vnc resource")
            grant = None
        if grant is None:
            relay.end(CloseCode.REFUSED, "denied", "ticket refused")
        return grant

    def _resource(self, name: str) -> Resource | None:
        return next((r for r in self._settings.resources
                     if r.name == name and r.kind == "vnc"), None)

    def _password(self, resource: Resource) -> bytes | None:
        """The server's password from its file (first line), read at each connection so
        that a changed password needs no restart; OSError if it cannot be read."""
        if resource.password_file is None:
            return None
        text = Path(self._settings.path(resource.password_file)).read_bytes()
        return text.splitlines()[0] if text.strip() else b""

    async def _relay(self, relay: ViewerRelay, grant: TicketGrant, client: str) -> None:
        resource = self._resource(grant.resource)
        assert resource is not None
        admission, port = await self._gate.pin(grant, client, "vnc")
        if relay.closed.is_set():
            return
        try:
            password = self._password(resource)
        except OSError as exc:
            self._audit.record("vnc.failed", user=grant.user, resource=grant.resource,
                               reason=f"cannot read password_file: {exc.strerror}")
            relay.refuse("the gateway cannot answer this desktop's password; "
                         "tell your administrator")
            return
        if isinstance(admission, DialError):
            self._audit.record("vnc.failed", user=grant.user, resource=grant.resource,
                               reason=str(admission))
        if isinstance(admission, DialError) or admission.address is None:
            relay.refuse(NOT_AVAILABLE)   # a refused address is audited by the gate
            return
        try:
            transport, _ = await self._dialer.connect(
                str(admission.address), port, lambda: ServerConnection(relay))
        except DialError as exc:
            self._audit.record("vnc.failed", user=grant.user, resource=grant.resource,
                               reason=str(exc))
            relay.refuse(NOT_AVAILABLE)
            return
        await self._carry(relay, grant, client, transport, password)

    async def _shadow(self, relay: ViewerRelay, grant: TicketGrant, client: str) -> None:
        """Open the device's shadowing channel as its console, then relay it."""
        assert self._hub is not None and self._gate.sessions is not None
        device = grant.resource.removeprefix(DEVICE_PREFIX)
        session = await self._gate.sessions.standing(grant.session or "")
        if not isinstance(session, Session):
            relay.end(CloseCode.SESSION_ENDED, "your session ended; sign in again",
                      "the session ended")
            return
        try:
            transport, said = await open_device(self._hub, session, device, self._dialer,
                                                client)
        except ClientError as exc:
            self._audit.record("vnc.failed", user=grant.user, resource=grant.resource,
                               reason=str(exc))
            relay.refuse(str(exc))
            return
        transport.set_protocol(ServerConnection(relay))
        transport.resume_reading()   # the console paused it if the device said much
        await self._carry(relay, grant, client, transport, None, said)

    async def _carry(self, relay: ViewerRelay, grant: TicketGrant, client: str,
                     transport: asyncio.Transport, password: bytes | None,
                     said: bytes = b"") -> None:
        """Relay until either side ends, as a connection the session's end closes."""
        if relay.closed.is_set():   # the viewer left while we dialled
            transport.abort()
            return
        relay.connected(transport, password)
        if said:
            relay.from_server(said)
        started = time.monotonic()
        connection = Connection("vnc", grant.user, client, relay, grant.resource,
                                session_handle=grant.session if self._gate.sessions else None)
        self._registry.add(connection)
        try:
            await relay.closed.wait()
        finally:
            self._registry.remove(connection)
            self._audit.record("vnc.ended", user=grant.user, resource=grant.resource,
                               client=client, bytes_to_server=relay.received,
                               bytes_to_client=relay.sent,
                               duration=round(time.monotonic() - started, 3),
                               reason=relay.ended)
