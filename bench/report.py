"""What a benchmark returns: tables to print, verdict lines, and the raw numbers that
go to bench/results/ as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]

    def render(self) -> str:
        cells = [[_cell(value) for value in row] for row in self.rows]
        widths = [max(len(column), *(len(row[i]) for row in cells))
                  for i, column in enumerate(self.columns)]
        # First column (the setup name) left-aligned, numbers right-aligned.
        def line(values: list[str]) -> str:
            return "  ".join(value.ljust(widths[0]) if i == 0 else value.rjust(widths[i])
                             for i, value in enumerate(values))

        rule = "  ".join("-" * width for width in widths)
        return "\n".join([self.title, line(self.columns), rule,
                          *(line(row) for row in cells)])


@dataclass
class Report:
    name: str
    tables: list[Table]
    verdicts: list[str]
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        parts = [table.render() for table in self.tables]
        parts.append("\n".join(self.verdicts))
        if self.notes:
            parts.append("\n".join(f"note: {note}" for note in self.notes))
        return "\n\n".join(parts)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def verdict(label: str, value: float, target: float, unit: str, *,
            higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = "≥" if higher_is_better else "≤"
    return f"{label}: {value:.2f} {unit}   target {sign} {target:g} {unit}   " \
           f"{'MET' if met else 'NOT MET'}"
