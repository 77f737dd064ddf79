"""The headline (issue 15): every shape against its baseline in interleaved rounds, one
table, the issue's targets beside each figure; `make bench` runs it. The latest table of
this machine replaces its section of bench/RESULTS.md.

Shapes (ours, then the baseline; every round runs each setup once, in this order):
  launched connection  iperf3 → `portcullis launch` → gateway → iperf3 server, against an
                       stunnel client → stunnel server pair; BENCH_BYTES per run
  tunnel stream        iperf3 → `portcullis connect -L` → gateway, against the same pair
  8 streams, 1 tunnel  iperf3 -P 8 through that -L forward (8 streams of one tunnel),
                       against iperf3 -P 8 through the pair (8 TLS connections); also
                       ours over the one-stream shape, round by round
  8 tunnels            8 `portcullis connect` processes, one iperf3 each (BENCH_BYTES/8
                       per client, all at once, 8 iperf3 servers), against 8 stunnel
                       pairs carrying one connection each
  double hop           BENCH_HOP_BYTES through `launch` → edge → `portcullis serve relay`
                       (classic, then dial-out) → server, against two stunnel pairs in a
                       row (plain → TLS → plain → TLS → plain)
  UDP                  iperf3 -u at BENCH_UDP_MBIT through `connect -U`: delivered rate
                       and loss; stunnel carries no UDP, so the reference is direct
                       loopback (the machine's ceiling, not a baseline to beat)
  small streams        connect + one byte echoed + close, 32 in flight, for
                       BENCH_RATE_SECONDS: through the `connect -L` forward, and at the
                       wire (a tunnel driven from this process: the gateway's own rate,
                       the one the 5,000/s target names), against the stunnel pair
  launches             ticket + WebSocket + redemption + one echoed byte, 16 in flight,
                       against a TLS connect to an stunnel server + one echoed byte

CPU s/GiB: CPU seconds (user + system, the process and its children: a gateway's
workers count) each tunnel process spent during a throughput run, per GiB carried.
iperf3's own CPU is in no figure. All processes share the machine's cores.

Environment: BENCH_ROUNDS=5, BENCH_BYTES=1G, BENCH_HOP_BYTES=100M, BENCH_UDP_MBIT=200,
BENCH_RATE_SECONDS=3; e.g. BENCH_ROUNDS=1 BENCH_BYTES=50M BENCH_RATE_SECONDS=1
python -m bench performance to smoke-test. A smoke run (fewer than 5 rounds, or less than
1G) does not touch bench/RESULTS.md.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import uvloop

from bench.deployment import PORTCULLIS, Deployment, Process, api_client, sign_in
from bench.double_hop import start_chain, start_portcullis
from bench.launch_rate import Launchers, tls_echo_once
from bench.launch_rate import measure as rate_measure
from bench.peers import (
    start_echo_server,
    start_iperf3_server,
    start_stunnel_pair,
)
from bench.report import Report, Table, machine
from bench.rounds import Spread, Target, interleaved, number, ratios, replace_section
from bench.throughput import carry
from bench.tunnel_setup import (
    POLICY,
    WireTunnel,
    free_port_both,
    start_connect,
    tunnel_url,
    wait_time_wait_drained,
)
from bench.tunnel_stream_rate import direct_once, stream_once
from bench.tunnel_throughput import wait_server_idle
from bench.tunnel_udp import step as udp_step

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
BYTES = os.environ.get("BENCH_BYTES", "1G")
HOP_BYTES = os.environ.get("BENCH_HOP_BYTES", "100M")
UDP_MBIT = int(os.environ.get("BENCH_UDP_MBIT", "200"))
RATE_SECONDS = float(os.environ.get("BENCH_RATE_SECONDS", "3"))
PARALLEL = 8
RUN_TIMEOUT = 300.0  # seconds per iperf3 run, whatever BENCH_BYTES says
OPENS = 6000  # per run at most (and RATE_SECONDS): bounds the TIME_WAIT sockets left
LAUNCHES = 2000
OPEN_CONCURRENCY = 32
LAUNCH_CONCURRENCY = 16
WARMUP = 64
MAX_ERRORS = 50
RESULTS_MD = Path(__file__).parent / "RESULTS.md"

# The targets of issue 15.
FASTER = Target(1.5, worst=1.2)  # every throughput shape (8 tunnels too), x stunnel
CPU_SHARE = Target(0.6, higher_is_better=False)  # our two ends' CPU/GiB over stunnel's
SCALING = Target(1.8)  # 8 streams in one tunnel over one stream
OPENS_PER_S = Target(5000)
LAUNCHES_PER_S = Target(400)


@dataclass
class Sample:
    """One setup's run in one round."""

    value: float  # the shape's figure, in its unit
    cpu_per_gib: dict[str, float] = field(default_factory=dict)  # process -> CPU s/GiB
    detail: dict[str, float] = field(default_factory=dict)  # p99_ms, loss_percent, gib


