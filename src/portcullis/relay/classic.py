"""The relay's classic mode: edges connect to it over mutual TLS and speak SOCKS5 inside,
one TLS connection per relayed connection (docs/protocol/relay.md).

    edge --TCP--> accept (limit) --TLS, deployment CA, within handshake_timeout-->
    common name portcullis-gateway? --SOCKS5 request within handshake_timeout-->
    RelayCore.admit + dial --> reply --> bytes / framed datagrams / echoes

Only the gateway's certificate is served: any other (another CA, expired, a user's, the
STA's) is refused at the handshake or right after it, audited with the reason
("relay.edge_refused"), and never reads a SOCKS byte. The SOCKS5 codec is
`proto/socks5.py` with the relay's extensions (0x83 UDP in stream, 0x81 ICMP echo in
stream); the refusal reply comes from the one Reason <-> SOCKS reply table there.

The data path is the Protocol API: a chunk read on one side is written to the other as
it came (no copy), and each side's pause_writing pauses reading on the other side.
Decisions are `RelayCore`'s, made once per connection. Never logs payload.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import cast

import structlog

from portcullis.errors import DialError, ProtocolError
from portcullis.net.dialer import EchoChannel
from portcullis.net.echoes import MAX_ECHO_DATA, EchoResponder
from portcullis.pki import transport_common_name
from portcullis.pki.roles import ROLE_COMMON_NAMES
from portcullis.policy.admission import Protocol
from portcullis.proto.socks5 import Command, Reply, Request, Socks5Connection, reply_for
from portcullis.proto.streamdatagrams import StreamDatagrams, frame_datagram
from portcullis.relay.core import RelayCore, RelayedStream
from portcullis.web.edge import Acceptor, Edge, Lease

log = structlog.get_logger("portcullis.relay")

GATEWAY_COMMON_NAME = ROLE_COMMON_NAMES["gateway"]
# Datagrams towards the edge are dropped, as UDP would, while this much is unsent to it.
MAX_UNSENT_DATAGRAMS = 1024 * 1024
_PROTOCOL_OF: dict[Command, Protocol] = {Command.CONNECT: "tcp", Command.UDP_IN_STREAM: "udp",
                                    Command.ICMP_ECHO_IN_STREAM: "icmp"}


class ClassicServer:
    """The classic listener: the edge's acceptor (`web/edge.py`: connection limit, TLS
    handshake bounded by `relay.handshake_timeout`) hands each authenticated connection
    to an `EdgeConnection`; a failed handshake is audited with its reason."""

    def __init__(self, core: RelayCore, tls: ssl.SSLContext, edge: Edge) -> None:
        self.core = core
        self.tls = tls
        self.edge = edge
        self.handshake_timeout = edge.limits.tls_handshake_timeout
        self._acceptor: Acceptor | None = None
        self._sock: socket.socket | None = None
        self._connections: set[EdgeConnection] = set()

    def listen(self, sock: socket.socket) -> tuple[str, int]:
        """Accept on the bound, listening `sock`; return the address it listens on."""
        self._sock = sock
        self._acceptor = Acceptor(self.edge, sock, self.tls,
                                  lambda lease: EdgeConnection(self, lease),
                                  handshake_failed=self._handshake_failed)
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop accepting and end every connection (SIGTERM)."""
        if self._acceptor is not None:
            self._acceptor.close()
        if self._sock is not None:
            self._sock.close()
        for connection in list(self._connections):
            connection.abort()

    def _handshake_failed(self, peer: str, exc: BaseException) -> None:
        reason, why = describe_handshake_failure(exc, self.handshake_timeout)
        self.core.refuse_edge(peer, reason, why)

    def connection_started(self, connection: EdgeConnection) -> None:
        self._connections.add(connection)

    def connection_ended(self, connection: EdgeConnection) -> None:
        self._connections.discard(connection)


