"""Throughput of the VPN tunnel, measured by iperf3 (2 GiB per run, each way) in three
setups side by side: direct on loopback, through the stunnel client/server pair (TLS
1.3, the baseline), and through `portcullis connect -L` → the tunnel → `portcullis up`
→ iperf3 server. First one TCP connection (iperf3 default), then 8 parallel ones
(iperf3 -P 8), which on portcullis are 9 streams (8 + iperf3's control connection)
of the one tunnel, and on stunnel 9 TLS connections.

Every setup reaches the same iperf3 server; "reverse" is iperf3 -R (server sends).
"""

from __future__ import annotations

import math
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.deployment import Process
from bench.peers import start_iperf3_server, start_stunnel_pair
from bench.report import Report, Table, verdict
from bench.throughput import BYTES, DIRECTIONS, TARGET, Measurement, carry
from bench.tunnel_setup import start_connect, start_tunnel_gateway

PARALLEL = 8
SETUPS = ("direct", "stunnel", "portcullis")
# label -> iperf3 arguments; the label is Measurement.direction
RUNS: dict[str, list[str]] = dict(DIRECTIONS) | {
    f"{direction} -P {PARALLEL}": [*args, "-P", str(PARALLEL)]
    for direction, args in DIRECTIONS.items()}


def wait_server_idle(port: int, timeout: float = 15) -> None:
    """Wait until the iperf3 server on `port` holds no connection but closed ones: a run
    through the tunnel ends at the client before its streams are torn down at the
    server, and iperf3 -s refuses a new test while it still sees the old one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as handle:
            next(handle)
            busy = any(int(fields[1].rsplit(":", 1)[1], 16) == port
                       and fields[3] not in ("0A", "06")  # LISTEN, TIME_WAIT
                       for fields in map(str.split, handle))
        if not busy:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the iperf3 server on port {port} is still busy after {timeout} s")


def measure(setup: str, label: str, port: int, tunnel: list[Process],
            server_port: int) -> Measurement:
    wait_server_idle(server_port)
    carried = carry([port], RUNS[label], {process.name: process for process in tunnel})
    print(f"  {setup:<12} {label:<14} {carried.gbits:6.2f} Gbit/s", flush=True)
    return Measurement(setup, label, carried.gbits, carried.gib, carried.seconds,
                       carried.cpu)


def run() -> Report:
    results: dict[tuple[str, str], Measurement] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-tunnel-tp-") as tmp:
        logs = Path(tmp)
        iperf_port = start_iperf3_server(stack, logs)

        deployment, gateway = start_tunnel_gateway(stack, logs)
        env = deployment.login_cli(logs / "client-home")
        target = f"127.0.0.1:{iperf_port}"
        connect, ports = start_connect(stack, logs, env, forwards=[target])

        cert, key = deployment.server_cert
        pair = start_stunnel_pair(stack, logs, target_port=iperf_port, cert=cert, key=key,
                                  ca=deployment.ca)

        setups = {"direct": (iperf_port, []),
                  "stunnel": (pair.port, [pair.client, pair.server]),
                  "portcullis": (ports[target], [connect, gateway])}
        for label in RUNS:
            for setup in SETUPS:
                port, tunnel = setups[setup]
                results[setup, label] = measure(setup, label, port, tunnel, iperf_port)

    tables = []
    verdicts = []
    data: dict[str, object] = {"bytes_per_run": BYTES, "target_ratio_to_stunnel": TARGET,
                               "parallel": PARALLEL}
    for parallel in (False, True):
        rows = []
        for label in RUNS:
            if ("-P" in label) != parallel:
                continue
            stunnel = results["stunnel", label].gbits
            direct = results["direct", label].gbits
            for setup in SETUPS:
                m = results[setup, label]
                rows.append([f"{setup} {label}", m.gbits, m.gib, m.seconds,
                             " + ".join(f"{name} {cpu:.1f}s"
                                        for name, cpu in m.tunnel_cpu.items()) or "-",
                             m.gbits / stunnel if stunnel else math.nan,
                             m.gbits / direct if direct else math.nan])
                data[f"{setup}_{label.replace(' ', '')}"] = m.as_json()
            ours = results["portcullis", label].gbits
            to_stunnel = ours / stunnel if stunnel else math.nan
            to_direct = ours / direct if direct else math.nan
            data[f"ratio_portcullis_stunnel_{label.replace(' ', '')}"] = to_stunnel
            data[f"ratio_portcullis_direct_{label.replace(' ', '')}"] = to_direct
            verdicts.append(f"{label}: tunnel/direct {to_direct:.2f}x")
            verdicts.append(verdict(f"{label}: tunnel/stunnel", to_stunnel, TARGET, "x"))
        what = (f"{PARALLEL} parallel TCP connections (iperf3 -P {PARALLEL}), on one tunnel"
                if parallel else "one TCP connection")
        tables.append(Table(f"iperf3 through the VPN tunnel's -L forward, {what}, "
                            f"{BYTES}B per run", [
                                "setup", "Gbit/s", "GiB", "seconds", "tunnel CPU",
                                "x stunnel", "x direct"], rows))
    return Report(
        name="tunnel_throughput",
        tables=tables,
        verdicts=verdicts,
        notes=["portcullis = iperf3 → `portcullis connect -L` → one WebSocket (TLS) → "
               "`portcullis up` → iperf3 server; stunnel = stunnel client → TLS → stunnel "
               "server → iperf3 server",
               "tunnel CPU = CPU seconds of each tunnel process during the run (iperf3's "
               "own CPU not included); with -P 8 the byte count is the total of all "
               "connections",
               "all processes share the machine's 2 cores: iperf3 client and server, both "
               "tunnel ends"],
        data=data)
