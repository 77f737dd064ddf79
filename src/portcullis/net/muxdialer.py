"""The dial-out Dialer: inward connections as mux streams over connections the relay
dialled out to this edge (double hop without an inbound rule into the second DMZ).

A dial picks a live relay session (the fewest open streams), opens a stream naming the
destination and waits, within the dial timeout, for the relay's ACCEPT (the relay decided
and connected) or REFUSE (DialError with the relay's Reason and words). The caller then
gets an asyncio transport over the stream, as if it had a socket:

- TCP: `MuxStreamTransport`. It is the mirror image of the tunnel's `StreamBridge`, and
  reuses it: the bridge treats the caller's protocol as its "socket" through `_BridgeSide`.
  So the credit arithmetic is the bridge's own, mapped onto the caller's protocol:
  the stream's send credit exhausted (`pending()`) or the carrier backed up
  -> `protocol.pause_writing()`, WINDOW received -> `resume_writing()`;
  `transport.pause_reading()` -> the bridge stops returning credit (`consumed()`), so the
  relay's window closes and it stops reading its socket; `resume_reading()` delivers what
  arrived meanwhile (at most one window) and returns the credit.
  `write_eof()` -> FIN; `close()` -> FIN, then the stream is forgotten (what still arrives
  is consumed by the session); `abort()` -> RESET; a RESET from the relay or the end of
  its connection -> `connection_lost` with the reason.
- UDP: `MuxDatagramTransport`, a connected datagram "socket" over a DATAGRAM flow.
- ICMP echo: an `EchoChannel` over an ICMP flow, in the tunnel's datagram format
  (request: u16 sequence + data; reply: u16 sequence + u32 round trip in µs + data).

Received payload reaches a protocol as the codec's memoryview when the protocol says it
takes views (`accepts_views`, as `StreamBridge` does), else as bytes (one copy).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from portcullis.errors import DialError, ProtocolError
from portcullis.net.dialer import EchoChannel, give_to_buffered
from portcullis.net.echoes import EchoRequests
from portcullis.net.icmp import TIMEOUT as ECHO_TIMEOUT
from portcullis.net.muxsession import DatagramFlow, MuxSession, StreamBridge
from portcullis.proto import mux
from portcullis.proto.mux import Reason

P = TypeVar("P", bound=asyncio.BaseProtocol)
D = TypeVar("D", bound=asyncio.DatagramProtocol)

Payload = bytes | memoryview


class RelaySessions(Protocol):
    """Where streams go: the relay connections this edge holds (gateway/relays.py)."""

    async def session(self) -> MuxSession:
        """A live relay session, or DialError(UNREACHABLE) when none is connected."""
        ...


class MuxDialer:
    def __init__(self, relays: RelaySessions, *, timeout: float = 10.0,
                 datagram_idle_timeout: float = 60.0) -> None:
        self._relays = relays
        self._timeout = timeout
        self._idle_timeout = datagram_idle_timeout

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]:
        """`source` is not used: the relay connects from its own address."""
        where = f"{host}:{port}"
        session = await self._relays.session()
        try:
            bridge = session.open_local(mux.Protocol.TCP, host, port, make=_DialedBridge)
        except (ProtocolError, ValueError) as exc:
            raise DialError(f"cannot open a stream to {where} through the relay: {exc}",
                            Reason.UNREACHABLE) from None
        assert isinstance(bridge, _DialedBridge)
        transport = MuxStreamTransport(bridge, (host, port))
        bridge.connection_made(transport.bridge_side)
        try:
            async with asyncio.timeout(self._timeout):
                await bridge.answer
        except TimeoutError:
            transport.abort()
            raise DialError(f"the relay did not connect to {where} in time",
                            Reason.TIMED_OUT) from None
        except asyncio.CancelledError:
            transport.abort()
            raise
        protocol = protocol_factory()
        transport.attach(protocol)
        return transport, protocol

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D], *,
                          source: str | None = None) -> tuple[asyncio.DatagramTransport, D]:
        flow = await self._open_flow(mux.Protocol.UDP, host, port, f"{host}:{port}/udp")
        transport = MuxDatagramTransport(flow, (host, port))
        protocol = protocol_factory()
        transport.attach(protocol)
        return transport, protocol

    async def open_echo(self, address: str, *, source: str | None = None) -> EchoChannel:
        flow = await self._open_flow(mux.Protocol.ICMP, address, 0, f"{address} (ICMP echo)")
        return MuxEcho(flow)

    async def _open_flow(self, protocol: mux.Protocol, host: str, port: int,
                         where: str) -> _DialedFlow:
        session = await self._relays.session()
        try:
            flow = session.open_flow(host, port, _drop, idle_timeout=self._idle_timeout,
                                     protocol=protocol, make=_DialedFlow)
        except (ProtocolError, ValueError) as exc:
            raise DialError(f"cannot open a stream to {where} through the relay: {exc}",
                            Reason.UNREACHABLE) from None
        assert isinstance(flow, _DialedFlow)
        try:
            async with asyncio.timeout(self._timeout):
                await flow.answer
        except TimeoutError:
            flow.close("timed out")
            raise DialError(f"the relay did not open {where} in time",
                            Reason.TIMED_OUT) from None
        except asyncio.CancelledError:
            flow.close("cancelled")
            raise
        return flow


def _drop(data: bytes) -> None:
    """Datagrams of a flow whose transport is not attached yet: none can come before
    ACCEPT, and the transport attaches in the same step as ACCEPT is seen."""


def _answer_failure(session: MuxSession, refusal: tuple[Reason, str] | None) -> DialError:
    """Why a stream we opened was not accepted: the relay's own words when it refused
    (they name the destination and say why), or the end of its connection."""
    if refusal is None or session.mux.closed:
        return DialError(f"the relay connection ended before the stream was opened "
                         f"({session.end_reason()})", Reason.UNREACHABLE)
    reason, message = refusal
    if not message.startswith("the relay"):
        message = f"the relay refused it: {message or reason.name.lower()}"
    return DialError(message, reason)


def _loss(session: MuxSession, refusal: tuple[Reason, str] | None) -> ConnectionError:
    """Why a stream in flight ended, for its protocol's `connection_lost`."""
    if refusal is None or session.mux.closed:
        return ConnectionResetError(f"the relay connection ended ({session.end_reason()})")
    reason, message = refusal
    return ConnectionResetError(f"the relay reset the stream: {message or reason.name.lower()}")


