"""Stream rate: how many new streams per second ONE VPN tunnel carries, and how long
each takes, with 32 in flight.

A stream, driven at the wire level in this process (no `portcullis connect`, no local
socket, so the numbers are the gateway's): OPEN to 127.0.0.1:ECHO → the gateway checks
the access policy, dials the echo server and answers ACCEPT → one byte sent with FIN →
the byte comes back from the echo server (latency stops here) → the echo server closes,
the gateway's FIN arrives (the stream is done, and counted). The reference row does the
same over plain TCP from this process straight to the echo server.

The echo server runs in its own process; the CPU seconds of every process are printed
to show which side is the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import uvloop

from bench.deployment import Deployment, Process, api_client, sign_in
from bench.launch_rate import Run
from bench.launch_rate import measure as launch_measure
from bench.peers import start_echo_server
from bench.report import Report, Table, verdict
from bench.tunnel_setup import (
    WireTunnel,
    start_tunnel_gateway,
    tunnel_url,
    wait_time_wait_drained,
)
from portcullis.proto import mux

# Per measured run, at most. Each tunnel stream leaves a TIME_WAIT socket on a gateway
# ephemeral port for 60 s (the gateway closes first); keep them well below the 28k-port
# range so that the next benchmark still finds free ports.
STREAMS = 12000
TIME_LIMIT = 10.0  # seconds per measured run, whatever STREAMS says
CONCURRENCY = 32
WARMUP = 500
TARGET = 2000.0  # streams/s
MAX_ERRORS = 50  # stop a run early once this many failed and most attempts fail


async def measure(name: str, once: Callable[[], Awaitable[float]], count: int,
                  servers: dict[str, Process]) -> Run:
    """The launch-rate benchmark's loop, with this benchmark's numbers."""
    run = await launch_measure(name, once, count, servers, concurrency=CONCURRENCY,
                               time_limit=TIME_LIMIT, max_errors=MAX_ERRORS)
    print(f"  {name:<22} {run.rate:8.0f} streams/s", flush=True)
    return run


async def direct_once(port: int) -> float:
    """Plain TCP: connect, one byte echoed, then closed with RST (SO_LINGER 0), so this
    reference run leaves no TIME_WAIT sockets behind."""
    writer, seconds = await echoed_connection(port)
    await close_with_reset(writer)
    return seconds


async def echoed_connection(port: int) -> tuple[asyncio.StreamWriter, float]:
    """Plain TCP to 127.0.0.1:port, one byte echoed back; returns the open connection
    and the seconds from connect() to the echoed byte (closed with RST if it fails)."""
    started = time.perf_counter()
    async with asyncio.timeout(15):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"x")
            if await reader.readexactly(1) != b"x":
                raise RuntimeError("the echo answered something else")
        except BaseException:
            await close_with_reset(writer)
            raise
    return writer, time.perf_counter() - started


async def close_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): no FIN exchange, no TIME_WAIT socket left here."""
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def stream_once(tunnel: WireTunnel, echo_port: int) -> float:
    """One stream on `tunnel`: OPEN, one byte echoed (the seconds until then are
    returned), then the gateway's FIN."""
    started = time.perf_counter()
    stream_id = await tunnel.echo_stream(echo_port, fin=True)
    seconds = time.perf_counter() - started
    try:
        await tunnel.expect(stream_id, mux.StreamEnded)
    except BaseException:
        tunnel.abandon(stream_id)
        raise
    tunnel.streams.pop(stream_id, None)
    return seconds


async def _measure_both(deployment: Deployment, gateway: Process, echo: Process,
                        echo_port: int) -> tuple[Run, Run]:
    async with api_client(deployment, 1) as api:
        token = await sign_in(api)
    tunnel = await WireTunnel.connect(tunnel_url(deployment), token, deployment.client_tls())
    try:
        def once() -> Awaitable[float]:
            return stream_once(tunnel, echo_port)

        await measure("warm-up", once, WARMUP, {})
        portcullis = await measure("portcullis tunnel", once, STREAMS,
                                   {"up": gateway, "echo": echo})
    finally:
        tunnel.close()
    baseline = await measure("direct TCP (reference)", lambda: direct_once(echo_port),
                             STREAMS, {"echo": echo})
    return portcullis, baseline


def _as_json(run_: Run) -> dict[str, object]:
    data = run_.as_json()
    data["streams_per_s"] = data.pop("launches_per_s")
    return data


def run() -> Report:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        logs = Path(tmp)
        echo, echo_port = start_echo_server(stack, logs)
        deployment, gateway = start_tunnel_gateway(stack, logs)
        portcullis, baseline = uvloop.run(_measure_both(deployment, gateway, echo, echo_port))
    print("  waiting for the streams' TIME_WAIT sockets to expire", flush=True)
    waited = wait_time_wait_drained()

    columns = ["setup", "done", "errors", "wall s", "streams/s", "p50 ms", "p90 ms",
               "p99 ms", "client CPU", "server CPU"]
    notes = [f"{STREAMS} streams (or {TIME_LIMIT:.0f} s), {CONCURRENCY} in flight on ONE "
             f"tunnel, after {WARMUP} warm-up streams; latency = OPEN to the echoed byte, "
             "a stream counts once the gateway's FIN arrived",
             "measured at the wire level in the benchmark process (the tunnel client's own "
             "WebSocket carrier and mux codec, no local sockets), not through "
             "`portcullis connect -L`: the rate is the gateway's",
             "direct TCP (reference) = connect + one byte echoed from this process straight "
             "to the echo server, closed with RST (no FIN exchange): the machine's ceiling, "
             "not a baseline to match",
             f"afterwards waited {waited:.0f} s for the gateway's TIME_WAIT sockets (one per "
             "tunnel stream: it closes first) to expire, so that later benchmarks find "
             "free ports",
             "client CPU = this process (the benchmark client), server CPU = each server "
             "process; % = of one core over the run's wall time. The machine has "
             f"{os.cpu_count()} cores shared by client, gateway and echo server."]
    for run_ in (portcullis, baseline):
        if run_.errors:
            notes.append(f"{run_.name}: {len(run_.errors)} errors, first: {run_.errors[0]}")
    ratio = portcullis.rate / baseline.rate if baseline.rate else math.nan
    return Report(
        name="tunnel_stream_rate",
        tables=[Table(f"New streams on one tunnel (concurrency {CONCURRENCY})", columns,
                      [portcullis.row(), baseline.row()])],
        verdicts=[f"ratio tunnel/direct TCP: {ratio:.2f}x",
                  verdict("tunnel streams/s", portcullis.rate, TARGET, "streams/s")],
        notes=notes,
        data={"portcullis": _as_json(portcullis), "direct": _as_json(baseline),
              "ratio_portcullis_direct": ratio, "target_streams_per_s": TARGET,
              "concurrency": CONCURRENCY})
