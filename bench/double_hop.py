"""Double hop (issue 11): what the relay costs, measured side by side in one run, in
interleaved rounds, against an stunnel chain of two TLS hops and against our single hop.

Shapes. Each carries to the same iperf3 server and the same TCP echo server (its own
process), everything on loopback:
  classic        `portcullis launch` → `portcullis up` (the edge: [dialer] via = "relay",
                 mode = "classic") → `portcullis serve relay` (mutual TLS + SOCKS5, one
                 TLS connection per relayed connection) → server
  dial-out       `portcullis launch` → edge ([dialer] mode = "dial-out") → relay → server;
                 the relay dialled the edge first ([relay] edges: K WebSocket/TLS
                 connections carrying our mux), the edge's connections are streams on them
  stunnel-chain  stunnel client → stunnel server → stunnel client → stunnel server → server:
                 plain → TLS → plain → TLS → plain, four processes (the baseline: two
                 off-the-shelf TLS hops)
  single-hop     `portcullis launch` → `portcullis up` (direct dialer) → server
A portcullis shape runs one edge (and relay) with two launches: one of the iperf3 server,
one of the echo server. The stunnel chain runs twice, once in front of each server.

Rounds: every round measures every shape in the order above (classic, dial-out,
stunnel-chain, single-hop), then the next round again, so that a slow moment of the shared
machine lands on every shape alike. A ratio is taken within a round, then summarised over
the rounds as "median (min–max)".

What each number means:
  throughput     iperf3 through ONE connection, BENCH_BYTES per run, each way (reverse =
                 iperf3 -R, the server sends), Gbit/s as received by iperf3.
                 "x stunnel-chain" / "x single-hop": this shape's figure over that shape's
                 in the same round (above 1: faster than it).
                 "CPU s/GiB": CPU seconds (user + system) each process of the shape spent
                 during the run per GiB carried, median over rounds: launch = `portcullis
                 launch`, edge = `portcullis up`, relay = `portcullis serve relay`,
                 stunnel N = the N-th stunnel along the path. iperf3's own CPU is not
                 counted.
  open latency   BENCH_OPEN connections opened one after another to the shape's local port
                 for the echo server; each: connect(), one byte written, until that byte
                 comes back (then closed with RST). Through portcullis every connection is
                 a new stream of the one launch, for which the edge dials the server
                 (through the relay, in the relay shapes). p50 and p99 per round; printed:
                 the median over rounds, and "added" = shape minus single-hop in the same
                 round (the cost of the second hop over our own direct dialer).
  streams/s      the same connections, BENCH_STREAMS of them (or 10 s), 16 in flight:
                 completed per second of wall time, through one relay.
  memory         once, before the rounds (after WARMUP connections opened and closed, so
                 that the iperf3 runs' freed buffers cannot hide the cost): RSS (VmRSS) of
                 each process on the echo path with BENCH_IDLE connections held open (each
                 has echoed one byte, then idles) minus the RSS with none, per connection,
                 in KiB. The relay's row is the
                 memory per relayed connection; the stunnel chain's last server is the hop
                 in the relay's place.
Every process reports CPU and memory from /proc/PID (bench.deployment.Process).

Environment (defaults are the measurement's; shrink them to smoke-test on a busy box):
  BENCH_ROUNDS=5        rounds (each shape once per round)
  BENCH_BYTES=1G        iperf3 -n, per run and direction
  BENCH_OPEN=300        connections per round for the open latency
  BENCH_STREAMS=2000    connections per round for streams/s (also stops after 10 s)
  BENCH_IDLE=1000       idle connections held for the memory reading (at most 1024: one
                        launch carries at most that many streams at a time)
  BENCH_SHAPES=classic,dial-out,stunnel-chain,single-hop   a subset (still measured
                        in this order)
e.g. BENCH_ROUNDS=1 BENCH_BYTES=20M BENCH_OPEN=30 BENCH_STREAMS=100 BENCH_IDLE=20 \
     python -m bench double_hop
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvloop

from bench.deployment import Deployment, Process, free_port
from bench.idle_memory import SETTLE, Sample, sample
from bench.launch_rate import Run
from bench.launch_rate import measure as launch_measure
from bench.peers import start_echo_server, start_iperf3_server, start_stunnel_chain
from bench.report import Report, Table, machine
from bench.rounds import Spread, ratio
from bench.throughput import DIRECTIONS, Carried
from bench.throughput import carry as iperf3_through
from bench.tunnel_memory import bounded
from bench.tunnel_setup import wait_time_wait_drained
from bench.tunnel_stream_rate import close_with_reset, direct_once, echoed_connection
from bench.tunnel_throughput import wait_server_idle
from portcullis.config.model import RelaySettings

ALL_SHAPES = ("classic", "dial-out", "stunnel-chain", "single-hop")
BASELINES = ("stunnel-chain", "single-hop")
RELAY_MODES = {"classic": "classic", "dial-out": "dial-out", "single-hop": None}
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
BYTES = os.environ.get("BENCH_BYTES", "1G")
OPENS = int(os.environ.get("BENCH_OPEN", "300"))
STREAMS = int(os.environ.get("BENCH_STREAMS", "2000"))
IDLE = int(os.environ.get("BENCH_IDLE", "1000"))
ASKED_SHAPES = os.environ.get("BENCH_SHAPES", ",".join(ALL_SHAPES)).split(",")
RUN_TIMEOUT = 180.0  # seconds per iperf3 run, whatever BENCH_BYTES says
OPEN_TIME_LIMIT = 60.0  # seconds per latency run
STREAM_TIME_LIMIT = 10.0  # seconds per streams/s run
STREAM_CONCURRENCY = 16
IDLE_CONCURRENCY = 16
WARMUP = 50  # connections opened and closed before the memory reading
MAX_ERRORS = 20  # a run stops early once this many failed and most attempts fail
READY_TIMEOUT = 30.0  # seconds for a shape's path to echo a first byte


@dataclass
class Shape:
    """One way from a local port to the servers, and the processes that carry it."""

    name: str
    iperf_port: int  # local port that reaches the iperf3 server
    echo_port: int  # local port that reaches the echo server
    iperf_path: dict[str, Process]  # role -> process carrying iperf3's connection
    echo_path: dict[str, Process]  # role -> process carrying the echo connections
    relay_health: int | None = None  # port of the relay's health and /status listener

    def relay_status(self) -> dict[str, Any] | None:
        """The relay's own counters (GET /status): proof that traffic crossed it."""
        if self.relay_health is None:
            return None
        response = httpx.get(f"http://127.0.0.1:{self.relay_health}/status", timeout=10)
        response.raise_for_status()
        return dict(response.json())


