"""The budget of refusal reports the agent sends its hub."""

from __future__ import annotations

from portcullis.shadow.refusals import RefusalBudget


def test_ten_per_address_then_counted_and_summed_up_once_the_window_ends() -> None:
    budget = RefusalBudget(per_address=10, total=100, window=10.0)
    admitted = [budget.admit("192.0.2.1", "console-ca", now=float(i) / 10) for i in range(25)]
    assert admitted == [True] * 10 + [False] * 15
    assert budget.admit("192.0.2.2", "malformed", now=3.0)   # another address: its own
    assert budget.get_timer() == 10.0
    assert budget.summary(9.9) is None
    summary = budget.summary(10.0)
    assert summary is not None
    assert (summary.count, summary.codes, summary.addresses) == (15, {"console-ca": 15}, 1)
    assert summary.code == "console-ca" and "15 more refusals" in summary.reason
    assert budget.summary(10.0) is None and budget.get_timer() is None
    assert budget.admit("192.0.2.1", "console-ca", now=10.5)   # a new window


def test_the_total_bounds_many_addresses() -> None:
    budget = RefusalBudget(per_address=10, total=3, window=10.0)
    admitted = [budget.admit(f"192.0.2.{i}", "malformed", now=0.0) for i in range(5)]
    assert admitted == [True, True, True, False, False]
    summary = budget.summary(10.0)
    assert summary is not None and summary.addresses == 2


def test_nothing_held_means_no_timer_and_no_summary() -> None:
    budget = RefusalBudget()
    assert budget.admit("192.0.2.1", "consent", now=0.0)
    assert budget.get_timer() is None
    assert budget.summary(100.0) is None
