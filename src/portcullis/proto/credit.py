"""Flow-control credit for one direction of one mux stream (like h2's ``windows.py``).

A mux stream carries data both ways and each way has its own credit: the receiver
grants the sender a number of bytes (in OPEN/ACCEPT, then in WINDOW frames) and the
sender may never have more un-granted bytes in flight. The two halves of that
bookkeeping live here, as plain arithmetic:

* ``SendCredit``: what we may still send. It shrinks as we send and grows with the
  peer's WINDOW increments.
* ``ReceiveCredit``: what the peer may still send us, and when to give credit back.
  Credit is returned only once the application has *delivered* the bytes onward
  (``on_consumed``), and in batches, so a slow consumer slows the sender down and a
  fast one does not cost a WINDOW frame per chunk.

This module never does I/O, never awaits and never reads a clock. A peer's mistake
raises ``ProtocolError``; a caller's mistake (consuming bytes never received, sending
beyond the credit) raises ``ValueError``.
"""

from __future__ import annotations

from portcullis.errors import ProtocolError

#: The largest credit a stream may hold. Kept at 2**31-1 (as in HTTP/2) so that a
#: window always fits a signed 32-bit integer in other implementations.
MAX_WINDOW = 2**31 - 1


class SendCredit:
    """The bytes we may still send on one stream before the peer grants more."""

    __slots__ = ("_available",)

    def __init__(self, initial: int = 0) -> None:
        # The initial value comes from the peer (OPEN or ACCEPT): a bad one is its fault.
        if not 0 <= initial <= MAX_WINDOW:
            raise ProtocolError(f"initial window {initial} is outside 0..{MAX_WINDOW}")
        self._available = initial

    @property
    def available(self) -> int:
        """How many bytes may be sent now."""
        return self._available

    def consume(self, n: int) -> None:
        """Record that ``n`` bytes were sent."""
        if not 0 <= n <= self._available:
            raise ValueError(f"cannot send {n} bytes with a credit of {self._available}")
        self._available -= n

    def grant(self, increment: int) -> None:
        """Add the peer's WINDOW ``increment``; zero or an overflow is a protocol error."""
        if increment <= 0:
            raise ProtocolError("WINDOW increment must be positive")
        if self._available + increment > MAX_WINDOW:
            raise ProtocolError(
                f"WINDOW increment {increment} overflows the credit of {self._available} "
                f"beyond {MAX_WINDOW}"
            )
        self._available += increment

    def __repr__(self) -> str:
        return f"SendCredit(available={self._available})"


class ReceiveCredit:
    """The bytes the peer may still send us on one stream, and when to return credit.

    Invariant: ``window + unconsumed + unannounced == initial``. Credit is only ever
    returned for bytes that were received, so the window never exceeds its initial
    value and can never overflow.
    """

    __slots__ = ("_initial", "_threshold", "_unannounced", "_unconsumed", "_window")

    def __init__(self, initial: int) -> None:
        # The initial value is ours (from Limits), so a bad one is a caller's mistake.
        if not 1 <= initial <= MAX_WINDOW:
            raise ValueError(f"initial window {initial} is outside 1..{MAX_WINDOW}")
        self._initial = initial
        self._window = initial
        # Returning credit once half of it is used keeps the sender busy (it still holds
        # the other half) while costing one WINDOW frame per half window, not per chunk.
        self._threshold = max(1, initial // 2)
        self._unconsumed = 0
        self._unannounced = 0

    @property
    def window(self) -> int:
        """How many bytes the peer may send before it needs more credit."""
        return self._window

    @property
    def initial(self) -> int:
        """The credit granted when the stream was opened or accepted."""
        return self._initial

    @property
    def unconsumed(self) -> int:
        """Bytes received but not yet delivered onward by the application."""
        return self._unconsumed

    def on_received(self, n: int) -> None:
        """Count ``n`` bytes of DATA from the peer; more than its credit is a protocol error."""
        if n > self._window:
            raise ProtocolError(
                f"DATA of {n} bytes exceeds the remaining credit of {self._window} bytes"
            )
        self._window -= n
        self._unconsumed += n

    def on_consumed(self, n: int) -> int:
        """Count ``n`` bytes delivered onward; return the WINDOW increment to send, or 0."""
        if not 0 <= n <= self._unconsumed:
            raise ValueError(
                f"cannot consume {n} bytes: only {self._unconsumed} were received and not "
                "yet consumed"
            )
        self._unconsumed -= n
        self._unannounced += n
        if self._unannounced < self._threshold:
            return 0
        increment = self._unannounced
        self._unannounced = 0
        self._window += increment
        return increment

    def __repr__(self) -> str:
        return (
            f"ReceiveCredit(window={self._window}, unconsumed={self._unconsumed}, "
            f"unannounced={self._unannounced})"
        )