@dataclass
class Round:
    """One shape in one round."""

    carried: dict[str, Carried]  # direction -> run
    opens: Run
    streams: Run


@dataclass
class Idle:
    """RSS of each process on a shape's echo path, with no and with `opened` connections."""

    before: dict[str, Sample]
    during: dict[str, Sample]
    opened: int
    errors: list[str]
    relay_streams: int | None  # streams open at the relay (its /status) while held

    def kib_each(self, role: str) -> float:
        if not self.opened:
            return math.nan
        return (self.during[role].rss_kib - self.before[role].rss_kib) / self.opened


# -- the shapes ------------------------------------------------------------------------

def relay_config(mode: str, *, edge_port: int, health_port: int, iperf_port: int,
                 echo_port: int) -> str:
    """The [relay] and [dialer] sections for an edge and relay run from one directory.
    The allow-list names 127.0.0.1/32 with the two server ports: loopback is never a
    destination unless a network entry covers it."""
    relay_port = free_port()
    lines = ["[relay]", f'listen = "127.0.0.1:{relay_port}"',
             f'health_listen = "127.0.0.1:{health_port}"',
             f'allow = ["127.0.0.1/32:{iperf_port},{echo_port}"]']
    if mode == "dial-out":
        lines.append(f'edges = ["https://127.0.0.1:{edge_port}"]')
    lines += ["", "[dialer]", 'via = "relay"', f'mode = "{mode}"']
    if mode == "classic":
        lines.append(f'relay = "127.0.0.1:{relay_port}"')
    return "\n".join(lines) + "\n"


