"""The Portcullis multiplexing codec ("Portcullis mux", version 1), sans I/O.

Many TCP/UDP/ICMP streams share one WebSocket between the client and the gateway. This
module turns bytes from the peer into events, and the application's actions into bytes
to send, exactly like websockets' ``Protocol`` or h11's ``Connection``::

    conn.receive_data(chunk, now)       # bytes in (any split: message boundaries do not matter)
    for event in conn.events_received():
        ...                             # StreamOpened, DataReceived, ...
    transport.writelines(conn.data_to_send())
    call_at(conn.get_timer(), lambda: conn.handle_timer(clock()))   # then events and bytes

Time is an argument, as in aioquic: ``now`` (seconds, any monotonic clock) comes with
``receive_data``, ``handle_timer`` and ``send_datagram``. The codec says when it next
needs the caller (``get_timer``); at that time ``handle_timer`` sends a keep-alive PING
if nothing arrived for ``Timers.keepalive_interval``, ends the connection with
GOAWAY(TIMED_OUT) and ``PeerTimedOut`` if nothing arrived for
``Timers.dead_peer_timeout``, and resets UDP/ICMP streams that carried no datagram for
their idle timeout (``StreamExpired``). Calling it early, or more often, is harmless.

The wire format is specified in ``docs/protocol/mux.md``; the stream state rules are
the ``_TRANSITIONS`` table below, readable at a glance.

This module never does I/O, never awaits, never reads a clock and never logs: the
asyncio shell around it does those. A malformed or forbidden frame from the peer raises
``ProtocolError`` once, queues a GOAWAY(PROTOCOL_ERROR) and leaves the connection dead.
A local misuse (data on a stream that is not open, a CONFIG from a client) raises
``ProtocolError`` (wrong state) or ``ValueError`` (bad argument) and changes nothing.

Zero-copy contract: ``DataReceived.data`` is a memoryview into the chunk given to
``receive_data`` (or into an immutable copy, for a frame split across chunks), and
``send_data`` keeps memoryviews of the caller's objects until they are sent. So: pass
``bytes`` to both and every view stays valid for as long as anyone holds it (handing it
to ``transport.write`` is fine). If you pass a ``bytearray`` or a view of a reused
buffer instead, handle the events before reusing it, and do not mutate what you gave
``send_data`` while ``pending()`` is non-zero.
"""

from __future__ import annotations

import heapq
import json
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, TypeAlias

from portcullis.errors import ProtocolError
from portcullis.proto.credit import MAX_WINDOW, ReceiveCredit, SendCredit
from portcullis.reasons import Reason

__all__ = [
    "FLAG_FIN",
    "HEADER_SIZE",
    "MAX_MESSAGE",
    "VERSION",
    "ConfigReceived",
    "CreditAvailable",
    "DataReceived",
    "DatagramReceived",
    "Event",
    "FrameType",
    "GoAwayReceived",
    "HelloReceived",
    "Limits",
    "MuxConnection",
    "PeerTimedOut",
    "PingReceived",
    "PongReceived",
    "Protocol",
    "Reason",
    "StreamAccepted",
    "StreamEnded",
    "StreamExpired",
    "StreamOpened",
    "StreamRefused",
    "StreamReset",
    "StreamState",
    "Timers",
]

VERSION = 1

# type u8, flags u8, stream_id u32, length u32, network byte order.
_HEADER = struct.Struct("!BBII")
HEADER_SIZE = _HEADER.size
# OPEN payload head: protocol u8, port u16, host_len u8.
_OPEN_HEAD = struct.Struct("!BHB")
_U32 = struct.Struct("!I")

#: The only flag bit of version 1, valid on DATA only.
FLAG_FIN = 0x01

#: Longest message in REFUSE, RESET and GOAWAY, in UTF-8 bytes.
MAX_MESSAGE = 512
_MAX_HOST = 255  # host_len is a u8
_MAX_STREAM_ID = 2**32 - 1
_PING_SIZE = 8
_PING_COUNTER = struct.Struct("!Q")


class FrameType(IntEnum):
    HELLO = 1
    OPEN = 2
    ACCEPT = 3
    REFUSE = 4
    DATA = 5
    WINDOW = 6
    FIN = 7
    RESET = 8
    PING = 9
    PONG = 10
    CONFIG = 11
    GOAWAY = 12
    DATAGRAM = 13


class Protocol(IntEnum):
    """What an OPENed stream carries; the values are the IP protocol numbers."""

    ICMP = 1
    TCP = 6
    UDP = 17


