"""Opening the ephemeral store a URL names: its own module, as it knows every backend
(the embedded one builds on store/ephemeral.py's interface)."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from portcullis.store.embedded import SqliteStore, sqlite_path
from portcullis.store.ephemeral import (
    Clock,
    EphemeralStore,
    MemoryStore,
    RedisStore,
    redis_url_and_prefix,
)


def open_ephemeral(
    url: str, *, clock: Clock | None = None, prefix: str | None = None
) -> EphemeralStore:
    """The store for `url`: "sqlite:///file.db", "memory://", or "redis://…" /
    "rediss://…" (optional ?prefix=).

    `clock` drives expiry in SqliteStore (default `time.time`: every process and a
    restart agree on it) and MemoryStore (default `time.monotonic`); Redis keeps its own
    time. Nothing connects yet: call `ping()` to check that the store answers.
    """
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return MemoryStore(clock=clock or time.monotonic)
    if parts.scheme == "sqlite":
        return SqliteStore(sqlite_path(url), clock=clock or time.time)
    redis_url, chosen = redis_url_and_prefix(url, prefix)
    return RedisStore(redis_url, prefix=chosen)
