"""Every outbound connection goes through one Dialer.

`DirectDialer` connects from this host. The double-hop relay (SOCKS5 inside mutual TLS)
will be a second implementation of the same interface, so features never care which
one is configured. Failures are DialError with a mux reason name, so a refused stream
tells the client why in terms it can print.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Protocol, TypeVar

from portcullis.errors import DialError

P = TypeVar("P", bound=asyncio.BaseProtocol)


D = TypeVar("D", bound=asyncio.DatagramProtocol)


class Dialer(Protocol):
    async def connect(self, host: str, port: int,
                      protocol_factory: Callable[[], P]) -> tuple[asyncio.Transport, P]: ...

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D]
                          ) -> tuple[asyncio.DatagramTransport, D]: ...


class DirectDialer:
    def __init__(self, *, timeout: float = 10.0) -> None:
        self._timeout = timeout

    async def connect(self, host: str, port: int,
                      protocol_factory: Callable[[], P]) -> tuple[asyncio.Transport, P]:
        loop = asyncio.get_running_loop()
        where = f"{host}:{port}"
        try:
            async with asyncio.timeout(self._timeout):
                transport, protocol = await loop.create_connection(protocol_factory, host, port)
        except TimeoutError:
            raise DialError(f"connecting to {where} timed out", "timed_out") from None
        except socket.gaierror as exc:
            raise DialError(f"cannot resolve {host}: {exc.strerror}", "name_not_found") from None
        except ConnectionRefusedError:
            raise DialError(f"{where} refused the connection", "refused") from None
        except OSError as exc:
            raise _dial_error(exc, where) from None
        return transport, protocol

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D]
                          ) -> tuple[asyncio.DatagramTransport, D]:
        """A UDP socket connected to host:port (replies from elsewhere are dropped)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_datagram_endpoint(protocol_factory,
                                                       remote_addr=(host, port))
        except OSError as exc:
            raise _dial_error(exc, f"{host}:{port}/udp") from None


def _dial_error(exc: OSError, where: str) -> DialError:
    if isinstance(exc, socket.gaierror):
        return DialError(f"cannot resolve {where}: {exc.strerror}", "name_not_found")
    reason = ("unreachable" if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
              else "refused")
    return DialError(f"cannot connect to {where}: {exc.strerror}", reason)
