"""HTTP clients whose connections are made by a Dialer, so the STA client and the portal
proxy reach the inside the way every other inward connection does (directly, or through
a relay).

`DialerTransport` is httpx's own transport (request mapping, pooling, keep-alive,
exception mapping) with an httpcore network backend whose `connect_tcp` calls
`Dialer.connect`. TLS for https is done here, sans-I/O over `ssl.MemoryBIO`, not by the
event loop: a relay dialer hands back a transport of its own, and uvloop's `start_tls`
accepts only uvloop's transports. Failures leave as httpcore's exceptions (httpx turns
them into its own), a failed dial's with the Dialer's words. Never logs what it
carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, cast

import httpcore
import httpx

from portcullis.errors import DialError
from portcullis.net.dialer import P

T = TypeVar("T")
# Received bytes held unread before the transport is paused: httpcore reads as it parses.
READ_BUFFER = 256 * 1024
# What one read asks of the raw stream when TLS wants more.
TLS_READ_SIZE = 64 * 1024
# httpx's own defaults.
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)


class StreamDialer(Protocol):
    """What an HTTP client needs of a Dialer: TCP connections (every `Dialer` is one)."""

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]: ...


class DialerTransport(httpx.AsyncHTTPTransport):
    """An httpx transport whose connections `dialer` makes; `tls` verifies https peers
    (and carries the client certificate)."""

    def __init__(self, dialer: StreamDialer, tls: ssl.SSLContext,
                 limits: httpx.Limits = LIMITS) -> None:
        super().__init__(verify=tls, limits=limits)
        # httpx takes no network backend argument (encode/httpx#3749 is still open): its
        # pool is the seam, and everything else of its transport is kept as it is. An
        # httpx that keeps its pool elsewhere would dial around the Dialer: refuse it.
        if not isinstance(getattr(self, "_pool", None), httpcore.AsyncConnectionPool):
            raise TypeError("this httpx keeps its connection pool elsewhere: "
                            "DialerTransport must be brought up to date")
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls, network_backend=DialerBackend(dialer),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry)


class DialerBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, dialer: StreamDialer) -> None:
        self._dialer = dialer

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                          ) -> httpcore.AsyncNetworkStream:
        # socket_options are not applied: the connection may be a relay's stream.
        try:
            async with asyncio.timeout(timeout):
                transport, inbox = await self._dialer.connect(host, port, _Inbox,
                                                              source=local_address)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except DialError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        return DialedStream(transport, inbox)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _Inbox(asyncio.Protocol):
    """What the peer sent, held until httpcore reads it (the transport is paused beyond
    READ_BUFFER), and whether the transport takes more writes now."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._paused = False
        self.ended = False
        self.broken: Exception | None = None
        self._arrived: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received += data
        if len(self._received) >= READ_BUFFER and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()
        _wake(self._arrived)

    def eof_received(self) -> bool | None:
        self.ended = True
        _wake(self._arrived)
        return None   # close: an HTTP client has nothing to say after the server's end

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.broken = exc
        _wake(self._arrived)
        _wake(self._writable)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        _wake(self._writable)
        self._writable = None

    @property
    def readable(self) -> bool:
        """A read would return now (data, or the end): when idle, the peer has closed."""
        return bool(self._received) or self.ended

    async def read(self, max_bytes: int) -> bytes:
        while not self._received and not self.ended:
            self._arrived = asyncio.get_running_loop().create_future()
            try:
                await self._arrived
            finally:
                self._arrived = None
        if not self._received:
            if self.broken is not None:
                raise httpcore.ReadError(f"the connection broke: {self.broken}")
            return b""
        if len(self._received) <= max_bytes:
            chunk = bytes(self._received)
            self._received.clear()
        else:
            chunk = bytes(self._received[:max_bytes])
            del self._received[:max_bytes]
        if self._paused and len(self._received) < READ_BUFFER and not self.ended:
            self._paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        return chunk

    async def drained(self) -> None:
        """Return once the transport takes more writes."""
        if self._writable is not None:
            await self._writable


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class DialedStream(httpcore.AsyncNetworkStream):
    """A dialled connection as httpcore reads and writes it."""

    def __init__(self, transport: asyncio.Transport, inbox: _Inbox) -> None:
        self._transport = transport
        self._inbox = inbox

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._inbox.read(max_bytes)
        except TimeoutError:
            raise httpcore.ReadTimeout("no answer in time") from None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        if self._inbox.ended or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        try:
            async with asyncio.timeout(timeout):
                await self._inbox.drained()
        except TimeoutError:
            raise httpcore.WriteTimeout("the peer does not take what is sent") from None
        if self._inbox.broken is not None:
            raise httpcore.WriteError(f"the connection broke: {self._inbox.broken}")

    async def aclose(self, *, last: bytes = b"") -> None:
        """Close, after sending `last` (a transport sends what it was given first)."""
        if last and not self._transport.is_closing():
            self._transport.write(last)
        self._transport.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        tls = TlsStream(self, ssl_context, server_hostname)
        try:
            await tls.handshake(timeout)
        except BaseException:
            await self.aclose()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return self._inbox.readable
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        return None


class TlsStream(httpcore.AsyncNetworkStream):
    """TLS over a dialled stream, whatever transport carries it: records go through
    memory buffers, and the raw stream's read and write move them."""

    def __init__(self, raw: DialedStream, context: ssl.SSLContext,
                 server_hostname: str | None) -> None:
        self._raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=False,
                                     server_hostname=server_hostname)

    async def handshake(self, timeout: float | None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._complete(self._tls.do_handshake)
        except TimeoutError:
            raise httpcore.ConnectTimeout("the TLS handshake timed out") from None
        except ssl.SSLError as exc:
            raise httpcore.ConnectError(f"TLS handshake failed: {exc}") from exc
        except (httpcore.ReadError, httpcore.WriteError) as exc:
            raise httpcore.ConnectError(f"TLS handshake failed: {exc}") from exc

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._complete(lambda: self._tls.read(max_bytes))
        except TimeoutError:
            raise httpcore.ReadTimeout("no answer in time") from None
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # The end, with close_notify or without: h11 tells a cut message from a
            # complete one.
            return b""
        except ssl.SSLError as exc:
            raise httpcore.ReadError(f"TLS failed: {exc}") from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        try:
            async with asyncio.timeout(timeout):
                while view:
                    written = await self._complete(functools.partial(self._tls.write, view))
                    view = view[written:]
        except TimeoutError:
            raise httpcore.WriteTimeout("the peer does not take what is sent") from None
        except ssl.SSLError as exc:
            raise httpcore.WriteError(f"TLS failed: {exc}") from exc

    async def aclose(self) -> None:
        # close_notify, without waiting for the peer's: the connection ends either way.
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        await self._raw.aclose(last=self._outgoing.read())

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS inside TLS is not offered")   # no proxy tunnels here

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._tls
        if info == "is_readable":
            return (self._incoming.pending > 0 or self._tls.pending() > 0
                    or self._raw.get_extra_info("is_readable"))
        return self._raw.get_extra_info(info)

    async def _complete(self, operation: Callable[[], T]) -> T:
        """Run one TLS operation to its end: send what it produced, read what it lacks."""
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                await self._flush()
                received = await self._raw.read(TLS_READ_SIZE)
                if received:
                    self._incoming.write(received)
                else:
                    self._incoming.write_eof()
            else:
                await self._flush()
                return result

    async def _flush(self) -> None:
        if self._outgoing.pending:
            await self._raw.write(self._outgoing.read())
