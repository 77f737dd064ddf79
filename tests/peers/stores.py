"""Fixtures that give each store test a real, private backend.

PostgreSQL tests get their own schema (dropped afterwards), Redis tests their own key
prefix (keys deleted afterwards), embedded-store tests their own SQLite file. When CI is
set, an unreachable server fails the test; otherwise the test is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import pytest
import redis.asyncio as redis

from peers.missing import missing_peer
from portcullis.store import (
    DurableStore,
    EphemeralStore,
    MemoryStore,
    SqliteStore,
    open_ephemeral,
)

POSTGRES_URL = os.environ.get(
    "PORTCULLIS_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("PORTCULLIS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, error: BaseException) -> NoReturn:
    """Fail under CI (the server must be there), skip elsewhere."""
    message = f"{what} is not reachable: {error}"
    missing_peer(message)


@dataclass
class DurableTarget:
    """A database to open, possibly several times: a SQLite file or a PostgreSQL schema."""

    url: str
    connect_args: dict[str, Any] = field(default_factory=dict)

    async def open(self) -> DurableStore:
        return await DurableStore.open(self.url, connect_args=self.connect_args)


@pytest.fixture(params=["sqlite", "postgresql"])
async def durable_target(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[DurableTarget]:
    if request.param == "sqlite":
        yield DurableTarget(f"sqlite+aiosqlite:///{tmp_path / 'portcullis.sqlite'}")
        return
    dsn = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    schema = f"pc_{secrets.token_hex(6)}"
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield DurableTarget(POSTGRES_URL, {"server_settings": {"search_path": schema}})
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture
async def durable_store(durable_target: DurableTarget) -> AsyncIterator[DurableStore]:
    store = await durable_target.open()
    yield store
    await store.close()


class FakeClock:
    """Time for MemoryStore and SqliteStore that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def answering_redis_url() -> str:
    """The test Redis URL, once it answers (skip or fail otherwise)."""
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        await admin.ping()
    except (redis.RedisError, OSError) as exc:
        unavailable(f"Redis at {REDIS_URL}", exc)
    finally:
        await admin.aclose()
    return REDIS_URL


@pytest.fixture
async def redis_url() -> str:
    return await answering_redis_url()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def ephemeral_store(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[EphemeralStore]:
    if request.param in ("memory", "sqlite"):
        local = (MemoryStore(clock=clock) if request.param == "memory"
                 else SqliteStore(tmp_path / "ephemeral.db", clock=clock))
        yield local
        await local.close()
        return
    url = await answering_redis_url()
    prefix = f"pc-test-{secrets.token_hex(6)}:"
    store = open_ephemeral(url, prefix=prefix)
    try:
        yield store
    finally:
        await store.close()
        admin = redis.Redis.from_url(url)
        keys = [key async for key in admin.scan_iter(match=f"{prefix}*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


Tick = Callable[[], Awaitable[None]]


@pytest.fixture
def tick(ephemeral_store: EphemeralStore, clock: FakeClock) -> Tick:
    """Let a little time pass: the fake clock for memory and SQLite, real time (briefly)
    for Redis."""
    step = 0.05

    async def memory_tick() -> None:
        clock.advance(step)

    async def real_tick() -> None:
        await asyncio.sleep(step)

    return memory_tick if isinstance(ephemeral_store, MemoryStore | SqliteStore) else real_tick
