"""How many of the agent's own refusals it tells the hub, one by one.

The agent reports every refusal it decides itself to the hub (which audits it). Anyone
who can reach the device proxy can cause refusals (bad TLS costs them nothing), so the
reports are budgeted: at most `per_address` per address and `total` in all per window of
`window` seconds; the rest are counted, and once the window is over the agent sends one
summary of them.

Counting only: time is an argument, no I/O, no clock (the agent asks `get_timer()` when
to call `summary()`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

PER_ADDRESS = 10
TOTAL = 100
WINDOW = 10.0


@dataclass(frozen=True)
class RefusalSummary:
    """The refusals of one window that were not reported one by one."""

    count: int
    codes: dict[str, int]
    addresses: int             # how many peer addresses they came from
    example_address: str       # one of them, for the report's "client"

    @property
    def code(self) -> str:
        """The most frequent code (a report carries one)."""
        return max(self.codes.items(), key=lambda item: (item[1], item[0]))[0]

    @property
    def reason(self) -> str:
        codes = ", ".join(f"{code} x{count}" for code, count in sorted(self.codes.items()))
        return (f"{self.count} more refusals from {self.addresses} address(es) were not "
                f"reported one by one (at most {PER_ADDRESS} per address per {WINDOW:g} s): "
                f"{codes}")


class RefusalBudget:
    """Which refusals to report; the others counted per fixed window."""

    def __init__(self, per_address: int = PER_ADDRESS, total: int = TOTAL,
                 window: float = WINDOW) -> None:
        self.per_address = per_address
        self.total = total
        self.window = window
        self._window_end: float | None = None
        self._reported = 0
        self._by_address: Counter[str] = Counter()
        self._held: Counter[str] = Counter()           # code -> count not reported
        self._held_addresses: set[str] = set()
        self._held_example = ""
        self._ended: RefusalSummary | None = None

    def admit(self, address: str, code: str, now: float) -> bool:
        """True: report this refusal now. False: it is counted for the summary."""
        self._roll(now)
        if self._window_end is None:
            self._window_end = now + self.window
        if self._reported < self.total and self._by_address[address] < self.per_address:
            self._reported += 1
            self._by_address[address] += 1
            return True
        self._held[code] += 1
        # Bounded: an address set as large as a flood would be memory for the attacker.
        if len(self._held_addresses) < 10_000:
            self._held_addresses.add(address)
        self._held_example = self._held_example or address
        return False

    def get_timer(self) -> float | None:
        """When `summary` has something to give (the end of a window with held refusals)."""
        if self._ended is not None:
            return 0.0   # due already
        return self._window_end if self._held else None

    def summary(self, now: float) -> RefusalSummary | None:
        """The held refusals of the window that ended by `now`, once."""
        self._roll(now)
        ended, self._ended = self._ended, None
        return ended

    def _roll(self, now: float) -> None:
        if self._window_end is None or now < self._window_end:
            return
        if self._held:
            codes = Counter(self._held)
            addresses = len(self._held_addresses)
            if self._ended is not None:   # not taken yet: one summary for both windows
                codes.update(self._ended.codes)
                addresses += self._ended.addresses
            self._ended = RefusalSummary(sum(codes.values()), dict(codes), addresses,
                                         self._held_example)
        self._window_end = None
        self._reported = 0
        self._by_address.clear()
        self._held.clear()
        self._held_addresses.clear()
        self._held_example = ""