def describe_handshake_failure(exc: BaseException, timeout: float) -> tuple[str, str]:
    """(short reason, what happened) for a TLS handshake that failed at the relay."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate", f"client certificate refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        what = exc.reason or str(exc)
        if what == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "certificate", "the client presented no certificate"
        return "tls", f"TLS handshake failed: {what}"
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "handshake_timeout", f"no TLS handshake within {timeout:g} s"
    return "tls", f"TLS handshake failed: {exc}"


class EdgeConnection(asyncio.Protocol):
    """One edge connection after its TLS handshake: the SOCKS5 exchange, then one relayed
    TCP connection, UDP flow or echo channel."""

    def __init__(self, server: ClassicServer, lease: Lease) -> None:
        self._server = server
        self._lease = lease
        self.core = server.core
        self._edge = "unknown"
        self._transport: asyncio.Transport | None = None
        self._socks = Socks5Connection(extensions=True)
        self._deadline: asyncio.TimerHandle | None = None
        self._relay: _Relayed | None = None
        self._identity: str | None = None   # set once the certificate is the gateway's
        self._closing = False
        self.bytes_to_edge = 0
        self.bytes_from_edge = 0

    # -- edge side ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server.connection_started(self)
        peer = transport.get_extra_info("peername")
        self._edge = str(peer[0]) if peer else "unknown"
        name = transport_common_name(transport)
        if name != GATEWAY_COMMON_NAME:
            self.refuse("certificate", f"the certificate's common name is {name!r}, not "
                         f"{GATEWAY_COMMON_NAME!r}: only edge gateways may use the relay")
            return
        self._identity = f"{GATEWAY_COMMON_NAME}@{self._edge}"
        self.core.status.edge_connected(self._identity)
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._server.handshake_timeout, self._socks_late)

    def data_received(self, data: bytes) -> None:
        relay = self._relay
        if relay is not None:
            self.bytes_from_edge += len(data)
            relay.from_edge(data)
            return
        if self._identity is None or self._closing:
            return
        try:
            self._socks.receive_data(data)
        except ProtocolError as exc:
            self._write(self._socks.data_to_send())
            self.refuse("socks", str(exc))
            return
        self._write(self._socks.data_to_send())
        request = self._socks.next_request()
        if request is not None:
            assert self._transport is not None
            self._transport.pause_reading()   # early data waits in the codec
            if self._deadline is not None:
                self._deadline.cancel()
            task = asyncio.ensure_future(self._open(request))
            task.add_done_callback(self._opened)

    def eof_received(self) -> bool:
        # TLS has no half-close (asyncio ends the connection after close_notify): the
        # relayed connection ends with it.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._relay is not None:
            self._relay.edge_lost()
            self._relay.stream.finished(self.bytes_to_edge, self.bytes_from_edge)
        if self._identity is not None:
            self.core.status.edge_disconnected(self._identity)
        self._server.connection_ended(self)
        self._lease.release()

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.pause_destination()

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.resume_destination()

    # -- to the edge ------------------------------------------------------------------
    def write_to_edge(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.bytes_to_edge += len(data)
            self._transport.write(data)

    def write_datagram_to_edge(self, payload: bytes) -> None:
        """One framed datagram (u16 length + bytes), in one write: a TLS transport makes
        a record of each piece it is given, and a record costs more than the copy."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self.bytes_to_edge += len(payload)
        transport.write(frame_datagram(payload))

    def edge_write_buffer_full(self) -> bool:
        """True while the edge is not keeping up: datagrams towards it are dropped."""
        transport = self._transport
        return transport is None or transport.get_write_buffer_size() > MAX_UNSENT_DATAGRAMS

    def pause_edge(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_edge(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        """Close after what is queued for the edge has been written."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- the request ------------------------------------------------------------------
    async def _open(self, request: Request) -> None:
        assert self._identity is not None
        if request.command not in _PROTOCOL_OF:
            self._reply(Reply.COMMAND_NOT_SUPPORTED)
            self.refuse("command", f"command {request.command.name} is not relayed (UDP "
                         "travels in the stream: 0x83)")
            return
        protocol = _PROTOCOL_OF[request.command]
        try:
            stream = await self.core.admit(self._identity, request.host, request.port,
                                           protocol)
            if request.command is Command.CONNECT:
                relay: _Relayed = await _TcpRelay.dial(self, stream)
            elif request.command is Command.UDP_IN_STREAM:
                relay = await _UdpRelay.dial(self, stream)
            else:
                relay = _EchoRelay(self, stream, await self.core.open_echo(stream))
        except DialError as exc:
            # Audited by the core; the edge reads the reason from the reply code.
            self._reply(reply_for(exc.reason.name.lower()))
            self.close()
            return
        if self._transport is None or self._transport.is_closing():
            relay.edge_lost()   # the edge left while we dialled
            stream.finished(0, 0)
            return
        self._relay = relay
        bound_host, bound_port = relay.bound
        self._reply(Reply.SUCCEEDED, bound_host, bound_port)
        early = self._socks.take_payload()
        if early:
            self.bytes_from_edge += len(early)
            relay.from_edge(early)
        self.resume_edge()

    def _opened(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("relay connection failed", edge=self._edge,
                      error=repr(task.exception()))
            self.abort()

    def _reply(self, code: Reply, host: str = "0.0.0.0", port: int = 0) -> None:
        self._socks.reply(code, host, port)
        self._write(self._socks.data_to_send())

    def _write(self, data: bytes) -> None:
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _socks_late(self) -> None:
        self.refuse("socks_timeout", f"no SOCKS5 request within "
                     f"{self._server.handshake_timeout:g} s of the TLS handshake")

    def refuse(self, reason: str, why: str) -> None:
        """Audit why this edge connection is refused, and close it."""
        if self._closing:
            return
        self._closing = True
        self.core.refuse_edge(self._identity or self._edge, reason, why)
        self.close()


class _Relayed:
    """What one edge connection carries once its request succeeded."""

    stream: RelayedStream

    @property
    def bound(self) -> tuple[str, int]:
        """BND.ADDR and BND.PORT: where the relay dialled from (none for an echo)."""
        return self.stream.source or ("0.0.0.0", 0)

    def from_edge(self, data: bytes) -> None:
        raise NotImplementedError

    def edge_lost(self) -> None:
        raise NotImplementedError

    def pause_destination(self) -> None:
        """The edge's TLS buffer is full: stop reading from the destination."""

    def resume_destination(self) -> None:
        """The edge's TLS buffer drained."""


class _TcpRelay(_Relayed, asyncio.Protocol):
    """CONNECT: bytes both ways, each side's back-pressure pausing the other side."""

    def __init__(self, edge: EdgeConnection, stream: RelayedStream) -> None:
        self._edge = edge
        self.stream = stream
        self._transport: asyncio.Transport | None = None

    @classmethod
    async def dial(cls, edge: EdgeConnection, stream: RelayedStream) -> _TcpRelay:
        _, relay = await edge.core.connect(stream, lambda: cls(edge, stream))
        return relay

    # destination side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._edge.write_to_edge(data)

    def eof_received(self) -> bool:
        # TLS cannot half-close: the edge connection ends once what is queued is written.
        self._edge.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._edge.close()

    def pause_writing(self) -> None:
        self._edge.pause_edge()

    def resume_writing(self) -> None:
        self._edge.resume_edge()

    # edge side
    def from_edge(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def edge_lost(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def pause_destination(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_destination(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()


class _UdpRelay(_Relayed, asyncio.DatagramProtocol):
    """0x83: framed datagrams from the edge go to the destination, its answers back framed.
    UDP has no back-pressure: datagrams meet a full edge buffer are dropped."""

    def __init__(self, edge: EdgeConnection, stream: RelayedStream) -> None:
        self._edge = edge
        self.stream = stream
        self._frames = StreamDatagrams()
        self._transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def dial(cls, edge: EdgeConnection, stream: RelayedStream) -> _UdpRelay:
        _, relay = await edge.core.connect_udp(stream, lambda: cls(edge, stream))
        return relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not self._edge.edge_write_buffer_full():
            self._edge.write_datagram_to_edge(data)

    def error_received(self, exc: Exception) -> None:
        pass   # an ICMP error for one datagram: UDP carries on

    def from_edge(self, data: bytes) -> None:
        datagrams = self._frames.receive_data(data)
        if self._transport is not None:
            for datagram in datagrams:
                self._transport.sendto(datagram)
        if self._frames.failure is not None:
            self._edge.refuse("framing", self._frames.failure)

    def edge_lost(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _EchoRelay(_Relayed):
    """0x81: each framed `u16 sequence + data` is one echo request; each reply goes back
    framed as `u16 sequence + u32 rtt_microseconds + data` (nothing when it times out),
    performed as for the tunnel's ICMP flows (`net/echoes.py`)."""

    def __init__(self, edge: EdgeConnection, stream: RelayedStream,
                 channel: EchoChannel) -> None:
        self._edge = edge
        self.stream = stream
        self._frames = StreamDatagrams(2 + MAX_ECHO_DATA)
        self._responder = EchoResponder(channel, edge.write_datagram_to_edge)

    def from_edge(self, data: bytes) -> None:
        requests = self._frames.receive_data(data)
        if self._frames.failure is not None:
            self._edge.refuse("framing", self._frames.failure)
            return
        for request in requests:
            self._responder.request(request)

    def edge_lost(self) -> None:
        self._responder.close()
