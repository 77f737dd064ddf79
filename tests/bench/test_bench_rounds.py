"""The headline benchmark's arithmetic (bench/rounds.py): the interleaved order, median
(min–max), ratios within a round, targets, and RESULTS.md keeping one section per machine."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

# bench/ is a package at the repository root, beside tests/, not an installed one.
sys.path.insert(0, str(Path(__file__).parents[2]))

from bench.rounds import Spread, Target, interleaved, ratios, replace_section


def test_setups_alternate_round_by_round() -> None:
    assert interleaved(["ours", "stunnel"], 3) == [
        (0, "ours"), (0, "stunnel"), (1, "ours"), (1, "stunnel"), (2, "ours"),
        (2, "stunnel")]


def test_no_rounds_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        interleaved(["ours"], 0)


def test_spread_is_median_min_max_without_the_runs_that_measured_nothing() -> None:
    spread = Spread.of([3.0, 1.0, math.nan, 2.0, 10.0])
    assert (spread.median, spread.low, spread.high) == (2.5, 1.0, 10.0)
    assert str(spread) == "2.50 (1.00–10.0)"
    assert str(Spread.of([1234.0])) == "1234"
    assert math.isnan(Spread.of([math.nan]).median)


def test_ratio_is_taken_within_each_round() -> None:
    # Round 2 is slow for both: per-round ratios stay 2, a ratio of medians would not.
    ours, theirs = [4.0, 1.0, 4.2], [2.0, 0.5, 2.1]
    assert Spread.of(ratios(ours, theirs)) == Spread(2.0, 2.0, 2.0)
    assert math.isnan(ratios([1.0], [0.0])[0])
    with pytest.raises(ValueError):
        ratios([1.0, 2.0], [1.0])


def test_target_needs_median_and_worst_round() -> None:
    faster = Target(1.5, worst=1.2)
    assert faster.met(Spread(1.6, 1.25, 2.0))
    assert not faster.met(Spread(1.6, 1.1, 2.0))
    assert not faster.met(Spread(1.4, 1.3, 1.5))
    assert faster.verdict(Spread(math.nan, math.nan, math.nan)) == "NOT MET"
    assert str(faster) == "median ≥ 1.5, min ≥ 1.2"
    cheaper = Target(0.6, higher_is_better=False)
    assert cheaper.met(Spread(0.55, 0.5, 0.9))
    assert cheaper.verdict(Spread(0.7, 0.5, 0.9)) == "NOT MET"
    assert str(cheaper) == "median ≤ 0.6"


def test_results_keep_one_section_per_machine() -> None:
    preamble = "# Benchmark results\n\nThe latest table of each machine.\n"
    first = replace_section("", "CPU A, 2 cores", "table one", preamble=preamble)
    assert first == preamble + "\n## CPU A, 2 cores\n\ntable one\n"
    both = replace_section(first, "CPU B, 8 cores", "table two", preamble=preamble)
    again = replace_section(both, "CPU A, 2 cores", "table three\n", preamble=preamble)
    assert again == (preamble + "\n## CPU A, 2 cores\n\ntable three\n\n"
                     "## CPU B, 8 cores\n\ntable two\n")
    assert replace_section(again, "CPU A, 2 cores", "table three",
                           preamble="ignored") == again