@dataclass
class Shape:
    """A shape: its setups (ours first, the baseline last), how each runs once, and the
    targets on the ratio to the baseline and on our own figures."""

    name: str
    unit: str
    setups: dict[str, Callable[[], Sample]]
    baseline: str
    faster: Target | None = None  # on ours / baseline, each round
    cpu: bool = False  # compare our processes' CPU/GiB with the baseline's
    own: dict[str, Target] = field(default_factory=dict)  # setup -> target on its figure
    note: str = ""


@dataclass
class Measured:
    shape: Shape
    samples: dict[str, list[Sample]]  # setup -> one per round, in round order

    def values(self, setup: str) -> list[float]:
        return [sample.value for sample in self.samples[setup]]

    def spread(self, setup: str) -> Spread:
        return Spread.of(self.values(setup))

    def ratio(self, setup: str) -> Spread:
        return Spread.of(ratios(self.values(setup), self.values(self.shape.baseline)))

    def cpu_total(self, setup: str) -> list[float]:
        return [sum(sample.cpu_per_gib.values()) for sample in self.samples[setup]]

    def detail(self, setup: str, key: str) -> Spread:
        return Spread.of([sample.detail.get(key, math.nan) for sample in self.samples[setup]])


def measure(shape: Shape, rounds: int = ROUNDS) -> Measured:
    """Each setup once per round, rounds one after another."""
    print(f"\n  -- {shape.name} ({shape.unit})", flush=True)
    samples: dict[str, list[Sample]] = {setup: [] for setup in shape.setups}
    for number_, setup in interleaved(list(shape.setups), rounds):
        sample = shape.setups[setup]()
        samples[setup].append(sample)
        print(f"  round {number_ + 1}/{rounds} {setup:<28} {number(sample.value):>8} "
              f"{shape.unit}", flush=True)
    return Measured(shape, samples)


# -- how each kind of setup runs once ----------------------------------------------------

def iperf_setup(ports: list[int], extra: list[str], path: dict[str, Process],
                servers: list[int], size: str = BYTES) -> Callable[[], Sample]:
    """iperf3 through `ports` (one client each, all at once), `path` the tunnel's
    processes; `servers` must be idle first (a tunnel tears a test down after iperf3
    -c has finished, and iperf3 -s refuses a new one until then)."""
    def once() -> Sample:
        for server in servers:
            wait_server_idle(server)
        carried = carry(ports, extra, path, size=size, timeout=RUN_TIMEOUT)
        return Sample(carried.gbits, carried.cpu_per_gib(), {"gib": carried.gib})
    return once


def udp_setup(name: str, port: int, path: dict[str, Process]) -> Callable[[], Sample]:
    def once() -> Sample:
        result = udp_step(name, port, list(path.values()), UDP_MBIT)
        return Sample(result.received_mbit, {}, {"loss_percent": result.loss_percent})
    return once


def rate_setup(name: str, count: int, concurrency: int,
               session: Callable[[], Awaitable[tuple[Callable[[], Awaitable[float]],
                                                     Callable[[], Awaitable[None]]]]],
               ) -> Callable[[], Sample]:
    """Up to `count` of `once` (or RATE_SECONDS), `concurrency` at a time, after WARMUP;
    `session()` makes (once, close) in the run's own event loop."""
    async def rate() -> Sample:
        once, close = await session()
        try:
            await rate_measure("warm-up", once, WARMUP, {}, concurrency=concurrency,
                               time_limit=RATE_SECONDS, max_errors=MAX_ERRORS)
            run = await rate_measure(name, once, count, {}, concurrency=concurrency,
                                     time_limit=RATE_SECONDS, max_errors=MAX_ERRORS)
        finally:
            await close()
        if run.errors:
            print(f"  {name}: {len(run.errors)} errors, first: {run.errors[0]}", flush=True)
        return Sample(run.rate, {}, {"p99_ms": run.percentile_ms(99),
                                     "errors": float(len(run.errors))})
    return lambda: uvloop.run(rate())


