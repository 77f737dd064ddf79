"""The local ends of the tunnel: a SOCKS5 server and fixed port forwards, and what the
HTTP proxy (`client.httpproxy`) builds on. Each accepted connection learns where it
wants to go (from the proxy protocol, or the forward's fixed destination), then becomes
one stream of the tunnel.

The proxy protocols are sans-I/O (`proto.socks5`, `proto.httpconnect`); these classes
only move bytes, time the handshake out, and hand the socket over to the stream once its
destination is known. A stream the gateway refuses is reported once, with its
destination and the gateway's words (`ProxySettings.on_refused`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from portcullis.client.tunnel import TunnelClient
from portcullis.errors import ProtocolError
from portcullis.net.muxsession import DatagramFlow, MuxSession, StreamBridge
from portcullis.proto import mux
from portcullis.proto.mux import Reason
from portcullis.proto.proxyauth import ProxyCredentials
from portcullis.proto.socks5 import (
    Command,
    Reply,
    Socks5Connection,
    UdpDatagram,
    build_udp_datagram,
    parse_udp_datagram,
    reply_for,
)

# Bytes to answer the application with: on success (reason None) or on refusal.
Answer = Callable[[Reason | None, str], bytes]
# Told of a stream the gateway refused: (host, port, reason, the gateway's message).
RefusalReport = Callable[[str, int, Reason, str], None]
#: Seconds a local client has to finish its SOCKS5 or HTTP CONNECT handshake.
HANDSHAKE_TIMEOUT = 10.0
#: Seconds the HTTP proxy waits for the gateway to open a forwarded request's connection.
UPSTREAM_TIMEOUT = 30.0
#: Seconds a forwarding HTTP proxy connection may see nothing move either way.
IDLE_TIMEOUT = 120.0
# A local UDP sender silent for this long gets a new flow next time (the gateway also
# ends flows idle for its own, configured time).
UDP_IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class ProxySettings:
    """What every local listener of one `connect` run shares."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    # Required of SOCKS5 (RFC 1929) and HTTP (Proxy-Authorization) clients when set.
    credentials: ProxyCredentials | None = None
    on_refused: RefusalReport | None = None
    upstream_timeout: float = UPSTREAM_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT


class ProxiedStream(StreamBridge):
    """A stream to ``destination``; its application may first wait for a proxy answer
    (SOCKS or HTTP). A refusal before ACCEPT is reported and, with an answer, told to
    the application in its own protocol."""

    def __init__(self, session: MuxSession, stream_id: int, answer: Answer | None,
                 destination: tuple[str, int], on_refused: RefusalReport | None) -> None:
        super().__init__(session, stream_id, accepted=False)
        self._answer = answer
        self._destination = destination
        self._on_refused = on_refused

    def on_accepted(self) -> None:
        if self.transport is not None and self._answer is not None:
            self.transport.write(self._answer(None, ""))
        super().on_accepted()

    def on_ended(self, refusal: tuple[Reason, str] | None = None) -> None:
        # CANCELLED is the tunnel going down or our own reset, not the gateway's decision.
        if (refusal is not None and not self.accepted and refusal[0] != Reason.CANCELLED
                and self._on_refused is not None):
            self._on_refused(*self._destination, *refusal)
        if (refusal is not None and not self.accepted and self.transport is not None
                and self._answer is not None):
            # Tell the application why, in its own protocol, then hang up politely.
            self.transport.write(self._answer(*refusal))
            self.transport.close()
            return
        super().on_ended(refusal)


class Inbound(asyncio.Protocol):
    # A proxy protocol (SOCKS5, HTTP) has a handshake to finish in time; a forward not.
    negotiates = False

    def __init__(self, tunnel: TunnelClient, settings: ProxySettings = ProxySettings()) -> None:
        self.tunnel = tunnel
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self._task: asyncio.Task[StreamBridge | None] | None = None
        # Bytes that arrive once the destination is known, before the stream takes over.
        self._pending = bytearray()
        self._carrying = False
        self._handshake_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.negotiates:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                self.settings.handshake_timeout, self._handshake_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.handshake_done()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def handshake_done(self) -> None:
        """The destination is known (or the connection is over): no more timeout."""
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        assert self.transport is not None
        self.transport.write(self.handshake_timeout_answer())
        self.transport.close()

    def handshake_timeout_answer(self) -> bytes:
        """What to tell a client whose handshake took too long (SOCKS5 has nothing)."""
        return b""

    def data_received(self, data: bytes) -> None:
        if self._carrying:
            self._pending += data
        else:
            self.negotiate(data)

    def negotiate(self, data: bytes) -> None:
        """Learn the destination from the proxy protocol, then call carry()."""

    def carry(self, host: str, port: int, answer: Answer | None, early: bytes = b"") -> None:
        assert self.transport is not None
        self.handshake_done()
        self._carrying = True
        self._pending += early
        self.transport.pause_reading()
        on_refused = self.settings.on_refused

        def make(session: MuxSession, stream_id: int) -> StreamBridge:
            return ProxiedStream(session, stream_id, answer, (host, port), on_refused)

        self._task = asyncio.ensure_future(self.tunnel.open(
            self.transport, mux.Protocol.TCP, host, port, make=make, early=self._pending))


