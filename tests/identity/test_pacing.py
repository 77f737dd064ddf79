"""The pacing of failed sign-in steps, as a pure decision: how long a denial still waits."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.identity.pacing import JITTER, MAX_TARGET, FailurePacing


def test_a_fast_directory_is_padded_to_the_floor() -> None:
    pacing = FailurePacing(0.5)
    for duration in (0.004, 0.05, 0.065) * 20:
        pacing.observe(duration)
    assert pacing.target() == 0.5
    # A locked account refused in 4 ms and a wrong password that took 65 ms both end at
    # the floor (jitter aside).
    assert pacing.delay(0.004, 0.0).wait == pytest.approx(0.496)
    assert pacing.delay(0.065, 0.0).wait == pytest.approx(0.435)


def test_a_slow_directory_raises_the_target_to_its_90th_percentile() -> None:
    pacing = FailurePacing(0.1)
    for index in range(100):
        pacing.observe(0.2 + index / 100)          # 0.20 … 1.19 s
    assert pacing.target() == pytest.approx(1.09)
    # The fast path (a locked account) is held as long as most real binds.
    assert pacing.delay(0.003, 0.0).wait == pytest.approx(1.087)


def test_the_target_is_capped() -> None:
    pacing = FailurePacing(0.5)
    for _ in range(50):
        pacing.observe(60.0)
    assert pacing.target() == MAX_TARGET


@given(floor=st.floats(0, 10), samples=st.lists(st.floats(0, 100), max_size=200),
       elapsed=st.floats(0, 100), randomness=st.floats(0, 1, exclude_max=True))
def test_a_denial_ends_between_the_target_and_its_jitter_or_when_it_already_has(
        floor: float, samples: list[float], elapsed: float, randomness: float) -> None:
    pacing = FailurePacing(floor)
    for sample in samples:
        pacing.observe(sample)
    pace = pacing.delay(elapsed, randomness)
    assert pace.wait >= 0
    assert min(floor, MAX_TARGET) <= pace.target <= MAX_TARGET
    if pace.wait > 0:
        ends = elapsed + pace.wait
        assert pace.target <= ends + 1e-9 and ends <= pace.target * (1 + JITTER) + 1e-9
