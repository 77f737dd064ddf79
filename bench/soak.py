"""Scale and soak: many tunnels carrying live streams for minutes, then many idle ones.

1. Soak: SOAK_TUNNELS tunnels (default 1,000), each with SOAK_STREAMS streams (default
   10) to the echo server, for SOAK_SECONDS (default 600). Every stream runs a
   request/response loop: REQUEST_BYTES out, the same bytes back, then a pause of about
   SOAK_INTERVAL seconds (jittered, so the streams do not march in step). A stream
   *stalls* when it makes no progress (no complete echo) for more than STALL_SECONDS;
   each such episode is counted once. The RSS of every process (the gateway and its
   workers, this load generator, the echo server) is sampled every SAMPLE_EVERY seconds;
   after the warm-up the gateway's memory must stay flat (reported: RSS at the end of the
   warm-up, at the end, and the least-squares slope).
2. Idle scale: on a freshly started gateway, IDLE_TUNNELS tunnels (default 10,000) are
   opened and left idle (the gateway keeps each alive with PINGs), then one idle stream is
   added on each of the first IDLE_STREAMS tunnels (as many as the open-file limit
   allows). Reported: KiB of gateway RSS per idle tunnel and per idle stream, and the
   gateway's CPU while it holds them all.

The load generator is this process: one uvloop event loop driving the tunnels at the
wire level (`bench.tunnel_setup.WireTunnel`: the client's own WebSocket carrier and mux
codec, no local sockets), all signed in with one session token (a session may hold any
number of tunnels). The gateway is a real `portcullis up` whose connection limits are
raised for the run (see `deployment_limits`); the echo server is its own process.
Every phase is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import uvloop

from bench.deployment import Deployment, Process, api_client, sign_in
from bench.peers import start_echo_server
from bench.report import Report, Table, verdict
from bench.tunnel_setup import (
    POLICY,
    WireTunnel,
    close_tunnels,
    tunnel_url,
    wait_time_wait_drained,
)
from bench.wire_launch import LaunchFailed
from portcullis.proto import mux


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


SOAK_SECONDS = _env_int("SOAK_SECONDS", 600)
SOAK_TUNNELS = _env_int("SOAK_TUNNELS", 1000)
SOAK_STREAMS = _env_int("SOAK_STREAMS", 10)
SOAK_INTERVAL = _env_float("SOAK_INTERVAL", 2.0)  # seconds between a stream's requests
IDLE_TUNNELS = _env_int("IDLE_TUNNELS", 10_000)
IDLE_STREAMS = _env_int("IDLE_STREAMS", 10_000)
REQUEST_BYTES = 256
STALL_SECONDS = 10.0
SAMPLE_EVERY = 10.0
OPEN_CONCURRENCY = 32
OPEN_TIME_LIMIT = 600.0    # seconds for one batch of opens (10,000 tunnels on a busy box)
MAX_ERRORS = 50
SETTLE = 5.0               # seconds idle before an idle-scale reading
IDLE_CPU_WINDOW = 30.0     # seconds over which the gateway's idle CPU is measured
WARMUP_TUNNELS = 50
FD_SPARE = 300             # descriptors a process needs besides the measured sockets
TARGET_SLOPE_KIB_PER_MIN = 100.0   # "flat": under ~1 MiB per 10 minutes
TARGET_TUNNEL_KIB = 100.0
TARGET_STREAM_KIB = 16.0

T = TypeVar("T")


def warmup_seconds(duration: float) -> float:
    """The first part of the soak during which memory may still grow (heaps, caches,
    socket buffers reaching their working size)."""
    return min(60.0, duration / 5)


# -- processes and their memory ---------------------------------------------------------


def tree_rss_kib(pid: int) -> tuple[int, int]:
    """RSS (KiB) of a process plus its children (workers), and how many processes."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return total // 1024, len(processes)


def tree_fds(pid: int) -> int:
    root = psutil.Process(pid)
    return sum(process.num_fds() for process in [root, *root.children(recursive=True)])


