"""The local HTTP proxy of `portcullis connect`: CONNECT tunnels, and plain requests in
absolute form (``GET http://host/path``) forwarded as browsers, pip, apt and curl send
them for ``http://`` URLs.

The first request head decides (``proto.httpconnect``): a CONNECT becomes one tunnel
stream like a SOCKS5 CONNECT; anything else is handed to ``HttpForwarding``, which runs
``proto.httpforward`` over the connection: every upstream connection it asks for is a
tunnel stream, decided by the gateway like any other, and joined to the forwarder by an
``UpstreamPipe`` in place of a socket.

Only moves bytes and keeps time: the HTTP parsing, the rewriting and every answer are
the codecs'. Back-pressure runs end to end: the client's socket is read only while the
forwarder wants a body or a head and the stream has credit; the stream's credit goes back
to the gateway only while the client's socket takes what it is sent. Nothing waits
forever: the first head has ``handshake_timeout``, an upstream stream
``upstream_timeout`` to be accepted, and a connection on which nothing moves either way
for ``idle_timeout`` is answered (408, 504) or closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from portcullis.client.proxies import Inbound, ProxiedStream, ProxySettings
from portcullis.client.tunnel import TunnelClient
from portcullis.errors import ProtocolError
from portcullis.net.muxsession import MuxSession, StreamBridge
from portcullis.proto import mux
from portcullis.proto.httpconnect import HttpConnectConnection, State, status_for
from portcullis.proto.httpforward import (
    CloseClient,
    DropUpstream,
    HttpForwarder,
    OpenUpstream,
    SendClient,
    SendUpstream,
)
from portcullis.proto.mux import Reason


class HttpProxyInbound(Inbound):
    """An HTTP proxy: CONNECT (HTTPS and other tunnels) and forwarded http:// requests."""

    negotiates = True

    def __init__(self, tunnel: TunnelClient, settings: ProxySettings) -> None:
        super().__init__(tunnel, settings)
        self._http = HttpConnectConnection(credentials=settings.credentials)

    def negotiate(self, data: bytes) -> None:
        assert self.transport is not None
        http = self._http
        try:
            http.receive_data(data)
        except ProtocolError:
            self.transport.write(http.data_to_send())
            self.transport.close()
            return
        if http.state is State.FORWARD:
            self.handshake_done()
            client, first = http.take_forward()
            forwarder = HttpForwarder.taking_over(client, first,
                                                  credentials=self.settings.credentials)
            forwarding = HttpForwarding(self.tunnel, self.settings, forwarder)
            self.transport.set_protocol(forwarding)
            forwarding.connection_made(self.transport)
            return
        request = http.next_request()
        if request is None:
            return

        def answer(reason: Reason | None, message: str) -> bytes:
            if reason is None:
                http.accept()
            else:
                name = reason.name.lower()
                http.refuse(status_for(name), f"{name}: {message}")
            return http.data_to_send()

        self.carry(request.host, request.port, answer, http.take_payload())

    def handshake_timeout_answer(self) -> bytes:
        self._http.time_out()
        return self._http.data_to_send()


