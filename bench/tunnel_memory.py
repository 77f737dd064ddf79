"""Memory per idle VPN tunnel and per idle tunnel stream: the RSS (VmRSS) of the
`portcullis up` process and its workers before and after

  1. 1,000 tunnels are held open, each a WebSocket (TLS) with HELLO {"session": TOKEN}
     answered by the gateway's HELLO and CONFIG (all with the same session token), no
     stream; then
  2. 10,000 streams are held open on 10 tunnels (1,000 each), each accepted, connected
     to the echo server, one byte echoed, then idle.

Each part runs on a freshly started gateway (same deployment), so memory freed by the
first cannot be reused by the second and hide its cost. The client side (this process)
and the echo server are separate processes, so the delta is the gateway's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import uvloop

from bench.deployment import Deployment, Process, api_client, sign_in
from bench.idle_memory import SETTLE, Sample, sample
from bench.peers import start_echo_server
from bench.report import Report, Table, verdict
from bench.tunnel_setup import (
    WireTunnel,
    close_tunnels,
    start_tunnel_gateway,
    tunnel_url,
    wait_time_wait_drained,
)

TUNNELS = 1000
STREAM_TUNNELS = 10
STREAMS_PER_TUNNEL = 1000  # the mux allows 1024 concurrent streams per tunnel
TUNNEL_CONCURRENCY = 16
STREAM_CONCURRENCY = 64
WARMUP_TUNNELS = 50
WARMUP_STREAMS = 200
OPEN_TIME_LIMIT = 90.0  # seconds per batch of opens
MAX_ERRORS = 20
TARGET_TUNNEL_KIB = 100.0
TARGET_STREAM_KIB = 16.0
FD_SPARE = 300  # descriptors a process needs besides the measured connections

T = TypeVar("T")


@dataclass
class Part:
    what: str  # "tunnel" or "stream"
    before: Sample
    during: Sample
    after: Sample
    opened: int
    errors: list[str] = field(default_factory=list)

    @property
    def per_item(self) -> float:
        return (self.during.rss_kib - self.before.rss_kib) / self.opened if self.opened else 0


async def bounded(count: int, concurrency: int, once: Callable[[int], Awaitable[T]],
                  done: list[T], errors: list[str], *, time_limit: float = OPEN_TIME_LIMIT,
                  max_errors: int = MAX_ERRORS, progress: str = "") -> float:
    """once(0), once(1), … once(count-1), `concurrency` at a time, each result appended to
    `done`; stops at `time_limit` seconds or `max_errors`. With `progress`, prints
    "N/COUNT PROGRESS" every tenth of the way. Returns the seconds it took."""
    started_at = time.monotonic()
    deadline = started_at + time_limit
    started = 0
    report_every = max(1, count // 10)

    async def worker() -> None:
        nonlocal started
        while started < count and time.monotonic() < deadline and len(errors) < max_errors:
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


async def open_streams(tunnels: list[WireTunnel], count: int, echo_port: int,
                       held: list[tuple[WireTunnel, int]], errors: list[str]) -> None:
    """`count` echoed, idle streams spread evenly over `tunnels`, as (tunnel, stream id)."""
    async def once(index: int) -> tuple[WireTunnel, int]:
        tunnel = tunnels[index % len(tunnels)]
        return tunnel, await tunnel.echo_stream(echo_port, fin=False)

    await bounded(count, STREAM_CONCURRENCY, once, held, errors)


async def _sign_in(deployment: Deployment) -> str:
    async with api_client(deployment, 1) as api:
        return await sign_in(api)


async def measure_tunnels(deployment: Deployment, gateway: Process, echo_port: int) -> Part:
    url, tls = tunnel_url(deployment), deployment.client_tls()
    token = await _sign_in(deployment)
    held: list[WireTunnel] = []
    errors: list[str] = []

    def once(_: int) -> Awaitable[WireTunnel]:
        return WireTunnel.connect(url, token, tls)

    try:
        # Warm-up: tunnels with a stream each, opened and closed, so that lazy imports,
        # caches and the dial path are paid before the first reading.
        await bounded(WARMUP_TUNNELS, TUNNEL_CONCURRENCY, once, held, errors)
        await open_streams(held, len(held), echo_port, [], errors)
        await close_tunnels(held)
        await asyncio.sleep(SETTLE)
        before = sample(gateway)
        await bounded(TUNNELS, TUNNEL_CONCURRENCY, once, held, errors)
        opened = len(held)
        await asyncio.sleep(SETTLE)
        during = sample(gateway)
    finally:
        with contextlib.suppress(Exception):
            await close_tunnels(held)
    await asyncio.sleep(SETTLE)
    return Part("tunnel", before, during, sample(gateway), opened, errors)


async def measure_streams(deployment: Deployment, gateway: Process, echo_port: int,
                          count: int) -> Part:
    url, tls = tunnel_url(deployment), deployment.client_tls()
    token = await _sign_in(deployment)
    tunnels: list[WireTunnel] = []
    errors: list[str] = []
    held: list[tuple[WireTunnel, int]] = []

    def once(_: int) -> Awaitable[WireTunnel]:
        return WireTunnel.connect(url, token, tls)

    try:
        await bounded(STREAM_TUNNELS, STREAM_TUNNELS, once,
                      tunnels, errors)
        if len(tunnels) < STREAM_TUNNELS:
            raise RuntimeError(f"could not open {STREAM_TUNNELS} tunnels: {errors[:1]}")
        # Warm-up: streams opened, echoed and reset on every tunnel.
        await open_streams(tunnels, WARMUP_STREAMS, echo_port, held, errors)
        for tunnel, stream_id in held:
            tunnel.abandon(stream_id)
        held.clear()
        await asyncio.sleep(SETTLE)
        before = sample(gateway)
        await open_streams(tunnels, count, echo_port, held, errors)
        await asyncio.sleep(SETTLE)
        during = sample(gateway)
    finally:
        with contextlib.suppress(Exception):
            await close_tunnels(tunnels)
    await asyncio.sleep(SETTLE)
    return Part("stream", before, during, sample(gateway), len(held), errors)


def stream_budget() -> tuple[int, str | None]:
    """How many idle streams the open-file limit allows (the gateway holds one socket per
    stream, the echo server one; both inherit this process's soft limit)."""
    wanted = STREAM_TUNNELS * STREAMS_PER_TUNNEL
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted + FD_SPARE:
        return wanted, None
    allowed = max(STREAM_TUNNELS, soft - FD_SPARE)
    return allowed, (f"open-file limit {soft} (hard {hard}) is too low for {wanted} streams: "
                     f"scaled down to {allowed}")


def run() -> Report:
    stream_count, scaled = stream_budget()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-tunnel-mem-") as tmp:
        logs = Path(tmp)
        echo, echo_port = start_echo_server(stack, logs)
        deployment, gateway = start_tunnel_gateway(stack, logs)
        tunnels = uvloop.run(measure_tunnels(deployment, gateway, echo_port))
        print(f"  {tunnels.opened} tunnels: {tunnels.per_item:.1f} KiB each", flush=True)
        gateway.stop()
        gateway = deployment.start(stack, logs)  # a fresh heap for the second part
        streams = uvloop.run(measure_streams(deployment, gateway, echo_port, stream_count))
        print(f"  {streams.opened} streams: {streams.per_item:.1f} KiB each", flush=True)
        echo_fds = echo.open_fds()  # after the close: should be back near zero
    print("  waiting for the streams' TIME_WAIT sockets to expire", flush=True)
    waited = wait_time_wait_drained()

    for part in (tunnels, streams):
        if not part.opened:
            raise RuntimeError(f"no {part.what} could be opened: {part.errors[:1]}")
    rows = [["before (after warm-up)", tunnels.before.rss_kib, tunnels.before.fds, "-"],
            [f"{tunnels.opened} idle tunnels open", tunnels.during.rss_kib,
             tunnels.during.fds, tunnels.per_item],
            ["all closed again", tunnels.after.rss_kib, tunnels.after.fds, "-"],
            [f"restarted, {STREAM_TUNNELS} tunnels open (warmed)", streams.before.rss_kib,
             streams.before.fds, "-"],
            [f"+ {streams.opened} idle streams open", streams.during.rss_kib,
             streams.during.fds, streams.per_item],
            ["all closed again", streams.after.rss_kib, streams.after.fds, "-"]]
    notes = [f"warm-up before each first reading: {WARMUP_TUNNELS} tunnels with one stream "
             f"each opened and closed / {WARMUP_STREAMS} streams opened, echoed and reset; "
             f"readings taken {SETTLE:.0f} s after the last open/close",
             "tunnels: all opened with the same session token (one JSON sign-in), "
             f"{TUNNEL_CONCURRENCY} at a time; streams: {STREAM_CONCURRENCY} at a time, "
             f"spread over {STREAM_TUNNELS} tunnels, each to the echo server",
             "fds: open file descriptors of the gateway (1 per tunnel: its TLS socket; "
             "1 per stream: its socket to the echo server)",
             f"echo server fds after everything closed: {echo_fds}; afterwards waited "
             f"{waited:.0f} s for the closed streams' TIME_WAIT sockets to expire"]
    if scaled:
        notes.append(scaled)
    for part in (tunnels, streams):
        if part.errors:
            notes.append(f"{len(part.errors)} {part.what} opens failed; first: "
                         f"{part.errors[0]}")
    return Report(
        name="tunnel_memory",
        tables=[Table("RSS of `portcullis up` (VmRSS)", [
            "state", "RSS KiB", "fds", "KiB each"], rows)],
        verdicts=[verdict("RSS per idle tunnel", tunnels.per_item, TARGET_TUNNEL_KIB, "KiB",
                          higher_is_better=False),
                  verdict("RSS per idle tunnel stream", streams.per_item, TARGET_STREAM_KIB,
                          "KiB", higher_is_better=False)],
        notes=notes,
        data={part.what + "s": {
            "opened": part.opened, "errors": len(part.errors),
            "first_errors": part.errors[:5], "rss_kib_before": part.before.rss_kib,
            "rss_kib_open": part.during.rss_kib, "rss_kib_after_close": part.after.rss_kib,
            "fds_before": part.before.fds, "fds_open": part.during.fds,
            "fds_after_close": part.after.fds, "kib_each": part.per_item}
            for part in (tunnels, streams)} | {
            "target_kib_per_tunnel": TARGET_TUNNEL_KIB,
            "target_kib_per_stream": TARGET_STREAM_KIB, "streams_scaled_down": scaled})