async def _nothing() -> None:
    pass


def tcp_opens(port: int) -> Callable[[], Awaitable[tuple[Callable[[], Awaitable[float]],
                                                          Callable[[], Awaitable[None]]]]]:
    async def session() -> tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]:
        return (lambda: direct_once(port)), _nothing
    return session


def wire_opens(deployment: Deployment, echo_port: int) -> Callable[
        [], Awaitable[tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]]]:
    async def session() -> tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]:
        async with api_client(deployment, 1) as api:
            token = await sign_in(api)
        tunnel = await WireTunnel.connect(tunnel_url(deployment), token,
                                          deployment.client_tls())

        async def close() -> None:
            tunnel.close()
        return (lambda: stream_once(tunnel, echo_port)), close
    return session


def launches(deployment: Deployment) -> Callable[
        [], Awaitable[tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]]]:
    async def session() -> tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]:
        launchers = await Launchers.signed_in(deployment, LAUNCH_CONCURRENCY)
        return (lambda: launchers.once("echo")), launchers.aclose
    return session


def tls_connects(port: int, deployment: Deployment) -> Callable[
        [], Awaitable[tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]]]:
    async def session() -> tuple[Callable[[], Awaitable[float]], Callable[[], Awaitable[None]]]:
        tls = deployment.client_tls()
        return (lambda: tls_echo_once(port, tls)), _nothing
    return session


# -- what the gateway ran with -----------------------------------------------------------

