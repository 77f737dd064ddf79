"""The asyncio shell around the mux codec: one tunnel whose streams are bridged to
TCP transports, and whose datagram flows to UDP sockets or ICMP echo channels (the tunnel,
launches, and both ends of a dial-out relay connection use it). Push-based, like the
transports around it: the carrier (a WebSocket connection, see `net.websocket`) hands in
whole messages and takes whole messages out.

It maps codec events to transport calls and back, nothing more: no decisions (the
owner's `on_open` callback decides what an incoming stream may reach), no copies of
payload (chunks go out as the codec made them), no logging per frame, no task per chunk.
Back-pressure is the codec's credit: a stream whose peer has granted no credit stops
reading its socket (`pause_reading`) until a WINDOW arrives, and a socket whose kernel
buffer is full (`pause_writing`) stops returning credit to the peer. A slow stream
therefore never stalls the others, and each stream's memory is bounded by its window.

Time reaches the codec from here: every message is handed in with `loop.time()`, and
one timer handle per session is kept armed at the codec's `get_timer()`, so keep-alive
PINGs, the end of a silent peer and the idle expiry of UDP/ICMP flows all run from it.
The handle is moved only when the codec's deadline comes earlier than the armed one
(rarely: when a flow opens or HELLO goes out); traffic, which only pushes deadlines
later, never touches it, and a handle that fires early just re-arms.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import structlog

from portcullis.errors import DialError, ProtocolError
from portcullis.net.dialer import Dialer
from portcullis.net.echoes import EchoResponder
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason, Timers

log = structlog.get_logger("portcullis.mux")

# How the access policy and the relay's allow-list name the protocol of an OPEN.
PROTOCOL_NAMES: dict[mux.Protocol, mux.ProtocolName] = {
    mux.Protocol.TCP: "tcp", mux.Protocol.UDP: "udp", mux.Protocol.ICMP: "icmp"}
# The largest message we send (several frames coalesced); both ends accept this much
# plus one frame (the WebSocket max_size on either side is set from it).
DEFAULT_MAX_MESSAGE = 1024 * 1024


def keepalive_fields(timers: Timers) -> dict[str, float]:
    """What a gateway tells its client of its keep-alive timers (the "keepalive" member
    of CONFIG for a tunnel, of HELLO for a launch), so that both ends agree."""
    return {"interval": timers.keepalive_interval,
            "dead_peer_timeout": timers.dead_peer_timeout}


def pushed_timers(fields: Mapping[str, object], current: Timers) -> Timers:
    """The timers the gateway told us in `fields`, or `current` if it told none (an
    older gateway) or values the codec cannot use."""
    told = fields.get("keepalive")
    if not isinstance(told, dict):
        return current
    interval, dead = told.get("interval"), told.get("dead_peer_timeout")
    if (not isinstance(interval, int | float) or not isinstance(dead, int | float)
            or isinstance(interval, bool) or isinstance(dead, bool)):
        return current
    try:
        return Timers(float(interval), float(dead), current.datagram_idle_timeout)
    except ValueError:
        return current


class MessageCarrier(Protocol):
    """What carries the session's messages: a WebSocket connection."""

    def send_message(self, chunks: Sequence[bytes | memoryview]) -> None:
        """Send the chunks, in order, as one message."""
        ...

    def close(self, code: int, reason: str) -> None: ...


@dataclass
class StreamCounters:
    sent: int = 0       # bytes carried from our socket to the peer
    received: int = 0   # bytes carried from the peer to our socket


