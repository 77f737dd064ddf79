"""The arithmetic of interleaved rounds, with no I/O: the order the setups run in, a
figure summarised over rounds as median (min–max), a ratio taken within each round, a
target checked against such a summary, and bench/RESULTS.md kept as one section per
machine. bench.performance and bench.double_hop measure; this module only counts."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def interleaved(setups: Sequence[str], rounds: int) -> list[tuple[int, str]]:
    """(round, setup) in the order they run: every setup once per round, then the next
    round, so that a slow moment of a shared machine lands on every setup alike
    (ours, stunnel, ours, stunnel, … rather than all of ours, then all of stunnel)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, not {rounds}")
    return [(number, setup) for number in range(rounds) for setup in setups]


@dataclass(frozen=True)
class Spread:
    """A figure over the rounds: its median, and the lowest and highest round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """NaN rounds (a run that measured nothing) are left out, not counted as zero."""
        kept = [value for value in values if not math.isnan(value)]
        if not kept:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.median(kept), min(kept), max(kept))

    def __str__(self) -> str:
        median, low, high = map(number, (self.median, self.low, self.high))
        return median if low == high else f"{median} ({low}–{high})"

    def as_json(self) -> dict[str, float]:
        return {"median": self.median, "min": self.low, "max": self.high}


def number(value: float) -> str:
    """Three significant figures or so: 4321, 432, 43.2, 4.32, 0.43."""
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio(value: float, base: float) -> float:
    return value / base if base else math.nan


def ratios(values: Sequence[float], bases: Sequence[float]) -> list[float]:
    """value / base round by round (the two lists are in round order)."""
    if len(values) != len(bases):
        raise ValueError(f"{len(values)} rounds against {len(bases)}")
    return [ratio(value, base) for value, base in zip(values, bases, strict=True)]


@dataclass(frozen=True)
class Target:
    """A target of issue 15 on a spread: its median at least (or at most) `median`, and,
    if `worst` is set, its worst round too (the lowest when higher is better)."""

    median: float
    worst: float | None = None
    higher_is_better: bool = True

    def met(self, spread: Spread) -> bool:
        if math.isnan(spread.median):
            return False
        if self.higher_is_better:
            return spread.median >= self.median and (
                self.worst is None or spread.low >= self.worst)
        return spread.median <= self.median and (
            self.worst is None or spread.high <= self.worst)

    def __str__(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        text = f"median {sign} {self.median:g}"
        if self.worst is not None:
            text += f", {'min' if self.higher_is_better else 'max'} {sign} {self.worst:g}"
        return text

    def verdict(self, spread: Spread) -> str:
        return "MET" if self.met(spread) else "NOT MET"


def replace_section(document: str, key: str, body: str, *, preamble: str) -> str:
    """`document` (a RESULTS.md) with the section "## KEY" replaced by `body`, or added
    at the end if there is none; the other machines' sections stay as they were. An
    empty document starts with `preamble`."""
    if "\n## " not in "\n" + document:
        document = preamble.rstrip("\n") + "\n"
    heading = f"## {key}"
    sections = re.split(r"(?m)^(?=## )", document)
    head, machines = sections[0], sections[1:]
    section = f"{heading}\n\n{body.strip()}\n\n"
    for index, existing in enumerate(machines):
        if existing.split("\n", 1)[0].strip() == heading:
            machines[index] = section
            break
    else:
        machines.append(section)
    if not head.endswith("\n\n"):
        head = head.rstrip("\n") + "\n\n"
    return (head + "".join(machines)).rstrip("\n") + "\n"