# How the access policy and the relay's allow-list name a Protocol.
ProtocolName = Literal["tcp", "udp", "icmp"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource bounds of one connection. Both ends should use the same values."""

    #: Largest frame payload accepted; outgoing DATA is split into frames of at most this.
    max_frame_payload: int = 256 * 1024
    #: Concurrent streams the *peer* may have opened; an OPEN beyond it is refused.
    max_streams: int = 1024
    #: Credit granted to the peer for each stream, in OPEN or ACCEPT.
    initial_window: int = 4 * 1024 * 1024
    #: Largest payload of HELLO, CONFIG, OPEN, REFUSE, RESET and GOAWAY.
    max_control_payload: int = 64 * 1024
    #: Largest DATAGRAM payload.
    max_datagram: int = 65535

    def __post_init__(self) -> None:
        if not 1 <= self.max_frame_payload <= _MAX_STREAM_ID:
            raise ValueError("max_frame_payload must be between 1 and 2**32-1")
        if self.max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if not 1 <= self.initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be between 1 and {MAX_WINDOW}")
        # OPEN with a 255-byte host and REFUSE with a full message must always fit.
        if self.max_control_payload < 1 + MAX_MESSAGE:
            raise ValueError(f"max_control_payload must be at least {1 + MAX_MESSAGE}")
        if self.max_datagram < 0:
            raise ValueError("max_datagram must not be negative")


@dataclass(frozen=True, slots=True)
class Timers:
    """When a connection pings, gives up on a silent peer, and ends idle datagram
    streams, in seconds. Each end applies its own; the gateway tells the client its
    values (CONFIG or HELLO), so both ends agree."""

    #: Nothing received for this long: send a PING (the peer answers with a PONG).
    keepalive_interval: float = 15.0
    #: Nothing received for this long: the peer is gone; GOAWAY(TIMED_OUT) ends it all.
    dead_peer_timeout: float = 45.0
    #: A UDP or ICMP stream without a datagram either way for this long is reset
    #: (unless ``open_stream``/``accept_stream`` gave it its own timeout).
    datagram_idle_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.keepalive_interval > 0:
            raise ValueError("keepalive_interval must be more than 0")
        if not self.dead_peer_timeout > self.keepalive_interval:
            raise ValueError("dead_peer_timeout must be more than keepalive_interval")
        if not self.datagram_idle_timeout > 0:
            raise ValueError("datagram_idle_timeout must be more than 0")


# --- Events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HelloReceived:
    """The peer's HELLO; ``fields`` includes ``"version": 1``."""

    fields: dict[str, object]


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened a stream; answer with ``accept_stream`` or ``refuse_stream``."""

    stream_id: int
    protocol: Protocol
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamRefused:
    """The peer refused a stream we opened; the stream is gone."""

    stream_id: int
    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes from the peer. ``data`` may be a view into the chunk given to ``receive_data``:
    valid as long as that chunk is not mutated (always, if it was ``bytes``). Call
    ``consumed(stream_id, len(data))`` once the bytes are delivered onward."""

    stream_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream: it sends no more data."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted the stream both ways; the stream is gone."""

    stream_id: int
    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class CreditAvailable:
    """All pending data of the stream was sent: resume reading its source."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the codec has already queued the PONG."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConfigReceived:
    """Configuration pushed by the gateway (received by clients only)."""

    config: dict[str, object]


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is closing the connection; every stream is gone."""

    reason: Reason
    message: str


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerTimedOut:
    """Nothing arrived for ``Timers.dead_peer_timeout``: the codec queued
    GOAWAY(TIMED_OUT) and the connection is closed. Send it, then hang up."""

    silent_for: float


@dataclass(frozen=True, slots=True)
class StreamExpired:
    """A UDP or ICMP stream carried no datagram for its idle timeout: the codec reset
    it (TIMED_OUT, or refused it if it was never answered). Close its socket."""

    stream_id: int
    idle_for: float


Event: TypeAlias = (
    HelloReceived
    | StreamOpened
    | StreamAccepted
    | StreamRefused
    | DataReceived
    | StreamEnded
    | StreamReset
    | CreditAvailable
    | PingReceived
    | PongReceived
    | ConfigReceived
    | GoAwayReceived
    | DatagramReceived
    | PeerTimedOut
    | StreamExpired
)


# --- Stream states -----------------------------------------------------------------


class StreamState(IntEnum):
    IDLE = 0  # only while an OPEN is being applied
    OPEN_SENT = 1  # we sent OPEN, waiting for ACCEPT or REFUSE
    OPEN_RECEIVED = 2  # the peer sent OPEN, the application has not answered yet
    OPEN = 3  # accepted: data flows both ways
    LOCAL_ENDED = 4  # we sent FIN; the peer may still send
    REMOTE_ENDED = 5  # the peer sent FIN; we may still send
    CLOSED = 6  # forgotten at once


class _Side(IntEnum):
    LOCAL = 0  # an action of the application on this side
    REMOTE = 1  # a frame received from the peer


_S = StreamState
_F = FrameType
_LOCAL = _Side.LOCAL
_REMOTE = _Side.REMOTE

# (state, who sends, frame) -> next state. Anything not listed is forbidden: a protocol
# error when the peer does it, a ProtocolError without side effect when we try it.
# FIN means the FIN frame or the FIN flag on DATA (applied after the data).
_TRANSITIONS: dict[tuple[StreamState, _Side, FrameType], StreamState] = {
    # Opening handshake.
    (_S.IDLE, _LOCAL, _F.OPEN): _S.OPEN_SENT,
    (_S.IDLE, _REMOTE, _F.OPEN): _S.OPEN_RECEIVED,
    (_S.OPEN_SENT, _REMOTE, _F.ACCEPT): _S.OPEN,
    (_S.OPEN_SENT, _REMOTE, _F.REFUSE): _S.CLOSED,
    (_S.OPEN_RECEIVED, _LOCAL, _F.ACCEPT): _S.OPEN,
    (_S.OPEN_RECEIVED, _LOCAL, _F.REFUSE): _S.CLOSED,
    # Accepted: both directions open.
    (_S.OPEN, _LOCAL, _F.DATA): _S.OPEN,
    (_S.OPEN, _REMOTE, _F.DATA): _S.OPEN,
    (_S.OPEN, _LOCAL, _F.DATAGRAM): _S.OPEN,
    (_S.OPEN, _REMOTE, _F.DATAGRAM): _S.OPEN,
    (_S.OPEN, _LOCAL, _F.WINDOW): _S.OPEN,
    (_S.OPEN, _REMOTE, _F.WINDOW): _S.OPEN,
    (_S.OPEN, _LOCAL, _F.FIN): _S.LOCAL_ENDED,
    (_S.OPEN, _REMOTE, _F.FIN): _S.REMOTE_ENDED,
    # We half-closed: the peer still sends, we still grant it credit. Its WINDOW frames
    # may have been in flight when our FIN left, so they are accepted (and unused).
    (_S.LOCAL_ENDED, _REMOTE, _F.DATA): _S.LOCAL_ENDED,
    (_S.LOCAL_ENDED, _REMOTE, _F.DATAGRAM): _S.LOCAL_ENDED,
    (_S.LOCAL_ENDED, _LOCAL, _F.WINDOW): _S.LOCAL_ENDED,
    (_S.LOCAL_ENDED, _REMOTE, _F.WINDOW): _S.LOCAL_ENDED,
    (_S.LOCAL_ENDED, _REMOTE, _F.FIN): _S.CLOSED,
    # The peer half-closed: we still send, it still grants us credit.
    (_S.REMOTE_ENDED, _LOCAL, _F.DATA): _S.REMOTE_ENDED,
    (_S.REMOTE_ENDED, _LOCAL, _F.DATAGRAM): _S.REMOTE_ENDED,
    (_S.REMOTE_ENDED, _REMOTE, _F.WINDOW): _S.REMOTE_ENDED,
    (_S.REMOTE_ENDED, _LOCAL, _F.FIN): _S.CLOSED,
    # RESET aborts a live stream from either side, in any state.
    **{
        (state, side, _F.RESET): _S.CLOSED
        for state in (_S.OPEN_SENT, _S.OPEN_RECEIVED, _S.OPEN, _S.LOCAL_ENDED, _S.REMOTE_ENDED)
        for side in _Side
    },
}


def _states_allowing(side: _Side, kind: FrameType) -> frozenset[StreamState]:
    return frozenset(s for (s, who, k) in _TRANSITIONS if who is side and k is kind)


# Derived from the table for the per-frame data path (one set lookup, no tuple).
_REMOTE_DATA_STATES = _states_allowing(_REMOTE, _F.DATA)
_LOCAL_DATA_STATES = _states_allowing(_LOCAL, _F.DATA)
_LOCAL_WINDOW_STATES = _states_allowing(_LOCAL, _F.WINDOW)
_LOCAL_FIN_STATES = _states_allowing(_LOCAL, _F.FIN)

# Frames about the connection itself travel on stream 0; all others on a stream > 0.
_CONNECTION_FRAMES = frozenset({_F.HELLO, _F.PING, _F.PONG, _F.CONFIG, _F.GOAWAY})


class _Stream:
    __slots__ = (
        "expiry_queued",
        "fin_queued",
        "idle_timeout",
        "last_activity",
        "opened_by_peer",
        "pending",
        "pending_bytes",
        "protocol",
        "receive_credit",
        "send_credit",
        "state",
        "stream_id",
    )

    def __init__(
        self,
        stream_id: int,
        protocol: Protocol,
        opened_by_peer: bool,
        send_credit: SendCredit,
        receive_credit: ReceiveCredit,
    ) -> None:
        self.stream_id = stream_id
        self.protocol = protocol
        self.opened_by_peer = opened_by_peer
        self.state = StreamState.IDLE
        self.send_credit = send_credit
        self.receive_credit = receive_credit
        # Data waiting for credit: views of the caller's objects, never copies.
        self.pending: deque[memoryview] = deque()
        self.pending_bytes = 0
        # The application asked for FIN while data was pending: send it after the data.
        self.fin_queued = False
        # Datagram streams only (0 for TCP): when the last datagram (or the ACCEPT)
        # went either way, and how long the stream may stay without one.
        self.last_activity = 0.0
        self.idle_timeout = 0.0
        self.expiry_queued = 0.0  # the stream's one live entry in the expiry heap


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _encode_message(message: str) -> bytes:
    # Messages are informative only: cut at MAX_MESSAGE bytes, on a character boundary,
    # rather than fail an abort path because an error text was long.
    encoded = message.encode("utf-8")
    if len(encoded) > MAX_MESSAGE:
        encoded = encoded[:MAX_MESSAGE].decode("utf-8", "ignore").encode("utf-8")
    return encoded


def _encode_json(fields: Mapping[str, object], limit: int, what: str) -> bytes:
    try:
        encoded = json.dumps(dict(fields), separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} fields cannot be encoded as JSON: {error}") from None
    payload = encoded.encode("utf-8")
    if len(payload) > limit:
        raise ValueError(f"{what} is {len(payload)} bytes, more than the limit of {limit}")
    return payload


def _decode_json_object(payload: memoryview, what: str) -> dict[str, object]:
    try:
        value = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"{what} payload is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} payload is not a JSON object")
    return value


