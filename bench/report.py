"""What a benchmark returns: tables to print, verdict lines, and the raw numbers that
go to bench/results/ as JSON."""

from __future__ import annotations

import os
import platform
import re
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
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


def machine() -> dict[str, object]:
    """Where the numbers come from: cores, CPU model, kernel, OpenSSL (Python's and
    stunnel's), Python, and which portcullis source was measured (PYTHONPATH may point at
    a snapshot instead of the working tree), at which commit."""
    import portcullis
    from bench.peers import require

    repo = Path(__file__).parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=repo).stdout.strip()

    with open("/proc/cpuinfo") as handle:
        model = re.search(r"(?m)^model name\s*:\s*(.+)$", handle.read())
    version = subprocess.run([require("stunnel4", "stunnel"), "-version"],
                             capture_output=True, text=True, timeout=30)
    stunnel = re.search(r"Running\s+with (OpenSSL \S+)", version.stdout + version.stderr)
    source = Path(portcullis.__file__).parent
    in_tree = source.is_relative_to(repo / "src")
    return {"cores": os.cpu_count(), "cpu": model.group(1).strip() if model else "unknown",
            "kernel": platform.release(), "openssl": ssl.OPENSSL_VERSION,
            "stunnel_openssl": stunnel.group(1) if stunnel else "unknown",
            "python": platform.python_version(), "platform": platform.platform(),
            "git": git("rev-parse", "--short", "HEAD"),
            "portcullis_source": str(source),
            "src_modified": bool(git("status", "--porcelain", "src")) if in_tree else None}
