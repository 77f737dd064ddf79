"""One tunnel over one carrier against the same tunnel over two (`connect --carriers`):
iperf3 -P 8 through a `connect -L` forward, upload and download (-R), BENCH_BYTES per
run, BENCH_ROUNDS rounds interleaved (K=1, K=2, K=1, K=2, …). Both `connect` processes
run side by side on one gateway, each with its own client home; the CPU seconds of each
`connect` and of the gateway are read per run, so the table shows what each end spent
per GiB."""

from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.deployment import Process
from bench.peers import start_iperf3_server
from bench.report import Report, Table
from bench.rounds import Spread, interleaved, ratio
from bench.throughput import Carried, carry
from bench.tunnel_setup import start_connect, start_tunnel_gateway
from bench.tunnel_throughput import wait_server_idle

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BYTES = os.environ.get("BENCH_BYTES", "1G")
CARRIERS = (1, 2)
DIRECTIONS = {"upload -P 8": ["-P", "8"], "download -P 8": ["-P", "8", "-R"]}


def run() -> Report:
    runs: dict[tuple[str, int], list[Carried]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-carriers-") as tmp:
        logs = Path(tmp)
        iperf_port = start_iperf3_server(stack, logs)
        deployment, gateway = start_tunnel_gateway(stack, logs)
        target = f"127.0.0.1:{iperf_port}"
        tunnels: dict[int, tuple[Process, int]] = {}
        for carriers in CARRIERS:
            env = deployment.login_cli(logs / f"home-{carriers}")
            (logs / f"carriers-{carriers}").mkdir()
            connect, ports = start_connect(
                stack, logs / f"carriers-{carriers}",
                {**env, "PORTCULLIS_CARRIERS": str(carriers)}, forwards=[target])
            tunnels[carriers] = connect, ports[target]
        gateway_processes = gateway.processes()
        for direction, extra in DIRECTIONS.items():
            for _, setup in interleaved([str(carriers) for carriers in CARRIERS], ROUNDS):
                carriers = int(setup)
                connect, port = tunnels[carriers]
                wait_server_idle(iperf_port)
                carried = carry([port], extra, {"connect": connect, "gateway": gateway},
                                size=BYTES)
                runs.setdefault((direction, carriers), []).append(carried)
                print(f"  {direction:<14} carriers {carriers}: {carried.gbits:6.2f} Gbit/s",
                      flush=True)
    rows = []
    data: dict[str, object] = {"rounds": ROUNDS, "bytes_per_run": BYTES}
    for direction in DIRECTIONS:
        single = [carried.gbits for carried in runs[direction, 1]]
        for carriers in CARRIERS:
            done = runs[direction, carriers]
            gbits = [carried.gbits for carried in done]
            per_gib = {role: Spread.of([carried.cpu_per_gib()[role] for carried in done])
                       for role in ("connect", "gateway")}
            within_round = Spread.of([ratio(mine, base) for mine, base in zip(gbits, single,
                                                                             strict=True)])
            rows.append([f"{direction}, carriers {carriers}", str(Spread.of(gbits)),
                         str(per_gib["connect"]), str(per_gib["gateway"]),
                         str(within_round)])
            data[f"{direction.replace(' ', '')}_carriers{carriers}"] = {
                "gbit_per_s": Spread.of(gbits).as_json(),
                "connect_cpu_s_per_gib": per_gib["connect"].as_json(),
                "gateway_cpu_s_per_gib": per_gib["gateway"].as_json(),
                "ratio_to_one_carrier": within_round.as_json()}
    table = Table(f"iperf3 -P 8 through one tunnel's -L forward, {BYTES}B per run, "
                  f"{ROUNDS} rounds interleaved: median (min–max)",
                  ["setup", "Gbit/s", "connect CPU s/GiB", "gateway CPU s/GiB",
                   "x 1 carrier (same round)"], rows)
    return Report(name="tunnel_carriers", tables=[table], verdicts=[], data=data,
                  notes=[f"the gateway ran as {gateway_processes} process(es) (with "
                         "[gateway] workers: a supervisor and its workers); `connect` is "
                         "one process"])