def _decode_reason(payload: memoryview, what: str) -> tuple[Reason, str]:
    try:
        reason = Reason(payload[0])
    except ValueError:
        raise ProtocolError(f"{what} has unknown reason code {payload[0]}") from None
    try:
        message = bytes(payload[1:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} message is not UTF-8") from None
    return reason, message


def _frame(kind: FrameType, stream_id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return _HEADER.pack(kind, flags, stream_id, len(payload)) + payload


class MuxConnection:
    """One end of a mux connection: feed it bytes, take events and bytes to send."""

    def __init__(
        self,
        role: Literal["client", "gateway"],
        limits: Limits = Limits(),
        timers: Timers = Timers(),
    ) -> None:
        if role not in ("client", "gateway"):
            raise ValueError(f"role must be 'client' or 'gateway', not {role!r}")
        self.role: Literal["client", "gateway"] = role
        self.limits = limits
        #: May be replaced at any time (a client applies the values its gateway sends);
        #: the next ``get_timer`` uses them.
        self.timers = timers
        # The clock starts at the first time the caller gives (receive_data or
        # handle_timer): until then there is no timer.
        self._now: float | None = None
        self._last_received = 0.0
        self._last_ping = float("-inf")
        self._ping_counter = 0
        self._round_trip: float | None = None
        # (deadline, stream id) of datagram streams, checked lazily: a deadline that
        # activity has moved is pushed again when it comes up, so a datagram costs one
        # float store, not a heap operation.
        self._expiries: list[tuple[float, int]] = []
        self._streams: dict[int, _Stream] = {}
        # Clients open odd ids, gateways even ids; each side's ids only grow, so an id
        # below the next/highest one that is not in _streams was closed, and frames
        # still in flight for it are ignored instead of remembered one by one.
        self._next_local_id = 1 if role == "client" else 2
        self._peer_parity = 0 if role == "client" else 1
        self._highest_peer_id = 0
        self._peer_stream_count = 0
        self._refused_for_limit = 0
        self._buffer = bytearray()  # the start of a frame split across chunks
        self._events: list[Event] = []
        self._output: list[bytes | memoryview] = []
        # Frames the codec answers on its own (PONG, REFUSE for too many streams) wait
        # here until our HELLO is out, since HELLO must be the first frame we send.
        self._deferred: list[bytes] = []
        self._hello_sent = False
        self._hello_received = False
        self._closed = False
        self._failure: str | None = None
        # Per frame type: (min payload, max payload, allowed flags, handler). Checked
        # from the header alone, before any payload is buffered.
        control = limits.max_control_payload
        reason_max = 1 + MAX_MESSAGE
        self._frame_rules: dict[
            int, tuple[int, int, int, Callable[[int, int, memoryview], None]]
        ] = {
            _F.HELLO: (2, control, 0, self._on_hello),
            _F.OPEN: (8, 8 + _MAX_HOST, 0, self._on_open),
            _F.ACCEPT: (4, 4, 0, self._on_accept),
            _F.REFUSE: (1, reason_max, 0, self._on_refuse),
            _F.DATA: (0, limits.max_frame_payload, FLAG_FIN, self._on_data),
            _F.WINDOW: (4, 4, 0, self._on_window),
            _F.FIN: (0, 0, 0, self._on_fin),
            _F.RESET: (1, reason_max, 0, self._on_reset),
            _F.PING: (_PING_SIZE, _PING_SIZE, 0, self._on_ping),
            _F.PONG: (_PING_SIZE, _PING_SIZE, 0, self._on_pong),
            _F.CONFIG: (2, control, 0, self._on_config),
            _F.GOAWAY: (1, reason_max, 0, self._on_goaway),
            _F.DATAGRAM: (0, limits.max_datagram, 0, self._on_datagram),
        }

    # --- input ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once a GOAWAY was sent or received, or the peer broke the protocol."""
        return self._closed

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Parse every complete frame in ``data`` (plus what was left from before).

        ``now`` is when it arrived: anything from the peer shows it is alive.
        Raises ``ProtocolError`` if the peer broke the protocol; a GOAWAY(PROTOCOL_ERROR)
        is then queued and every later call raises again. Events parsed before the error
        stay queued. After a GOAWAY (sent or received) input is ignored.
        """
        if self._failure is not None:
            raise ProtocolError(f"the mux connection already failed: {self._failure}")
        if self._closed:
            return
        if self._now is None:
            self._start_clock(now)
        self._now = self._last_received = now
        try:
            view: memoryview | None = _byte_view(data)
            if self._buffer and view is not None:
                view = self._complete_buffered_frame(view)
            if view is not None:
                self._parse(view)
        except ProtocolError as error:
            self._fail(str(error))
            raise

    # --- time --------------------------------------------------------------------------

    @property
    def round_trip(self) -> float | None:
        """Seconds from the last answered keep-alive PING to its PONG, if any was."""
        return self._round_trip

    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called, or None (closed, or no time
        given yet). Never later than anything due; it may be earlier (then the call
        does nothing but move the timer)."""
        if self._closed or self._now is None:
            return None
        timers = self.timers
        last = self._last_received
        at = last + timers.dead_peer_timeout
        if self._hello_sent:
            ping_at = (last if last > self._last_ping else self._last_ping) + (
                timers.keepalive_interval
            )
            if ping_at < at:
                at = ping_at
        expiries = self._expiries
        if expiries and expiries[0][0] < at:
            at = expiries[0][0]
        return at

    def handle_timer(self, now: float) -> None:
        """Do what is due at ``now``: a keep-alive PING, the end of a silent connection
        (GOAWAY(TIMED_OUT) and ``PeerTimedOut``), the reset of idle datagram streams
        (``StreamExpired``). Then take events, bytes to send and the next timer."""
        if self._closed:
            return
        if self._now is None:
            self._start_clock(now)
        self._now = now
        timers = self.timers
        # Deadlines are compared as get_timer computes them, so that a call at exactly
        # get_timer() always does what was due (a subtraction may round the other way).
        if now >= self._last_received + timers.dead_peer_timeout:
            silent = now - self._last_received
            message = f"nothing received for {silent:.1f} s".encode()
            self._output.append(_frame(_F.GOAWAY, 0, bytes([Reason.TIMED_OUT]) + message))
            self._close()
            self._events.append(PeerTimedOut(silent))
            return
        if self._hello_sent and now >= max(self._last_received, self._last_ping) + (
            timers.keepalive_interval
        ):
            self._ping_counter += 1
            self._output.append(_frame(_F.PING, 0, _PING_COUNTER.pack(self._ping_counter)))
            self._last_ping = now
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            queued, stream_id = heapq.heappop(expiries)
            stream = self._streams.get(stream_id)
            if stream is None or queued != stream.expiry_queued:
                continue  # closed meanwhile, or superseded by an earlier entry
            due = stream.last_activity + stream.idle_timeout
            if due > now:
                self._queue_expiry(stream, due)
            else:
                self._expire(stream, now - stream.last_activity)

    def _start_clock(self, now: float) -> None:
        self._now = self._last_received = now
        for stream in self._streams.values():  # datagram streams opened before
            if stream.idle_timeout:
                stream.last_activity = now
                self._queue_expiry(stream, now + stream.idle_timeout)

    def _queue_expiry(self, stream: _Stream, deadline: float) -> None:
        stream.expiry_queued = deadline
        heapq.heappush(self._expiries, (deadline, stream.stream_id))

    @staticmethod
    def _check_idle_timeout(protocol: Protocol, idle_timeout: float | None) -> None:
        if idle_timeout is None:
            return
        if protocol is Protocol.TCP:
            raise ValueError("idle_timeout applies to UDP and ICMP streams only")
        if not idle_timeout > 0:
            raise ValueError("idle_timeout must be more than 0")

    def _track_idle(self, stream: _Stream, idle_timeout: float | None) -> None:
        """Start the idle clock of a new datagram stream (a no-op for TCP)."""
        if stream.protocol is Protocol.TCP:
            return
        if idle_timeout is None:
            idle_timeout = self.timers.datagram_idle_timeout
        stream.idle_timeout = idle_timeout
        if self._now is not None:
            stream.last_activity = self._now
            self._queue_expiry(stream, self._now + idle_timeout)

    def _expire(self, stream: _Stream, idle_for: float) -> None:
        payload = bytes([Reason.TIMED_OUT]) + f"idle for {idle_for:.0f} s".encode()
        # A stream the application never answered is refused, any other one reset.
        kind = _F.REFUSE if stream.state is _S.OPEN_RECEIVED else _F.RESET
        self._advance(stream, _LOCAL, kind)
        self._emit_automatic(_frame(kind, stream.stream_id, payload))
        self._events.append(StreamExpired(stream.stream_id, idle_for))

    # --- output ------------------------------------------------------------------------

    def events_received(self) -> list[Event]:
        """Take the events parsed so far, oldest first."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes | memoryview]:
        """Take the chunks to write, in order (for ``writelines`` or one joined message)."""
        output, self._output = self._output, []
        return output

    def _parse(self, view: memoryview) -> None:
        # Fast path: frames are read straight out of the caller's chunk, payloads are
        # views of it; only a trailing partial frame is copied into the buffer.
        unpack = _HEADER.unpack_from
        rules = self._frame_rules
        end = len(view)
        pos = 0
        while end - pos >= HEADER_SIZE:
            kind, flags, stream_id, length = unpack(view, pos)
            handler = self._check_header(rules, kind, flags, length)
            start = pos + HEADER_SIZE
            stop = start + length
            if stop > end:
                break
            self._dispatch(handler, kind, flags, stream_id, view[start:stop])
            pos = stop
            if self._closed:
                return  # GOAWAY received: nothing after it is read
        if pos < end:
            self._buffer += view[pos:]

    def _complete_buffered_frame(self, view: memoryview) -> memoryview | None:
        """Finish the frame started in the buffer; return the rest of ``view``, if any."""
        buffer = self._buffer
        if len(buffer) < HEADER_SIZE:
            take = HEADER_SIZE - len(buffer)
            buffer += view[:take]
            view = view[take:]
            if len(buffer) < HEADER_SIZE:
                return None
            kind, flags, _, length = _HEADER.unpack_from(buffer)
            # Checked as soon as the header is whole, before buffering a huge payload.
            self._check_header(self._frame_rules, kind, flags, length)
        kind, flags, stream_id, length = _HEADER.unpack_from(buffer)
        missing = HEADER_SIZE + length - len(buffer)
        if missing > len(view):
            buffer += view
            return None
        buffer += view[:missing]
        # One copy for a frame that spanned chunks; an immutable copy, so the payload view
        # handed out in DataReceived stays valid while the buffer is reused.
        frame = memoryview(bytes(buffer))
        buffer.clear()
        handler = self._frame_rules[kind][3]
        self._dispatch(handler, kind, flags, stream_id, frame[HEADER_SIZE:])
        if self._closed:
            return None
        return view[missing:]

    def _check_header(
        self,
        rules: dict[int, tuple[int, int, int, Callable[[int, int, memoryview], None]]],
        kind: int,
        flags: int,
        length: int,
    ) -> Callable[[int, int, memoryview], None]:
        rule = rules.get(kind)
        if rule is None:
            raise ProtocolError(f"unknown frame type {kind}")
        low, high, allowed_flags, handler = rule
        if flags & ~allowed_flags:
            raise ProtocolError(f"unknown flags 0x{flags:02x} on {_F(kind).name}")
        if not low <= length <= high:
            raise ProtocolError(
                f"{_F(kind).name} payload of {length} bytes is outside {low}..{high}"
            )
        return handler

    def _dispatch(
        self,
        handler: Callable[[int, int, memoryview], None],
        kind: int,
        flags: int,
        stream_id: int,
        payload: memoryview,
    ) -> None:
        if not self._hello_received and kind != _F.HELLO and kind != _F.GOAWAY:
            raise ProtocolError(f"{_F(kind).name} before HELLO")
        if (stream_id == 0) != (kind in _CONNECTION_FRAMES):
            where = "on stream 0" if stream_id == 0 else f"on stream {stream_id}"
            raise ProtocolError(f"{_F(kind).name} {where}")
        handler(flags, stream_id, payload)

    # --- frame handlers (peer side) ------------------------------------------------

    def _peer_stream(self, stream_id: int, kind: FrameType) -> _Stream | None:
        """The live stream, None if it was closed (ignore the frame), else an error."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            return stream
        if self._was_opened(stream_id):
            return None
        raise ProtocolError(f"{kind.name} on stream {stream_id}, which was never opened")

    def _was_opened(self, stream_id: int) -> bool:
        # Ids of each parity only grow, so any id up to the latest one was opened once.
        if stream_id % 2 == self._peer_parity:
            return 0 < stream_id <= self._highest_peer_id
        return 0 < stream_id < self._next_local_id

    def _advance(self, stream: _Stream, side: _Side, kind: FrameType) -> None:
        next_state = _TRANSITIONS.get((stream.state, side, kind))
        if next_state is None:
            who = "peer sent" if side is _REMOTE else "cannot send"
            raise ProtocolError(
                f"{who} {kind.name} on stream {stream.stream_id} in state {stream.state.name}"
            )
        stream.state = next_state
        if next_state is _S.CLOSED:
            self._forget(stream)

    def _forget(self, stream: _Stream) -> None:
        streams = self._streams
        del streams[stream.stream_id]
        if stream.opened_by_peer:
            self._peer_stream_count -= 1
            self._refused_for_limit = 0
        expiries = self._expiries
        if stream.idle_timeout and len(expiries) > 2 * len(streams) + 64:
            # Entries of ended streams wait for their deadline; many short flows (DNS)
            # would pile them up, so rebuild from the live ones now and then.
            expiries[:] = [
                (s.expiry_queued, s.stream_id) for s in streams.values() if s.idle_timeout
            ]
            heapq.heapify(expiries)

    def _on_hello(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._hello_received:
            raise ProtocolError("second HELLO")
        fields = _decode_json_object(payload, "HELLO")
        version = fields.get("version")
        if type(version) is not int or version != VERSION:
            raise ProtocolError(f"HELLO version {version!r} is not supported (want {VERSION})")
        self._hello_received = True
        self._events.append(HelloReceived(fields))

    def _on_open(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id % 2 != self._peer_parity:
            opener = "gateway" if self.role == "client" else "client"
            raise ProtocolError(f"OPEN on stream {stream_id}: wrong parity for the {opener}")
        if stream_id <= self._highest_peer_id:
            raise ProtocolError(f"OPEN reuses stream {stream_id}")
        protocol_number, port, host_length = _OPEN_HEAD.unpack_from(payload)
        if len(payload) != _OPEN_HEAD.size + host_length + 4:
            raise ProtocolError(f"OPEN payload of {len(payload)} bytes does not match its host")
        try:
            protocol = Protocol(protocol_number)
        except ValueError:
            raise ProtocolError(f"OPEN with unknown protocol {protocol_number}") from None
        try:
            host = bytes(payload[4 : 4 + host_length]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("OPEN host is not UTF-8") from None
        (window,) = _U32.unpack_from(payload, 4 + host_length)
        send_credit = SendCredit(window)  # rejects a window above 2**31-1
        self._highest_peer_id = stream_id
        if self._peer_stream_count >= self.limits.max_streams:
            # Not fatal: the peer may simply be busy. The stream is refused and closed.
            # But a peer that goes on opening as many again while none of its streams
            # ends is flooding, not busy.
            self._refused_for_limit += 1
            if self._refused_for_limit > self.limits.max_streams:
                raise ProtocolError(
                    f"too many streams: {self._refused_for_limit} opened beyond the limit "
                    f"of {self.limits.max_streams} while none ended")
            refusal = bytes([Reason.LIMIT_EXCEEDED]) + b"too many streams"
            self._emit_automatic(_frame(_F.REFUSE, stream_id, refusal))
            return
        stream = _Stream(
            stream_id, protocol, True, send_credit, ReceiveCredit(self.limits.initial_window)
        )
        self._track_idle(stream, None)
        self._advance(stream, _REMOTE, _F.OPEN)
        self._streams[stream_id] = stream
        self._peer_stream_count += 1
        self._events.append(StreamOpened(stream_id, protocol, host, port))

    def _on_accept(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._peer_stream(stream_id, _F.ACCEPT)
        if stream is None:
            return
        (window,) = _U32.unpack_from(payload)
        send_credit = SendCredit(window)
        self._advance(stream, _REMOTE, _F.ACCEPT)
        stream.send_credit = send_credit
        stream.last_activity = self._last_received
        self._events.append(StreamAccepted(stream_id))

    def _on_refuse(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._peer_stream(stream_id, _F.REFUSE)
        if stream is None:
            return
        reason, message = _decode_reason(payload, "REFUSE")
        self._advance(stream, _REMOTE, _F.REFUSE)
        self._events.append(StreamRefused(stream_id, reason, message))

    def _on_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._streams.get(stream_id) or self._peer_stream(stream_id, _F.DATA)
        if stream is None:
            return
        if stream.state not in _REMOTE_DATA_STATES:
            raise ProtocolError(
                f"peer sent DATA on stream {stream_id} in state {stream.state.name}"
            )
        if payload:
            stream.receive_credit.on_received(len(payload))
            self._events.append(DataReceived(stream_id, payload))
        if flags & FLAG_FIN:
            self._on_peer_fin(stream)

    def _on_fin(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._peer_stream(stream_id, _F.FIN)
        if stream is not None:
            self._on_peer_fin(stream)

    def _on_peer_fin(self, stream: _Stream) -> None:
        self._advance(stream, _REMOTE, _F.FIN)
        self._events.append(StreamEnded(stream.stream_id))

    def _on_window(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._peer_stream(stream_id, _F.WINDOW)
        if stream is None:
            return
        (increment,) = _U32.unpack_from(payload)
        self._advance(stream, _REMOTE, _F.WINDOW)
        stream.send_credit.grant(increment)
        if stream.pending_bytes:
            self._send_pending(stream)

    def _on_reset(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._peer_stream(stream_id, _F.RESET)
        if stream is None:
            return
        reason, message = _decode_reason(payload, "RESET")
        self._advance(stream, _REMOTE, _F.RESET)
        self._events.append(StreamReset(stream_id, reason, message))

    def _on_ping(self, flags: int, stream_id: int, payload: memoryview) -> None:
        data = bytes(payload)
        self._emit_automatic(_frame(_F.PONG, 0, data))
        self._events.append(PingReceived(data))

    def _on_pong(self, flags: int, stream_id: int, payload: memoryview) -> None:
        data = bytes(payload)
        if self._ping_counter and data == _PING_COUNTER.pack(self._ping_counter):
            self._round_trip = self._last_received - self._last_ping
        self._events.append(PongReceived(data))

    def _on_config(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self.role == "gateway":
            raise ProtocolError("CONFIG sent by a client")
        self._events.append(ConfigReceived(_decode_json_object(payload, "CONFIG")))

    def _on_goaway(self, flags: int, stream_id: int, payload: memoryview) -> None:
        reason, message = _decode_reason(payload, "GOAWAY")
        self._close()
        self._output.clear()  # the peer reads nothing more: unsent frames are garbage
        self._events.append(GoAwayReceived(reason, message))

    def _on_datagram(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._peer_stream(stream_id, _F.DATAGRAM)
        if stream is None:
            return
        if stream.protocol is Protocol.TCP:
            raise ProtocolError(f"DATAGRAM on {stream.protocol.name} stream {stream_id}")
        self._advance(stream, _REMOTE, _F.DATAGRAM)
        stream.last_activity = self._last_received
        self._events.append(DatagramReceived(stream_id, bytes(payload)))

    # --- actions -------------------------------------------------------------------

    def send_hello(self, fields: Mapping[str, object]) -> None:
        """Send HELLO, the first frame; ``"version": 1`` is added to ``fields``."""
        if self._closed:
            raise ProtocolError("the mux connection is closed")
        if self._hello_sent:
            raise ProtocolError("HELLO was already sent")
        if fields.get("version", VERSION) != VERSION:
            raise ValueError(f"HELLO version must be {VERSION}")
        payload = _encode_json(
            {"version": VERSION, **fields}, self.limits.max_control_payload, "HELLO"
        )
        self._output.append(_frame(_F.HELLO, 0, payload))
        self._hello_sent = True
        self._output.extend(self._deferred)
        self._deferred.clear()

    def open_stream(
        self, protocol: Protocol, host: str, port: int, *, idle_timeout: float | None = None
    ) -> int:
        """Open a stream to ``host``:``port`` ("" = the pinned destination); return its id.

        A UDP or ICMP stream is reset after ``idle_timeout`` seconds without a datagram
        (default ``timers.datagram_idle_timeout``); TCP streams never idle out here.
        """
        self._require_ready()
        protocol = Protocol(protocol)
        self._check_idle_timeout(protocol, idle_timeout)
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} is outside 0..65535")
        encoded_host = host.encode("utf-8")
        if len(encoded_host) > _MAX_HOST:
            raise ValueError(f"host is {len(encoded_host)} bytes, more than {_MAX_HOST}")
        stream_id = self._next_local_id
        if stream_id > _MAX_STREAM_ID:
            raise ProtocolError("stream ids are exhausted: open a new mux connection")
        self._next_local_id += 2
        stream = _Stream(
            stream_id, protocol, False, SendCredit(0), ReceiveCredit(self.limits.initial_window)
        )
        self._track_idle(stream, idle_timeout)
        self._advance(stream, _LOCAL, _F.OPEN)
        self._streams[stream_id] = stream
        payload = (
            _OPEN_HEAD.pack(protocol, port, len(encoded_host))
            + encoded_host
            + _U32.pack(self.limits.initial_window)
        )
        self._output.append(_frame(_F.OPEN, stream_id, payload))
        return stream_id

    def accept_stream(self, stream_id: int, *, idle_timeout: float | None = None) -> None:
        """Accept a stream the peer opened, granting it ``limits.initial_window``.

        ``idle_timeout`` replaces the default idle timeout of a UDP or ICMP stream.
        """
        self._require_ready()
        stream = self._local_stream(stream_id)
        self._check_idle_timeout(stream.protocol, idle_timeout)
        self._advance(stream, _LOCAL, _F.ACCEPT)
        if stream.idle_timeout and self._now is not None:
            stream.last_activity = self._now
            if idle_timeout is not None:
                stream.idle_timeout = idle_timeout
                if self._now + idle_timeout < stream.expiry_queued:
                    self._queue_expiry(stream, self._now + idle_timeout)
        elif idle_timeout is not None and stream.idle_timeout:
            stream.idle_timeout = idle_timeout
        self._output.append(_frame(_F.ACCEPT, stream_id, _U32.pack(self.limits.initial_window)))

    def refuse_stream(self, stream_id: int, reason: Reason, message: str = "") -> None:
        """Refuse a stream the peer opened; it is closed. ``message`` is cut to 512 bytes."""
        self._require_ready()
        stream = self._local_stream(stream_id)
        payload = bytes([Reason(reason)]) + _encode_message(message)
        self._advance(stream, _LOCAL, _F.REFUSE)
        self._output.append(_frame(_F.REFUSE, stream_id, payload))

    def send_data(
        self, stream_id: int, data: bytes | bytearray | memoryview, *, fin: bool = False
    ) -> None:
        """Send ``data`` as far as the peer's credit allows; keep the rest pending.

        Pending data (and a FIN given with it) is sent as WINDOW frames arrive; when it
        is all out, ``CreditAvailable`` is emitted. Do not mutate ``data`` meanwhile.
        """
        self._require_ready()
        stream = self._local_stream(stream_id)
        if stream.fin_queued or stream.state not in _LOCAL_DATA_STATES:
            raise ProtocolError(
                f"cannot send DATA on stream {stream_id} in state {stream.state.name}"
                + (" (FIN already given)" if stream.fin_queued else "")
            )
        view = _byte_view(data)
        if stream.pending_bytes:
            # Keep order: new data goes behind what is already waiting.
            if view:
                stream.pending.append(view)
                stream.pending_bytes += len(view)
            stream.fin_queued = fin
            return
        size = len(view)
        sendable = min(size, stream.send_credit.available)
        if sendable:
            whole = sendable == size
            self._emit_data(stream, view if whole else view[:sendable], fin and whole)
        if sendable < size:
            stream.pending.append(view[sendable:])
            stream.pending_bytes = size - sendable
            stream.fin_queued = fin
        elif fin:
            if not sendable:
                self._output.append(_frame(_F.FIN, stream_id))
            self._advance(stream, _LOCAL, _F.FIN)

    def pending(self, stream_id: int) -> int:
        """Bytes of ``stream_id`` waiting for credit (0 for a closed or unknown stream)."""
        stream = self._streams.get(stream_id)
        return stream.pending_bytes if stream is not None else 0

    def send_fin(self, stream_id: int) -> None:
        """Half-close our direction (after any pending data)."""
        self.send_data(stream_id, b"", fin=True)

    def reset_stream(self, stream_id: int, reason: Reason, message: str = "") -> None:
        """Abort a stream both ways; pending data is dropped.

        A no-op on a stream that is already gone or a closed connection, so abort paths
        need not check first. ``message`` is cut to 512 bytes.
        """
        if self._closed:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            if not self._was_opened(stream_id):
                raise ProtocolError(f"stream {stream_id} was never opened")
            return
        payload = bytes([Reason(reason)]) + _encode_message(message)
        self._advance(stream, _LOCAL, _F.RESET)
        self._output.append(_frame(_F.RESET, stream_id, payload))

    def consumed(self, stream_id: int, n: int) -> None:
        """The application delivered ``n`` received bytes onward: return credit in batches.

        A no-op on a stream that is already gone or a closed connection.
        """
        if self._closed:
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        increment = stream.receive_credit.on_consumed(n)
        # After the peer's FIN no more data comes, so its credit no longer matters.
        if increment and stream.state in _LOCAL_WINDOW_STATES:
            self._output.append(_frame(_F.WINDOW, stream_id, _U32.pack(increment)))

    def is_open(self, stream_id: int) -> bool:
        """Whether the stream exists (opened and not yet closed or reset)."""
        return stream_id in self._streams

    def send_datagram(
        self, stream_id: int, data: bytes | bytearray | memoryview, now: float
    ) -> None:
        """Send one datagram on an accepted UDP or ICMP stream (not flow-controlled);
        ``now`` restarts the stream's idle clock."""
        self._require_ready()
        stream = self._local_stream(stream_id)
        if stream.protocol is Protocol.TCP:
            raise ProtocolError(f"stream {stream_id} is TCP: datagrams need UDP or ICMP")
        view = _byte_view(data)
        if len(view) > self.limits.max_datagram:
            raise ValueError(
                f"datagram of {len(view)} bytes exceeds the limit of {self.limits.max_datagram}"
            )
        self._advance(stream, _LOCAL, _F.DATAGRAM)
        stream.last_activity = now
        self._output.append(_HEADER.pack(_F.DATAGRAM, 0, stream_id, len(view)))
        self._output.append(view)

    def send_ping(self, payload: bytes) -> None:
        """Send PING with an 8-byte opaque payload; the peer answers PONG with it."""
        self._require_ready()
        if len(payload) != _PING_SIZE:
            raise ValueError(f"PING payload must be {_PING_SIZE} bytes, not {len(payload)}")
        self._output.append(_frame(_F.PING, 0, bytes(payload)))

    def send_config(self, config: Mapping[str, object]) -> None:
        """Push configuration to the client (gateway only)."""
        self._require_ready()
        if self.role != "gateway":
            raise ProtocolError("only the gateway may send CONFIG")
        payload = _encode_json(config, self.limits.max_control_payload, "CONFIG")
        self._output.append(_frame(_F.CONFIG, 0, payload))

    def send_goaway(self, reason: Reason, message: str = "") -> None:
        """Close the whole connection: every stream is gone, further input is ignored.

        Allowed before HELLO (to turn a peer away); a no-op once already closed.
        """
        if self._closed:
            return
        payload = bytes([Reason(reason)]) + _encode_message(message)
        self._output.append(_frame(_F.GOAWAY, 0, payload))
        self._close()

    def stream_ids(self) -> list[int]:
        """The ids of the live streams, ascending."""
        return sorted(self._streams)

    # --- internals -------------------------------------------------------------------

    def _require_ready(self) -> None:
        if self._closed:
            raise ProtocolError("the mux connection is closed")
        if not self._hello_sent:
            raise ProtocolError("send_hello() must come first")

    def _local_stream(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise ProtocolError(f"stream {stream_id} is not open")
        return stream

    def _emit_automatic(self, frame: bytes) -> None:
        if self._hello_sent:
            self._output.append(frame)
        else:
            self._deferred.append(frame)

    def _emit_data(self, stream: _Stream, view: memoryview, fin: bool) -> None:
        """Frame ``view`` (non-empty, within credit) as DATA; FIN flag on the last frame."""
        stream.send_credit.consume(len(view))
        output = self._output
        pack = _HEADER.pack
        stream_id = stream.stream_id
        step = self.limits.max_frame_payload
        size = len(view)
        if size <= step:  # the common case: one frame, no slicing
            output.append(pack(_F.DATA, FLAG_FIN if fin else 0, stream_id, size))
            output.append(view)
            return
        for start in range(0, size, step):
            chunk = view[start : start + step]
            last = start + step >= size
            output.append(pack(_F.DATA, FLAG_FIN if fin and last else 0, stream_id, len(chunk)))
            output.append(chunk)

    def _send_pending(self, stream: _Stream) -> None:
        credit = stream.send_credit
        pending = stream.pending
        while pending and credit.available:
            head = pending[0]
            sendable = min(len(head), credit.available)
            if sendable == len(head):
                pending.popleft()
                self._emit_data(stream, head, stream.fin_queued and not pending)
            else:
                pending[0] = head[sendable:]
                self._emit_data(stream, head[:sendable], False)
            stream.pending_bytes -= sendable
        if not pending:
            if stream.fin_queued:
                stream.fin_queued = False
                self._advance(stream, _LOCAL, _F.FIN)  # the flag went on the last frame
            self._events.append(CreditAvailable(stream.stream_id))

    def _close(self) -> None:
        self._closed = True
        self._streams.clear()
        self._expiries.clear()
        self._peer_stream_count = 0
        self._deferred.clear()
        self._buffer.clear()

    def _fail(self, message: str) -> None:
        self._failure = message
        if not self._closed:
            payload = bytes([Reason.PROTOCOL_ERROR]) + _encode_message(message)
            self._output.append(_frame(_F.GOAWAY, 0, payload))
            self._close()
