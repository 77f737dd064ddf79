"""The edge of every listener: which connections are let in, and how long each may take.

Each listener accepts TCP itself and starts TLS from `EdgeConnection` with
`loop.start_tls`, rather than letting `create_server(ssl=…)` do it (uvicorn passes no
`ssl_handshake_timeout` there, so asyncio's 60 s would apply). Seeing the connection before
its handshake lets the edge
- refuse it over the global or the per-address limit, before any TLS work (`Admissions`);
- bound the handshake (`limits.tls_handshake_timeout`): a silent or stalling client is
  aborted when it runs out.
After the handshake the connection goes to uvicorn's HTTP protocol, as a `HeadTimedHttp`:
the whole request head must arrive within `limits.header_timeout` (a fixed deadline, as
Apache's mod_reqtimeout `header=` without MinRate), counted from the end of the handshake
for the first request and from the first byte of each following one; the idle time between
keep-alive requests is uvicorn's `timeout_keep_alive` (`limits.keepalive_timeout`). A head
that is late is answered 408 and the connection aborted at once.

A connection counts against the limits from its accept until it closes, WebSocket tunnels
and launches included (the gateway's WebSocket protocol reports its end with `closed`).

Never logs per connection: refusals are logged at most once per `LOG_INTERVAL`, counted.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, cast

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from portcullis.config.model import LimitSettings

log = structlog.get_logger("portcullis.edge")

LOG_INTERVAL = 10.0
# How long a closing TLS connection waits for the client's close_notify (asyncio: 30 s).
TLS_SHUTDOWN_TIMEOUT = 5.0
# File descriptors kept beyond the connection limit: listeners, stores, logs, dialled peers.
SPARE_FILES = 256
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                   b"content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n")


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str


class Admissions:
    """Connections open, in all and per client address, against their limits.
    Counting only: no I/O, no clock."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.total = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> Admission:
        """Count one more connection from `address`, or say why not."""
        if self.total >= self.max_total:
            return Admission(False, f"{self.total} connections are open, the limit "
                                    f"(limits.max_connections)")
        held = self._by_address.get(address, 0)
        if held >= self.max_per_address:
            return Admission(False, f"{held} connections are open from {address}, the limit "
                                    f"(limits.max_connections_per_address)")
        self.total += 1
        self._by_address[address] = held + 1
        return Admission(True, "within the limits")

    def release(self, address: str) -> None:
        held = self._by_address.get(address, 0)
        if held <= 0:
            return
        self.total -= 1
        if held == 1:
            del self._by_address[address]
        else:
            self._by_address[address] = held - 1

    def held(self, address: str) -> int:
        return self._by_address.get(address, 0)


class RefusalLog:
    """At most one warning per `interval` however many connections are refused."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: float | None = None
        self._count = 0

    def refused(self, reason: str, now: float) -> None:
        self._count += 1
        if self._last is None or now - self._last >= self._interval:
            log.warning("connections refused", count=self._count, reason=reason,
                        since_seconds=None if self._last is None else round(now - self._last))
            self._last = now
            self._count = 0


class Edge:
    """The admissions and timeouts of one node's listeners (one set of limits for all)."""

    def __init__(self, limits: LimitSettings) -> None:
        self.limits = limits
        self.admissions = Admissions(limits.max_connections,
                                     limits.max_connections_per_address)
        self._refusals = RefusalLog(LOG_INTERVAL)
        self._open: dict[asyncio.BaseTransport, str] = {}   # TLS transport -> client address
        self._handshakes: set[asyncio.Task[None]] = set()

    def protocol(self, http: type[HeadTimedHttp],
                 tls: ssl.SSLContext) -> type[asyncio.Protocol]:
        """The protocol class uvicorn runs a listener with (its `http` setting)."""
        edge = self

        class EdgeConnection(asyncio.Protocol):
            def __init__(self, config: Any, server_state: Any, app_state: Any,
                         _loop: Any = None) -> None:
                self._http = http(config=config, server_state=server_state,
                                  app_state=app_state, _loop=_loop, edge=edge)

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                edge.accepted(transport, self._http, tls)

        return EdgeConnection

    def accepted(self, accepted: asyncio.BaseTransport, http: HeadTimedHttp,
                 tls: ssl.SSLContext) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, accepted)
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "unknown"
        admission = self.admissions.admit(address)
        if not admission.admitted:
            self._refusals.refused(admission.reason, asyncio.get_running_loop().time())
            transport.abort()
            return
        transport.pause_reading()   # TLS reads it, not us
        task = asyncio.ensure_future(self._secure(transport, http, tls, address))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _secure(self, transport: asyncio.Transport, http: HeadTimedHttp,
                      tls: ssl.SSLContext, address: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            secured = await loop.start_tls(
                transport, http, tls, server_side=True,
                ssl_handshake_timeout=self.limits.tls_handshake_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except asyncio.CancelledError:   # the listener is shutting down
            self.admissions.release(address)
            transport.abort()
            raise
        except Exception:
            # Timed out, failed or cut off during the handshake; start_tls has closed it.
            self.admissions.release(address)
            transport.abort()
            return
        if secured is None:   # the connection ended as the handshake completed
            self.admissions.release(address)
            return
        self._open[secured] = address
        http.connection_made(secured)

    def closed(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection carried by `transport` has ended (said once or more)."""
        address = self._open.pop(transport, None) if transport is not None else None
        if address is not None:
            self.admissions.release(address)


class HeadTimedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for every request head."""

    def __init__(self, *args: Any, edge: Edge, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._edge = edge
        self._head_timer: TimerHandle | None = None
        self._awaiting_head = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Also a client that completed TLS and sends nothing is closed by this deadline.
        self._start_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and self._head_timer is None:
            self._start_head_deadline()   # the first byte of a keep-alive request
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._cancel_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._awaiting_head = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        self._edge.closed(self.transport)
        super().connection_lost(exc)

    def _start_head_deadline(self) -> None:
        self._head_timer = self.loop.call_later(self._edge.limits.header_timeout,
                                                self._head_late)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind an answer still being written: close after it.
            self.cycle.keep_alive = False
            return
        self.transport.write(REQUEST_TIMEOUT)
        self.transport.abort()


def raise_open_files_limit(connections: int) -> None:
    """Let the process hold `connections` sockets plus its own files, as far as the hard
    limit allows; say so when it does not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FILES
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    if soft < connections + SPARE_FILES:
        log.warning("the open files limit is below limits.max_connections",
                    open_files=soft, max_connections=connections)
