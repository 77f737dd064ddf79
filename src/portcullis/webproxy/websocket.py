"""WebSocket upgrades on an application's host, relayed to the application.

The upgrade is checked like any request (`WebProxy.admit`), then sent to the upstream
through the same keep-alive pool and Dialer (httpx hands back the connection after the
upstream's 101), and from then on bytes are relayed both ways as they are, without
parsing frames: whatever the application and the browser agreed (subprotocol,
extensions) goes through. Each relay is registered with the gateway's connections
under its gateway session, so that the session's ending (sign-out, kill, expiry: see
`gateway.revocation`) closes it at once, with a close frame when the bytes relayed to
the browser end at a frame's end (`proto.wsframes`); an administrator sees and ends it
like a launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import cast

import httpcore
import httpx
import structlog
from websockets.http11 import Request

from portcullis.errors import StoreError
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.net.tls import server_name_of
from portcullis.net.websocket import WebSocketMux, reject
from portcullis.proto.mux import Reason
from portcullis.proto.wsframes import FrameBoundaries, close_frame
from portcullis.webproxy.proxy import WebProxy
from portcullis.webproxy.rewrite import (
    Forwarding,
    browser_response_headers,
    upstream_request_headers,
)
from portcullis.webproxy.sites import Destination, Site

log = structlog.get_logger("portcullis.webproxy")

READ_SIZE = 64 * 1024
# Bytes from the browser held for the upstream before the browser is paused.
HIGH_WATER = 256 * 1024
HANDSHAKE_TIMEOUT = 15.0
# RFC 6455 §7.4.1: the endpoint ends the connection because of its policy.
POLICY_VIOLATION = 1008
# How long a browser has to take the close frame before its connection is cut.
CLOSE_GRACE = 1.0


class WebSocketRelays:
    """Takes the WebSocket upgrades that are for web resources' hosts (`take`)."""

    def __init__(self, proxy: WebProxy, registry: ConnectionRegistry,
                 closed: Callable[[asyncio.BaseTransport | None], None]) -> None:
        self._proxy = proxy
        self._registry = registry
        self._closed = closed
        self._tasks: set[asyncio.Task[None]] = set()

    def take(self, carrier: WebSocketMux, request: Request) -> bool:
        transport = carrier.transport
        if transport is None:
            return True
        sites = self._proxy.sites
        hosts = request.headers.get_all("Host")
        if len(hosts) > 1:
            reject(carrier, 400, "bad request\n")
            return True
        destination, site = sites.destination(hosts[0] if hosts else None)
        opened_for = sites.by_host(server_name_of(transport.get_extra_info("ssl_object")))
        if destination is not Destination.WEB and opened_for is None:
            # The gateway's own endpoints, as before web resources, whatever the Host: a
            # relay dialling out may name the edge by an inside name, and each endpoint
            # authenticates its peer itself (certificate, ticket, session).
            return False
        if destination is not Destination.WEB or site is not opened_for or site is None:
            reject(carrier, 421, "misdirected request\n")
            return True
        if site.upstream_target(request.path.encode("latin-1"), b"") is None:
            reject(carrier, 400, "bad request path\n")   # as the edge answers over HTTP
            return True
        relay = WebSocketRelay(self._proxy, self._registry, site, transport, self._closed)
        transport.set_protocol(relay)
        task = asyncio.ensure_future(relay.run(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True


class WebSocketRelay(asyncio.Protocol):
    """One browser's WebSocket to an application: the browser's side is this protocol
    on the gateway's connection, the application's an httpx upgrade stream."""

    def __init__(self, proxy: WebProxy, registry: ConnectionRegistry, site: Site,
                 transport: asyncio.Transport,
                 closed: Callable[[asyncio.BaseTransport | None], None]) -> None:
        self._proxy = proxy
        self._registry = registry
        self._site = site
        self._transport = transport
        self._closed_callback = closed
        self._to_upstream: deque[bytes] = deque()
        self._queued = 0
        self._data = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._gone = False
        self._frames = FrameBoundaries()   # of what went to the browser
        self._sent = 0
        self._received = 0
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if peer else "unknown"
        transport.pause_reading()   # until the application has answered

    # -- asyncio.Protocol (the browser's side) -----------------------------------------
    def data_received(self, data: bytes) -> None:
        self._to_upstream.append(data)
        self._queued += len(data)
        self._received += len(data)
        self._data.set()
        if self._queued >= HIGH_WATER:
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_callback(self._transport)
        self._end()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- Carrier (the gateway's connection registry) -----------------------------------
    def close(self, reason: Reason, message: str) -> None:
        """The gateway session ended (or an administrator, or shutdown): close now. When
        what went to the browser ends at a frame's end, with a close frame (1008 and
        why) it has CLOSE_GRACE to take; in the middle of a frame, at once (the browser
        sees 1006)."""
        if not self._gone and self._frames.at_boundary and not self._transport.is_closing():
            self._transport.write(close_frame(POLICY_VIOLATION, message or "session ended"))
            self._transport.close()
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self._transport.abort)
        else:
            self._transport.abort()
        self._end()

    def byte_counts(self) -> tuple[int, int]:
        return self._sent, self._received

    @property
    def open_streams(self) -> int:
        return 0 if self._gone else 1

    # -- the relay -------------------------------------------------------------------
    async def run(self, request: Request) -> None:
        try:
            await self._serve(request)
        except StoreError as exc:   # sessions or keys cannot be read: nothing is let through
            log.error("store unavailable", resource=self._site.name, error=str(exc))
            self._answer(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")

    async def _serve(self, request: Request) -> None:
        site = self._site
        headers = [(name.lower().encode("latin-1"), value.encode("latin-1"))
                   for name, value in request.headers.raw_items()]
        if self._proxy.refuse_cross_site(site, headers, "GET", self._client, websocket=True):
            self._answer(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
            return
        decision = await self._proxy.admit(site, headers, "GET", self._client)
        if not decision.allowed or decision.session is None:
            self._answer(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
            return
        session = decision.session
        target = site.upstream_target(request.path.encode("latin-1"), b"")
        if target is None:   # refused in `take` already
            self._answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
            return
        identity = await self._proxy.asserter.headers(session.claims, site)
        upstream_headers = upstream_request_headers(headers, site,
                                                    Forwarding(self._client, identity),
                                                    websocket=True)
        client = self._proxy.websocket_client_for(site)
        url = httpx.URL(scheme=site.scheme, host=site.host, port=site.port).copy_with(
            raw_path=target)
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                response = await client.send(client.build_request("GET", url,
                                                                  headers=upstream_headers),
                                             stream=True)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning("web upstream WebSocket failed", resource=site.name, error=str(exc))
            self._answer(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n")
            return
        stream = cast(httpcore.AsyncNetworkStream | None,
                      response.extensions.get("network_stream"))
        if response.status_code != 101 or stream is None:
            await response.aclose()
            self._answer(f"HTTP/1.1 {response.status_code} Refused\r\ncontent-length: 0\r\n"
                         "connection: close\r\n\r\n".encode())
            return
        answer = browser_response_headers(response.headers.raw, site, self._proxy.sites.all,
                                          self._proxy.sites.gateway_host)
        head = [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                b"connection: Upgrade\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in answer.headers]
        self._transport.write(b"".join(head) + b"\r\n")
        connection = Connection("web", session.username, self._client, self,
                                detail=site.name, session_handle=session.handle)
        self._registry.add(connection)
        self._proxy.audit.record("web.websocket_opened", resource=site.name,
                                 user=session.username, client=self._client,
                                 connection=connection.id)
        self._transport.resume_reading()
        started = time.monotonic()
        try:
            await self._relay(stream)
        finally:
            self._registry.remove(connection)
            with contextlib.suppress(Exception):
                await stream.aclose()
            # Its connection leaves the pool only with the response (httpcore counts an
            # upgraded connection as taken until then).
            with contextlib.suppress(Exception):
                await response.aclose()
            self._transport.close()
            self._proxy.audit.record("web.websocket_ended", resource=site.name,
                                     user=session.username, connection=connection.id,
                                     bytes_to_client=self._sent,
                                     bytes_from_client=self._received,
                                     duration=round(time.monotonic() - started, 3))

    async def _relay(self, stream: httpcore.AsyncNetworkStream) -> None:
        downstream = asyncio.ensure_future(self._from_upstream(stream))
        upstream = asyncio.ensure_future(self._to_upstream_loop(stream))
        try:
            await asyncio.wait([downstream, upstream], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (downstream, upstream):
                task.cancel()
            for task in (downstream, upstream):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _from_upstream(self, stream: httpcore.AsyncNetworkStream) -> None:
        while not self._gone:
            data = await stream.read(READ_SIZE)
            if not data:
                return
            self._sent += len(data)
            self._frames.feed(data)
            self._transport.write(data)
            await self._writable.wait()

    async def _to_upstream_loop(self, stream: httpcore.AsyncNetworkStream) -> None:
        while True:
            while self._to_upstream:
                data = self._to_upstream.popleft()
                self._queued -= len(data)
                await stream.write(data)
                if self._queued < HIGH_WATER and not self._gone:
                    self._transport.resume_reading()
            if self._gone:
                return
            self._data.clear()
            await self._data.wait()

    def _answer(self, response: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(response)
            self._transport.close()

    def _end(self) -> None:
        if not self._gone:
            self._gone = True
            self._data.set()
            self._writable.set()