class StreamBridge(asyncio.Protocol):
    """One mux stream joined to one TCP connection."""

    # Payload may be handed in as memoryviews (the relay dialer's streams): the codec
    # takes them as they are.
    accepts_views = True

    def __init__(self, session: MuxSession, stream_id: int, *, accepted: bool) -> None:
        self.session = session
        self.stream_id = stream_id
        self.transport: asyncio.Transport | None = None
        self.counters = StreamCounters()
        self._accepted = accepted
        self._early: list[bytes] = []
        self._write_paused = False
        self._unreturned_credit = 0
        self._local_eof = False
        self._remote_eof = False
        self._done = False
        # Told once when the socket is gone (the tunnel audits each stream's bytes).
        self.on_closed: Callable[[StreamBridge], None] | None = None

    # -- socket side -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if not self._accepted or self.session.sources_paused:
            self.transport.pause_reading()   # nothing may flow before the peer accepts

    def data_received(self, data: bytes) -> None:
        if not self._accepted:
            # A read already under way when we paused (uvloop) may still arrive: hold it.
            self._early.append(data)
            return
        session = self.session
        self.counters.sent += len(data)
        session.mux.send_data(self.stream_id, data)
        if session.mux.pending(self.stream_id):
            assert self.transport is not None
            self.transport.pause_reading()
        session.flush_soon()

    def eof_received(self) -> bool:
        if self._local_eof:
            # Told again: uvloop may report the end while reading is paused before the
            # accept, and once more when on_accepted resumes reading. One FIN only.
            return True
        self._local_eof = True
        if not self._accepted:
            return True   # sent as FIN once the peer accepts (FIN, like data, needs ACCEPT)
        if not self._done:
            self.session.mux.send_fin(self.stream_id)
            self.session.flush_soon()
        self._close_if_finished()
        return True   # keep our write side open: TCP half-close is carried end to end

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done:
            self._done = True
            if not (self._local_eof and self._remote_eof):
                self.session.reset(self.stream_id, Reason.CANCELLED,
                                   "connection closed" if exc is None else str(exc))
        self.session.forget(self)
        if self.on_closed is not None:
            self.on_closed(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._unreturned_credit:
            self.session.mux.consumed(self.stream_id, self._unreturned_credit)
            self._unreturned_credit = 0
            self.session.flush_soon()

    # -- tunnel side ----------------------------------------------------------------
    @property
    def accepted(self) -> bool:
        return self._accepted

    @property
    def ended(self) -> bool:
        return self._done

    def hold(self, data: bytes) -> None:
        """Bytes read before the stream was opened (a proxy's pipelined request)."""
        if data:
            self._early.append(data)

    def on_accepted(self) -> None:
        self._accepted = True
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)
        if self._local_eof:
            self._local_eof = False
            self.eof_received()
        self.on_credit()

    def on_data(self, data: bytes | memoryview) -> None:
        assert self.transport is not None
        size = len(data)
        self.counters.received += size
        self.transport.write(data)
        # Credit goes back only once the kernel has taken the bytes; while the socket
        # is backed up the peer's window closes and it stops sending on this stream.
        if self._write_paused:
            self._unreturned_credit += size
        else:
            self.session.mux.consumed(self.stream_id, size)

    def on_credit(self) -> None:
        transport = self.transport
        if (transport is not None and self._accepted and not transport.is_closing()
                and not self.session.sources_paused
                and not self.session.mux.pending(self.stream_id)):
            transport.resume_reading()

    def on_remote_eof(self) -> None:
        self._remote_eof = True
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        self._close_if_finished()

    def on_ended(self, refusal: tuple[Reason, str] | None = None) -> None:
        """The peer refused or reset the stream, or the tunnel ended: drop the socket."""
        self._done = True
        if self.transport is not None:
            self.transport.abort()

    def _close_if_finished(self) -> None:
        if self._local_eof and self._remote_eof and self.transport is not None:
            self._done = True
            self.transport.close()


class DatagramFlow:
    """One UDP flow: a stream of datagrams, ended by either side or after idling (the
    codec's timer decides when, and resets the stream).

    `deliver` hands a datagram from the peer to the local socket. Datagrams sent before
    the peer accepts wait in a short queue; beyond it they are dropped, as UDP may be.
    """

    MAX_QUEUED = 64

    def __init__(self, session: MuxSession, stream_id: int, deliver: Callable[[bytes], None],
                 *, accepted: bool) -> None:
        self.session = session
        self.stream_id = stream_id
        self.counters = StreamCounters()
        self.on_closed: Callable[[DatagramFlow], None] | None = None
        self._deliver = deliver
        self._accepted = accepted
        self._queued: list[bytes] = []
        self._ended = False

    def send(self, data: bytes) -> None:
        """A datagram from our socket, to the peer."""
        if self._ended:
            return
        if not self._accepted:
            if len(self._queued) < self.MAX_QUEUED:
                self._queued.append(data)
            return
        session = self.session
        self.counters.sent += len(data)
        session.mux.send_datagram(self.stream_id, data, session.loop.time())
        session.flush_soon()

    def on_datagram(self, data: bytes) -> None:
        self.counters.received += len(data)
        self._deliver(data)

    def on_accepted(self) -> None:
        self._accepted = True
        queued, self._queued = self._queued, []
        for data in queued:
            self.send(data)

    def on_ended(self, refusal: tuple[Reason, str] | None = None) -> None:
        """The flow is over: the peer refused, reset or ended it, it idled out, or the
        tunnel ended (`refusal` says why when the peer did)."""
        if self._ended:
            return
        self._ended = True
        self._queued = []
        if self.on_closed is not None:
            self.on_closed(self)

    def close(self, message: str) -> None:
        """End the flow from this side."""
        self.session.reset(self.stream_id, Reason.CANCELLED, message)
        self.session.forget_flow(self)
        self.on_ended()


