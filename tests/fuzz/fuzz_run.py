"""Coverage-guided fuzzing of Portcullis's parsers with atheris (libFuzzer for Python).

    python tests/fuzz/fuzz_run.py TARGET [CORPUS_DIR...] [-libFuzzer flags]   # one target
    python tests/fuzz/fuzz_run.py --all --seconds N                          # every target

``--all`` runs each target of ``fuzz_targets.TARGETS`` for N seconds in its own process,
starting from the committed seeds in ``tests/fuzz/corpus/TARGET/``; inputs it finds
interesting go to ``test-artifacts/fuzz/TARGET/corpus/`` (the committed corpus is only
read), and an input that crashes a target is saved there as ``crash-…``, named in the
output. Exit status 1 if any target crashed. ``make fuzz`` runs this with
FUZZ_SECONDS; ``make test`` runs a few seconds per target (``test_fuzz.py``).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
ARTIFACTS = HERE.parent.parent / "test-artifacts" / "fuzz"
# What one fuzzing process may use; more is a finding (an input that makes a parser
# allocate without bound).
MEMORY_LIMIT_MB = 2048


def command(target: str, seconds: float, work: Path) -> list[str]:
    """The command that fuzzes ``target`` for ``seconds``, keeping its finds in ``work``."""
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    # A child starts with its parent's peak RSS (Linux keeps ru_maxrss across fork and
    # exec), and libFuzzer holds that peak against -rss_limit_mb: after a long test run
    # the limit would be spent before the first input. Count the limit from there; each
    # allocation stays bounded by -malloc_limit_mb.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return [sys.executable, str(Path(__file__).resolve()), target,
            str(work / "corpus"), str(CORPUS / target),
            f"-max_total_time={max(1, round(seconds))}", f"-artifact_prefix={work}/",
            "-timeout=10", f"-rss_limit_mb={inherited_mb + MEMORY_LIMIT_MB}",
            f"-malloc_limit_mb={MEMORY_LIMIT_MB}", "-max_len=4096", "-print_final_stats=1"]


def crashes(work: Path) -> list[Path]:
    return sorted(path for pattern in ("crash-*", "timeout-*", "oom-*")
                  for path in work.glob(pattern))


def run_all(names: list[str], seconds: float) -> int:
    failed = []
    for name in names:
        work = ARTIFACTS / name
        started = time.monotonic()
        result = subprocess.run(command(name, seconds, work), capture_output=True, text=True)
        stats = [line for line in result.stderr.splitlines()
                 if line.startswith(("stat::number_of_executed_units", "Done "))]
        print(f"{name}: exit {result.returncode} after {time.monotonic() - started:.1f} s; "
              + "; ".join(stats), flush=True)
        if result.returncode != 0:
            failed.append(name)
            print(result.stderr[-4000:], file=sys.stderr)
            for path in crashes(work):
                print(f"{name}: reproducer {path} (add it to {CORPUS / name} once fixed)",
                      file=sys.stderr)
    return 1 if failed else 0


def fuzz(target: str, argv: list[str]) -> None:
    import atheris

    sys.path.insert(0, str(HERE))
    # Coverage of our parsers and of h11, which parses the HTTP proxy's request head.
    with atheris.instrument_imports(include=["portcullis", "h11"]):
        from fuzz_targets import TARGETS
    atheris.Setup([sys.argv[0], *argv], TARGETS[target])
    atheris.Fuzz()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] != "--all":
        fuzz(sys.argv[1], sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--target", action="append", help="only these targets")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from fuzz_targets import TARGETS

    return run_all(args.target or list(TARGETS), args.seconds)


if __name__ == "__main__":
    sys.exit(main())
