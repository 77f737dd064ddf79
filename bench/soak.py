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
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import uvloop

from bench import tunnel_memory
from bench.deployment import Deployment, Process, api_client, sign_in, start_process
from bench.peers import start_echo_server
from bench.report import Report, Table, verdict
from bench.tunnel_setup import (
    POLICY,
    WireTunnel,
    close_tunnels,
    tunnel_url,
    wait_time_wait_drained,
)
from portcullis.net.websocket import WebSocketMux
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
# Frames per traceback for tracemalloc in the gateway (0: off); on, the soak compares a
# snapshot at the end of the warm-up with one at the end and reports what grew.
SOAK_TRACEMALLOC = _env_int("SOAK_TRACEMALLOC", 0)
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


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and its children (the gateway's workers, if it has any)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _sum_over(processes: list[psutil.Process],
              measure: Callable[[psutil.Process], float]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
            total += measure(process)
    return total


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _run_queue_wait(process: psutil.Process) -> float:
    """Seconds the process's main thread spent runnable but waiting for a CPU
    (/proc/PID/schedstat, second field, in ns): how starved the machine left it."""
    with open(f"/proc/{process.pid}/schedstat") as handle:
        return int(handle.read().split()[1]) / 1e9


@dataclass
class Usage:
    """One process tree at one moment: cumulative CPU and run-queue wait."""

    kib: int
    cpu: float
    wait: float

    @classmethod
    def of(cls, processes: list[psutil.Process]) -> Usage:
        kib = _sum_over(processes, lambda process: process.memory_info().rss) // 1024
        return cls(int(kib), _sum_over(processes, _cpu_seconds),
                   _sum_over(processes, _run_queue_wait))


@dataclass
class MemorySample:
    at: float           # seconds since the soak's streams started
    gateway: Usage
    gateway_processes: int
    gateway_fds: int
    generator: Usage    # this process alone (the gateway and echo server are children)
    echo_kib: int
    load: float         # 1-minute load average of the machine
    generator_lag: float = 0.0  # this process's loop: the latest wake-up since the last

    @property
    def gateway_kib(self) -> int:
        return self.gateway.kib

    @property
    def generator_kib(self) -> int:
        return self.generator.kib


def take_sample(at: float, gateway: Process, echo: Process) -> MemorySample:
    processes = process_tree(gateway.pid)
    fds = int(_sum_over(processes, lambda process: process.num_fds()))
    return MemorySample(at, Usage.of(processes), len(processes), fds,
                        Usage.of([psutil.Process()]), echo.rss_kib(), os.getloadavg()[0])


def share(before: Usage, after: Usage, seconds: float) -> tuple[float, float]:
    """CPU and run-queue wait between two readings, each as % of one core's time."""
    if seconds <= 0:
        return 0.0, 0.0
    return (100 * (after.cpu - before.cpu) / seconds,
            100 * (after.wait - before.wait) / seconds)


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


class EchoTunnel(WireTunnel):
    """A wire-level tunnel whose soak streams take their events as callbacks: no task
    and no future per echo, so that the load generator, which shares the machine with
    the gateway it measures, costs as little as it can."""

    def __init__(self, carrier: WebSocketMux) -> None:
        super().__init__(carrier)
        self.echoes: dict[int, EchoStream] = {}

    def _deliver(self, stream_id: int, event: mux.Event) -> None:
        echo = self.echoes.get(stream_id)
        if echo is None:
            super()._deliver(stream_id, event)
        else:
            echo.on_event(event)

    def _gone(self, why: str) -> None:
        super()._gone(why)
        for echo in self.echoes.values():
            echo.fail(why)


class EchoStream:
    """One stream's request/response loop: REQUEST_BYTES out, wait until the same bytes
    came back, pause about SOAK_INTERVAL, again; until the soak ends."""

    def __init__(self, soak: Soak, tunnel: EchoTunnel, stream_id: int) -> None:
        self.soak = soak
        self.tunnel = tunnel
        self.stream_id = stream_id
        self.loop = asyncio.get_running_loop()
        self.last_progress = time.monotonic()
        self.stalled = False
        self.failed: str | None = None
        self.counter = 0
        self.request = b""
        self.received = 0
        self.sent_at = 0.0
        tunnel.echoes[stream_id] = self

    def start(self, now: float) -> None:
        self.last_progress = now
        self.loop.call_later(random.uniform(0, SOAK_INTERVAL), self.send_request)

    def send_request(self) -> None:
        now = time.monotonic()
        if self.failed is not None or now >= self.soak.stop_at:
            return
        self.counter += 1
        self.request = self.counter.to_bytes(8, "big") * (REQUEST_BYTES // 8)
        self.received = 0
        self.sent_at = now
        self.tunnel.send(self.stream_id, self.request)

    def on_event(self, event: mux.Event) -> None:
        if not isinstance(event, mux.DataReceived):
            self.fail(f"{type(event).__name__}: {event}")
            return
        data = event.data
        end = self.received + len(data)
        if end > len(self.request) or data != self.request[self.received:end]:
            self.fail(f"the echo answered other bytes than request {self.counter}")
            return
        self.received = end
        if end == len(self.request):
            now = time.monotonic()
            self.soak.echoed(self, now - self.sent_at, now)
            self.loop.call_later(SOAK_INTERVAL * random.uniform(0.5, 1.5), self.send_request)

    def fail(self, why: str) -> None:
        """The stream stops; the stall watcher counts it as stalled from then on. (After
        the soak, the tunnels closing are no failure.)"""
        if self.failed is None and time.monotonic() < self.soak.stop_at:
            self.failed = why
            self.soak.failures.append(f"stream {self.stream_id}: {why}")


@dataclass
class Soak:
    """What the streams share: their progress, the stalls, the round trips, and how
    late this process's own event loop ran (a stall it caused is not the gateway's)."""

    stop_at: float
    streams: list[EchoStream] = field(default_factory=list)
    round_trips: Histogram = field(default_factory=Histogram)
    stalls: int = 0              # episodes of > STALL_SECONDS without progress
    stalled_streams: set[int] = field(default_factory=set)  # indexes into `streams`
    stall_times: list[tuple[float, int]] = field(default_factory=list)  # (when, how many)
    longest_gap: float = 0.0     # the longest time any stream went without progress
    failures: list[str] = field(default_factory=list)
    loop_lag: float = 0.0        # this process's loop: the latest wake-up so far (s)
    window_lag: float = 0.0      # the same since the last memory sample

    def echoed(self, stream: EchoStream, round_trip: float, now: float) -> None:
        self.round_trips.add(round_trip)
        self.longest_gap = max(self.longest_gap, now - stream.last_progress)
        stream.last_progress = now
        stream.stalled = False

    def check_stalls(self, now: float) -> None:
        new = 0
        for index, stream in enumerate(self.streams):
            if not stream.stalled and now - stream.last_progress > STALL_SECONDS:
                stream.stalled = True
                new += 1
                self.stalled_streams.add(index)
        if new:
            self.stalls += new
            self.stall_times.append((now, new))

    async def watch(self) -> None:
        """Stalls once a second; the loop's lateness four times a second."""
        tick = 0.25
        checked = time.monotonic()
        while (now := time.monotonic()) < self.stop_at:
            await asyncio.sleep(tick)
            late = time.monotonic() - now - tick
            self.loop_lag = max(self.loop_lag, late)
            self.window_lag = max(self.window_lag, late)
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                self.check_stalls(checked)


async def bounded(count: int, once: Callable[[int], Awaitable[T]], done: list[T],
                  errors: list[str], *, progress: str = "") -> float:
    """tunnel_memory's bounded opener with this benchmark's concurrency and limits."""
    return await tunnel_memory.bounded(count, OPEN_CONCURRENCY, once, done, errors,
                                       time_limit=OPEN_TIME_LIMIT, max_errors=MAX_ERRORS,
                                       progress=progress)


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
    errors: list[str]


async def run_soak(deployment: Deployment, gateway: Process, echo: Process,
                   echo_port: int, snapshots: Snapshots | None = None) -> SoakResult:
    url, tls = tunnel_url(deployment), deployment.client_tls()
    token = await _sign_in(deployment)
    tunnels: list[WireTunnel] = []
    errors: list[str] = []
    soak = Soak(stop_at=math.inf)

    async def open_tunnel(_: int) -> WireTunnel:
        tunnel = await EchoTunnel.connect(url, token, tls)
        assert isinstance(tunnel, EchoTunnel)   # connect() builds a `cls`
        try:
            for _ in range(SOAK_STREAMS):
                stream_id = await tunnel.echo_stream(echo_port, fin=False)
                soak.streams.append(EchoStream(soak, tunnel, stream_id))
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
        for stream in soak.streams:
            stream.start(started)
        watcher = asyncio.ensure_future(soak.watch())
        samples: list[MemorySample] = []
        warmup_end = started + warmup_seconds(SOAK_SECONDS)
        while (now := time.monotonic()) < soak.stop_at:
            samples.append(sample := take_sample(now - started, gateway, echo))
            sample.generator_lag, soak.window_lag = soak.window_lag, 0.0
            if len(samples) > 1:
                print_progress(samples[-2], sample, soak)
            if snapshots is not None and not snapshots.taken and now >= warmup_end:
                await snapshots.take()
            await asyncio.sleep(min(SAMPLE_EVERY, max(0.0, soak.stop_at - now)))
        samples.append(take_sample(time.monotonic() - started, gateway, echo))
        samples[-1].generator_lag = soak.window_lag
        if snapshots is not None:
            await snapshots.take()
        async with asyncio.timeout(10):
            await watcher
        soak.check_stalls(soak.stop_at)
    finally:
        with contextlib.suppress(Exception):
            await close_tunnels(tunnels)
    return SoakResult(opened, len(soak.streams), open_seconds, samples,
                      warmup_seconds(SOAK_SECONDS), soak, errors)


def print_progress(previous: MemorySample, sample: MemorySample, soak: Soak) -> None:
    seconds = sample.at - previous.at
    gateway_cpu, gateway_wait = share(previous.gateway, sample.gateway, seconds)
    generator_cpu, generator_wait = share(previous.generator, sample.generator, seconds)
    print(f"  t={sample.at:4.0f}s RSS KiB: gateway {sample.gateway_kib}, generator "
          f"{sample.generator_kib}, echo {sample.echo_kib}; {soak.round_trips.total} echoes, "
          f"{soak.stalls} stalls; CPU/wait %: gateway {gateway_cpu:.0f}/{gateway_wait:.0f}, "
          f"generator {generator_cpu:.0f}/{generator_wait:.0f}, its loop late "
          f"{sample.generator_lag:.2f} s; load {sample.load:.1f}", flush=True)


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
        await asyncio.sleep(IDLE_CPU_WINDOW)
        idle_cpu, _ = share(tunnels_open.gateway, sample().gateway, IDLE_CPU_WINDOW)
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


def start_gateway(stack: ExitStack, logs: Path, connections: int, *,
                  traced: Path | None = None) -> tuple[Deployment, Process]:
    """`portcullis up` on a fresh deployment with raised limits; under tracemalloc
    (bench.traced_up, snapshots into `traced`) if given."""
    deployment = Deployment.create(logs)
    config = deployment.directory / "portcullis.toml"
    text = config.read_text()
    if "\n[limits]\n" not in text:
        raise RuntimeError("portcullis init wrote no [limits] section to raise")
    config.write_text(text.replace("\n[limits]\n", "\n[limits]\n" + deployment_limits(
        connections), 1) + POLICY)
    if traced is None:
        return deployment, deployment.start(stack, logs)
    traced.mkdir()
    gateway = start_process(
        stack, [sys.executable, "-m", "bench.traced_up", str(deployment.directory),
                str(traced)], logs / "portcullis-up-traced.log", name="portcullis up (traced)",
        env={"TRACEMALLOC_FRAMES": str(SOAK_TRACEMALLOC)})
    gateway.wait_for(r"Portal: https://", timeout=120)
    return deployment, gateway


class Snapshots:
    """tracemalloc snapshots of the traced gateway, taken by signal (bench.traced_up)."""

    def __init__(self, gateway: Process, directory: Path) -> None:
        self.gateway = gateway
        self.directory = directory
        self.taken: list[Path] = []

    async def take(self) -> None:
        number = len(self.taken) + 1
        done = self.directory / f"snapshot-{number}.done"
        os.kill(self.gateway.pid, signal.SIGUSR2)
        async with asyncio.timeout(120):   # a big heap takes a while to write
            while not done.exists():
                await asyncio.sleep(0.2)
        self.taken.append(self.directory / f"snapshot-{number}.pickle")

    def growth(self, top: int = 15) -> list[str]:
        """The source lines whose live memory grew most from the first to the last."""
        if len(self.taken) < 2:
            return []
        first = tracemalloc.Snapshot.load(str(self.taken[0]))
        last = tracemalloc.Snapshot.load(str(self.taken[-1]))
        return [f"{stat.size_diff / 1024:+.0f} KiB ({stat.count_diff:+d} blocks) "
                f"{stat.traceback.format()[-1].strip()}"
                for stat in last.compare_to(first, "lineno")[:top]]


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

    second_half = [s for s in samples if s.at >= last.at / 2]
    rows = []
    slopes: dict[str, float] = {}
    for name, attribute in (("gateway", "gateway_kib"), ("load generator", "generator_kib"),
                            ("echo server", "echo_kib")):
        def kib(sample: MemorySample, attribute: str = attribute) -> int:
            return int(getattr(sample, attribute))

        slopes[name] = slope_per_minute([(s.at, float(kib(s))) for s in after_warmup])
        rows.append([name, kib(samples[0]), kib(first), kib(last), kib(last) - kib(first),
                     slopes[name],
                     slope_per_minute([(s.at, float(kib(s))) for s in second_half])])
    soak = result.soak
    histogram = soak.round_trips
    seconds = max(1.0, last.at - samples[0].at)
    start = soak.stop_at - SOAK_SECONDS
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
        ["stall episodes (t s: streams)", ", ".join(
            f"{at - start:.0f}: {count}" for at, count in soak.stall_times[:8]) or "-"],
        ["gateway CPU / run-queue wait (% of a core)",
         "{:.0f} / {:.0f}".format(*share(samples[0].gateway, last.gateway, seconds))],
        ["generator CPU / run-queue wait (% of a core)",
         "{:.0f} / {:.0f}".format(*share(samples[0].generator, last.generator, seconds))],
        ["generator's own loop: latest wake-up (s)", soak.loop_lag],
        ["load average (1 min) min / max",
         f"{min(s.load for s in samples):.1f} / {max(s.load for s in samples):.1f}"],
    ]
    tables = [
        Table(f"Soak: RSS KiB per process ({result.warmup_end:.0f} s warm-up, sampled every "
              f"{SAMPLE_EVERY:.0f} s)",
              ["process", "start", "warm-up end", "end", "growth", "KiB/min after warm-up",
               "KiB/min 2nd half"],
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
        "open_errors": result.errors[:10], "stall_times": [
            (round(at - start, 1), count) for at, count in soak.stall_times],
        "generator_loop_lag": soak.loop_lag, "slopes_kib_per_min": slopes,
        "gateway_processes": samples[-1].gateway_processes,
        "samples": [asdict(s) for s in samples],
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
        "samples": [asdict(s) for s in (result.before, result.tunnels_open,
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
        traced = logs / "snapshots" if SOAK_TRACEMALLOC else None
        deployment, gateway = start_gateway(stack, logs, connections, traced=traced)
        snapshots = Snapshots(gateway, traced) if traced is not None else None
        result = uvloop.run(run_soak(deployment, gateway, echo, echo_port, snapshots))
        grew = snapshots.growth() if snapshots is not None else []
    print("  waiting for the closed streams' TIME_WAIT sockets to expire", flush=True)
    wait_time_wait_drained()

    tables, data, gateway_slope = soak_tables(result)
    if grew:
        tables.append(Table("Gateway (tracemalloc): what grew from the warm-up's end to the "
                            "end", ["growth and where"], [[line] for line in grew]))
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
