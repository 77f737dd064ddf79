"""A Dialer whose transports are not the event loop's, as a relay dialer's are (a mux
stream, a SOCKS connection inside TLS): what proves that a feature works over any
Dialer, not only over sockets. It carries the bytes over a real TCP connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from portcullis.errors import DialError
from portcullis.reasons import Reason


class _Forwarder(asyncio.Protocol):
    """The inner connection's side: everything goes on to the caller's protocol."""

    def __init__(self, outer: asyncio.Protocol) -> None:
        self.outer = outer

    def data_received(self, data: bytes) -> None:
        self.outer.data_received(data)

    def eof_received(self) -> bool | None:
        return self.outer.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.outer.connection_lost(exc)

    def pause_writing(self) -> None:
        self.outer.pause_writing()

    def resume_writing(self) -> None:
        self.outer.resume_writing()


class CarriedTransport(asyncio.Transport):
    """A transport that is not the event loop's, as a relay dialer returns (a mux stream,
    a SOCKS connection inside TLS): here it carries bytes over a TCP connection of its
    own."""

    def __init__(self, inner: asyncio.Transport, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._inner = inner
        self._protocol = protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


class CarryingDialer:
    """Dials like a relay dialer does: its own transport object around the connection."""

    def __init__(self) -> None:
        self.dials = 0

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], Any], *,
                      source: str | None = None) -> tuple[asyncio.Transport, Any]:
        self.dials += 1
        protocol = protocol_factory()
        try:
            inner, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Forwarder(protocol), host, port)
        except ConnectionRefusedError:
            raise DialError(f"{host}:{port} refused the connection", Reason.REFUSED) from None
        carried = CarriedTransport(inner, protocol)
        protocol.connection_made(carried)
        return carried, protocol

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], Any], *,
                          source: str | None = None) -> Any:
        raise DialError("no UDP here", Reason.REFUSED)

    async def open_echo(self, address: str, *, source: str | None = None) -> Any:
        raise DialError("no ICMP here", Reason.REFUSED)
