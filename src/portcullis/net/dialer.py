"""Every inward connection goes through one Dialer.

`DirectDialer` connects from this host; the relay dialers (the double hop: SOCKS5 inside
mutual TLS, or mux streams over connections the relay dialled out) are other
implementations of the same interface, so features never care which one is configured.
A Dialer makes TCP connections, connected UDP sockets and ICMP echo channels. Failures
are DialError with a mux `Reason`, so a refused stream tells the client why in terms it
can print.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Protocol, TypeVar

from portcullis.errors import DialError
from portcullis.net.icmp import Pinger
from portcullis.proto.mux import Reason

P = TypeVar("P", bound=asyncio.BaseProtocol)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)   # Linux


D = TypeVar("D", bound=asyncio.DatagramProtocol)


class Dialer(Protocol):
    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]: ...

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D], *,
                          source: str | None = None) -> tuple[asyncio.DatagramTransport, D]: ...

    async def open_echo(self, address: str, *, source: str | None = None) -> EchoChannel:
        """An echo channel to `address` (an IP literal), or DialError now if echoes
        cannot be sent there at all."""
        ...


class EchoChannel(Protocol):
    """ICMP echo towards one address: each call is one echo request."""

    async def echo(self, sequence: int, data: bytes) -> tuple[bytes, float] | None:
        """(the reply's data, round trip in seconds), or None when no reply came in time."""
        ...

    def close(self) -> None: ...


class DirectDialer:
    def __init__(self, *, timeout: float = 10.0, pinger: Pinger | None = None) -> None:
        self._timeout = timeout
        self._pinger = pinger or Pinger()

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]:
        """`source`: the local address to connect from (a tunnel's pool address)."""
        loop = asyncio.get_running_loop()
        where = f"{host}:{port}"
        try:
            async with asyncio.timeout(self._timeout):
                if source is None:
                    transport, protocol = await loop.create_connection(
                        protocol_factory, host, port)
                else:
                    sock = await _connected_from(source, host, port)
                    transport, protocol = await loop.create_connection(protocol_factory,
                                                                       sock=sock)
        except TimeoutError:
            raise DialError(f"connecting to {where} timed out", Reason.TIMED_OUT) from None
        except socket.gaierror as exc:
            raise DialError(f"cannot resolve {host}: {exc.strerror}",
                            Reason.NAME_NOT_FOUND) from None
        except ConnectionRefusedError:
            raise DialError(f"{where} refused the connection", Reason.REFUSED) from None
        except OSError as exc:
            raise _dial_error(exc, where) from None
        return transport, protocol

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D], *,
                          source: str | None = None) -> tuple[asyncio.DatagramTransport, D]:
        """A UDP socket connected to host:port (replies from elsewhere are dropped)."""
        loop = asyncio.get_running_loop()
        try:
            if source is None:
                return await loop.create_datagram_endpoint(protocol_factory,
                                                           remote_addr=(host, port))
            sock = _bound_to(source, socket.SOCK_DGRAM)
            try:
                sock.connect((host, port))   # UDP: no packet sent, just the peer fixed
            except BaseException:
                sock.close()
                raise
            return await loop.create_datagram_endpoint(protocol_factory, sock=sock)
        except OSError as exc:
            raise _dial_error(exc, f"{host}:{port}/udp") from None


    async def open_echo(self, address: str, *, source: str | None = None) -> EchoChannel:
        """`source` is not used: ping sockets send from the host's own address."""
        self._pinger.check(address)
        return _DirectEcho(self._pinger, address, self._pinger.new_identifier())


class _DirectEcho:
    def __init__(self, pinger: Pinger, address: str, identifier: int) -> None:
        self._pinger = pinger
        self._address = address
        self._identifier = identifier

    async def echo(self, sequence: int, data: bytes) -> tuple[bytes, float] | None:
        return await self._pinger.echo(self._address, self._identifier, sequence, data)

    def close(self) -> None:
        pass   # the pinger's sockets serve every channel


def give_to_buffered(protocol: asyncio.BufferedProtocol, data: bytes | memoryview) -> None:
    """Copy `data` into a BufferedProtocol's buffers, as the event loop's transports do:
    for a relay dialer's transport, which hands over bytes it already holds."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def _bound_to(source: str, kind: socket.SocketKind) -> socket.socket:
    """A non-blocking socket bound to `source`, which need not be configured on an
    interface (IP_FREEBIND): a pool address routed to this host."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connected_from(source: str, host: str, port: int) -> socket.socket:
    """A TCP socket bound to `source` and connected to host:port."""
    sock = _bound_to(source, socket.SOCK_STREAM)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _dial_error(exc: OSError, where: str) -> DialError:
    if isinstance(exc, socket.gaierror):
        return DialError(f"cannot resolve {where}: {exc.strerror}", Reason.NAME_NOT_FOUND)
    reason = (Reason.UNREACHABLE if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
              else Reason.REFUSED)
    return DialError(f"cannot connect to {where}: {exc.strerror}", reason)