# -- TCP ---------------------------------------------------------------------------------
class _DialedBridge(StreamBridge):
    """A stream we opened, waiting for the relay's answer; then the bridge between it and
    the caller's protocol (through `_BridgeSide`)."""

    def __init__(self, session: MuxSession, stream_id: int) -> None:
        super().__init__(session, stream_id, accepted=False)
        self.answer: asyncio.Future[None] = session.loop.create_future()
        self.ended_by: tuple[Reason, str] | None = None

    def on_accepted(self) -> None:
        super().on_accepted()
        if not self.answer.done():
            self.answer.set_result(None)

    def finished(self) -> None:
        """Nothing more goes to the relay on the caller's behalf."""
        self._done = True

    def end_sending(self) -> None:
        """FIN, unless it went already (the caller may close after write_eof, or in the
        middle of handling the relay's FIN)."""
        if not self._local_eof and not self._done:
            self.eof_received()

    def on_ended(self, refusal: tuple[Reason, str] | None = None) -> None:
        self.ended_by = refusal
        if not self.answer.done():
            self.answer.set_exception(_answer_failure(self.session, refusal))
            self.session.forget(self)
        super().on_ended(refusal)


class _BridgeSide(asyncio.Transport):
    """What the bridge takes for its socket's transport: each call is translated into
    the caller's protocol's terms by the `MuxStreamTransport`."""

    def __init__(self, owner: MuxStreamTransport) -> None:
        super().__init__()
        self._owner = owner

    def write(self, data: bytes | bytearray | memoryview) -> None:   # DATA from the relay
        self._owner.deliver(data)   # type: ignore[arg-type]  # the codec's bytes or view

    def write_eof(self) -> None:                         # FIN from the relay
        self._owner.deliver_eof()

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:                     # no send credit
        self._owner.stop_writes()

    def resume_reading(self) -> None:                    # credit again
        self._owner.allow_writes()

    def is_closing(self) -> bool:
        return self._owner.is_closing()

    def close(self) -> None:                             # FIN both ways: done
        self._owner.finish(None)

    def abort(self) -> None:                             # RESET, REFUSE or session end
        bridge = self._owner.bridge
        self._owner.finish(_loss(bridge.session, bridge.ended_by))


