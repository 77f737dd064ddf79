"""UDP through the VPN tunnel: iperf3 -u through `portcullis connect -U` at increasing
offered rates, reporting the highest rate delivered with less than 1 % loss, next to
the same ladder sent directly on loopback.

iperf3 -u keeps its control connection on TCP and sends its datagrams to the same port
number, so the tunnel gets a -L (TCP) and a -U (UDP) forward on one local port, both to
the iperf3 server. Only if this portcullis has `connect -U`; otherwise the benchmark
says so and measures nothing.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.deployment import Process
from bench.peers import require, start_iperf3_server
from bench.report import Report, Table
from bench.tunnel_setup import (
    free_port_both,
    start_connect,
    start_tunnel_gateway,
    udp_forward_available,
)

RATES_MBIT = (50, 100, 200, 400, 800, 1600, 3200)  # offered, in order; stop at the first lossy
BISECTIONS = 2  # after the first lossy rate, between it and the last clean one
SECONDS = 3  # per rate
DATAGRAM = 1400  # bytes of payload (fits a 1500-byte path MTU)
LOSS_LIMIT = 1.0  # percent
RUN_TIMEOUT = 30.0


@dataclass
class Step:
    offered_mbit: int
    received_mbit: float
    loss_percent: float
    jitter_ms: float
    tunnel_cpu: dict[str, float]

    @property
    def clean(self) -> bool:
        return self.loss_percent < LOSS_LIMIT


def iperf3_udp(port: int, mbit: int) -> tuple[float, float, float]:
    """One iperf3 -u run; returns (received Mbit/s, loss %, jitter ms) as the server saw."""
    result = subprocess.run(
        [require("iperf3"), "-c", "127.0.0.1", "-p", str(port), "-u", "-b", f"{mbit}M",
         "-l", str(DATAGRAM), "-t", str(SECONDS), "-J"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT)
    report = json.loads(result.stdout or "{}")
    if result.returncode != 0 or "error" in report:
        raise RuntimeError(f"iperf3 -u -b {mbit}M on port {port} failed: "
                           f"{report.get('error') or result.stderr.strip()}")
    total = report["end"]["sum"]
    packets = total["packets"] or 1
    received_bits = (packets - total["lost_packets"]) * DATAGRAM * 8
    return (received_bits / total["seconds"] / 1e6, float(total["lost_percent"]),
            float(total["jitter_ms"]))


def step(setup: str, port: int, tunnel: list[Process], mbit: int) -> Step:
    before = {process.name: process.cpu_seconds() for process in tunnel}
    received, loss, jitter = iperf3_udp(port, mbit)
    cpu = {process.name: process.cpu_seconds() - before[process.name] for process in tunnel}
    print(f"  {setup:<12} {mbit:>5} Mbit/s offered: {received:8.1f} received, "
          f"{loss:5.2f} % lost", flush=True)
    return Step(mbit, received, loss, jitter, cpu)


def ladder(setup: str, port: int, tunnel: list[Process]) -> list[Step]:
    """RATES_MBIT in order up to the first lossy rate, then BISECTIONS halvings of the
    gap between the last clean rate and the first lossy one."""
    steps: list[Step] = []
    for mbit in RATES_MBIT:
        steps.append(step(setup, port, tunnel, mbit))
        if not steps[-1].clean:
            break
    else:
        return steps
    clean = max((s.offered_mbit for s in steps if s.clean), default=0)
    lossy = steps[-1].offered_mbit
    for _ in range(BISECTIONS):
        mbit = (clean + lossy) // 2
        if mbit in (clean, lossy):
            break
        steps.append(step(setup, port, tunnel, mbit))
        clean, lossy = (mbit, lossy) if steps[-1].clean else (clean, mbit)
    return steps


def best(steps: list[Step]) -> int:
    clean = [one.offered_mbit for one in steps if one.clean]
    return max(clean) if clean else 0


def run() -> Report:
    if not udp_forward_available():
        print("UDP forward not available yet", flush=True)
        return Report(name="tunnel_udp", tables=[],
                      verdicts=["UDP forward not available yet: `portcullis connect` has "
                                "no -U; skipped"],
                      data={"skipped": "UDP forward not available yet"})
    results: dict[str, list[Step]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-tunnel-udp-") as tmp:
        logs = Path(tmp)
        iperf_port = start_iperf3_server(stack, logs)
        deployment, gateway = start_tunnel_gateway(stack, logs)
        env = deployment.login_cli(logs / "client-home")
        local = free_port_both()
        target = f"127.0.0.1:{iperf_port}"
        connect, _ = start_connect(stack, logs, env, fixed_forwards=[(local, target)],
                                   udp_forwards=[(local, target)])
        results["direct"] = ladder("direct", iperf_port, [])
        results["portcullis"] = ladder("portcullis", local, [connect, gateway])

    rows = [[f"{setup} {one.offered_mbit}M", one.offered_mbit, one.received_mbit,
             one.loss_percent, one.jitter_ms,
             " + ".join(f"{name} {cpu:.1f}s" for name, cpu in one.tunnel_cpu.items()) or "-",
             "yes" if one.clean else "NO"]
            for setup, steps in results.items() for one in steps]
    direct, ours = best(results["direct"]), best(results["portcullis"])
    top = RATES_MBIT[-1]
    verdicts = [f"{setup}: highest offered rate with < {LOSS_LIMIT:g} % loss: {rate} Mbit/s"
                + (" (the ladder's top: the limit is higher)" if rate == top else "")
                for setup, rate in (("direct", direct), ("portcullis", ours))]
    if direct:
        verdicts.append(f"tunnel/direct: {ours / direct:.2f}x")
    return Report(
        name="tunnel_udp",
        tables=[Table(f"iperf3 -u through the tunnel's -U forward, {DATAGRAM}-byte datagrams, "
                      f"{SECONDS} s per rate", [
                          "setup", "offered Mbit/s", "received Mbit/s", "loss %",
                          "jitter ms", "tunnel CPU", f"< {LOSS_LIMIT:g} %"], rows)],
        verdicts=verdicts,
        notes=["loss and jitter as the iperf3 server saw them; each ladder stops at its "
               "first rate with too much loss",
               f"ladder: {', '.join(map(str, RATES_MBIT))} Mbit/s up to the first lossy "
               f"rate, then {BISECTIONS} bisections between it and the last clean rate",
               "received Mbit/s = datagrams that arrived x payload size / run time",
               "iperf3's default socket buffers: direct loopback loses datagrams too at "
               "high rates, so the direct row is the ceiling of this test on this machine"],
        data={setup: [vars(one) for one in steps] for setup, steps in results.items()}
        | {"best_direct_mbit": direct, "best_portcullis_mbit": ours,
           "loss_limit_percent": LOSS_LIMIT})