def tree_cpu_seconds(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        times = process.cpu_times()
        total += times.user + times.system
    return total


@dataclass
class MemorySample:
    at: float           # seconds since the soak's streams started
    gateway_kib: int
    gateway_processes: int
    gateway_fds: int
    generator_kib: int
    echo_kib: int
    load: float         # 1-minute load average of the machine


def take_sample(at: float, gateway: Process, echo: Process) -> MemorySample:
    gateway_kib, processes = tree_rss_kib(gateway.pid)
    generator_kib = psutil.Process().memory_info().rss // 1024  # not its children
    return MemorySample(at, gateway_kib, processes, tree_fds(gateway.pid), generator_kib,
                        echo.rss_kib(), os.getloadavg()[0])


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, KiB) points, in KiB per minute."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / spread


# -- round-trip times, in fixed memory --------------------------------------------------


class Histogram:
    """Round-trip times in 0.1 ms buckets up to 10 s: a fixed-size table, so that
    recording millions of requests does not itself grow the load generator."""

    RESOLUTION = 1e-4
    BUCKETS = 100_000

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.total = 0
        self.largest = 0.0

    def add(self, seconds: float) -> None:
        self.counts[min(self.BUCKETS - 1, int(seconds / self.RESOLUTION))] += 1
        self.total += 1
        self.largest = max(self.largest, seconds)

    def quantile(self, fraction: float) -> float:
        wanted = math.ceil(fraction * self.total)
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if count and seen >= wanted:
                return (index + 1) * self.RESOLUTION
        return self.largest


# -- the soak ----------------------------------------------------------------------------


@dataclass
class EchoStream:
    tunnel: WireTunnel
    stream_id: int
    last_progress: float
    stalled: bool = False
    requests: int = 0