class MuxStreamTransport(asyncio.Transport):
    """A TCP-like transport over one mux stream (see the module docstring)."""

    def __init__(self, bridge: _DialedBridge, peer: tuple[str, int]) -> None:
        super().__init__({"peername": peer, "sockname": None})
        self.bridge = bridge
        self.bridge_side = _BridgeSide(self)
        self._protocol: asyncio.BaseProtocol | None = None
        self._views = False
        self._reading_paused = False
        self._held: list[Payload] = []     # arrived while reading was paused (<= a window)
        self._held_eof = False
        self._writes_stopped = False       # what the bridge wants
        self._told_paused = False          # what the protocol was told
        self._closing = False
        self._lost: tuple[Exception | None] | None = None   # set once the stream is over
        self._lost_told = False

    # -- the caller's side ---------------------------------------------------------
    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._views = bool(getattr(protocol, "accepts_views", False))
        protocol.connection_made(self)
        self._sync_writes()
        self._drain()

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._views = bool(getattr(protocol, "accepts_views", False))

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost is not None:
            return
        if not data:
            return
        # The codec keeps what it cannot send yet: it must not change under it.
        self.bridge.data_received(data if type(data) is bytes else bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if self._closing or self._lost is not None:
            return
        self.bridge.end_sending()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self.bridge.session.mux.pending(self.bridge.stream_id)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)   # writes pause as soon as anything waits for the relay's credit

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass   # the stream's credit is the limit

    def pause_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.bridge.pause_writing()   # withhold WINDOW credit from the relay

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._drain()
            if not self._reading_paused:
                self.bridge.resume_writing()   # return the credit held back

    def is_reading(self) -> bool:
        return not self._reading_paused

    def is_closing(self) -> bool:
        # A stream that ended cleanly may still hold bytes for the protocol to read: it
        # is closing once the protocol has been told it is lost.
        return self._closing or self._lost_told

    def close(self) -> None:
        """FIN after what was written, then forget the stream: the session consumes
        whatever the relay still sends, and the codec ends the stream at its FIN."""
        if self._closing or self._lost is not None:
            return
        self._closing = True
        bridge = self.bridge
        bridge.end_sending()
        bridge.session.forget(bridge)
        self.finish(None)

    def abort(self) -> None:
        if self._lost is not None:
            return
        self._closing = True
        bridge = self.bridge
        if not bridge.ended:
            bridge.session.reset(bridge.stream_id, Reason.CANCELLED, "closed by the edge")
        bridge.session.forget(bridge)
        self.finish(None)

    # -- the bridge's side (through _BridgeSide) -----------------------------------------
    def deliver(self, data: Payload) -> None:
        if self._closing or self._lost is not None:
            return
        if self._reading_paused or self._held or self._protocol is None:
            self._held.append(data)
            return
        self._give(data)

    def deliver_eof(self) -> None:
        if self._reading_paused or self._held or self._protocol is None:
            self._held_eof = True
            return
        self._give_eof()

    def stop_writes(self) -> None:
        self._writes_stopped = True
        self._sync_writes()

    def allow_writes(self) -> None:
        self._writes_stopped = False
        self._sync_writes()

    def finish(self, exc: Exception | None) -> None:
        """The stream is over; the protocol hears it once what it may still read is read
        (unless the stream was reset: then what was held is dropped, as TCP drops it)."""
        if self._lost is not None:
            return
        self.bridge.finished()
        self.bridge.session.forget(self.bridge)
        self._lost = (exc,)
        if exc is not None:
            self._held.clear()
            self._held_eof = False
        self._tell_lost_soon()

    # -- internals ------------------------------------------------------------------------
    def _sync_writes(self) -> None:
        protocol = self._protocol
        if protocol is None or self._writes_stopped == self._told_paused:
            return
        self._told_paused = self._writes_stopped
        if self._writes_stopped:
            protocol.pause_writing()
        else:
            protocol.resume_writing()

    def _give(self, data: Payload) -> None:
        protocol = self._protocol
        if isinstance(protocol, asyncio.BufferedProtocol):
            give_to_buffered(protocol, data)
        elif isinstance(protocol, asyncio.Protocol):
            protocol.data_received(data if self._views else bytes(data))  # type: ignore[arg-type]

    def _give_eof(self) -> None:
        protocol = self._protocol
        keep_open = isinstance(protocol, asyncio.Protocol) and protocol.eof_received()
        if not keep_open:
            self.close()

    def _drain(self) -> None:
        if self._protocol is None:
            return
        while self._held and not self._reading_paused:
            self._give(self._held.pop(0))
        if self._held or self._reading_paused:
            return
        if self._held_eof:
            self._held_eof = False
            self._give_eof()
        self._tell_lost_soon()

    def _tell_lost_soon(self) -> None:
        if (self._lost is None or self._lost_told or self._protocol is None
                or self._held or self._held_eof):
            return
        self._lost_told = True
        protocol, (exc,) = self._protocol, self._lost
        self.bridge.session.loop.call_soon(protocol.connection_lost, exc)


