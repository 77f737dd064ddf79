"""How long a connection that keeps itself up (a relay or a shadow agent dialling out)
waits before its next attempt: full jitter, so that after a restart the peers that lost
their connections together do not all come back at the same moment."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(attempt: int, low: float, high: float,
                  draw: Callable[[float, float], float] = random.uniform) -> float:
    """Full jitter: uniform over [0, min(high, low * 2^attempt)]."""
    return draw(0.0, min(high, low * 2 ** min(attempt, 32)))
