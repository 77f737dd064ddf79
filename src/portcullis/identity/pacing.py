"""How long a failed sign-in step takes: long enough that its time tells nothing.

An unknown name, a wrong password and a locked account do different work (a search and a
dummy bind, a search and a bind, a search or nothing at all), and a directory across a
network makes the differences larger than any local hash. So the whole step is
equalised, not its parts: a step that ends in "denied" is answered no earlier than

    target = max(auth.throttle.failure_floor, p90 of the recent steps' own durations)

after it arrived, plus a random 0-20 % of the target. The floor covers a directory that
answers faster than it (the usual case); the running percentile covers one that is slower,
so padding follows the directory instead of leaking once it passes the floor. A step that
takes longer than the target is not shortened (it already looks like the slow ones).

`FailurePacing.delay` is pure (time and randomness are arguments); the login service
measures, asks and sleeps. Never sleeps itself.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# Recent step durations the percentile is taken over (per node: what this node saw).
SAMPLES = 128
PERCENTILE = 0.9
JITTER = 0.2
# However slow the directory became, no failed step is held longer than this.
MAX_TARGET = 10.0


@dataclass(frozen=True)
class Pace:
    target: float                     # the step's floor or recent p90, whichever is larger
    wait: float                       # how long to wait still (0: already long enough)


class FailurePacing:
    def __init__(self, floor: float) -> None:
        self.floor = floor
        self._samples: deque[float] = deque(maxlen=SAMPLES)

    def observe(self, duration: float) -> None:
        """One step's own duration (before any padding), failed or not."""
        self._samples.append(duration)

    def target(self) -> float:
        if not self._samples:
            return min(self.floor, MAX_TARGET)
        ordered = sorted(self._samples)
        high = ordered[min(len(ordered) - 1, math.ceil(PERCENTILE * len(ordered)) - 1)]
        return min(max(self.floor, high), MAX_TARGET)

    def delay(self, elapsed: float, randomness: float) -> Pace:
        """How much longer a failed step that has taken `elapsed` seconds must wait;
        `randomness` is uniform in [0, 1)."""
        target = self.target()
        return Pace(target, max(0.0, target * (1 + JITTER * randomness) - elapsed))