class UdpSocket(asyncio.DatagramProtocol):
    """The socket of one UDP flow a peer opened: what the server answers goes to the flow."""

    def __init__(self) -> None:
        self.flow: DatagramFlow | None = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        if self.flow is not None:
            self.flow.send(data)

    def error_received(self, exc: Exception) -> None:
        pass   # ICMP errors (port unreachable): UDP's own semantics; the flow idles out


StreamOpenHandler = Callable[["MuxSession", mux.StreamOpened], Awaitable[None]]
BridgeFactory = Callable[["MuxSession", int], StreamBridge]
FlowFactory = Callable[["MuxSession", int, Callable[[bytes], None]], DatagramFlow]


class MuxSession:
    """One mux connection: dispatches events, coalesces output into messages."""

    def __init__(self, connection: MuxConnection, *, on_open: StreamOpenHandler | None = None,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.mux = connection
        self.max_message = max_message
        self._on_open = on_open
        self._carrier: MessageCarrier | None = None
        self._streams: dict[int, StreamBridge] = {}
        self._flows: dict[int, DatagramFlow] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self.loop = self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.hello: asyncio.Future[dict[str, object]] = self._loop.create_future()
        self.goaway: tuple[Reason, str] | None = None     # the peer ended the session
        self.ended_here: tuple[Reason, str] | None = None  # we did
        self.protocol_error: str | None = None
        self.totals = StreamCounters()
        self.closed = asyncio.Event()
        self.sources_paused = False
        self.config: dict[str, object] | None = None   # what the gateway pushed
        # Told when the peer refuses a stream we opened (the client prints it).
        self.on_refused: Callable[[Reason, str], None] | None = None

    # -- the carrier's side -------------------------------------------------------
    def attach(self, carrier: MessageCarrier) -> None:
        self._carrier = carrier
        self.mux.handle_timer(self._loop.time())   # the codec's clock starts now
        self.flush_soon()   # whatever the owner queued before (its HELLO)

    def receive_message(self, message: bytes | bytearray | memoryview) -> None:
        if self.closed.is_set():
            return
        try:
            self.mux.receive_data(message, self._loop.time())
        except ProtocolError as exc:
            self.protocol_error = str(exc)
            # The codec has queued a GOAWAY(PROTOCOL_ERROR): send it, then hang up.
            self._end(1002, "protocol error")
            return
        self._dispatch(self.mux.events_received())
        if self.goaway is not None:
            self._end(1000, "")
            return
        self.flush_soon()

    def carrier_closed(self) -> None:
        """The WebSocket is gone: every stream ends with it."""
        if self.closed.is_set():
            return
        self._carrier = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Close the codec too, so that it forgets its streams and their pending data
        # (views of up to a window each), and drop what it had to send: nowhere to go.
        self.mux.send_goaway(Reason.CANCELLED, "connection lost")
        self.mux.data_to_send()
        for bridge in list(self._streams.values()):
            self.forget(bridge)
            bridge.on_ended((Reason.CANCELLED, "tunnel closed"))
        for flow in list(self._flows.values()):
            self.forget_flow(flow)
            flow.on_ended((Reason.CANCELLED, "tunnel closed"))
        for task in self._tasks:
            task.cancel()
        if not self.hello.done():
            self.hello.set_exception(ConnectionError("the tunnel closed"))
        self.closed.set()

    def pause_sources(self) -> None:
        """The carrier's send buffer is full: stop reading every stream's socket."""
        self.sources_paused = True
        for bridge in self._streams.values():
            if bridge.transport is not None:
                bridge.transport.pause_reading()

    def resume_sources(self) -> None:
        self.sources_paused = False
        for bridge in list(self._streams.values()):
            bridge.on_credit()

    # -- the owner's side ---------------------------------------------------------
    def close(self, reason: Reason, message: str) -> None:
        """End the whole tunnel, telling the peer why."""
        if self.ended_here is None:
            self.ended_here = (reason, message)
        with contextlib.suppress(ProtocolError, ValueError):
            self.mux.send_goaway(reason, message)
        self._end(1000, message)

    @property
    def rtt(self) -> float | None:
        """Seconds, from the last answered keep-alive PING."""
        return self.mux.round_trip

    def use_timers(self, timers: Timers) -> None:
        """Apply new keep-alive and idle timers (what the gateway told a client)."""
        self.mux.timers = timers
        self._arm_timer()

    async def hello_within(self, seconds: float) -> dict[str, object] | None:
        """The peer's HELLO, or None if it did not come in time or the tunnel closed."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.hello), seconds)
        except (TimeoutError, ConnectionError):
            return None

    def bridge(self, stream_id: int, *, accepted: bool) -> StreamBridge:
        bridge = StreamBridge(self, stream_id, accepted=accepted)
        self._streams[stream_id] = bridge
        return bridge

    def open_local(self, protocol: mux.Protocol, host: str, port: int, *,
                   make: BridgeFactory | None = None) -> StreamBridge:
        """Open a stream to the peer for a socket we accepted (client side)."""
        stream_id = self.mux.open_stream(protocol, host, port)
        self.flush_soon()
        bridge = (make(self, stream_id) if make is not None
                  else StreamBridge(self, stream_id, accepted=False))
        self._streams[stream_id] = bridge
        return bridge

    def open_flow(self, host: str, port: int, deliver: Callable[[bytes], None], *,
                  idle_timeout: float, protocol: mux.Protocol = mux.Protocol.UDP,
                  make: FlowFactory | None = None) -> DatagramFlow:
        """Open a UDP (or ICMP echo) flow to the peer (client side)."""
        stream_id = self.mux.open_stream(protocol, host, port, idle_timeout=idle_timeout)
        self.flush_soon()
        flow = (make(self, stream_id, deliver) if make is not None
                else DatagramFlow(self, stream_id, deliver, accepted=False))
        self._flows[stream_id] = flow
        return flow

    def accept_flow(self, stream_id: int, deliver: Callable[[bytes], None], *,
                    idle_timeout: float) -> DatagramFlow:
        """Accept a UDP flow the peer opened (gateway side), once its socket is ready."""
        # ProtocolError if the peer reset it meanwhile
        self.mux.accept_stream(stream_id, idle_timeout=idle_timeout)
        flow = DatagramFlow(self, stream_id, deliver, accepted=True)
        self._flows[stream_id] = flow
        self.flush_soon()
        return flow

    def forget_flow(self, flow: DatagramFlow) -> None:
        if self._flows.get(flow.stream_id) is flow:
            del self._flows[flow.stream_id]
            self.totals.sent += flow.counters.sent
            self.totals.received += flow.counters.received

    def reset(self, stream_id: int, reason: Reason, message: str) -> None:
        # A no-op in the codec for a stream that is already gone.
        self.mux.reset_stream(stream_id, reason, message)
        self.flush_soon()

    def forget(self, bridge: StreamBridge) -> None:
        """Drop a finished stream, adding its byte counts to the session's (once)."""
        if self._streams.get(bridge.stream_id) is bridge:
            del self._streams[bridge.stream_id]
            self.totals.sent += bridge.counters.sent
            self.totals.received += bridge.counters.received

    def end_reason(self) -> str:
        """Why the session ended, for logs and the audit trail."""
        if self.protocol_error is not None:
            return f"protocol error: {self.protocol_error}"
        for who, ended in (("peer", self.goaway), ("this side", self.ended_here)):
            if ended is not None:
                reason, message = ended
                return f"{who} ended it: {reason.name.lower()}" + (
                    f" ({message})" if message else "")
        return "connection closed"

    def byte_counts(self) -> tuple[int, int]:
        """(sent, received) so far, open streams included."""
        sent, received = self.totals.sent, self.totals.received
        counters = [bridge.counters for bridge in self._streams.values()]
        counters += [flow.counters for flow in self._flows.values()]
        for live in counters:
            sent += live.sent
            received += live.received
        return sent, received

    @property
    def open_streams(self) -> int:
        return len(self._streams) + len(self._flows)

    async def connect_stream(self, stream_id: int, dialer: Dialer, host: str, port: int,
                             *, on_closed: Callable[[StreamBridge], None] | None = None,
                             refusal: str | None = None,
                             source: str | None = None) -> DialError | None:
        """Answer a stream the peer opened by connecting to host:port: ACCEPT once the
        socket is up, REFUSE (and return why) if it cannot be. The bridge exists before
        the dial, so a RESET that arrives meanwhile finds it and the socket is dropped."""
        bridge = self.bridge(stream_id, accepted=False)
        bridge.on_closed = on_closed
        try:
            await dialer.connect(host, port, lambda: bridge, source=source)
        except DialError as exc:
            self.forget(bridge)
            # `refusal` replaces the dialer's words when they would say too much (a
            # launched resource's address is not the client's business).
            self.refuse(stream_id, exc.reason, refusal or exc.told)
            return exc
        if bridge.ended or not self.mux.is_open(stream_id):
            # Reset (before or during the dial), or the tunnel ended: drop the socket.
            self.forget(bridge)
            if bridge.transport is not None:
                bridge.transport.abort()
            return None
        self.mux.accept_stream(stream_id)
        bridge.on_accepted()
        self.flush_soon()
        return None

    async def connect_flow(self, stream_id: int, dialer: Dialer, host: str, port: int, *,
                           idle_timeout: float,
                           on_closed: Callable[[DatagramFlow], None] | None = None,
                           source: str | None = None) -> DialError | None:
        """Answer a UDP stream the peer opened with a socket connected to host:port:
        ACCEPT once it exists, REFUSE (and return why) if it cannot."""
        try:
            transport, socket_side = await dialer.connect_udp(host, port, UdpSocket,
                                                              source=source)
        except DialError as exc:
            self.refuse(stream_id, exc.reason, exc.told)
            return exc
        try:
            flow = self.accept_flow(stream_id, transport.sendto, idle_timeout=idle_timeout)
        except ProtocolError:   # the peer reset it meanwhile
            transport.close()
            return None

        def closed(ended: DatagramFlow) -> None:
            transport.close()
            if on_closed is not None:
                on_closed(ended)

        flow.on_closed = closed
        socket_side.flow = flow
        return None

    async def connect_echo(self, stream_id: int, dialer: Dialer, address: str, *,
                           idle_timeout: float,
                           on_closed: Callable[[DatagramFlow], None] | None = None,
                           source: str | None = None) -> DialError | None:
        """Answer an ICMP stream the peer opened: each datagram from the peer is one echo
        the Dialer performs, its reply sent back on the flow (`net/echoes.py`)."""
        try:
            channel = await dialer.open_echo(address, source=source)
        except DialError as exc:
            self.refuse(stream_id, exc.reason, exc.told)
            return exc
        # The replies go on the flow, which exists once it is accepted (below).
        responder = EchoResponder(channel, lambda reply: flow.send(reply))

        def closed(ended: DatagramFlow) -> None:
            responder.close()
            if on_closed is not None:
                on_closed(ended)

        try:
            flow = self.accept_flow(stream_id, responder.request, idle_timeout=idle_timeout)
        except ProtocolError:   # the peer reset it meanwhile
            channel.close()
            return None
        flow.on_closed = closed
        return None

    def refuse(self, stream_id: int, reason: Reason, message: str) -> None:
        """Refuse a stream the peer opened, unless it has gone meanwhile."""
        with contextlib.suppress(ProtocolError):
            self.mux.refuse_stream(stream_id, reason, message)
            self.flush_soon()

    def spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        """Run a task that lives no longer than the session."""
        if self.closed.is_set():
            coroutine.close()
            return
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def flush_soon(self) -> None:
        # Once per loop iteration: everything the streams produced in it goes out
        # together, in as few messages as the size limit allows.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    # -- internals ---------------------------------------------------------------------
    async def _open_guarded(self, handler: StreamOpenHandler, event: mux.StreamOpened) -> None:
        """Run the owner's handler; a bug in it refuses the stream instead of leaving the
        peer waiting for an answer that never comes."""
        try:
            await handler(self, event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stream handler failed", stream=event.stream_id)
            self.refuse(event.stream_id, Reason.INTERNAL_ERROR, "internal error")

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stream handler failed", exc_info=task.exception())

    def _dispatch(self, events: list[mux.Event]) -> None:
        streams = self._streams
        for event in events:
            if isinstance(event, mux.DataReceived):
                bridge = streams.get(event.stream_id)
                if bridge is not None:
                    bridge.on_data(event.data)
                else:
                    self.mux.consumed(event.stream_id, len(event.data))
            elif isinstance(event, mux.DatagramReceived):
                if (flow := self._flows.get(event.stream_id)) is not None:
                    flow.on_datagram(event.data)
            elif isinstance(event, mux.CreditAvailable):
                if (bridge := streams.get(event.stream_id)) is not None:
                    bridge.on_credit()
            elif isinstance(event, mux.StreamEnded):
                if (bridge := streams.get(event.stream_id)) is not None:
                    bridge.on_remote_eof()
                elif (flow := self._flows.get(event.stream_id)) is not None:
                    self.forget_flow(flow)
                    flow.on_ended()
            elif isinstance(event, mux.StreamAccepted):
                if (bridge := streams.get(event.stream_id)) is not None:
                    bridge.on_accepted()
                elif (flow := self._flows.get(event.stream_id)) is not None:
                    flow.on_accepted()
            elif isinstance(event, mux.StreamExpired):
                if (flow := self._flows.get(event.stream_id)) is not None:
                    self.forget_flow(flow)
                    flow.on_ended()
            elif isinstance(event, mux.StreamRefused | mux.StreamReset):
                if isinstance(event, mux.StreamRefused) and self.on_refused is not None:
                    self.on_refused(event.reason, event.message)
                if (bridge := streams.get(event.stream_id)) is not None:
                    self.forget(bridge)
                    bridge.on_ended((event.reason, event.message))
                elif (flow := self._flows.get(event.stream_id)) is not None:
                    self.forget_flow(flow)
                    flow.on_ended((event.reason, event.message))
            elif isinstance(event, mux.StreamOpened):
                if self._on_open is None:
                    self.mux.refuse_stream(event.stream_id, Reason.DENIED,
                                           "this side accepts no streams")
                else:
                    self.spawn(self._open_guarded(self._on_open, event))
            elif isinstance(event, mux.HelloReceived):
                if self.mux.role == "client":   # a launch's gateway tells its timers here
                    self.use_timers(pushed_timers(event.fields, self.mux.timers))
                if not self.hello.done():
                    self.hello.set_result(event.fields)
            elif isinstance(event, mux.GoAwayReceived):
                self.goaway = (event.reason, event.message)
            elif isinstance(event, mux.ConfigReceived):
                self.config = event.config
                self.use_timers(pushed_timers(event.config, self.mux.timers))
            elif isinstance(event, mux.PeerTimedOut):
                self.ended_here = (Reason.TIMED_OUT,
                                   f"nothing received for {event.silent_for:.1f} s")

    def _arm_timer(self) -> None:
        deadline = self.mux.get_timer()
        if deadline is None or (self._timer is not None and self._timer_at <= deadline):
            return   # nothing due, or the armed handle fires first (and re-arms)
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed.is_set():
            return
        self.mux.handle_timer(self._loop.time())
        self._dispatch(self.mux.events_received())
        if self.mux.closed:   # the peer went silent: the codec queued GOAWAY(TIMED_OUT)
            self._end(1001, "timed out")
            return
        self._flush()   # what it queued (a PING, RESETs); re-arms the timer

    def _flush(self) -> None:
        self._flush_scheduled = False
        carrier = self._carrier
        if carrier is None:
            return
        self._arm_timer()
        chunks = self.mux.data_to_send()
        if not chunks:
            return
        start, size, limit = 0, 0, self.max_message
        for index, chunk in enumerate(chunks):
            if size + len(chunk) > limit and index > start:
                carrier.send_message(chunks[start:index])
                start, size = index, 0
            size += len(chunk)
        carrier.send_message(chunks[start:])

    def _end(self, code: int, reason: str) -> None:
        carrier = self._carrier
        self._flush()
        if carrier is not None:
            carrier.close(code, reason[:120])
        self.carrier_closed()
