"""The edge of every listener: which connections are let in, and how long each may take.

Each listener accepts its connections itself (`Acceptor`, in place of the server uvicorn
would create) and hands each admitted one to the loop with `connect_accepted_socket`,
which does the TLS handshake (uvicorn's own `create_server(ssl=…)` passes no
`ssl_handshake_timeout`, so asyncio's 60 s would apply). Accepting ourselves lets the edge
- refuse a connection over the global or the per-address limit before any TLS work
  (`Admissions`): it is closed at once;
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
import errno
import resource
import socket
import ssl
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from portcullis.config.model import LimitSettings

log = structlog.get_logger("portcullis.edge")

LOG_INTERVAL = 10.0
# How long a closing TLS connection waits for the client's close_notify (asyncio: 30 s).
TLS_SHUTDOWN_TIMEOUT = 5.0
# File descriptors kept beyond the connection limit: listeners, stores, logs, dialled peers.
SPARE_FILES = 256
# Connections taken per readiness of a listening socket, and the pause when the process is
# out of file descriptors (as asyncio's own accept loop does).
ACCEPT_BATCH = 64
ACCEPT_RETRY_DELAY = 1.0
# Set in a request's ASGI extensions when its target is in absolute form
# (`GET http://host/ HTTP/1.1`), which uvicorn hides: the path alone goes to the app.
ABSOLUTE_FORM = "portcullis.absolute_form"
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


class Lease:
    """One admitted connection's place in the counts, given back once."""

    def __init__(self, admissions: Admissions, address: str) -> None:
        self._admissions = admissions
        self._address: str | None = address

    def release(self) -> None:
        if self._address is not None:
            self._admissions.release(self._address)
            self._address = None


class Edge:
    """The admissions and timeouts of one node's listeners (one set of limits for all)."""

    def __init__(self, limits: LimitSettings) -> None:
        self.limits = limits
        self.admissions = Admissions(limits.max_connections,
                                     limits.max_connections_per_address)
        self.refusals = RefusalLog(LOG_INTERVAL)
        self._open: dict[asyncio.BaseTransport, Lease] = {}

    def opened(self, transport: asyncio.BaseTransport, lease: Lease) -> None:
        self._open[transport] = lease

    def closed(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection carried by `transport` has ended (said once or more)."""
        lease = self._open.pop(transport, None) if transport is not None else None
        if lease is not None:
            lease.release()


class Acceptor:
    """Accepts one listening socket's connections, admits them and starts their TLS.
    Stands in for the asyncio server uvicorn keeps (`close`, `wait_closed`)."""

    def __init__(self, edge: Edge, sock: socket.socket, tls: ssl.SSLContext,
                 make_protocol: Callable[[Lease], asyncio.Protocol], *,
                 handshake_failed: Callable[[str, BaseException], None] | None = None
                 ) -> None:
        """`handshake_failed(peer, exc)` hears of each handshake that failed or timed out
        (the relay audits them)."""
        self._edge = edge
        self._handshake_failed = handshake_failed
        self._sock = sock
        self._tls = tls
        self._make_protocol = make_protocol
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[Any]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                self._edge.refusals.refused(f"cannot accept: {exc.strerror}", self._loop.time())
                self._loop.remove_reader(self._sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                return
            self._admit(conn, str(peer[0]))

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _admit(self, conn: socket.socket, address: str) -> None:
        admission = self._edge.admissions.admit(address)
        if not admission.admitted:
            self._edge.refusals.refused(admission.reason, self._loop.time())
            conn.close()
            return
        lease = Lease(self._edge.admissions, address)
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:   # already reset by the client
            lease.release()
            conn.close()
            return
        # From here the loop owns the socket, and closes it if the handshake fails.
        task = asyncio.ensure_future(self._loop.connect_accepted_socket(
            lambda: self._make_protocol(lease), conn, ssl=self._tls,
            ssl_handshake_timeout=self._edge.limits.tls_handshake_timeout,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT))
        self._handshakes.add(task)
        task.add_done_callback(lambda done: self._handshake_done(done, lease, address))

    def _handshake_done(self, task: asyncio.Task[Any], lease: Lease, address: str) -> None:
        self._handshakes.discard(task)
        if task.cancelled() or task.exception() is not None:
            # Timed out, failed or cut off during the handshake (or shutting down).
            lease.release()
            exc = None if task.cancelled() else task.exception()
            if exc is not None and self._handshake_failed is not None:
                self._handshake_failed(address, exc)

    def close(self) -> None:
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        for task in list(self._handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        return None


class EdgeServer(uvicorn.Server):
    """A uvicorn server whose listening sockets are `Acceptor`s of this edge."""

    def __init__(self, config: uvicorn.Config, edge: Edge, tls: ssl.SSLContext) -> None:
        super().__init__(config)
        self._edge = edge
        self._tls = tls

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # What uvicorn's startup does for sockets given to it, with our accept loop.
        await self.lifespan.startup()
        config = self.config

        def make_protocol(lease: Lease) -> asyncio.Protocol:
            protocol: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state,
                app_state=self.lifespan.state, edge=self._edge, lease=lease)
            return protocol

        self.servers = [Acceptor(self._edge, sock, self._tls, make_protocol)  # type: ignore[misc]
                        for sock in sockets or []]
        self.started = True


class HeadTimedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for every request head."""

    def __init__(self, *args: Any, edge: Edge, lease: Lease, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._edge = edge
        self._lease = lease
        self._head_timer: TimerHandle | None = None
        self._awaiting_head = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._edge.opened(transport, self._lease)
        # Also a client that completed TLS and sends nothing is closed by this deadline.
        self._start_head_deadline()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and self._head_timer is None:
            self._start_head_deadline()   # the first byte of a keep-alive request
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._cancel_head_deadline()
        if not self.url.startswith(b"/"):
            # An ASGI extension is a dict: this one holds the target as sent.
            self.scope.setdefault("extensions", {})[ABSOLUTE_FORM] = {"target": bytes(self.url)}
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
