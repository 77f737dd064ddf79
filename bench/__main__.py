"""`python -m bench [NAME ...]`: run the benchmarks (all, or those named), print a table
per benchmark with its ratios and target, and write every number to
bench/results/bench-<time>.json. `python -m bench performance` (what `make bench` runs)
is the headline: every shape against stunnel in interleaved rounds, one table, kept in
bench/RESULTS.md; "all" is the single benchmarks, without it."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import (
    double_hop,
    federation,
    idle_memory,
    idle_tls,
    launch_rate,
    login_rate,
    performance,
    revocation,
    shadow,
    soak,
    throughput,
    tunnel_carriers,
    tunnel_memory,
    tunnel_stream_rate,
    tunnel_throughput,
    tunnel_udp,
    webproxy,
)
from bench.report import Report, machine

BENCHMARKS: dict[str, Callable[[], Report]] = {
    "throughput": throughput.run,
    "launch_rate": launch_rate.run,
    "login_rate": login_rate.run,
    "idle_memory": idle_memory.run,
    "idle_tls": idle_tls.run,
    "tunnel_throughput": tunnel_throughput.run,
    "tunnel_carriers": tunnel_carriers.run,
    "tunnel_udp": tunnel_udp.run,
    "tunnel_stream_rate": tunnel_stream_rate.run,
    "tunnel_memory": tunnel_memory.run,
    "revocation": revocation.run,
    "double_hop": double_hop.run,
    "federation": federation.run,
    "shadow": shadow.run,
    "webproxy": webproxy.run,
    "performance": performance.run,
    "soak": soak.run,
    "tunnel_scale": soak.run_scale,
}
# Run only when named: the headline (`make bench`) runs the others' shapes again, and the
# soak and scale runs take minutes at full size (`make soak`).
ON_REQUEST = {"performance", "soak", "tunnel_scale"}
RESULTS = Path(__file__).parent / "results"
OPEN_FILES = 16384  # idle_memory holds ~3 sockets per connection in client + gateway


def raise_open_file_limit() -> None:
    """Before any subprocess starts, so `portcullis up` inherits the limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="benchmarks to run (default: all but "
                             f"{', '.join(sorted(ON_REQUEST))}): {', '.join(BENCHMARKS)}")
    names = parser.parse_args().names or [name for name in BENCHMARKS
                                          if name not in ON_REQUEST]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from "
                     f"{', '.join(BENCHMARKS)}")
    raise_open_file_limit()
    benchmarks: dict[str, object] = {}
    measured = machine()
    results = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": measured,
               "benchmarks": benchmarks}
    print(f"measuring portcullis from {measured['portcullis_source']} "
          f"(git {measured['git']}, src modified: {measured['src_modified']})")
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            report = BENCHMARKS[name]()
        except Exception as exc:
            traceback.print_exc()
            failed.append(name)
            benchmarks[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        print(report.render(), flush=True)
        print(f"({time.monotonic() - started:.0f} s)", flush=True)
        benchmarks[name] = {**report.data, "verdicts": report.verdicts}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults: {path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