@dataclass
class Soak:
    """What the streams share: their progress, the stall count and the round trips."""

    stop_at: float
    streams: list[EchoStream] = field(default_factory=list)
    round_trips: Histogram = field(default_factory=Histogram)
    stalls: int = 0              # episodes of > STALL_SECONDS without progress
    stalled_streams: set[int] = field(default_factory=set)  # indexes into `streams`
    longest_gap: float = 0.0     # the longest time any stream went without progress
    failures: list[str] = field(default_factory=list)

    def progressed(self, stream: EchoStream, now: float) -> None:
        self.longest_gap = max(self.longest_gap, now - stream.last_progress)
        stream.last_progress = now
        stream.stalled = False
        stream.requests += 1

    def check_stalls(self, now: float) -> None:
        for index, stream in enumerate(self.streams):
            if not stream.stalled and now - stream.last_progress > STALL_SECONDS:
                stream.stalled = True
                self.stalls += 1
                self.stalled_streams.add(index)

    async def watch_stalls(self) -> None:
        while time.monotonic() < self.stop_at:
            await asyncio.sleep(1.0)
            self.check_stalls(time.monotonic())

    async def echo_loop(self, stream: EchoStream) -> None:
        """Request, wait for the whole echo, pause; until the soak ends. A stream that
        fails stops here (and is then counted as stalled by the watcher)."""
        tunnel, stream_id = stream.tunnel, stream.stream_id
        await asyncio.sleep(random.uniform(0, SOAK_INTERVAL))
        counter = 0
        try:
            while time.monotonic() < self.stop_at:
                counter += 1
                request = counter.to_bytes(8, "big") * (REQUEST_BYTES // 8)
                sent_at = time.monotonic()
                tunnel.send(stream_id, request)
                await self.receive_echo(tunnel, stream_id, request)
                now = time.monotonic()
                self.round_trips.add(now - sent_at)
                self.progressed(stream, now)
                await asyncio.sleep(SOAK_INTERVAL * random.uniform(0.5, 1.5))
        except (LaunchFailed, TimeoutError) as exc:
            if len(self.failures) < MAX_ERRORS:
                self.failures.append(f"stream {stream_id}: {type(exc).__name__}: {exc}")

    async def receive_echo(self, tunnel: WireTunnel, stream_id: int, request: bytes) -> None:
        received = bytearray()
        while len(received) < len(request):
            try:
                event = await tunnel.expect(stream_id, mux.DataReceived)
            except TimeoutError:
                # No data for a while: the watcher counts the stall; keep waiting
                # until the soak is over, so that a stream that recovers goes on.
                if time.monotonic() >= self.stop_at:
                    raise
                continue
            assert isinstance(event, mux.DataReceived)
            received += event.data
        if received != request:
            raise LaunchFailed(f"the echo answered {len(received)} other bytes")


async def bounded(count: int, once: Callable[[int], Awaitable[T]], done: list[T],
                  errors: list[str], *, concurrency: int = OPEN_CONCURRENCY,
                  progress: str = "") -> float:
    """once(0) … once(count-1), `concurrency` at a time, results appended to `done`;
    stops at OPEN_TIME_LIMIT or MAX_ERRORS. Returns the seconds it took."""
    started_at = time.monotonic()
    deadline = started_at + OPEN_TIME_LIMIT
    started = 0
    report_every = max(1, count // 10)

    async def worker() -> None:
        nonlocal started
        while started < count and time.monotonic() < deadline and len(errors) < MAX_ERRORS:
            index = started
            started += 1
            try:
                done.append(await once(index))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            if progress and len(done) % report_every == 0:
                print(f"  {len(done)}/{count} {progress}", flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started_at


async def _sign_in(deployment: Deployment) -> str:
    async with api_client(deployment, 1) as api:
        return await sign_in(api)


@dataclass
class SoakResult:
    tunnels: int
    streams: int
    open_seconds: float
    samples: list[MemorySample]
    warmup_end: float
    soak: Soak
    cpu_seconds: float
    errors: list[str]


async def run_soak(deployment: Deployment, gateway: Process, echo: Process,
                   echo_port: int) -> SoakResult:
    url, tls = tunnel_url(deployment), deployment.client_tls()
    token = await _sign_in(deployment)
    tunnels: list[WireTunnel] = []
    errors: list[str] = []
    soak = Soak(stop_at=math.inf)

    async def open_tunnel(_: int) -> WireTunnel:
        tunnel = await WireTunnel.connect(url, token, tls)
        try:
            for _ in range(SOAK_STREAMS):
                stream_id = await tunnel.echo_stream(echo_port, fin=False)
                soak.streams.append(EchoStream(tunnel, stream_id, time.monotonic()))
        except BaseException:
            tunnel.close()
            raise
        return tunnel

    try:
        open_seconds = await bounded(SOAK_TUNNELS, open_tunnel, tunnels, errors,
                                     progress="tunnels with their streams open")
        opened = len(tunnels)
        if not tunnels:
            raise RuntimeError(f"no tunnel could be opened: {errors[:1]}")
        print(f"  {len(tunnels)} tunnels, {len(soak.streams)} streams open in "
              f"{open_seconds:.0f} s; soaking for {SOAK_SECONDS} s", flush=True)
        started = time.monotonic()
        soak.stop_at = started + SOAK_SECONDS
        now = time.monotonic()
        for stream in soak.streams:
            stream.last_progress = now
        cpu_before = tree_cpu_seconds(gateway.pid)
        loops = [asyncio.ensure_future(soak.echo_loop(stream)) for stream in soak.streams]
        watcher = asyncio.ensure_future(soak.watch_stalls())
        samples: list[MemorySample] = []
        while (now := time.monotonic()) < soak.stop_at:
            sample = take_sample(now - started, gateway, echo)
            samples.append(sample)
            print(f"  t={sample.at:4.0f}s gateway {sample.gateway_kib} KiB, generator "
                  f"{sample.generator_kib} KiB, echo {sample.echo_kib} KiB, "
                  f"{soak.round_trips.total} echoes, {soak.stalls} stalls, "
                  f"load {sample.load:.1f}", flush=True)
            await asyncio.sleep(min(SAMPLE_EVERY, max(0.0, soak.stop_at - now)))
        samples.append(take_sample(time.monotonic() - started, gateway, echo))
        cpu_seconds = tree_cpu_seconds(gateway.pid) - cpu_before
        # The loops end at their next request; one that waits for an echo ends when its
        # wait times out (bounded by the tunnel client's step timeout).
        async with asyncio.timeout(60):
            await asyncio.gather(*loops, watcher)
        soak.check_stalls(soak.stop_at)
    finally:
        with contextlib.suppress(Exception):
            await close_tunnels(tunnels)
    return SoakResult(opened, len(soak.streams), open_seconds, samples,
                      warmup_seconds(SOAK_SECONDS), soak, cpu_seconds, errors)


# -- idle scale ----------------------------------------------------------------------------


@dataclass
class IdleResult:
    before: MemorySample
    tunnels_open: MemorySample
    streams_open: MemorySample
    tunnels: int
    streams: int
    open_seconds: float
    idle_cpu_percent: float
    errors: list[str]
    streams_scaled: str | None

    @property
    def kib_per_tunnel(self) -> float:
        return (self.tunnels_open.gateway_kib - self.before.gateway_kib) / max(1, self.tunnels)

    @property
    def kib_per_stream(self) -> float:
        return (self.streams_open.gateway_kib - self.tunnels_open.gateway_kib) / max(
            1, self.streams)


def idle_stream_budget(tunnels: int) -> tuple[int, str | None]:
    """How many idle streams fit beside `tunnels` tunnels: the gateway holds one socket
    per tunnel and one per stream, under the open-file hard limit."""
    wanted = min(IDLE_STREAMS, tunnels)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or tunnels + wanted + FD_SPARE <= hard:
        return wanted, None
    allowed = max(0, hard - tunnels - FD_SPARE)
    return allowed, (f"open-file hard limit {hard}: the gateway can hold {tunnels} tunnels "
                     f"and {allowed} streams, not {wanted}")


async def run_idle(deployment: Deployment, gateway: Process, echo: Process,
                   echo_port: int) -> IdleResult:
    url, tls = tunnel_url(deployment), deployment.client_tls()
    token = await _sign_in(deployment)
    tunnels: list[WireTunnel] = []
    errors: list[str] = []

    def open_tunnel(_: int) -> Awaitable[WireTunnel]:
        return WireTunnel.connect(url, token, tls)

    def sample() -> MemorySample:
        return take_sample(0.0, gateway, echo)

    try:
        # Warm-up: lazy imports, caches and the dial path paid before the first reading.
        await bounded(WARMUP_TUNNELS, open_tunnel, tunnels, errors)
        for tunnel in tunnels:
            tunnel.abandon(await tunnel.echo_stream(echo_port, fin=False))
        await close_tunnels(tunnels)
        await asyncio.sleep(SETTLE)
        before = sample()
        open_seconds = await bounded(IDLE_TUNNELS, open_tunnel, tunnels, errors,
                                     progress="idle tunnels open")
        opened = len(tunnels)
        await asyncio.sleep(SETTLE)
        tunnels_open = sample()
        # What holding them costs: keep-alive PINGs and their PONGs, nothing else.
        cpu_before = tree_cpu_seconds(gateway.pid)
        await asyncio.sleep(IDLE_CPU_WINDOW)
        idle_cpu = 100 * (tree_cpu_seconds(gateway.pid) - cpu_before) / IDLE_CPU_WINDOW
        still_open = sum(1 for tunnel in tunnels if not tunnel.gone)
        if still_open < opened:
            errors.append(f"{opened - still_open} idle tunnels closed by the gateway")
        count, scaled = idle_stream_budget(opened)
        streams: list[int] = []

        def open_stream(index: int) -> Awaitable[int]:
            return tunnels[index].echo_stream(echo_port, fin=False)

        await bounded(count, open_stream, streams, errors, progress="idle streams open")
        await asyncio.sleep(SETTLE)
        streams_open = sample()
    finally:
        with contextlib.suppress(Exception):
            await close_tunnels(tunnels)
    return IdleResult(before, tunnels_open, streams_open, opened, len(streams),
                      open_seconds, idle_cpu, errors, scaled)


# -- the deployment ---------------------------------------------------------------------


def deployment_limits(connections: int) -> str:
    """The [limits] keys this benchmark raises: every tunnel comes from 127.0.0.1, so the
    per-address cap (default 1,000) and the node's cap (default 10,000) must both let
    `connections` in."""
    return (f"max_connections = {connections}\n"
            f"max_connections_per_address = {connections}\n")


def start_gateway(stack: ExitStack, logs: Path, connections: int) -> tuple[Deployment, Process]:
    deployment = Deployment.create(logs)
    config = deployment.directory / "portcullis.toml"
    text = config.read_text()
    if "\n[limits]\n" not in text:
        raise RuntimeError("portcullis init wrote no [limits] section to raise")
    config.write_text(text.replace("\n[limits]\n", "\n[limits]\n" + deployment_limits(
        connections), 1) + POLICY)
    return deployment, deployment.start(stack, logs)


def raise_open_files_to_hard() -> int:
    """This process and what it starts may hold as many sockets as the hard limit
    allows (10,000 tunnels need 10,000 here and more in the gateway)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


# -- the report -------------------------------------------------------------------------


def soak_tables(result: SoakResult) -> tuple[list[Table], dict[str, object], float]:
    samples = result.samples
    after_warmup = [s for s in samples if s.at >= result.warmup_end] or samples[-1:]
    first, last = after_warmup[0], samples[-1]

    rows = []
    slopes: dict[str, float] = {}
    for name, attribute in (("gateway", "gateway_kib"), ("load generator", "generator_kib"),
                            ("echo server", "echo_kib")):
        def kib(sample: MemorySample, attribute: str = attribute) -> int:
            return int(getattr(sample, attribute))

        slopes[name] = slope_per_minute([(s.at, float(kib(s))) for s in after_warmup])
        rows.append([name, kib(samples[0]), kib(first), kib(last), kib(last) - kib(first),
                     slopes[name]])
    soak = result.soak
    histogram = soak.round_trips
    seconds = max(1.0, samples[-1].at)
    stream_rows: list[list[Any]] = [
        ["tunnels / streams", f"{result.tunnels} / {result.streams}"],
        ["opened in (s)", result.open_seconds],
        ["echoes (requests answered)", histogram.total],
        ["echoes per second", histogram.total / seconds],
        ["round trip p50 / p99 / max (ms)",
         f"{histogram.quantile(0.5) * 1e3:.1f} / {histogram.quantile(0.99) * 1e3:.1f} / "
         f"{histogram.largest * 1e3:.1f}"],
        [f"stalls (> {STALL_SECONDS:g} s without progress)", soak.stalls],
        ["streams that stalled", len(soak.stalled_streams)],
        ["longest gap between echoes (s)", soak.longest_gap],
        ["streams failed", len(soak.failures)],
        ["gateway CPU (% of a core)", 100 * result.cpu_seconds / seconds],
        ["load average (1 min) min / max",
         f"{min(s.load for s in samples):.1f} / {max(s.load for s in samples):.1f}"],
    ]
    tables = [
        Table(f"Soak: RSS KiB per process ({result.warmup_end:.0f} s warm-up, sampled every "
              f"{SAMPLE_EVERY:.0f} s)",
              ["process", "start", "warm-up end", "end", "growth", "KiB/min after warm-up"],
              rows),
        Table("Soak: streams", ["", "value"], stream_rows),
    ]
    data: dict[str, object] = {
        "tunnels": result.tunnels, "streams": result.streams,
        "seconds": SOAK_SECONDS, "interval": SOAK_INTERVAL, "request_bytes": REQUEST_BYTES,
        "open_seconds": result.open_seconds, "warmup_seconds": result.warmup_end,
        "echoes": histogram.total, "rtt_p50": histogram.quantile(0.5),
        "rtt_p99": histogram.quantile(0.99), "rtt_max": histogram.largest,
        "stalls": soak.stalls, "stalled_streams": len(soak.stalled_streams),
        "longest_gap": soak.longest_gap, "stream_failures": soak.failures[:10],
        "open_errors": result.errors[:10], "gateway_cpu_seconds": result.cpu_seconds,
        "slopes_kib_per_min": slopes,
        "gateway_processes": samples[-1].gateway_processes,
        "samples": [vars(s) for s in samples],
    }
    return tables, data, slopes["gateway"]


def idle_table(result: IdleResult) -> tuple[Table, dict[str, object]]:
    rows = [["before (after warm-up)", result.before.gateway_kib, result.before.gateway_fds,
             "-", result.before.generator_kib],
            [f"{result.tunnels} idle tunnels", result.tunnels_open.gateway_kib,
             result.tunnels_open.gateway_fds, result.kib_per_tunnel,
             result.tunnels_open.generator_kib],
            [f"+ {result.streams} idle streams", result.streams_open.gateway_kib,
             result.streams_open.gateway_fds, result.kib_per_stream,
             result.streams_open.generator_kib]]
    data: dict[str, object] = {
        "tunnels": result.tunnels, "streams": result.streams,
        "open_seconds": result.open_seconds, "kib_per_tunnel": result.kib_per_tunnel,
        "kib_per_stream": result.kib_per_stream, "idle_cpu_percent": result.idle_cpu_percent,
        "errors": result.errors[:10], "streams_scaled": result.streams_scaled,
        "samples": [vars(s) for s in (result.before, result.tunnels_open,
                                      result.streams_open)]}
    return Table("Idle scale: RSS of the gateway", [
        "state", "gateway KiB", "gateway fds", "KiB each", "generator KiB"], rows), data


def run() -> Report:
    """The soak (part 1): `python -m bench soak`."""
    open_files = raise_open_files_to_hard()
    connections = SOAK_TUNNELS + 100
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        logs = Path(tmp)
        echo, echo_port = start_echo_server(stack, logs)
        deployment, gateway = start_gateway(stack, logs, connections)
        result = uvloop.run(run_soak(deployment, gateway, echo, echo_port))
    print("  waiting for the closed streams' TIME_WAIT sockets to expire", flush=True)
    wait_time_wait_drained()

    tables, data, gateway_slope = soak_tables(result)
    notes = [
        f"each stream: {REQUEST_BYTES} bytes echoed, then a pause of {SOAK_INTERVAL:g} s "
        f"± 50 %; a stall is > {STALL_SECONDS:g} s without a complete echo",
        LOAD_GENERATOR,
        limits_note(connections, open_files),
        f"gateway RSS sums its {result.samples[-1].gateway_processes} process(es)",
    ]
    for what, errors in (("tunnel opens", result.errors),
                         ("streams", result.soak.failures)):
        if errors:
            notes.append(f"{len(errors)} {what} failed; first: {errors[0]}")
    verdicts = [
        verdict("gateway RSS slope after warm-up", gateway_slope, TARGET_SLOPE_KIB_PER_MIN,
                "KiB/min", higher_is_better=False),
        verdict("stalls", float(result.soak.stalls), 0, "", higher_is_better=False),
    ]
    return Report(name="soak", tables=tables, verdicts=verdicts, notes=notes,
                  data=data | {"open_files": open_files, "max_connections": connections})


def run_scale() -> Report:
    """Idle scale (part 2): `python -m bench tunnel_scale`."""
    open_files = raise_open_files_to_hard()
    connections = IDLE_TUNNELS + WARMUP_TUNNELS + 100
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        logs = Path(tmp)
        echo, echo_port = start_echo_server(stack, logs)
        deployment, gateway = start_gateway(stack, logs, connections)
        result = uvloop.run(run_idle(deployment, gateway, echo, echo_port))
    print("  waiting for the closed streams' TIME_WAIT sockets to expire", flush=True)
    wait_time_wait_drained()

    table, data = idle_table(result)
    notes = [
        f"{result.tunnels} tunnels opened in {result.open_seconds:.0f} s "
        f"({OPEN_CONCURRENCY} at a time), then one idle stream (one byte echoed) on each "
        f"of the first {result.streams}; readings {SETTLE:.0f} s after the last open",
        f"gateway CPU while holding the idle tunnels (keep-alive PINGs and PONGs): "
        f"{result.idle_cpu_percent:.1f} % of a core over {IDLE_CPU_WINDOW:.0f} s",
        LOAD_GENERATOR,
        limits_note(connections, open_files),
        "machine load average (1 min) at the three readings: " + ", ".join(
            f"{s.load:.1f}" for s in (result.before, result.tunnels_open, result.streams_open)),
    ]
    if result.streams_scaled:
        notes.append(result.streams_scaled)
    if result.errors:
        notes.append(f"{len(result.errors)} opens failed; first: {result.errors[0]}")
    verdicts = [
        verdict("RSS per idle tunnel", result.kib_per_tunnel, TARGET_TUNNEL_KIB, "KiB",
                higher_is_better=False),
        verdict("RSS per idle stream", result.kib_per_stream, TARGET_STREAM_KIB, "KiB",
                higher_is_better=False),
    ]
    return Report(name="tunnel_scale", tables=[table], verdicts=verdicts, notes=notes,
                  data=data | {"open_files": open_files, "max_connections": connections})


LOAD_GENERATOR = ("load generator: this process, one uvloop loop, wire-level tunnels (no "
                  "local sockets), all on one session token")


def limits_note(connections: int, open_files: int) -> str:
    return (f"gateway: `portcullis up` with [limits] max_connections = "
            f"max_connections_per_address = {connections} (defaults 10,000 and 1,000: every "
            f"tunnel comes from 127.0.0.1); open-file limit {open_files}")
