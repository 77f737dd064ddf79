"""Every core: HTTPS requests per second that one node answers with 1 and with 2 workers
(`[gateway] workers`), measured by `wrk` against `GET /api/v1/health` (which asks both
stores), on the shared Redis store both ways. Two shapes: keep-alive (HTTP work) and
`Connection: close` (a TLS handshake per request). Rounds are interleaved (1, 2, 1, 2 …)
so that the machine's noise falls on both; the spread of the rounds is printed.

    python -m bench.workers_rate [--rounds 3] [--seconds 10]

Needs wrk and Redis at PORTCULLIS_TEST_REDIS_URL (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import statistics
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.deployment import Deployment

REDIS_URL = os.environ.get("PORTCULLIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SHAPES = {"keep-alive": [], "connection: close": ["-H", "Connection: close"]}


def on_shared_store(root: Path) -> Deployment:
    deployment = Deployment.create(root)
    config = deployment.directory / "portcullis.toml"
    config.write_text(re.sub(r"(?m)^ephemeral = .*$",
                             f'ephemeral = "{REDIS_URL}?prefix=bench-{secrets.token_hex(4)}:"',
                             config.read_text()))
    return deployment


def set_workers(deployment: Deployment, workers: int) -> None:
    config = deployment.directory / "portcullis.toml"
    text = re.sub(r"(?m)^workers = \d+\n", "", config.read_text())
    config.write_text(re.sub(r"(?m)^(\[gateway\]\n)", rf"\1workers = {workers}\n", text))


def requests_per_second(url: str, shape: list[str], seconds: int) -> float:
    result = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", *shape, url],
                            capture_output=True, text=True, timeout=seconds + 30, check=True)
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    if match is None:
        raise RuntimeError(f"wrk said:\n{result.stdout}{result.stderr}")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    options = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed")
    figures: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        deployment = on_shared_store(root)
        for round_number in range(options.rounds):
            for workers in (1, 2):
                set_workers(deployment, workers)
                with ExitStack() as stack:
                    deployment.start(stack, root)
                    for shape, arguments in SHAPES.items():
                        rate = requests_per_second(f"{deployment.url}/api/v1/health",
                                                   arguments, options.seconds)
                        figures.setdefault((shape, workers), []).append(rate)
                        print(f"round {round_number + 1}: {workers} worker(s), {shape}: "
                              f"{rate:.0f} requests/s", flush=True)
    print(f"\ncores: {os.cpu_count()}; wrk -t2 -c32 -d{options.seconds}s, "
          f"{options.rounds} interleaved rounds")
    print("| shape | 1 worker (median, min–max) | 2 workers (median, min–max) | ratio |")
    print("|---|---|---|---|")
    for shape in SHAPES:
        one, two = figures[(shape, 1)], figures[(shape, 2)]
        ratios = sorted(b / a for a, b in zip(one, two, strict=True))
        print(f"| {shape} | {statistics.median(one):.0f} ({min(one):.0f}–{max(one):.0f}) | "
              f"{statistics.median(two):.0f} ({min(two):.0f}–{max(two):.0f}) | "
              f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f}) |")


if __name__ == "__main__":
    main()