# -- UDP and ICMP --------------------------------------------------------------------------
class _DialedFlow(DatagramFlow):
    """A datagram flow we opened, waiting for the relay's answer; then its datagrams go
    to whoever `listen` names."""

    def __init__(self, session: MuxSession, stream_id: int,
                 deliver: Callable[[bytes], None]) -> None:
        super().__init__(session, stream_id, self._received, accepted=False)
        self.answer: asyncio.Future[None] = session.loop.create_future()
        self._listener: Callable[[bytes], None] = deliver
        self.on_lost: Callable[[Exception | None], None] | None = None

    def listen(self, listener: Callable[[bytes], None]) -> None:
        self._listener = listener

    def _received(self, data: bytes) -> None:
        self._listener(data)

    def on_accepted(self) -> None:
        super().on_accepted()
        if not self.answer.done():
            self.answer.set_result(None)

    def on_ended(self, refusal: tuple[Reason, str] | None = None) -> None:
        if not self.answer.done():
            self.answer.set_exception(_answer_failure(self.session, refusal))
        was_ended = self._ended
        super().on_ended(refusal)
        if not was_ended and self.on_lost is not None:
            self.on_lost(None if refusal is None else _loss(self.session, refusal))


class MuxDatagramTransport(asyncio.DatagramTransport):
    """A connected UDP "socket" over one DATAGRAM flow: `sendto(data)` without an
    address, replies to the protocol's `datagram_received` from the destination."""

    def __init__(self, flow: _DialedFlow, peer: tuple[str, int]) -> None:
        super().__init__({"peername": peer, "sockname": None})
        self._flow = flow
        self._peer = peer
        self._protocol: asyncio.DatagramProtocol | None = None
        self._closing = False

    def attach(self, protocol: asyncio.DatagramProtocol) -> None:
        self._protocol = protocol
        self._flow.listen(lambda data: protocol.datagram_received(data, self._peer))
        self._flow.on_lost = self._lost
        protocol.connection_made(self)

    def sendto(self, data: bytes | bytearray | memoryview, addr: Any = None) -> None:
        if addr is not None and tuple(addr[:2]) != self._peer:
            raise ValueError(f"this transport is connected to {self._peer}, not {addr}")
        if not self._closing:
            self._flow.send(bytes(data))

    def close(self) -> None:
        if not self._closing:
            self._flow.close("closed by the edge")   # tells _lost, once

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.DatagramProtocol)
        self._protocol = protocol

    def _lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._protocol is not None:
            self._flow.session.loop.call_soon(self._protocol.connection_lost, exc)


class MuxEcho:
    """ICMP echo performed by the relay: each `echo` is one datagram on the flow."""

    def __init__(self, flow: _DialedFlow, *, timeout: float = ECHO_TIMEOUT + 1.0) -> None:
        self._flow = flow
        self._requests = EchoRequests(flow.send, timeout=timeout)
        flow.listen(self._requests.replied)
        flow.on_lost = lambda exc: self._requests.end()

    async def echo(self, sequence: int, data: bytes) -> tuple[bytes, float] | None:
        return await self._requests.echo(sequence, data)

    def close(self) -> None:
        self._flow.close("closed by the edge")
