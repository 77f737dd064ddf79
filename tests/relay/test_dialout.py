"""The dial-out connector's reconnect delays: full jitter, bounded, never giving up."""

from __future__ import annotations

from portcullis.relay.dialout import backoff_delay


def test_the_reconnect_delay_is_drawn_up_to_a_doubling_ceiling_capped_at_the_maximum() -> None:
    ceilings = [backoff_delay(attempt, 0.2, 10.0, draw=lambda low, high: high)
                for attempt in range(12)]
    assert ceilings[:4] == [0.2, 0.4, 0.8, 1.6]
    assert ceilings[-1] == 10.0 and max(ceilings) == 10.0
    assert all(backoff_delay(attempt, 0.2, 10.0, draw=lambda low, high: low) == 0.0
               for attempt in range(12))


def test_the_reconnect_delay_stays_finite_after_very_many_attempts() -> None:
    assert 0.0 <= backoff_delay(10_000, 0.2, 10.0) <= 10.0
