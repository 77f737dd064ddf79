"""The fuzz targets as tests: every committed corpus input (seeds, and inputs that once
crashed a parser) passes its target, and a bounded atheris run of each target finds
nothing new (PORTCULLIS_FUZZ_SECONDS per target, default 2; `make fuzz` runs longer)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fuzz_run
from fuzz_targets import TARGETS

from peers.missing import missing_peer

SECONDS = float(os.environ.get("PORTCULLIS_FUZZ_SECONDS", "2"))
CORPUS_FILES = sorted(path for path in fuzz_run.CORPUS.glob("*/*") if path.is_file())


def test_every_target_has_a_committed_seed_corpus() -> None:
    for name in TARGETS:
        assert any((fuzz_run.CORPUS / name).glob("seed-*")), name


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_corpus_input_is_handled_by_its_parser_as_specified(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("name", list(TARGETS))
def test_a_bounded_fuzzing_run_finds_no_crash(name: str, tmp_path: Path) -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        missing_peer("atheris is not installed (pip install -e '.[test]')")
    work = tmp_path / name
    result = subprocess.run(fuzz_run.command(name, SECONDS, work), capture_output=True, text=True,
                            timeout=SECONDS + 60)
    found = fuzz_run.crashes(work)
    if found:
        # Keep the reproducer where a developer (or CI's artifacts) will find it.
        saved = fuzz_run.ARTIFACTS / name
        saved.mkdir(parents=True, exist_ok=True)
        for path in found:
            (saved / path.name).write_bytes(path.read_bytes())
    assert result.returncode == 0 and not found, (
        f"{name} crashed; reproducer saved in {fuzz_run.ARTIFACTS / name}:\n"
        f"{result.stderr[-3000:]}")
    executed = [line for line in result.stderr.splitlines()
                if line.startswith("stat::number_of_executed_units")]
    print(f"{name}: {executed[0] if executed else 'no stats'} in {SECONDS:.0f} s")
    assert executed and int(executed[0].split(":")[-1]) > 0