class UpstreamPipe(asyncio.Transport):
    """Stands where a socket would for one upstream stream's bridge: what the bridge
    writes goes to the forwarder, its pause/resume of reading gates the client's
    socket, and closing it ends the stream."""

    def __init__(self, owner: HttpForwarding) -> None:
        super().__init__()
        self._owner = owner
        self.bridge: StreamBridge | None = None
        # The request bytes until the bridge exists (TunnelClient.open takes them then).
        self.early = bytearray()
        self.blocked = True   # no credit yet: the stream is not accepted
        self.accepted = False
        self.refusal: tuple[Reason, str] | None = None
        self.opening: asyncio.Task[StreamBridge | None] | None = None
        self._closing = False

    def send(self, data: bytes) -> None:
        """Request bytes for the upstream."""
        if self.bridge is None:
            self.early += data
        elif not self._closing:
            self.bridge.data_received(data)

    def answer(self, reason: Reason | None, message: str) -> bytes:
        """ProxiedStream's answer: nothing to write, but the outcome is noted."""
        if reason is None:
            self.accepted = True
            self._owner.upstream_accepted(self)
        else:
            self.refusal = (reason, message)
        return b""

    # --- asyncio.Transport, as StreamBridge and TunnelClient.open use it -------------------
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, StreamBridge)
        self.bridge = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.bridge is not None
        return self.bridge

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._closing:
            self._owner.upstream_data(self, bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self._closing:
            self._owner.upstream_data(self, b"")

    def pause_reading(self) -> None:
        self.blocked = True
        self._owner.update_reading()

    def resume_reading(self) -> None:
        self.blocked = False
        self._owner.update_reading()

    def is_reading(self) -> bool:
        return not self.blocked

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._end(lost=False)

    def abort(self) -> None:
        self._end(lost=True)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def _end(self, *, lost: bool) -> None:
        if self._closing:
            return
        self._closing = True
        opening = self.opening
        if opening is not None and not opening.done() and opening is not asyncio.current_task():
            opening.cancel()   # still waiting for the tunnel to come up
        self._owner.upstream_ended(self, lost=lost)
        if self.bridge is not None:
            self.bridge.connection_lost(None)   # resets the stream unless it ended cleanly


class HttpForwarding(asyncio.Protocol):
    """The client's connection once its first request is one to forward."""

    def __init__(self, tunnel: TunnelClient, settings: ProxySettings,
                 forwarder: HttpForwarder) -> None:
        self._tunnel = tunnel
        self._settings = settings
        self._forwarder = forwarder
        self._transport: asyncio.Transport | None = None
        self._pipe: UpstreamPipe | None = None
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._upstream_timer: asyncio.TimerHandle | None = None
        self._reading = True
        self._client_write_paused = False

    # --- the client's socket --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._idle_timer = self._loop.call_later(self._settings.idle_timeout, self._idle_check)
        self._run()

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self._forwarder.receive_client(data)
        self._run()

    def eof_received(self) -> bool:
        self._forwarder.receive_client(b"")
        self._run()
        return True   # a half-closed client still gets its response

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._idle_timer, self._upstream_timer):
            if timer is not None:
                timer.cancel()
        self._drop()

    def pause_writing(self) -> None:
        # The client reads slowly: the stream stops returning credit, the server waits.
        self._client_write_paused = True
        if self._pipe is not None and self._pipe.bridge is not None:
            self._pipe.bridge.pause_writing()

    def resume_writing(self) -> None:
        self._client_write_paused = False
        if self._pipe is not None and self._pipe.bridge is not None:
            self._pipe.bridge.resume_writing()

    # --- the upstream pipe's calls ------------------------------------------------------------
    def upstream_data(self, pipe: UpstreamPipe, data: bytes) -> None:
        if pipe is self._pipe:
            self._last_activity = self._loop.time()
            self._forwarder.receive_upstream(data)
            self._run()

    def upstream_accepted(self, pipe: UpstreamPipe) -> None:
        if pipe is self._pipe and self._upstream_timer is not None:
            self._upstream_timer.cancel()
            self._upstream_timer = None

    def upstream_ended(self, pipe: UpstreamPipe, *, lost: bool) -> None:
        if pipe is not self._pipe:
            return   # dropped by us: its end is ours
        self._pipe = None
        if pipe.refusal is not None:
            reason, message = pipe.refusal
            name = reason.name.lower()
            self._forwarder.upstream_failed(status_for(name), f"{name}: {message}")
        elif not pipe.accepted:
            self._forwarder.upstream_failed(502, "the tunnel is down")
        elif lost:
            self._forwarder.upstream_failed(502, "the connection to the server was lost")
        self._run()

    def update_reading(self) -> None:
        """Read the client while the forwarder wants it and the stream can take it."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pipe = self._pipe
        reading = self._forwarder.wants_client_data and (pipe is None or not pipe.blocked)
        if reading != self._reading:
            self._reading = reading
            if reading:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # --- internals --------------------------------------------------------------------------
    def _run(self) -> None:
        """Carry out what the forwarder asks, in order."""
        transport = self._transport
        assert transport is not None
        for command in self._forwarder.commands():
            if isinstance(command, SendClient):
                transport.write(command.data)
            elif isinstance(command, SendUpstream):
                if self._pipe is not None:
                    self._pipe.send(command.data)
            elif isinstance(command, OpenUpstream):
                self._open(command.host, command.port)
            elif isinstance(command, DropUpstream):
                self._drop()
            elif isinstance(command, CloseClient):
                self._drop()
                transport.close()
        self.update_reading()

    def _open(self, host: str, port: int) -> None:
        if self._upstream_timer is not None:
            self._upstream_timer.cancel()
        pipe = self._pipe = UpstreamPipe(self)
        on_refused = self._settings.on_refused

        def make(session: MuxSession, stream_id: int) -> StreamBridge:
            bridge = ProxiedStream(session, stream_id, pipe.answer, (host, port), on_refused)
            if self._client_write_paused:
                bridge.pause_writing()
            return bridge

        pipe.opening = asyncio.ensure_future(self._tunnel.open(
            pipe, mux.Protocol.TCP, host, port, make=make, early=pipe.early))
        self._upstream_timer = self._loop.call_later(self._settings.upstream_timeout,
                                                     self._upstream_expired, pipe)

    def _drop(self) -> None:
        pipe, self._pipe = self._pipe, None
        if self._upstream_timer is not None:
            self._upstream_timer.cancel()
            self._upstream_timer = None
        if pipe is not None:
            pipe.close()

    def _upstream_expired(self, pipe: UpstreamPipe) -> None:
        self._upstream_timer = None
        if pipe is self._pipe:
            self._drop()
            self._forwarder.upstream_failed(
                504, f"the gateway did not open the connection in "
                     f"{self._settings.upstream_timeout:g} s")
            self._run()

    def _idle_check(self) -> None:
        idle = self._settings.idle_timeout
        quiet_since = self._loop.time() - self._last_activity
        if quiet_since < idle:
            self._idle_timer = self._loop.call_later(idle - quiet_since, self._idle_check)
            return
        self._idle_timer = None
        self._forwarder.idle_expired()
        self._run()
