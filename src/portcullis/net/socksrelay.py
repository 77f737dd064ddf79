"""The classic-mode relay Dialer: SOCKS5 inside mutual TLS (docs/protocol/relay.md).

Each inward connection is its own TCP connection to the relay, a TLS handshake in which
the edge presents its `gateway` certificate and checks the relay's against the
deployment CA, the relay's host name and the relay's role (every role's certificate may
carry the same host names: the portal's or the STA's must not stand in for the relay and
read the inward traffic), then one SOCKS5 command:

- CONNECT for TCP; once the relay says SUCCEEDED, the caller's protocol becomes the TLS
  transport's protocol: no extra hop and no copy per chunk after the handshake.
- 0x83 "UDP in stream" for UDP and 0x81 "ICMP echo in stream" for ping: datagrams framed
  by `proto/streamdatagrams.py` on the same TLS stream, so UDP never leaves mutual TLS.

The relay's last TLS session is offered in every new handshake (`ResumingClientContext`),
so a new connection costs an abbreviated handshake. Under TLS 1.3 the session ticket
comes after the handshake: it is taken once the SOCKS reply has been read.

Every failure is a DialError with a mux `Reason`: a SOCKS refusal maps through the one
table in `proto/socks5.py`; TLS and connection failures name the relay and say what an
administrator should check (the audit trail's words; the client of a refused stream is
told only its destination and the reason, `DialError.told`). The relay connects from
its own address: SOCKS5 has no field for a source, so `source` is not used (address
pools are the relay's business).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, TypeVar, cast

from portcullis.config.values import parse_host_port
from portcullis.errors import DialError, ProtocolError
from portcullis.net.dialer import EchoChannel, give_to_buffered
from portcullis.net.echoes import EchoRequests
from portcullis.net.icmp import TIMEOUT as ECHO_TIMEOUT
from portcullis.net.tls import ResumingClientContext, describe_tls_failure
from portcullis.pki import transport_common_name
from portcullis.pki.roles import ROLE_COMMON_NAMES
from portcullis.proto.mux import Reason
from portcullis.proto.socks5 import Command, Reply, reason_for
from portcullis.proto.socks5client import Socks5ClientHandshake
from portcullis.proto.streamdatagrams import StreamDatagrams, frame_datagram

__all__ = ["ClassicRelayDialer"]

P = TypeVar("P", bound=asyncio.BaseProtocol)
D = TypeVar("D", bound=asyncio.DatagramProtocol)
T = TypeVar("T", bound=asyncio.BaseProtocol)

#: Datagrams are dropped, as UDP would, while this much is unsent on the TLS stream.
MAX_UNSENT_DATAGRAMS = 256 * 1024

RELAY_COMMON_NAME = ROLE_COMMON_NAMES["relay"]
_UNTRUSTED_RELAY = ("issue the relay's certificate from this deployment's CA "
                    "(portcullis cert issue --role relay) and check [dialer] relay")
_WHAT_IS_CARRIED = {Command.UDP_IN_STREAM: "UDP",
                    Command.ICMP_ECHO_IN_STREAM: "ICMP echo"}


class ClassicRelayDialer:
    """Dials through a classic-mode relay at `relay` ("HOST:PORT"; its certificate must
    name HOST). `tls` is the edge's client context (gateway certificate, deployment CA):
    pass the node's tracked context so that a renewed certificate is used."""

    def __init__(self, relay: str, tls: ResumingClientContext, *,
                 timeout: float = 10.0) -> None:
        self._host, self._port = parse_host_port(relay, what="relay")
        self._relay = relay
        self._tls = tls
        self._timeout = timeout

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]:
        transport, handshake = await self._open(Command.CONNECT, host, port)
        protocol = _made_for(transport, protocol_factory)
        handshake.hand_over(protocol)
        return transport, protocol

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D], *,
                          source: str | None = None) -> tuple[asyncio.DatagramTransport, D]:
        transport, handshake = await self._open(Command.UDP_IN_STREAM, host, port)
        protocol = _made_for(transport, protocol_factory)
        datagrams = _DatagramsInStream(protocol, (host, port))
        handshake.hand_over(datagrams)
        return datagrams, protocol

    async def open_echo(self, address: str, *, source: str | None = None) -> EchoChannel:
        _, handshake = await self._open(Command.ICMP_ECHO_IN_STREAM, address, 0)
        channel = _EchoInStream(self._relay)
        handshake.hand_over(channel)
        return channel

    async def _open(self, command: Command, host: str,
                    port: int) -> tuple[asyncio.Transport, _SocksHandshake]:
        """TCP, TLS and the SOCKS handshake; the transport (reading paused) once the
        relay said SUCCEEDED. A DialError's message names the relay and what to check,
        for the audit trail; the client of a refused stream is told only why."""
        try:
            return await self._handshake(command, host, port)
        except DialError as exc:
            if exc.told == str(exc):
                exc.told = (f"{host}:{port} cannot be reached through the relay "
                            f"({exc.reason.name.lower().replace('_', ' ')})")
            raise

    async def _handshake(self, command: Command, host: str,
                         port: int) -> tuple[asyncio.Transport, _SocksHandshake]:
        loop = asyncio.get_running_loop()
        handshake = _SocksHandshake(Socks5ClientHandshake(command, host, port), self._relay)
        asked = f"{host}:{port}"
        try:
            async with asyncio.timeout(self._timeout):
                transport, _ = await loop.create_connection(
                    lambda: handshake, self._host, self._port, ssl=self._tls,
                    server_hostname=self._host)
                try:
                    reply = await handshake.replied
                except BaseException:
                    transport.abort()
                    raise
        except TimeoutError:
            raise DialError(f"the relay at {self._relay} did not answer within "
                            f"{self._timeout:g} s (asked for {asked})",
                            Reason.TIMED_OUT) from None
        except (OSError, ProtocolError) as exc:
            if handshake.secured and isinstance(exc, ConnectionResetError):
                raise self._unanswered(command, asked) from None
            raise self._failure(exc) from None
        # The session is complete only now: a TLS 1.3 ticket follows the handshake.
        sslobj = transport.get_extra_info("ssl_object")
        if isinstance(sslobj, ssl.SSLObject) and sslobj.session is not None:
            self._tls.session_to_offer = sslobj.session
        if reply is Reply.SUCCEEDED:
            return transport, handshake
        transport.close()
        if command in _WHAT_IS_CARRIED and reply is Reply.COMMAND_NOT_SUPPORTED:
            raise self._not_carried(command, "it answered: command not supported")
        raise DialError(f"the relay at {self._relay} refused {asked}: "
                        f"{reply.name.lower().replace('_', ' ')}", reason_for(reply))

    def _unanswered(self, command: Command, asked: str) -> DialError:
        """The relay closed the connection after TLS was up, without a SOCKS reply."""
        if command in _WHAT_IS_CARRIED:
            # dante, for one, closes without a reply to a command it does not know.
            return self._not_carried(command, "it closed the connection when asked for it")
        # dante resets the connection when its dial fails; stunnel in front of it then
        # loses the replies it had sent. The relay's own log has the reason.
        return DialError(f"the relay at {self._relay} closed the connection without "
                         f"answering the request for {asked} (see the relay's log)",
                         Reason.UNREACHABLE)

    def _not_carried(self, command: Command, answer: str) -> DialError:
        what = _WHAT_IS_CARRIED[command]
        return DialError(f"the relay at {self._relay} does not carry {what} ({answer}): a "
                         "stock SOCKS5 server carries TCP only; use a Portcullis relay",
                         reason_for(Reply.COMMAND_NOT_SUPPORTED),
                         told=f"the relay does not carry {what}")

    def _failure(self, exc: Exception) -> DialError:
        where = self._relay
        described = describe_tls_failure(exc, where, peer="relay",
                                         untrusted_remedy=_UNTRUSTED_RELAY)
        if described is not None:
            return DialError(described, Reason.UNREACHABLE)
        if isinstance(exc, ssl.SSLError):
            # The relay's alert after our certificate (TLS 1.3: after our handshake).
            return DialError(
                f"the relay at {where} refused this gateway's TLS connection "
                f"({exc.reason or exc}): the relay must trust the CA that issued "
                "pki/gateway.crt, and that certificate must be current", Reason.UNREACHABLE)
        if isinstance(exc, ProtocolError):
            return DialError(f"the relay at {where} is not a SOCKS5 server as expected: "
                             f"{exc}", Reason.PROTOCOL_ERROR)
        if isinstance(exc, ConnectionRefusedError):
            return DialError(f"the relay at {where} refused the connection: is it "
                             "running, and is [dialer] relay its address?", Reason.UNREACHABLE)
        detail = (exc.strerror if isinstance(exc, OSError) else None) or exc
        return DialError(f"cannot reach the relay at {where}: {detail}", Reason.UNREACHABLE)


