"""Revocation latency: from a sign-out to the tunnel of that session seeing its GOAWAY,
over 50 sessions, on one node and on two nodes where the sign-out happens on the other.

- one node: `portcullis up` with the default stores (memory://, SQLite): the ending is
  delivered in-process;
- two nodes: two `portcullis up` sharing PostgreSQL and Redis (as tests/e2e/test_cluster
  does); each session signs in and signs out at node A, its tunnel runs through node B,
  which hears of it over Redis pub/sub.

Each latency runs from just before `POST /api/v1/logout` is sent (so it includes that
request) to the moment the wire-level tunnel client (`bench.tunnel_setup.WireTunnel`)
receives the GOAWAY. Sessions are ended one after another, so each figure is one
ending's latency, not a queue's. The target is the issue's bound: p99 under 1 s.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import ssl
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import httpx
import redis.asyncio as redis
import uvloop

from bench.deployment import (
    PASSWORD,
    PORTCULLIS,
    USER,
    Deployment,
    free_port_run,
    run_cli,
    start_process,
)
from bench.report import Report, Table, verdict
from bench.tunnel_setup import WireTunnel
from portcullis.net import websocket

SESSIONS = 50
STEP_TIMEOUT = 10.0
TARGET_P99 = 1.0
POSTGRES_DSN = os.environ.get("PORTCULLIS_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test").replace(
                                  "postgresql+asyncpg://", "postgresql://")
REDIS_URL = os.environ.get("PORTCULLIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class EndedTunnel(WireTunnel):
    """A wire-level tunnel that notes when the gateway ended it."""

    def __init__(self, carrier: websocket.WebSocketMux) -> None:
        super().__init__(carrier)
        self.ended = asyncio.Event()
        self.ended_at = 0.0

    def _gone(self, why: str) -> None:
        if not self.ended.is_set():
            self.ended_at = time.perf_counter()
            self.ended.set()
        super()._gone(why)


async def sign_in(client: httpx.AsyncClient, node: str) -> str:
    response = await client.post(f"{node}/api/v1/login", json={
        "answers": {"username": USER, "password": PASSWORD}})
    body = response.json()
    if body.get("status") != "authenticated":
        raise RuntimeError(f"sign-in failed: {response.status_code} {response.text[:200]}")
    return str(body["token"])


async def measure(sign_in_node: str, tunnel_node: str, tls: ssl.SSLContext) -> list[float]:
    """Latencies (seconds) of SESSIONS sign-outs at `sign_in_node`, tunnels at the other."""
    url = websocket.websocket_url(tunnel_node, "/api/v1/tunnel")
    async with httpx.AsyncClient(verify=tls, timeout=30) as client:
        tokens = [await sign_in(client, sign_in_node) for _ in range(SESSIONS)]
        tunnels = [await EndedTunnel.connect(url, token, tls) for token in tokens]
        latencies = []
        try:
            for token, tunnel in zip(tokens, tunnels, strict=True):
                started = time.perf_counter()
                response = await client.post(f"{sign_in_node}/api/v1/logout",
                                             headers={"authorization": f"Bearer {token}"})
                if response.status_code != 200:
                    raise RuntimeError(f"sign-out: {response.status_code}")
                async with asyncio.timeout(STEP_TIMEOUT):
                    await tunnel.ended.wait()
                latencies.append(tunnel.ended_at - started)
        finally:
            for tunnel in tunnels:
                if not tunnel.gone:
                    tunnel.close()
    return latencies


def set_stores(deployment: Deployment, durable: str, ephemeral: str) -> None:
    config = deployment.directory / "portcullis.toml"
    text = config.read_text()
    text = re.sub(r'(?m)^durable = .*$', f'durable = "{durable}"', text)
    text = re.sub(r'(?m)^ephemeral = .*$', f'ephemeral = "{ephemeral}"', text)
    config.write_text(text)


def second_node(deployment: Deployment, root: Path) -> Deployment:
    """A copy of the deployment (same CA, keys and stores) on three other ports."""
    directory = root / "node-b"
    shutil.copytree(deployment.directory, directory)
    port = free_port_run(4)
    config = directory / "portcullis.toml"
    text = config.read_text()
    for offset in range(3):
        text = re.sub(rf"(?<=[:]){deployment.port + offset}\b", str(port + offset), text)
    config.write_text(text)
    return Deployment(directory, port)


async def postgres(statement: str) -> None:
    connection = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def forget_prefix(prefix: str) -> None:
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
    finally:
        await admin.aclose()


def one_node(root: Path) -> list[float]:
    with ExitStack() as stack:
        deployment = Deployment.create(root / "one")
        deployment.start(stack, root / "one")
        return uvloop.run(measure(deployment.url, deployment.url, deployment.client_tls()))


def two_nodes(root: Path) -> list[float]:
    database = f"pc_bench_{secrets.token_hex(4)}"
    prefix = f"pc-bench-{secrets.token_hex(4)}:"
    asyncio.run(postgres(f'CREATE DATABASE "{database}"'))
    try:
        with ExitStack() as stack:
            logs = root / "two"
            logs.mkdir()
            # Users are added to the durable store in use: set it before Deployment adds ours.
            node_a = Deployment.create(logs)
            set_stores(node_a, f"{POSTGRES_DSN.rsplit('/', 1)[0]}/{database}",
                       f"{REDIS_URL}?prefix={prefix}")
            run_cli("user", "add", USER, "--dir", str(node_a.directory), "--group", "staff",
                    "--password-stdin", stdin=PASSWORD + "\n")
            node_b = second_node(node_a, logs)
            node_a.start(stack, logs)
            process = start_process(stack, [PORTCULLIS, "up", "--dir", str(node_b.directory)],
                                    logs / "portcullis-up-b.log", name="portcullis up (B)")
            process.wait_for(r"Portal: https://", timeout=60)
            return uvloop.run(measure(node_a.url, node_b.url, node_a.client_tls()))
    finally:
        asyncio.run(postgres(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        asyncio.run(forget_prefix(prefix))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run() -> Report:
    with tempfile.TemporaryDirectory(prefix="pc-bench-revocation-") as temp:
        root = Path(temp)
        results = {"one node (memory://)": one_node(root),
                   "two nodes (PostgreSQL + Redis), sign-out on the other": two_nodes(root)}
    rows, data, verdicts = [], {}, []
    for setup, latencies in results.items():
        ms = [value * 1000 for value in latencies]
        p50, p99 = percentile(ms, 0.50), percentile(ms, 0.99)
        rows.append([setup, len(ms), p50, p99, max(ms), statistics.mean(ms)])
        data[setup] = {"sessions": len(ms), "p50_ms": p50, "p99_ms": p99, "max_ms": max(ms),
                       "mean_ms": statistics.mean(ms), "latencies_ms": ms}
        verdicts.append(verdict(f"{setup}: p99", p99, TARGET_P99 * 1000, "ms",
                                higher_is_better=False))
    table = Table(f"Revocation latency: sign-out to the tunnel's GOAWAY, {SESSIONS} sessions",
                  ["setup", "sessions", "p50 ms", "p99 ms", "max ms", "mean ms"], rows)
    return Report("revocation", [table], verdicts,
                  notes=["each figure includes the sign-out request itself"], data=data)
