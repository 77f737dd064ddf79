"""Launch rate: how many launches per second one gateway completes, and how long each
takes, with 16 launches in flight from one signed-in session.

A launch = ticket request (POST /api/v1/resources/echo/launch, keep-alive HTTP) +
WebSocket connect (TLS) + ticket redemption + one stream opened + one byte echoed back
by the resource's server, then closed. The baseline does what any TLS tunnel must do
per connection: a TLS connect to stunnel in front of the same echo server + one byte back.

The echo server runs in its own process, so this process's CPU is the client's only;
the CPU seconds of every process are printed to show which side is the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import resource
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvloop

from bench.deployment import Deployment, Process, api_client, sign_in
from bench.peers import start_echo_server, start_stunnel_server
from bench.report import Report, Table, verdict
from bench.wire_launch import WireLaunch

LAUNCHES = 500
CONCURRENCY = 16
TIME_LIMIT = 30.0  # seconds per measured run, whatever LAUNCHES says
WARMUP = 32
TARGET = 200.0  # launches/s
MAX_ERRORS = 20  # stop a run early once this many failed and most attempts fail


@dataclass
class Run:
    name: str
    latencies: list[float]  # seconds, one per completed launch
    errors: list[str]
    wall: float
    client_cpu: float
    server_cpu: dict[str, float]  # process name -> CPU seconds during the run

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall else 0.0

    def percentile_ms(self, p: float) -> float:
        """Nearest-rank percentile."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000

    def row(self) -> list[object]:
        servers = ", ".join(f"{name} {cpu:.1f}s ({cpu / self.wall * 100:.0f}%)"
                            for name, cpu in self.server_cpu.items())
        return [self.name, len(self.latencies), len(self.errors), f"{self.wall:.1f}",
                self.rate, self.percentile_ms(50), self.percentile_ms(90),
                self.percentile_ms(99), f"{self.client_cpu:.1f}s "
                f"({self.client_cpu / self.wall * 100:.0f}%)", servers]

    def as_json(self) -> dict[str, object]:
        return {"completed": len(self.latencies), "errors": len(self.errors),
                "first_errors": self.errors[:5], "wall_s": self.wall,
                "launches_per_s": self.rate, "p50_ms": self.percentile_ms(50),
                "p90_ms": self.percentile_ms(90), "p99_ms": self.percentile_ms(99),
                "client_cpu_s": self.client_cpu, "server_cpu_s": self.server_cpu}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, once: Callable[[], Awaitable[float]], count: int,
                  servers: dict[str, Process], *, concurrency: int = CONCURRENCY,
                  time_limit: float = TIME_LIMIT, max_errors: int = MAX_ERRORS) -> Run:
    """Run `once` `count` times (or until `time_limit`), `concurrency` at a time."""
    latencies: list[float] = []
    errors: list[str] = []
    started_count = 0
    deadline = time.monotonic() + time_limit

    async def worker() -> None:
        nonlocal started_count
        while started_count < count and time.monotonic() < deadline:
            if len(errors) >= max_errors and len(errors) > len(latencies):
                return
            started_count += 1
            try:
                latencies.append(await once())
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    server_before = {key: process.cpu_seconds() for key, process in servers.items()}
    cpu_before, wall_before = _own_cpu(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall_before
    client_cpu = _own_cpu() - cpu_before
    server_cpu = {key: process.cpu_seconds() - server_before[key]
                  for key, process in servers.items()}
    return Run(name, latencies, errors, wall, client_cpu, server_cpu)


async def tls_echo_once(port: int, tls: ssl.SSLContext) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(15):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="localhost")
        try:
            writer.write(b"x")
            if await reader.readexactly(1) != b"x":
                raise RuntimeError("the echo answered something else")
            seconds = time.perf_counter() - started
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return seconds


async def launch_once(api: httpx.AsyncClient, resource: str, tls: ssl.SSLContext) -> float:
    """One launch of `resource`, closed again; returns its seconds to the echoed byte."""
    wire = await WireLaunch.open(api, resource, tls)
    wire.close()
    return wire.seconds


