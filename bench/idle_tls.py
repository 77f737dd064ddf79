"""Memory per idle TLS connection, and what the timeouts give back: the RSS of
`portcullis up` before, while K connections that completed TLS and sent nothing are held
open to the gateway's listener, and after the header timeout (`limits.header_timeout`,
its default) has closed them.

The clients (this process) are another process than the gateway, so the delta is the
gateway's own cost: the TLS connection and uvicorn's HTTP protocol waiting for a request.
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

import uvloop

from bench.deployment import Deployment, Process
from bench.idle_memory import SETTLE, Sample, sample
from bench.report import Report, Table, verdict

CONNECTIONS = 1000
CONCURRENCY = 32
WARMUP = 50  # connections opened and closed first, so lazy imports and caches are paid
HEADER_TIMEOUT = 20.0  # the default of limits.header_timeout
REAP_SLACK = 10.0
TARGET_KIB = 64.0


@dataclass
class Readings:
    before: Sample
    during: Sample
    after: Sample
    opened: int
    errors: list[str]
    reaped_after: float  # seconds from the first open until the gateway's sockets were back


async def open_idle(host: str, port: int, tls: ssl.SSLContext, count: int,
                    held: list[asyncio.StreamWriter], errors: list[str]) -> None:
    """Open `count` TLS connections, CONCURRENCY at a time, and send nothing on them."""
    started = 0

    async def worker() -> None:
        nonlocal started
        while started < count and len(errors) < 20:
            started += 1
            try:
                _, writer = await asyncio.open_connection(host, port, ssl=tls,
                                                          server_hostname="localhost")
                held.append(writer)
            except OSError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _measure(deployment: Deployment, gateway: Process) -> Readings:
    tls = deployment.client_tls()
    held: list[asyncio.StreamWriter] = []
    errors: list[str] = []
    await open_idle("127.0.0.1", deployment.port, tls, WARMUP, held, errors)
    for writer in held:
        writer.close()
    held.clear()
    await asyncio.sleep(SETTLE)
    before = sample(gateway)
    opened_at = time.monotonic()
    await open_idle("127.0.0.1", deployment.port, tls, CONNECTIONS, held, errors)
    opened = len(held)
    await asyncio.sleep(SETTLE)
    during = sample(gateway)
    # The gateway closes them HEADER_TIMEOUT after each handshake; wait for its sockets.
    deadline = opened_at + HEADER_TIMEOUT + REAP_SLACK + 30
    while gateway.open_fds() > before.fds + 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    reaped_after = time.monotonic() - opened_at
    await asyncio.sleep(SETTLE)
    after = sample(gateway)
    for writer in held:
        with contextlib.suppress(Exception):
            writer.close()
    return Readings(before, during, after, opened, errors, reaped_after)


def run() -> Report:
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-idle-tls-") as tmp:
        logs = Path(tmp)
        deployment = Deployment.create(logs)
        config = deployment.directory / "portcullis.toml"
        # This measures memory, not the per-address limit (every client is 127.0.0.1).
        config.write_text(config.read_text().replace(
            "[limits]\n", f"[limits]\nheader_timeout = {HEADER_TIMEOUT}\n"
                          "max_connections_per_address = 5000\n", 1))
        gateway = deployment.start(stack, logs)
        readings = uvloop.run(_measure(deployment, gateway))

    before, during, after = readings.before, readings.during, readings.after
    opened, errors, reaped_after = readings.opened, readings.errors, readings.reaped_after
    if not opened:
        raise RuntimeError(f"no TLS connection could be opened: {errors[:1]}")
    per_connection = (during.rss_kib - before.rss_kib) / opened
    kept = (after.rss_kib - before.rss_kib) / opened
    rows = [["before (after warm-up)", before.rss_kib, before.fds, "-"],
            [f"{opened} idle TLS connections", during.rss_kib, during.fds, per_connection],
            ["after the header timeout closed them", after.rss_kib, after.fds, "-"]]
    notes = [f"clients complete the TLS handshake and send nothing; header_timeout "
             f"{HEADER_TIMEOUT:.0f} s; the gateway's sockets were back to their number "
             f"{reaped_after:.1f} s after the first connection opened",
             f"after: {kept:.2f} KiB per connection not returned to the system: the "
             "allocator keeps freed memory for reuse (no connection is left: see fds)"]
    if errors:
        notes.append(f"{len(errors)} connections failed; first: {errors[0]}")
    return Report(
        name="idle_tls",
        tables=[Table("RSS of `portcullis up` (VmRSS)", [
            "state", "RSS KiB", "fds", "KiB per connection"], rows)],
        verdicts=[verdict("RSS per idle TLS connection", per_connection, TARGET_KIB, "KiB",
                          higher_is_better=False),
                  verdict("idle TLS connections closed after (s)", reaped_after,
                          HEADER_TIMEOUT + REAP_SLACK, "s", higher_is_better=False)],
        notes=notes,
        data={"connections": opened, "errors": len(errors), "first_errors": errors[:5],
              "rss_kib_before": before.rss_kib, "rss_kib_open": during.rss_kib,
              "rss_kib_after_timeout": after.rss_kib, "fds_before": before.fds,
              "fds_open": during.fds, "fds_after_timeout": after.fds,
              "kib_per_connection": per_connection, "kib_per_connection_after": kept,
              "reaped_after_seconds": reaped_after, "header_timeout": HEADER_TIMEOUT,
              "target_kib": TARGET_KIB})