def gateway_settings(deployment: Deployment, gateway: Process) -> dict[str, object]:
    """Workers (from portcullis.toml, and the processes counted), carriers (from
    `connect --help`): what the deployment defaults gave, whatever this build offers."""
    config = tomllib.loads((deployment.directory / "portcullis.toml").read_text())
    workers = config.get("gateway", {}).get("workers")
    help_text = subprocess.run([PORTCULLIS, "connect", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    carriers = re.search(r"--carriers\b[^\[]*\[default:\s*([^\];]+)", help_text, re.DOTALL)
    return {"workers_configured": workers, "gateway_processes": gateway.processes(),
            "connect_carriers": (carriers.group(1).strip() if carriers
                                 else "no --carriers option (one WebSocket)"
                                 if "--carriers" not in help_text else "see connect --help")}


# -- the run -----------------------------------------------------------------------------

def run() -> Report:
    loads = {"before": os.getloadavg()}
    measured_on = machine()
    results: list[Measured] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-performance-") as tmp:
        logs = Path(tmp)
        iperf_port = start_iperf3_server(stack, logs)
        _, echo_port = start_echo_server(stack, logs)

        deployment = Deployment.create(logs, "gateway")
        deployment.add_config(POLICY)
        deployment.add_resource("iperf", "iperf3", f"127.0.0.1:{iperf_port}")
        deployment.add_resource("echo", "Echo", f"127.0.0.1:{echo_port}")
        gateway = deployment.start(stack, logs)
        env = deployment.login_cli(logs / "client-home")
        launch, launch_port = deployment.start_launch(stack, logs, env, "iperf")
        iperf_target, echo_target = f"127.0.0.1:{iperf_port}", f"127.0.0.1:{echo_port}"
        udp_port = free_port_both()
        connect, forwards = start_connect(
            stack, logs, env, forwards=[iperf_target, echo_target],
            fixed_forwards=[(udp_port, iperf_target)], udp_forwards=[(udp_port, iperf_target)])

        cert, key = deployment.server_cert
        pairs = {server: start_stunnel_pair(stack, logs, target_port=target, cert=cert,
                                            key=key, ca=deployment.ca, suffix=f" {server}")
                 for server, target in (("iperf", iperf_port), ("echo", echo_port))}

        # The relay shapes' deployments start now, before the small streams leave
        # thousands of ports in TIME_WAIT (`init` needs free ports in a row).
        hops = {f"{mode} relay": start_portcullis(stack, logs, mode, mode,
                                                  iperf_port=iperf_port, echo_port=echo_port)
                for mode in ("classic", "dial-out")}
        chain = start_chain(stack, logs, deployment, iperf_port=iperf_port,
                            echo_port=echo_port)
        settings = gateway_settings(deployment, gateway)
        print(f"  gateway: {settings}", flush=True)

        iperf_stunnel_port, iperf_stunnel = pairs["iperf"].port, pairs["iperf"].path
        ends = {"gateway": gateway}
        results.append(measure(Shape(
            "launched connection", "Gbit/s", {
                "portcullis launch": iperf_setup([launch_port], [], {"launch": launch, **ends},
                                                 [iperf_port]),
                "stunnel pair": iperf_setup([iperf_stunnel_port], [], iperf_stunnel,
                                            [iperf_port])},
            baseline="stunnel pair", faster=FASTER, cpu=True)))
        tunnel_path = {"connect": connect, **ends}
        results.append(measure(Shape(
            "tunnel stream", "Gbit/s", {
                "portcullis connect -L": iperf_setup([forwards[iperf_target]], [], tunnel_path,
                                                     [iperf_port]),
                "stunnel pair": iperf_setup([iperf_stunnel_port], [], iperf_stunnel,
                                            [iperf_port])},
            baseline="stunnel pair", faster=FASTER, cpu=True)))
        parallel = ["-P", str(PARALLEL)]
        results.append(measure(Shape(
            f"{PARALLEL} streams, one tunnel", "Gbit/s", {
                "portcullis connect -L": iperf_setup([forwards[iperf_target]], parallel,
                                                     tunnel_path, [iperf_port]),
                "stunnel pair": iperf_setup([iperf_stunnel_port], parallel, iperf_stunnel,
                                            [iperf_port])},
            baseline="stunnel pair", faster=FASTER, cpu=True,
            note=f"iperf3 -P {PARALLEL}: {PARALLEL} streams of one tunnel; through stunnel, "
                 f"{PARALLEL} TLS connections of one pair")))
        results.append(many_tunnels(logs, deployment, gateway, env))
        results.append(measure(Shape(
            "double hop", "Gbit/s", {
                **{name: iperf_setup([shape.iperf_port], [], shape.iperf_path, [iperf_port],
                                     size=HOP_BYTES) for name, shape in hops.items()},
                "stunnel chain": iperf_setup([chain.iperf_port], [], chain.iperf_path,
                                             [iperf_port], size=HOP_BYTES)},
            baseline="stunnel chain", faster=FASTER, cpu=True,
            note=f"{HOP_BYTES}B per run; stunnel chain = two stunnel pairs in a row")))
        results.append(measure(Shape(
            "UDP", "Mbit/s", {
                "portcullis connect -U": udp_setup("portcullis", udp_port, tunnel_path),
                "direct (no tunnel)": udp_setup("direct", iperf_port, {})},
            baseline="direct (no tunnel)",
            note=f"iperf3 -u offered {UDP_MBIT} Mbit/s; stunnel carries no UDP: the "
                 "reference is direct loopback, the ceiling")))
        echo_stunnel_port, echo_stunnel_tls = pairs["echo"].port, pairs["echo"].tls_port
        results.append(measure(Shape(
            "small streams", "opens/s", {
                "portcullis at the wire": rate_setup(
                    "wire", OPENS, OPEN_CONCURRENCY, wire_opens(deployment, echo_port)),
                "portcullis connect -L": rate_setup(
                    "connect -L", OPENS, OPEN_CONCURRENCY, tcp_opens(forwards[echo_target])),
                "stunnel pair": rate_setup(
                    "stunnel", OPENS, OPEN_CONCURRENCY, tcp_opens(echo_stunnel_port))},
            baseline="stunnel pair", own={"portcullis at the wire": OPENS_PER_S},
            note=f"{OPEN_CONCURRENCY} in flight, {RATE_SECONDS:g} s or {OPENS} per run")))
        results.append(measure(Shape(
            "launches", "launches/s", {
                "portcullis launch": rate_setup(
                    "launch", LAUNCHES, LAUNCH_CONCURRENCY, launches(deployment)),
                "stunnel TLS connect": rate_setup(
                    "stunnel", LAUNCHES, LAUNCH_CONCURRENCY,
                    tls_connects(echo_stunnel_tls, deployment))},
            baseline="stunnel TLS connect", own={"portcullis launch": LAUNCHES_PER_S},
            note=f"{LAUNCH_CONCURRENCY} in flight, {RATE_SECONDS:g} s or {LAUNCHES} per run")))
    loads["after"] = os.getloadavg()
    print("  waiting for the streams' TIME_WAIT sockets to expire", flush=True)
    wait_time_wait_drained()
    report = headline(results, measured_on, settings, loads)
    if ROUNDS >= 5 and _bytes(BYTES) >= 2**30:
        RESULTS_MD.write_text(replace_section(
            RESULTS_MD.read_text() if RESULTS_MD.exists() else "", machine_key(measured_on),
            results_section(report, measured_on),
            preamble="# Benchmark results\n\nThe latest `make bench` table of each machine "
                     "it ran on (bench/performance.py; docs/performance.md says how to "
                     "read it). Each run replaces its machine's section.\n"))
        print(f"\n{RESULTS_MD} updated", flush=True)
    return report


def many_tunnels(logs: Path, deployment: Deployment, gateway: Process,
                 env: dict[str, str]) -> Measured:
    """8 connect processes, one iperf3 each, against 8 stunnel pairs; 8 iperf3 servers
    (iperf3 -s runs one test at a time). Torn down after this shape."""
    with ExitStack() as stack:
        servers = [_iperf3_server(stack, logs, number_) for number_ in range(PARALLEL)]
        ours: dict[str, Process] = {"gateway": gateway}
        ours_ports, theirs_ports = [], []
        theirs: dict[str, Process] = {}
        cert, key = deployment.server_cert
        for number_, server in enumerate(servers, 1):
            target = f"127.0.0.1:{server}"
            process, ports = start_connect(stack, logs, env, forwards=[target],
                                           name=f"portcullis connect {number_}")
            ours[f"connect {number_}"] = process
            ours_ports.append(ports[target])
            pair = start_stunnel_pair(stack, logs, target_port=server, cert=cert, key=key,
                                      ca=deployment.ca, suffix=f" {number_}")
            theirs |= {f"{role} {number_}": process for role, process in pair.path.items()}
            theirs_ports.append(pair.port)
        each = f"{max(1, _bytes(BYTES) // PARALLEL // 2**20)}M"
        return measure(Shape(
            f"{PARALLEL} tunnels", "Gbit/s", {
                f"portcullis {PARALLEL}x connect": iperf_setup(ours_ports, [], ours, servers,
                                                              size=each),
                f"stunnel {PARALLEL} pairs": iperf_setup(theirs_ports, [], theirs, servers,
                                                         size=each)},
            baseline=f"stunnel {PARALLEL} pairs", faster=FASTER, cpu=True,
            note=f"{PARALLEL} iperf3 clients at once, {each}B each"))


def _iperf3_server(stack: ExitStack, logs: Path, number_: int) -> int:
    directory = logs / f"iperf3-{number_}"
    directory.mkdir()
    return start_iperf3_server(stack, directory)


def _bytes(size: str) -> int:
    """iperf3's -n: 100M, 1G, 512K or bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(size[:-1]) * units[size[-1].upper()]) if size[-1].upper() in units \
        else int(size)


def machine_key(measured_on: dict[str, object]) -> str:
    """The RESULTS.md section a run belongs to: the CPU model and core count."""
    return f"{measured_on['cpu']}, {measured_on['cores']} cores"


# -- the table ---------------------------------------------------------------------------

def headline(results: list[Measured], measured_on: dict[str, object],
             settings: dict[str, object], loads: dict[str, tuple[float, float, float]]
             ) -> Report:
    rows: list[list[object]] = []
    cpu_rows: list[list[object]] = []
    data: dict[str, object] = {
        "rounds": ROUNDS, "bytes_per_run": BYTES, "double_hop_bytes": HOP_BYTES,
        "udp_mbit": UDP_MBIT, "rate_seconds": RATE_SECONDS, "machine": measured_on,
        "gateway": settings, "load_average": loads, "shapes": {}}
    shapes: dict[str, object] = {}
    by_name = {result.shape.name: result for result in results}
    for result in results:
        shape = result.shape
        figures: dict[str, object] = {"unit": shape.unit, "baseline": shape.baseline,
                                      "note": shape.note}
        for setup in shape.setups:
            spread = result.spread(setup)
            detail = _detail(result, setup)
            figures[setup] = {"per_round": result.values(setup), "spread": spread.as_json(),
                              "detail": {key: result.detail(setup, key).as_json()
                                         for key in result.samples[setup][0].detail},
                              "cpu_s_per_gib": {
                                  role: Spread.of([s.cpu_per_gib[role]
                                                   for s in result.samples[setup]]).as_json()
                                  for role in result.samples[setup][0].cpu_per_gib}}
            if setup == shape.baseline:
                rows.append([shape.name, setup, f"{spread} {shape.unit}", detail, "1", "", ""])
            else:
                versus = result.ratio(setup)
                figures[setup]["x_baseline"] = versus.as_json()  # type: ignore[index]
                target = shape.faster
                rows.append([shape.name, setup, f"{spread} {shape.unit}", detail, str(versus),
                             f"x {target}" if target else "",
                             target.verdict(versus) if target else ""])
            if setup in shape.own:
                target = shape.own[setup]
                rows.append([shape.name, f"  {setup}", f"{spread} {shape.unit}", "", "",
                             f"{target} {shape.unit}", target.verdict(spread)])
            for role in result.samples[setup][0].cpu_per_gib:
                cpu_rows.append([shape.name, setup, role, str(Spread.of(
                    [sample.cpu_per_gib[role] for sample in result.samples[setup]]))])
            if result.samples[setup][0].cpu_per_gib:
                cpu_rows.append([shape.name, setup, "all together",
                                 str(Spread.of(result.cpu_total(setup)))])
        if shape.cpu:
            for setup in shape.setups:
                if setup == shape.baseline:
                    continue
                share = Spread.of(ratios(result.cpu_total(setup),
                                         result.cpu_total(shape.baseline)))
                figures[f"cpu_share_{setup}"] = share.as_json()
                rows.append([shape.name, f"  CPU/GiB, {setup}", "", "",
                             str(share), f"x {CPU_SHARE}", CPU_SHARE.verdict(share)])
        shapes[shape.name] = figures
    one, several = by_name.get("tunnel stream"), by_name.get(f"{PARALLEL} streams, one tunnel")
    if one and several:
        setup = "portcullis connect -L"
        scaling = Spread.of(ratios(several.values(setup), one.values(setup)))
        data["scaling_8_streams_over_1"] = scaling.as_json()
        rows.append([f"{PARALLEL} streams ÷ 1 stream", setup, "", "", str(scaling),
                     f"x {SCALING}", SCALING.verdict(scaling)])
    data["shapes"] = shapes
    load = "load average " + " → ".join(
        f"{when} {' '.join(f'{value:.2f}' for value in values)}"
        for when, values in loads.items())
    machine_line = (
        f"machine: {measured_on['cores']} cores, {measured_on['cpu']}, Linux "
        f"{measured_on['kernel']}, Python {measured_on['python']} with "
        f"{measured_on['openssl']}, stunnel with {measured_on['stunnel_openssl']}, "
        f"git {measured_on['git']}"
        + (" (src modified)" if measured_on.get("src_modified") else "") + f"; {load}")
    gateway_line = (f"gateway: workers = {settings['workers_configured'] or 'not set'} in "
                    f"portcullis.toml, {settings['gateway_processes']} process(es) running; "
                    f"connect carriers: {settings['connect_carriers']}")
    notes = [f"{ROUNDS} rounds, interleaved (each setup once per round, in the order "
             "shown); figure = median (min–max) over the rounds; x = ratio to the "
             "baseline taken within each round, then median (min–max)",
             f"throughput: iperf3 -n {BYTES} per run and shape (8 tunnels: split over "
             f"the {PARALLEL} clients; double hop: {HOP_BYTES}); Gbit/s as received",
             *(f"{result.shape.name}: {result.shape.note}" for result in results
               if result.shape.note)]
    return Report(
        name="performance",
        tables=[Table("Headline: ours against the baseline", [
            "shape", "setup", "figure", "detail", "x baseline", "target", "verdict"], rows),
            Table("CPU seconds per GiB carried, each process (and its children), median "
                  "(min–max)", ["shape", "setup", "process", "CPU s/GiB"], cpu_rows)],
        verdicts=[machine_line, gateway_line],
        notes=notes, data=data)


def _detail(result: Measured, setup: str) -> str:
    samples = result.samples[setup]
    parts = []
    if "p99_ms" in samples[0].detail:
        parts.append(f"p99 {result.detail(setup, 'p99_ms')} ms")
    if "loss_percent" in samples[0].detail:
        parts.append(f"loss {result.detail(setup, 'loss_percent')} %")
    if "gib" in samples[0].detail:
        parts.append(f"{number(result.detail(setup, 'gib').median)} GiB received")
    errors = sum(sample.detail.get("errors", 0) for sample in samples)
    if errors:
        parts.append(f"{errors:.0f} errors")
    return ", ".join(parts)


def results_section(report: Report, measured_on: dict[str, object]) -> str:
    """The RESULTS.md body of one machine: when, then the report as printed."""
    return (f"{time.strftime('%Y-%m-%d %H:%M %Z')}, `make bench` "
            f"(git {measured_on['git']})\n\n```\n{report.render()}\n```")

