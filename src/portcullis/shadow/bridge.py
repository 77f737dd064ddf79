"""A bidirectional byte relay between two connected asyncio transports.

The shadow channel ends in two transports (the TLS connection between the proxies and
the plain connection to a VNC program); once the channel is up the bridge takes both
over (`transport.set_protocol`) and copies bytes as they come, with back-pressure each
way: when one side's write buffer is full (its protocol's `pause_writing`), the other
side stops reading until it drains (`resume_writing`). Either side ending (EOF, close,
loss) ends both, after what is queued for the surviving side is flushed.

It never copies a chunk (the bytes a transport hands over are written as they are),
never parses them, and never logs per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

# A side that never reads what is queued for it would keep a closing connection (and
# its buffer) forever: after this long it is aborted.
DEFAULT_LINGER = 30.0


@dataclass(frozen=True)
class BridgeResult:
    """What crossed the bridge, and which side ended it first ("first" / "second")."""

    first_to_second: int
    second_to_first: int
    ended_by: str
    error: str | None


class _Side(asyncio.Protocol):
    """The protocol of one transport while bridged: feeds the other side."""

    def __init__(self, bridge: Bridge, name: str, transport: asyncio.Transport) -> None:
        self.bridge = bridge
        self.name = name
        self.transport = transport
        self.peer: _Side   # set by the bridge once both sides exist
        self.received = 0
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        # No half-close: a VNC session is over when either program stops sending, and
        # TLS in asyncio cannot half-close anyway. False: the transport closes itself.
        self.bridge.side_ended(self, None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.bridge.side_ended(self, exc)
        self.bridge.side_lost()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class Bridge:
    """Relay between `first` and `second` (connected transports) until either ends.

    `first_pending` are bytes already read from `first` (by the code that set up the
    channel) that go to `second` before anything else; `second_pending` likewise. Both
    transports may be paused when handed over: the bridge resumes their reading.
    `closed` resolves (and `on_closed` is called) once both connections are gone.
    """

    def __init__(self, first: asyncio.Transport, second: asyncio.Transport, *,
                 first_pending: bytes = b"", second_pending: bytes = b"",
                 on_closed: Callable[[BridgeResult], None] | None = None,
                 linger: float = DEFAULT_LINGER) -> None:
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[BridgeResult] = loop.create_future()
        self._on_closed = on_closed
        self._linger = linger
        self._linger_timer: asyncio.TimerHandle | None = None
        self._ended_by: str | None = None
        self._error: str | None = None
        self._first = _Side(self, "first", first)
        self._second = _Side(self, "second", second)
        self._first.peer, self._second.peer = self._second, self._first
        self._first.received = len(first_pending)
        self._second.received = len(second_pending)
        for side in (self._first, self._second):
            side.transport.set_protocol(side)
            if side.transport.is_closing():
                # Gone before it was handed over: its connection_lost went elsewhere.
                side.lost = True
        if first_pending:
            second.write(first_pending)
        if second_pending:
            first.write(second_pending)
        for side in (self._first, self._second):
            if side.lost:
                self.side_ended(side, None)
        self.side_lost()
        if self._ended_by is None:
            for side in (self._first, self._second):
                # Written pending bytes may already have paused the peer's reading.
                if side.peer.transport.get_write_buffer_size() <= \
                        side.peer.transport.get_write_buffer_limits()[1]:
                    side.transport.resume_reading()

    @property
    def first_to_second(self) -> int:
        return self._first.received

    @property
    def second_to_first(self) -> int:
        return self._second.received

    def close(self, reason: str | None = None, *, linger: float | None = None) -> None:
        """End both sides: what is queued is still written, for at most `linger` s
        (default: the bridge's). An ending the hub orders uses a short one: a peer that
        does not read (or answer TLS's close_notify) must not keep the channel open."""
        self.side_ended(self._first, None, reason=reason or "closed", linger=linger)

    def side_ended(self, side: _Side, exc: Exception | None, *, reason: str | None = None,
                   linger: float | None = None) -> None:
        if self._ended_by is None:
            self._ended_by = side.name
            self._error = reason or (str(exc) or type(exc).__name__ if exc else None)
            loop = asyncio.get_running_loop()
            self._linger_timer = loop.call_later(
                self._linger if linger is None else linger, self._abort)
        for each in (self._first, self._second):
            if not each.transport.is_closing():
                each.transport.close()

    def side_lost(self) -> None:
        if not (self._first.lost and self._second.lost) or self.closed.done():
            return
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        result = BridgeResult(self._first.received, self._second.received,
                              self._ended_by or "first", self._error)
        self.closed.set_result(result)
        if self._on_closed is not None:
            self._on_closed(result)

    def _abort(self) -> None:
        for side in (self._first, self._second):
            if not side.lost:
                side.transport.abort()
