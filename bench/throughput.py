"""Throughput of one TCP connection, measured by iperf3 (≥ 1 GiB each way) in three
setups side by side: direct on loopback, through an stunnel client/server pair (TLS 1.3,
the baseline), and through `portcullis launch` → `portcullis up` → iperf3 server.

Every setup reaches the same iperf3 server; "reverse" is iperf3 -R (server sends).
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.deployment import Deployment, Process
from bench.peers import (
    require,
    start_iperf3_server,
    start_stunnel_pair,
)
from bench.report import Report, Table, verdict

BYTES = "2G"  # per run, through one connection (iperf3 -n)
RUN_TIMEOUT = 120.0  # seconds; at 0.2 Gbit/s 2 GiB would take 86 s
TARGET = 1.0  # portcullis / stunnel
DIRECTIONS = {"forward": [], "reverse": ["-R"]}


@dataclass
class Measurement:
    setup: str
    direction: str
    gbits: float
    gib: float
    seconds: float
    tunnel_cpu: dict[str, float]  # CPU seconds of each tunnel process during the run

    def as_json(self) -> dict[str, object]:
        return {"gbit_per_s": self.gbits, "gib": self.gib, "seconds": self.seconds,
                "tunnel_cpu_s": self.tunnel_cpu}


@dataclass
class Carried:
    """One iperf3 run (of one client, or of several side by side) through a path."""

    gbits: float  # as received, all clients together
    gib: float
    seconds: float
    cpu: dict[str, float]  # role -> CPU seconds of that process (tree) during the run

    def cpu_per_gib(self) -> dict[str, float]:
        return {role: seconds / self.gib if self.gib else math.nan
                for role, seconds in self.cpu.items()}


def iperf3(ports: Sequence[int], extra: list[str], *, size: str = BYTES,
           timeout: float = RUN_TIMEOUT) -> tuple[float, float, float]:
    """One iperf3 client run of `size` bytes (iperf3 -n) to each port in `ports`, all at
    once; returns (Gbit/s, GiB, seconds) as received, summed over the clients: the bytes
    of all of them over the longest one's time."""
    clients = [subprocess.Popen(
        [require("iperf3"), "-c", "127.0.0.1", "-p", str(port), "-n", size, "-J", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for port in ports]
    deadline = time.monotonic() + timeout
    received: list[dict[str, float]] = []
    try:
        for port, client in zip(ports, clients, strict=True):
            out, err = client.communicate(timeout=max(0.1, deadline - time.monotonic()))
            report = json.loads(out or "{}")
            if client.returncode != 0 or "error" in report:
                raise RuntimeError(f"iperf3 {' '.join(extra)} on port {port} failed: "
                                   f"{report.get('error') or err.strip()}")
            received.append(report["end"]["sum_received"])
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait(10)
    total = sum(one["bytes"] for one in received)
    seconds = max(one["seconds"] for one in received)
    return total * 8 / seconds / 1e9, total / 2**30, seconds


def carry(ports: Sequence[int], extra: list[str], path: dict[str, Process], *,
          size: str = BYTES, timeout: float = RUN_TIMEOUT) -> Carried:
    """iperf3 through `ports` (see iperf3), with the CPU seconds each process of `path`
    (role -> process, the tunnel's ends) spent meanwhile. iperf3's own CPU is not in it."""
    before = {role: process.cpu_seconds() for role, process in path.items()}
    gbits, gib, seconds = iperf3(ports, extra, size=size, timeout=timeout)
    cpu = {role: process.cpu_seconds() - before[role] for role, process in path.items()}
    return Carried(gbits, gib, seconds, cpu)


def measure(setup: str, direction: str, port: int, tunnel: list[Process]) -> Measurement:
    carried = carry([port], DIRECTIONS[direction], {process.name: process for process in tunnel})
    print(f"  {setup:<12} {direction:<8} {carried.gbits:6.2f} Gbit/s", flush=True)
    return Measurement(setup, direction, carried.gbits, carried.gib, carried.seconds,
                       carried.cpu)


def run() -> Report:
    results: list[Measurement] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        logs = Path(tmp)
        iperf_port = start_iperf3_server(stack, logs)

        deployment = Deployment.create(logs)
        deployment.add_resource("iperf", "iperf3", f"127.0.0.1:{iperf_port}")
        gateway = deployment.start(stack, logs)
        env = deployment.login_cli(logs / "client-home")
        launch, launch_port = deployment.start_launch(stack, logs, env, "iperf")

        cert, key = deployment.server_cert
        pair = start_stunnel_pair(stack, logs, target_port=iperf_port, cert=cert, key=key,
                                  ca=deployment.ca)

        setups = {"direct": (iperf_port, []),
                  "stunnel": (pair.port, [pair.client, pair.server]),
                  "portcullis": (launch_port, [launch, gateway])}
        for direction in DIRECTIONS:
            for setup, (port, tunnel) in setups.items():
                results.append(measure(setup, direction, port, tunnel))

    by_key = {(m.setup, m.direction): m for m in results}
    rows = []
    verdicts = []
    data: dict[str, object] = {"bytes_per_run": BYTES, "target_ratio_to_stunnel": TARGET}
    for direction in DIRECTIONS:
        ours = by_key["portcullis", direction].gbits
        stunnel = by_key["stunnel", direction].gbits
        direct = by_key["direct", direction].gbits
        to_stunnel = ours / stunnel if stunnel else math.nan
        to_direct = ours / direct if direct else math.nan
        for setup in ("direct", "stunnel", "portcullis"):
            m = by_key[setup, direction]
            rows.append([f"{setup} {direction}", m.gbits, m.gib, m.seconds,
                         " + ".join(f"{name} {cpu:.1f}s" for name, cpu in m.tunnel_cpu.items())
                         or "-",
                         m.gbits / stunnel if stunnel else math.nan,
                         m.gbits / direct if direct else math.nan])
            data[f"{setup}_{direction}"] = m.as_json()
        data[f"ratio_portcullis_stunnel_{direction}"] = to_stunnel
        data[f"ratio_portcullis_direct_{direction}"] = to_direct
        verdicts.append(f"{direction}: portcullis/direct {to_direct:.2f}x")
        verdicts.append(verdict(f"{direction}: portcullis/stunnel", to_stunnel, TARGET, "x"))
    return Report(
        name="throughput",
        tables=[Table(f"iperf3, one TCP connection, {BYTES}B per run", [
            "setup", "Gbit/s", "GiB", "seconds", "tunnel CPU", "x stunnel", "x direct"],
            rows)],
        verdicts=verdicts,
        notes=["tunnel CPU = CPU seconds of each tunnel process during the run "
               "(iperf3's own CPU not included)",
               "all processes share the machine's cores: iperf3 client and server, both "
               "tunnel ends"],
        data=data)