def start_portcullis(stack: ExitStack, logs: Path, name: str, mode: str | None, *,
                     iperf_port: int, echo_port: int) -> Shape:
    """A deployment of its own (an edge, and a relay when `mode` is set), signed in, with
    a launch of each server."""
    deployment = Deployment.create(logs, name)
    deployment.add_resource("iperf", "iperf3", f"127.0.0.1:{iperf_port}")
    deployment.add_resource("echo", "Echo", f"127.0.0.1:{echo_port}")
    roles = {"edge": deployment.start(stack, logs)} if mode is None else {}
    shape = Shape(name, 0, 0, {}, {})
    if mode is not None:
        shape.relay_health = free_port()
        deployment.add_config(relay_config(mode, edge_port=deployment.port,
                                           health_port=shape.relay_health,
                                           iperf_port=iperf_port, echo_port=echo_port))
        roles["edge"] = deployment.start(stack, logs)
        roles["relay"] = deployment.start_relay(stack, logs)
        # Dial-out: ready once the relay holds all its connections to the edge, so that
        # the streams spread over them as they will in use.
        wanted = RelaySettings().connections if mode == "dial-out" else 0
        wait_until(lambda: (shape.relay_status() or {}).get("connections", 0) >= wanted,
                   f"{wanted} relay connections", list(roles.values()))
    env = deployment.login_cli(logs / f"client-home-{name}")
    iperf_launch, shape.iperf_port = deployment.start_launch(stack, logs, env, "iperf")
    echo_launch, shape.echo_port = deployment.start_launch(stack, logs, env, "echo")
    shape.iperf_path = {"launch": iperf_launch, **roles}
    shape.echo_path = {"launch": echo_launch, **roles}
    wait_until_echoes(shape.echo_port, list(shape.echo_path.values()))
    status = shape.relay_status()
    if status is not None and not status.get("streams_total"):
        raise RuntimeError(f"{name}: a byte came back but the relay carried no stream: the "
                           "edge dials directly (is [dialer] via = \"relay\" wired?)")
    return shape


def start_chain(stack: ExitStack, logs: Path, deployment: Deployment, *, iperf_port: int,
                echo_port: int) -> Shape:
    """Two chains of two TLS hops, one in front of each server, with the certificates of
    `deployment` (the gateway's, valid for localhost)."""
    cert, key = deployment.server_cert
    chains: dict[str, tuple[int, dict[str, Process]]] = {}
    for server, target in (("iperf", iperf_port), ("echo", echo_port)):
        processes, port = start_stunnel_chain(stack, logs, target_port=target, hops=2,
                                              cert=cert, key=key, ca=deployment.ca,
                                              name=f"stunnel-{server}")
        # Roles as in the other chain: "stunnel 1 client" ... "stunnel 4 server".
        chains[server] = (port, {process.name.replace(f"stunnel-{server}", "stunnel"): process
                                 for process in processes})
    (iperf_local, iperf_path), (echo_local, echo_path) = chains["iperf"], chains["echo"]
    wait_until_echoes(echo_local, list(echo_path.values()))
    return Shape("stunnel-chain", iperf_local, echo_local, iperf_path, echo_path)


def wait_until_echoes(port: int, processes: list[Process]) -> None:
    """Retry one echoed byte through `port` until it works: the whole path is up."""
    def echoes() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"x")
            return sock.recv(1) == b"x"

    wait_until(echoes, f"byte echoed through port {port}", processes)