class _SocksHandshake(asyncio.Protocol):
    """The TLS transport's protocol until the SOCKS reply; then `hand_over`."""

    def __init__(self, codec: Socks5ClientHandshake, relay: str) -> None:
        self._codec = codec
        self._relay = relay
        self.secured = False   # the TLS handshake is done: the SOCKS one has begun
        self.replied: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._eof = False
        self._lost: list[Exception | None] = []   # one item once the connection is lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = self._transport = cast(asyncio.Transport, transport)
        self.secured = True
        name = transport_common_name(tls)
        if name != RELAY_COMMON_NAME:   # not a word of the request to another role
            self._fail(DialError(
                f"the server at {self._relay} presented the certificate of {name!r}, not "
                f"the relay's ({RELAY_COMMON_NAME!r}): check [dialer] relay",
                Reason.UNREACHABLE))
            tls.abort()
            return
        tls.write(self._codec.data_to_send())

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        try:
            reply = self._codec.receive_data(data)
        except ProtocolError as exc:
            self._fail(exc)
            transport.abort()
            return
        if self.replied.done():
            return   # the stream's first bytes, kept by the codec for the caller
        if reply is not None:
            if reply is Reply.SUCCEEDED:
                transport.pause_reading()   # until the caller's protocol is in place
            self.replied.set_result(reply)

    def eof_received(self) -> bool | None:
        self._eof = True
        self._fail(ConnectionResetError("the relay closed the connection during the "
                                        "SOCKS5 handshake"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.append(exc)
        self._fail(exc or ConnectionResetError("the relay closed the connection during "
                                               "the SOCKS5 handshake"))

    def _fail(self, exc: Exception) -> None:
        if not self.replied.done():
            self.replied.set_exception(exc)

    def hand_over(self, protocol: asyncio.BaseProtocol) -> None:
        """Make `protocol` the transport's protocol and give it what came meanwhile."""
        transport = self._transport
        assert transport is not None
        # Reading resumes on the next loop iteration: after connection_made, which may
        # pause it again.
        if not self._lost:
            transport.resume_reading()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        early = self._codec.take_payload()
        if early:
            _deliver(protocol, early)
        if self._eof and isinstance(protocol, asyncio.Protocol):
            protocol.eof_received()
        if self._lost:
            protocol.connection_lost(self._lost[0])


def _made_for(transport: asyncio.Transport, protocol_factory: Callable[[], T]) -> T:
    """The caller's protocol; the relayed connection is dropped if it cannot be made."""
    try:
        return protocol_factory()
    except BaseException:
        transport.abort()
        raise


def _deliver(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    if isinstance(protocol, asyncio.BufferedProtocol):
        give_to_buffered(protocol, data)
    elif isinstance(protocol, asyncio.Protocol):
        protocol.data_received(data)


class _DatagramsInStream(asyncio.DatagramTransport, asyncio.Protocol):
    """A connected UDP "socket" whose datagrams travel framed on the TLS stream: a
    datagram transport to the caller, the TLS transport's protocol underneath."""

    def __init__(self, protocol: asyncio.DatagramProtocol, peer: tuple[str, int]) -> None:
        super().__init__()
        self._protocol = protocol
        self._peer = peer
        self._stream: asyncio.Transport | None = None
        self._decoder = StreamDatagrams()

    # -- the caller's side: asyncio.DatagramTransport -----------------------------------
    def sendto(self, data: bytes | bytearray | memoryview,
               addr: Any = None) -> None:
        if addr is not None and tuple(addr) != self._peer:
            raise ValueError(f"this UDP flow is connected to {self._peer}, not {addr}")
        stream = self._stream
        if stream is None or stream.is_closing():
            return
        if stream.get_write_buffer_size() > MAX_UNSENT_DATAGRAMS:
            return   # dropped, as a full socket buffer would
        stream.write(frame_datagram(data))

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.abort()

    def is_closing(self) -> bool:
        return self._stream is None or self._stream.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        return default if self._stream is None else self._stream.get_extra_info(name,
                                                                                 default)

    # -- the TLS transport's side: asyncio.Protocol -------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._stream = transport   # type: ignore[assignment]   # a TLS transport
        self._protocol.connection_made(self)

    def data_received(self, data: bytes) -> None:
        for datagram in self._decoder.receive_data(data):
            self._protocol.datagram_received(datagram, self._peer)
        if self._decoder.failure is not None:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)


class _EchoInStream(asyncio.Protocol):
    """ICMP echo to one address, performed by the relay: each request a framed
    `u16 sequence + data`, each reply a framed `u16 sequence + u32 rtt_us + data`."""

    def __init__(self, relay: str) -> None:
        self._relay = relay
        self._stream: asyncio.Transport | None = None
        self._decoder = StreamDatagrams()
        self._requests = EchoRequests(self._send, timeout=ECHO_TIMEOUT)

    async def echo(self, sequence: int, data: bytes) -> tuple[bytes, float] | None:
        stream = self._stream
        if stream is None or stream.is_closing():
            raise DialError(f"the relay at {self._relay} closed the ICMP echo channel",
                            Reason.UNREACHABLE)
        return await self._requests.echo(sequence, data)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def _send(self, request: bytes) -> None:
        assert self._stream is not None
        self._stream.write(frame_datagram(request))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._stream = transport   # type: ignore[assignment]   # a TLS transport

    def data_received(self, data: bytes) -> None:
        replies = self._decoder.receive_data(data)
        if self._decoder.failure is not None:
            assert self._stream is not None
            self._stream.abort()
            return
        for reply in replies:
            self._requests.replied(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._requests.end()