class Launchers:
    """One keep-alive API client per launch in flight, each with one connection, as that
    many users' clients would have, all with the same session.

    Why not one pool of `concurrency` connections: httpcore looks at every pooled
    connection (its socket's readability, through anyio) on each request, which cost the
    benchmark's own process 40 % of its CPU per launch (py-spy) — and on 2 cores that
    process, not the gateway, set the rate. The gateway sees the same requests either way.
    """

    def __init__(self, clients: list[httpx.AsyncClient], tls: ssl.SSLContext) -> None:
        self._tls = tls
        self._clients = clients
        self._idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        for client in clients:
            self._idle.put_nowait(client)

    @classmethod
    async def signed_in(cls, deployment: Deployment, concurrency: int) -> Launchers:
        clients = [api_client(deployment, 1) for _ in range(concurrency)]
        token = await sign_in(clients[0])
        for client in clients[1:]:
            client.headers["authorization"] = f"Bearer {token}"
        return cls(clients, deployment.client_tls())

    async def once(self, resource: str) -> float:
        """One launch on a client no other launch is using (at most `concurrency` run)."""
        api = self._idle.get_nowait()
        try:
            return await launch_once(api, resource, self._tls)
        finally:
            self._idle.put_nowait(api)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()


async def _measure_both(deployment: Deployment, gateway: Process, echo: Process,
                        stunnel: Process, stunnel_port: int) -> tuple[Run, Run]:
    tls = deployment.client_tls()
    launchers = await Launchers.signed_in(deployment, CONCURRENCY)
    try:
        def once() -> Awaitable[float]:
            return launchers.once("echo")

        await measure("warm-up", once, WARMUP, {})
        portcullis = await measure("portcullis launch", once, LAUNCHES,
                                   {"up": gateway, "echo": echo})
    finally:
        await launchers.aclose()
    baseline = await measure("stunnel TLS connect", lambda: tls_echo_once(stunnel_port, tls),
                             LAUNCHES, {"stunnel": stunnel, "echo": echo})
    return portcullis, baseline


def run() -> Report:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-launch-") as tmp:
        logs = Path(tmp)
        echo, echo_port = start_echo_server(stack, logs)
        deployment = Deployment.create(logs)
        deployment.add_resource("echo", "Echo", f"127.0.0.1:{echo_port}")
        gateway = deployment.start(stack, logs)
        cert, key = deployment.server_cert
        stunnel, stunnel_port = start_stunnel_server(stack, logs, target_port=echo_port,
                                                     cert=cert, key=key)
        portcullis, baseline = uvloop.run(
            _measure_both(deployment, gateway, echo, stunnel, stunnel_port))

    columns = ["setup", "done", "errors", "wall s", "launches/s", "p50 ms", "p90 ms",
               "p99 ms", "client CPU", "server CPU"]
    ratio = portcullis.rate / baseline.rate if baseline.rate else math.nan
    notes = [f"{LAUNCHES} launches (or {TIME_LIMIT:.0f} s), {CONCURRENCY} in flight, "
             f"after {WARMUP} warm-up launches; one signed-in session, keep-alive API calls",
             "client CPU = this process (the benchmark client), server CPU = each server "
             "process; % = of one core over the run's wall time. The machine has "
             f"{os.cpu_count()} cores shared by client, gateway and echo server."]
    for run_ in (portcullis, baseline):
        if run_.errors:
            notes.append(f"{run_.name}: first error: {run_.errors[0]}")
    return Report(
        name="launch_rate",
        tables=[Table(f"Launch rate (concurrency {CONCURRENCY})", columns,
                      [portcullis.row(), baseline.row()])],
        verdicts=[f"ratio portcullis/stunnel: {ratio:.2f}x",
                  verdict("portcullis launches/s", portcullis.rate, TARGET, "launches/s")],
        notes=notes,
        data={"portcullis": portcullis.as_json(), "stunnel": baseline.as_json(),
              "ratio_portcullis_stunnel": ratio, "target_launches_per_s": TARGET,
              "concurrency": CONCURRENCY})