class SocksInbound(Inbound):
    """RFC 1928 SOCKS5: CONNECT, and UDP ASSOCIATE (each destination one UDP flow)."""

    negotiates = True

    def __init__(self, tunnel: TunnelClient, settings: ProxySettings = ProxySettings()) -> None:
        super().__init__(tunnel, settings)
        self._socks = Socks5Connection(credentials=settings.credentials)
        self._relay: asyncio.DatagramTransport | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._relay is not None:   # the association lives as long as this connection
            self._relay.close()

    def negotiate(self, data: bytes) -> None:
        assert self.transport is not None
        socks = self._socks
        try:
            socks.receive_data(data)
        except ProtocolError:
            self.transport.write(socks.data_to_send())
            self.transport.close()
            return
        self.transport.write(socks.data_to_send())
        request = socks.next_request()
        if request is None:
            return
        self.handshake_done()
        if request.command == Command.UDP_ASSOCIATE:
            self._task = asyncio.ensure_future(self._associate(request.port))
            return
        if request.command != Command.CONNECT:
            socks.reply(Reply.COMMAND_NOT_SUPPORTED)
            self.transport.write(socks.data_to_send())
            self.transport.close()
            return

        def answer(reason: Reason | None, message: str) -> bytes:
            socks.reply(Reply.SUCCEEDED if reason is None else reply_for(reason.name.lower()))
            return socks.data_to_send()

        self.carry(request.host, request.port, answer, socks.take_payload())

    async def _associate(self, client_port: int) -> StreamBridge | None:
        """Open the UDP relay next to our TCP address and tell the client where it is."""
        assert self.transport is not None
        local = self.transport.get_extra_info("sockname")
        peer = self.transport.get_extra_info("peername")
        loop = asyncio.get_running_loop()
        try:
            relay, _ = await loop.create_datagram_endpoint(
                lambda: SocksUdpRelay(self.tunnel, peer[0], client_port),
                local_addr=(local[0], 0))
        except OSError:
            self._socks.reply(Reply.GENERAL_FAILURE)
            self.transport.write(self._socks.data_to_send())
            self.transport.close()
            return None
        self._relay = relay
        bound = relay.get_extra_info("sockname")
        self._socks.reply(Reply.SUCCEEDED, bound[0], bound[1])
        self.transport.write(self._socks.data_to_send())
        return None


class SocksUdpRelay(asyncio.DatagramProtocol):
    """The UDP side of a SOCKS5 association: datagrams with a SOCKS header from the
    client; each destination is one flow of the tunnel."""

    def __init__(self, tunnel: TunnelClient, client_host: str, client_port: int = 0) -> None:
        self._client_host = client_host   # RFC 1928: only the associating client,
        self._client_port = client_port   # and from the port it named (0: not known yet)
        self._transport: asyncio.DatagramTransport | None = None
        self._flows = FlowTable(tunnel)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._flows.close_all("association ended")

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        transport = self._transport
        if (addr[0] != self._client_host or transport is None
                or (self._client_port and addr[1] != self._client_port)):
            return
        try:
            datagram = parse_udp_datagram(data)
        except ProtocolError:
            return   # a malformed datagram is dropped, as UDP may be
        host, port = datagram.host, datagram.port

        def deliver(reply: bytes) -> None:
            transport.sendto(build_udp_datagram(UdpDatagram(host, port, reply)), addr)

        self._flows.send((host, port), host, port, datagram.payload, deliver)


class FlowTable:
    """The tunnel's UDP flows of one local socket, by key (a local sender, or a
    destination); a flow is opened on first use and forgotten when it ends. While the
    tunnel is down, datagrams are dropped, as UDP allows."""

    def __init__(self, tunnel: TunnelClient) -> None:
        self._tunnel = tunnel
        self._flows: dict[object, DatagramFlow] = {}

    def send(self, key: object, host: str, port: int, data: bytes,
             deliver: Callable[[bytes], None]) -> None:
        flow = self._flows.get(key)
        if flow is None:
            session = self._tunnel.current
            if session is None:
                return
            try:
                flow = session.open_flow(host, port, deliver, idle_timeout=UDP_IDLE_TIMEOUT)
            except (ProtocolError, ValueError):   # the tunnel just ended, or a bad name
                return
            flow.on_closed = lambda ended: self._forget(key, ended)
            self._flows[key] = flow
        flow.send(data)

    def close_all(self, message: str) -> None:
        for flow in list(self._flows.values()):
            flow.close(message)

    def _forget(self, key: object, flow: DatagramFlow) -> None:
        if self._flows.get(key) is flow:
            del self._flows[key]


class UdpForward(asyncio.DatagramProtocol):
    """A UDP forward (-U): each local sender is its own flow to one destination inside."""

    def __init__(self, tunnel: TunnelClient, host: str, port: int) -> None:
        self._destination = (host, port)
        self._transport: asyncio.DatagramTransport | None = None
        self._flows = FlowTable(tunnel)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        transport = self._transport
        if transport is not None:
            self._flows.send(addr, *self._destination, data,
                             lambda reply: transport.sendto(reply, addr))


class ForwardInbound(Inbound):
    """A fixed forward (-L): every connection goes to one destination."""

    def __init__(self, tunnel: TunnelClient, host: str, port: int,
                 settings: ProxySettings = ProxySettings()) -> None:
        super().__init__(tunnel, settings)
        self._destination = (host, port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.carry(*self._destination, answer=None)
