"""Memory per idle launched connection: the RSS of the `portcullis up` process before
and after K launches are held open, each a WebSocket with its ticket redeemed and one
accepted stream connected to the echo server (one byte echoed, then idle).

The client side (this process) and the echo server are separate processes from the
gateway, so the delta is the gateway's own cost: the WebSocket, the TLS connection, the
mux session and stream, and the dialled TCP connection to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvloop

from bench.deployment import Deployment, Process, api_client, sign_in
from bench.peers import start_echo_server
from bench.report import Report, Table, verdict
from bench.wire_launch import WireLaunch

CONNECTIONS = 1000
CONCURRENCY = 16
WARMUP = 50  # launches opened and closed first, so lazy imports and caches are paid
SETTLE = 2.0  # seconds idle before reading RSS
OPEN_TIME_LIMIT = 60.0
TARGET_KIB = 64.0


@dataclass
class Sample:
    rss_kib: int
    fds: int


def sample(gateway: Process) -> Sample:
    return Sample(gateway.rss_kib(), gateway.open_fds())


@dataclass
class Readings:
    before: Sample
    during: Sample
    after: Sample
    opened: int
    errors: list[str]


async def open_many(api: httpx.AsyncClient, tls: ssl.SSLContext, count: int,
                    held: list[WireLaunch], errors: list[str]) -> None:
    """Open `count` launches, CONCURRENCY at a time, appending them to `held`."""
    started = 0
    deadline = time.monotonic() + OPEN_TIME_LIMIT

    async def worker() -> None:
        nonlocal started
        while started < count and time.monotonic() < deadline and len(errors) < 20:
            started += 1
            try:
                held.append(await WireLaunch.open(api, "echo", tls))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def close_all(held: list[WireLaunch]) -> None:
    for start in range(0, len(held), 100):
        for wire in held[start:start + 100]:
            wire.close()
        await asyncio.sleep(0.05)  # let the closes go out in batches
    held.clear()


async def _measure(deployment: Deployment, gateway: Process) -> Readings:
    tls = deployment.client_tls()
    held: list[WireLaunch] = []
    errors: list[str] = []
    async with api_client(deployment, CONCURRENCY) as api:
        await sign_in(api)
        try:
            await open_many(api, tls, WARMUP, held, errors)
            await close_all(held)
            await asyncio.sleep(SETTLE)
            before = sample(gateway)
            await open_many(api, tls, CONNECTIONS, held, errors)
            opened = len(held)
            await asyncio.sleep(SETTLE)
            during = sample(gateway)
        finally:
            with contextlib.suppress(Exception):
                await close_all(held)
        await asyncio.sleep(SETTLE)
        after = sample(gateway)
    return Readings(before, during, after, opened, errors)


def run() -> Report:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        logs = Path(tmp)
        _, echo_port = start_echo_server(stack, logs)
        deployment = Deployment.create(logs)
        deployment.add_resource("echo", "Echo", f"127.0.0.1:{echo_port}")
        gateway = deployment.start(stack, logs)
        readings = uvloop.run(_measure(deployment, gateway))

    before, during, after = readings.before, readings.during, readings.after
    opened, errors = readings.opened, readings.errors
    if not opened:
        raise RuntimeError(f"no launch could be opened: {errors[:1]}")
    per_connection = (during.rss_kib - before.rss_kib) / opened
    rows = [["before (after warm-up)", before.rss_kib, before.fds, "-"],
            [f"{opened} idle launches open", during.rss_kib, during.fds, per_connection],
            ["all closed again", after.rss_kib, after.fds, "-"]]
    notes = [f"{WARMUP} launches were opened and closed before the first reading; "
             f"readings taken {SETTLE:.0f} s after the last open/close",
             "fds: open file descriptors of the gateway (≈ 2 per launch: the WebSocket's "
             "TLS socket and the socket to the echo server)"]
    if errors:
        notes.append(f"{len(errors)} launches failed; first: {errors[0]}")
    return Report(
        name="idle_memory",
        tables=[Table("RSS of `portcullis up` (VmRSS)", [
            "state", "RSS KiB", "fds", "KiB per connection"], rows)],
        verdicts=[verdict("RSS per idle launched connection", per_connection, TARGET_KIB,
                          "KiB", higher_is_better=False)],
        notes=notes,
        data={"connections": opened, "errors": len(errors), "first_errors": errors[:5],
              "rss_kib_before": before.rss_kib, "rss_kib_open": during.rss_kib,
              "rss_kib_after_close": after.rss_kib, "fds_before": before.fds,
              "fds_open": during.fds, "fds_after_close": after.fds,
              "kib_per_connection": per_connection, "target_kib": TARGET_KIB})