def wait_until(ready: Callable[[], bool], what: str, processes: list[Process]) -> None:
    """Poll `ready()` until it is true (errors count as not yet), for READY_TIMEOUT;
    `processes` must stay alive meanwhile."""
    deadline = time.monotonic() + READY_TIMEOUT
    last = "not yet"
    while time.monotonic() < deadline:
        for process in processes:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited {process.popen.returncode}:\n"
                                   f"{process.output()[-2000:]}")
        try:
            if ready():
                return
        except (OSError, httpx.HTTPError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    raise RuntimeError(f"no {what} after {READY_TIMEOUT:.0f} s ({last})")


# -- one round ---------------------------------------------------------------------------

def carry(shape: Shape, direction: str, iperf_server: int) -> Carried:
    wait_server_idle(iperf_server)
    return iperf3_through([shape.iperf_port], DIRECTIONS[direction], shape.iperf_path,
                          size=BYTES, timeout=RUN_TIMEOUT)


async def open_runs(shape: Shape) -> tuple[Run, Run]:
    """Open latency (one at a time), then streams/s (STREAM_CONCURRENCY in flight)."""
    def once() -> Awaitable[float]:
        return direct_once(shape.echo_port)

    opens = await launch_measure(f"{shape.name} opens", once, OPENS, {}, concurrency=1,
                                 time_limit=OPEN_TIME_LIMIT, max_errors=MAX_ERRORS)
    streams = await launch_measure(f"{shape.name} streams", once, STREAMS, {},
                                   concurrency=STREAM_CONCURRENCY,
                                   time_limit=STREAM_TIME_LIMIT, max_errors=MAX_ERRORS)
    return opens, streams


def measure_round(shape: Shape, iperf_server: int) -> Round:
    carried = {direction: carry(shape, direction, iperf_server) for direction in DIRECTIONS}
    result = Round(carried, *uvloop.run(open_runs(shape)))
    print(f"  {shape.name:<14} " + "  ".join(
        f"{direction} {run_.gbits:6.2f} Gbit/s" for direction, run_ in carried.items())
        + f"  open p50 {result.opens.percentile_ms(50):6.2f} ms"
        f"  {result.streams.rate:7.0f} streams/s", flush=True)
    return result


async def hold_idle(shape: Shape) -> Idle:
    """IDLE echoed connections held open through the shape (after WARMUP opened and
    closed), RSS read before and during."""
    processes = shape.echo_path
    held: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def once(_: int) -> asyncio.StreamWriter:
        writer, _seconds = await echoed_connection(shape.echo_port)
        return writer

    try:
        await bounded(WARMUP, IDLE_CONCURRENCY, once, held, errors)
        for writer in held:
            await close_with_reset(writer)
        held.clear()
        await asyncio.sleep(SETTLE)
        before = {role: sample(process) for role, process in processes.items()}
        await bounded(IDLE, IDLE_CONCURRENCY, once, held, errors)
        await asyncio.sleep(SETTLE)
        during = {role: sample(process) for role, process in processes.items()}
        relay_streams = (shape.relay_status() or {}).get("streams")
    finally:
        for writer in held:
            await close_with_reset(writer)
    result = Idle(before, during, len(held), errors, relay_streams)
    print(f"  {shape.name:<14} {result.opened} idle: " + ", ".join(
        f"{role} {result.kib_each(role):.1f} KiB" for role in processes) + " each", flush=True)
    return result


# -- the run -----------------------------------------------------------------------------

def run() -> Report:
    unknown = set(ASKED_SHAPES) - set(ALL_SHAPES)
    if unknown:
        raise RuntimeError(f"BENCH_SHAPES: no shape {', '.join(sorted(unknown))}; choose from "
                           f"{', '.join(ALL_SHAPES)}")
    rounds: list[dict[str, Round]] = []
    idle: dict[str, Idle] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-double-hop-") as tmp:
        logs = Path(tmp)
        iperf_server = start_iperf3_server(stack, logs)
        _, echo_server = start_echo_server(stack, logs)
        shapes: list[Shape] = []
        for name in (name for name in ALL_SHAPES if name in ASKED_SHAPES):
            print(f"  starting {name}", flush=True)
            if name == "stunnel-chain":
                certificates = Deployment.create(logs, "stunnel-certificates")
                shapes.append(start_chain(stack, logs, certificates,
                                          iperf_port=iperf_server, echo_port=echo_server))
            else:
                shapes.append(start_portcullis(stack, logs, name, RELAY_MODES[name],
                                               iperf_port=iperf_server,
                                               echo_port=echo_server))
        print("  memory", flush=True)
        for shape in shapes:
            idle[shape.name] = uvloop.run(hold_idle(shape))
        for number in range(1, ROUNDS + 1):
            print(f"  round {number}/{ROUNDS}", flush=True)
            rounds.append({shape.name: measure_round(shape, iperf_server)
                           for shape in shapes})
        relayed = {shape.name: status for shape in shapes
                   if (status := shape.relay_status()) is not None}
    print("  waiting for the connections' TIME_WAIT sockets to expire", flush=True)
    waited = wait_time_wait_drained()
    return report(rounds, idle, relayed, waited)


# -- summaries ---------------------------------------------------------------------------

def over_rounds(rounds: list[dict[str, Round]], shape: str,
                figure: Callable[[Round], float]) -> Spread:
    return Spread.of([figure(round_[shape]) for round_ in rounds])


def ratio_over_rounds(rounds: list[dict[str, Round]], shape: str, base: str,
                      figure: Callable[[Round], float]) -> Spread | None:
    """figure(shape) / figure(base), round by round; None if base was not measured."""
    if base not in rounds[0] or base == shape:
        return None
    return Spread.of([ratio(figure(round_[shape]), figure(round_[base]))
                      for round_ in rounds])


def difference_over_rounds(rounds: list[dict[str, Round]], shape: str, base: str,
                           figure: Callable[[Round], float]) -> Spread | None:
    if base not in rounds[0] or base == shape:
        return None
    return Spread.of([figure(round_[shape]) - figure(round_[base]) for round_ in rounds])


def _cell(spread: Spread | None) -> str:
    return "-" if spread is None else str(spread)


def _json(spread: Spread | None) -> dict[str, float] | None:
    return None if spread is None else spread.as_json()


def _gbits(direction: str) -> Callable[[Round], float]:
    return lambda round_: round_.carried[direction].gbits


def _open_ms(percentile: float) -> Callable[[Round], float]:
    return lambda round_: round_.opens.percentile_ms(percentile)


def _streams_rate(round_: Round) -> float:
    return round_.streams.rate


def _compared(ratios: dict[str, Spread | None]) -> str:
    return "".join(f", {spread} x {base}" for base, spread in ratios.items() if spread)


def report(rounds: list[dict[str, Round]], idle: dict[str, Idle],
           relayed: dict[str, dict[str, Any]], waited: float) -> Report:
    """`relayed`: each relay's /status at the end, by shape."""
    shapes = list(rounds[0])
    measured_on = machine()
    by_shape: dict[str, object] = {}
    data: dict[str, object] = {
        "rounds": len(rounds), "bytes_per_run": BYTES, "opens_per_round": OPENS,
        "streams_per_round": STREAMS, "idle_connections": IDLE, "machine": measured_on,
        "shapes": by_shape}
    throughput_rows, cpu_rows, latency_rows, stream_rows, memory_rows = [], [], [], [], []
    verdicts: list[str] = []
    notes: list[str] = []
    for shape in shapes:
        figures: dict[str, object] = {}
        cpu_by_role: dict[str, list[Spread]] = {}
        for direction in DIRECTIONS:
            gbits = over_rounds(rounds, shape, _gbits(direction))
            ratios = {base: ratio_over_rounds(rounds, shape, base, _gbits(direction))
                      for base in BASELINES}
            cpu = {role: Spread.of([round_[shape].carried[direction].cpu_per_gib()[role]
                                    for round_ in rounds])
                   for role in rounds[0][shape].carried[direction].cpu}
            throughput_rows.append([shape, direction, str(gbits),
                                    *map(_cell, ratios.values())])
            for role, spread in cpu.items():
                cpu_by_role.setdefault(role, []).append(spread)
            figures[f"throughput_{direction}"] = {
                "gbit_per_s": gbits.as_json(),
                **{f"x_{base}": _json(spread) for base, spread in ratios.items()},
                "cpu_s_per_gib": {role: spread.as_json() for role, spread in cpu.items()},
                "per_round_gbit_per_s": [round_[shape].carried[direction].gbits
                                         for round_ in rounds]}
            if shape in RELAY_MODES:  # the headline: ours against the baselines
                verdicts.append(f"{shape} throughput {direction}: {gbits} Gbit/s"
                                + _compared(ratios))
        cpu_rows += [[shape, role, *map(str, spreads)] for role, spreads in cpu_by_role.items()]

        p50, p99 = (over_rounds(rounds, shape, _open_ms(p)) for p in (50, 99))
        added = {p: difference_over_rounds(rounds, shape, "single-hop", _open_ms(p))
                 for p in (50, 99)}
        open_errors = sum(len(round_[shape].opens.errors) for round_ in rounds)
        latency_rows.append([shape, str(p50), str(p99), _cell(added[50]), _cell(added[99]),
                             open_errors])
        figures["open_ms"] = {"p50": p50.as_json(), "p99": p99.as_json(),
                              "added_p50_vs_single_hop": _json(added[50]),
                              "added_p99_vs_single_hop": _json(added[99]),
                              "errors": open_errors}

        rate = over_rounds(rounds, shape, _streams_rate)
        rate_ratios = {base: ratio_over_rounds(rounds, shape, base, _streams_rate)
                       for base in BASELINES}
        stream_errors = sum(len(round_[shape].streams.errors) for round_ in rounds)
        stream_rows.append([shape, str(rate), *map(_cell, rate_ratios.values()),
                            stream_errors])
        figures["streams_per_s"] = {"rate": rate.as_json(), "errors": stream_errors,
                                    **{f"x_{base}": _json(spread)
                                       for base, spread in rate_ratios.items()}}

        held = idle[shape]
        for role in held.before:
            memory_rows.append([shape, role, held.before[role].rss_kib,
                                held.during[role].rss_kib, held.kib_each(role)])
        figures["memory"] = {
            "held_open": held.opened, "errors": len(held.errors),
            "kib_per_connection": {role: held.kib_each(role) for role in held.before},
            "rss_kib_none": {role: reading.rss_kib for role, reading in held.before.items()},
            "rss_kib_open": {role: reading.rss_kib for role, reading in held.during.items()},
            "relay_streams_open": held.relay_streams}
        if shape in relayed:
            figures["relay_status_at_end"] = relayed[shape]
            notes.append(f"{shape}: the relay's /status counted "
                         f"{relayed[shape].get('streams_total')} relayed streams in all, "
                         f"{held.relay_streams} open while {held.opened} idle connections "
                         "were held")
        if shape in RELAY_MODES:
            verdicts.append(f"{shape} opening a stream: p50 {p50} ms, p99 {p99} ms" + (
                f"; {added[50]} ms (p50), {added[99]} ms (p99) more than single-hop"
                if added[50] and added[99] else ""))
            verdicts.append(f"{shape}: {rate} streams/s{_compared(rate_ratios)}" + (
                f"; relay {held.kib_each('relay'):.1f} KiB per relayed connection"
                if RELAY_MODES[shape] else ""))
        for what, errors in (("open", [e for r in rounds for e in r[shape].opens.errors]),
                             ("stream", [e for r in rounds for e in r[shape].streams.errors]),
                             ("idle", held.errors)):
            if errors:
                notes.append(f"{shape}: {len(errors)} {what} connections failed; first: "
                             f"{errors[0]}")
        by_shape[shape] = figures

    spread_note = f"median over {len(rounds)} rounds (min–max) where the figures differ"
    tables = [
        Table(f"Throughput, one connection, iperf3 -n {BYTES} per run; {spread_note}",
              ["shape", "direction", "Gbit/s", "x stunnel-chain", "x single-hop"],
              throughput_rows),
        Table(f"CPU seconds per GiB carried, each process, during those runs; {spread_note}",
              ["shape", "process", *(f"{direction} s/GiB" for direction in DIRECTIONS)],
              cpu_rows),
        Table(f"Opening a stream: connect to echoed byte, {OPENS} one after another per "
              f"round; {spread_note}",
              ["shape", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms", "errors"],
              latency_rows),
        Table(f"Streams per second, {STREAMS} per round (or {STREAM_TIME_LIMIT:.0f} s), "
              f"{STREAM_CONCURRENCY} in flight; {spread_note}",
              ["shape", "streams/s", "x stunnel-chain", "x single-hop", "errors"],
              stream_rows),
        Table(f"Memory: RSS with {IDLE} idle echoed connections open vs none (before the "
              f"rounds, after {WARMUP} opened and closed)",
              ["shape", "process", "RSS KiB none", "RSS KiB open", "KiB per connection"],
              memory_rows)]
    notes[:0] = [
        "machine: " + "; ".join(f"{key} {value}" for key, value in measured_on.items()),
        "added = shape minus single-hop in the same round; x = ratio in the same round",
        "CPU s/GiB: launch = portcullis launch, edge = portcullis up, relay = portcullis "
        "serve relay, stunnel N client/server = the N-th stunnel along the path; all "
        "processes, iperf3 and the echo server share the machine's cores",
        f"afterwards waited {waited:.0f} s for TIME_WAIT sockets to expire"]
    return Report(name="double_hop", tables=tables, verdicts=verdicts, notes=notes, data=data)
