"""The ephemeral store: short-lived shared state with a TTL on everything.

Tickets, login attempts, rate-limit counters and the set of live sessions live here. One
interface, `EphemeralStore`, and three backends chosen by URL with `open_ephemeral()`:
`SqliteStore` (store/embedded.py, the default: one file that every process of a node
shares and a restart keeps), `RedisStore` for several nodes sharing state, and
`MemoryStore` for tests (one process; time from an injected clock, so tests never sleep).

It never stores a token or a ticket in clear: callers pass keyed hashes as keys. It never
keeps anything forever (every write has a TTL) and never lets a backend's exception
escape: failures leave as `StoreError` naming the Redis address or the file, never the
keys or values.
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from portcullis.errors import StoreError

Clock = Callable[[], float]

DEFAULT_PREFIX = "portcullis:"

# Entries examined for expiry on each MemoryStore write: bounded work, bounded memory.
_SWEEP_PER_WRITE = 8


def checked_ttl(ttl: float) -> float:
    # A zero or negative TTL is a programming error, not a store failure.
    if not (ttl > 0 and math.isfinite(ttl)):
        raise ValueError(f"TTL must be a positive number of seconds, not {ttl!r}")
    return ttl


class EphemeralStore(abc.ABC):
    """Bytes values, string keys, every write with a TTL in seconds.

    `take` and `put_new` are atomic across every client of one store: of many concurrent
    callers exactly one gets the value / stores its own.
    """

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, ttl: float) -> None:
        """Store `value` under `key` for `ttl` seconds, replacing anything there."""

    @abc.abstractmethod
    async def put_new(self, key: str, value: bytes, ttl: float) -> bool:
        """Store only if `key` is absent; True if this call stored it."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The live value under `key`, or None."""

    @abc.abstractmethod
    async def take(self, key: str) -> bytes | None:
        """Get and delete in one step: under any concurrency one caller gets the value."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove `key` (a value, counter or set); absent keys are fine."""

    @abc.abstractmethod
    async def touch(self, key: str, ttl: float) -> bool:
        """Make a live key expire `ttl` seconds from now; False if it is absent."""

    @abc.abstractmethod
    async def incr(self, key: str, ttl: float) -> int:
        """Add one to a counter and return it; a new counter expires after `ttl` seconds.

        The TTL is not refreshed by later increments: a rate-limit window closes on time.
        """

    @abc.abstractmethod
    async def add_to_set(self, key: str, member: str, ttl: float) -> None:
        """Add `member` to the set under `key` and make the whole set live `ttl` more."""

    @abc.abstractmethod
    async def set_members(self, key: str) -> set[str]:
        """The members of the set under `key`; empty if absent or expired."""

    @abc.abstractmethod
    async def remove_from_set(self, key: str, member: str) -> None:
        """Remove `member`; a set left empty disappears."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the store answers; StoreError if not (health checks)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""


class _Entry:
    __slots__ = ("expires_at", "value")

    def __init__(self, value: bytes | set[str], expires_at: float) -> None:
        self.value = value
        self.expires_at = expires_at


class MemoryStore(EphemeralStore):
    """One process's ephemeral store: a dict of (value, expiry time).

    Every method runs without awaiting, so each is atomic under asyncio. Expired entries
    are invisible at once and purged lazily: when read, and a few per write.
    """

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._sweep_keys: list[str] = []

    def __len__(self) -> int:
        """Entries held, including expired ones not purged yet (for tests and metrics)."""
        return len(self._entries)

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        now = self._clock()
        self._entries[key] = _Entry(bytes(value), now + checked_ttl(ttl))
        self._sweep_some(now)

    async def put_new(self, key: str, value: bytes, ttl: float) -> bool:
        now = self._clock()
        checked_ttl(ttl)
        if self._live(key, now) is not None:
            return False
        self._entries[key] = _Entry(bytes(value), now + ttl)
        self._sweep_some(now)
        return True

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key, self._clock())
        return None if entry is None else _as_bytes(entry)

    async def take(self, key: str) -> bytes | None:
        entry = self._live(key, self._clock())
        if entry is None:
            return None
        value = _as_bytes(entry)
        del self._entries[key]
        return value

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def touch(self, key: str, ttl: float) -> bool:
        now = self._clock()
        checked_ttl(ttl)
        entry = self._live(key, now)
        if entry is None:
            return False
        entry.expires_at = now + ttl
        return True

    async def incr(self, key: str, ttl: float) -> int:
        now = self._clock()
        checked_ttl(ttl)
        entry = self._live(key, now)
        if entry is None:
            entry = self._entries[key] = _Entry(b"0", now + ttl)
            self._sweep_some(now)
        try:
            count = int(_as_bytes(entry)) + 1
        except ValueError:
            raise StoreError("incr on a value that is not an integer counter") from None
        entry.value = str(count).encode()
        return count

    async def add_to_set(self, key: str, member: str, ttl: float) -> None:
        now = self._clock()
        checked_ttl(ttl)
        entry = self._live(key, now)
        if entry is None:
            self._entries[key] = _Entry({member}, now + ttl)
            self._sweep_some(now)
            return
        _as_set(entry).add(member)
        entry.expires_at = now + ttl

    async def set_members(self, key: str) -> set[str]:
        entry = self._live(key, self._clock())
        return set() if entry is None else set(_as_set(entry))

    async def remove_from_set(self, key: str, member: str) -> None:
        entry = self._live(key, self._clock())
        if entry is None:
            return
        members = _as_set(entry)
        members.discard(member)
        if not members:
            del self._entries[key]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._sweep_keys.clear()

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= now:
            del self._entries[key]
            return None
        return entry

    def _sweep_some(self, now: float) -> None:
        # Walks a snapshot of the keys a few at a time; a new snapshot once it is used up.
        # A full pass takes len/_SWEEP_PER_WRITE writes, so garbage stays proportional.
        for _ in range(_SWEEP_PER_WRITE):
            if not self._sweep_keys:
                self._sweep_keys = list(self._entries)
                if not self._sweep_keys:
                    return
            self._live(self._sweep_keys.pop(), now)


def _as_bytes(entry: _Entry) -> bytes:
    if isinstance(entry.value, set):
        raise StoreError("the key holds a set, not a value")
    return entry.value


def _as_set(entry: _Entry) -> set[str]:
    if not isinstance(entry.value, set):
        raise StoreError("the key holds a value, not a set")
    return entry.value


def _reply_bytes(reply: bytes | str | None) -> bytes | None:
    # The client is built without decode_responses, so replies are bytes; this narrows the type.
    return reply.encode() if isinstance(reply, str) else reply


def _ttl_ms(ttl: float) -> int:
    return max(1, math.ceil(checked_ttl(ttl) * 1000))


class RedisStore(EphemeralStore):
    """The shared ephemeral store: Redis through a redis.asyncio connection pool.

    Every key is prefixed (default "portcullis:") so several deployments can share a
    Redis. `take` is GETDEL, `put_new` is SET NX; TTLs are sent in milliseconds.
    """

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        parts = urlsplit(url)
        self._prefix = prefix
        try:
            self._address = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        except ValueError as exc:
            where = parts.netloc.rpartition("@")[2]  # never the password
            raise StoreError(f"invalid Redis URL {where!r}: {exc}") from exc
        try:
            self._redis = redis.Redis.from_url(
                url,
                socket_connect_timeout=5.0,
                socket_timeout=5.0,
                # A few quick retries: an outage must reach health checks in well under a
                # second, not after redis-py's default multi-second backoff.
                retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries=2),
            )
        except (ValueError, RedisError) as exc:
            raise StoreError(f"invalid Redis URL for {self._address}: {exc}") from exc

    @property
    def prefix(self) -> str:
        return self._prefix

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        px = _ttl_ms(ttl)
        with self._mapped_errors("SET"):
            await self._redis.set(self._key(key), value, px=px)

    async def put_new(self, key: str, value: bytes, ttl: float) -> bool:
        px = _ttl_ms(ttl)
        with self._mapped_errors("SET NX"):
            return bool(await self._redis.set(self._key(key), value, px=px, nx=True))

    async def get(self, key: str) -> bytes | None:
        with self._mapped_errors("GET"):
            return _reply_bytes(await self._redis.get(self._key(key)))

    async def take(self, key: str) -> bytes | None:
        with self._mapped_errors("GETDEL"):
            return _reply_bytes(await self._redis.getdel(self._key(key)))

    async def delete(self, key: str) -> None:
        with self._mapped_errors("DEL"):
            await self._redis.delete(self._key(key))

    async def touch(self, key: str, ttl: float) -> bool:
        px = _ttl_ms(ttl)
        with self._mapped_errors("PEXPIRE"):
            return bool(await self._redis.pexpire(self._key(key), px))

    async def incr(self, key: str, ttl: float) -> int:
        px = _ttl_ms(ttl)
        full_key = self._key(key)
        with self._mapped_errors("INCR"):
            # MULTI/EXEC: create the counter with its TTL if absent, then count, atomically.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(full_key, 0, px=px, nx=True)
                pipe.incr(full_key)
                _, count = await pipe.execute()
        return int(count)

    async def add_to_set(self, key: str, member: str, ttl: float) -> None:
        px = _ttl_ms(ttl)
        full_key = self._key(key)
        with self._mapped_errors("SADD"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(full_key, member)
                pipe.pexpire(full_key, px)
                await pipe.execute()

    async def set_members(self, key: str) -> set[str]:
        with self._mapped_errors("SMEMBERS"):
            members = await self._redis.smembers(self._key(key))
        return {m if isinstance(m, str) else m.decode() for m in members}

    async def remove_from_set(self, key: str, member: str) -> None:
        with self._mapped_errors("SREM"):
            await self._redis.srem(self._key(key), member)

    async def ping(self) -> None:
        with self._mapped_errors("PING"):
            await self._redis.ping()

    async def close(self) -> None:
        with self._mapped_errors("close"):
            await self._redis.aclose()

    def _key(self, key: str) -> str:
        return self._prefix + key

    @contextmanager
    def _mapped_errors(self, command: str) -> Iterator[None]:
        """The one place where redis-py exceptions become ours (keys are not named)."""
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreError(
                f"cannot reach Redis at {self._address}: {exc}; check that it runs and "
                "that the ephemeral store URL is right"
            ) from exc
        except RedisError as exc:
            raise StoreError(f"Redis at {self._address} refused {command}: {exc}") from exc


def shared_between_processes(url: str) -> bool:
    """Whether another process (a worker, the CLI) opening `url` sees the same state:
    true of every store but memory://."""
    return urlsplit(url).scheme != "memory"


def redis_url_and_prefix(url: str, prefix: str | None = None) -> tuple[str, str]:
    """A redis:// or rediss:// URL without our "?prefix=", and the key prefix to use."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise StoreError(
            f"unsupported ephemeral store URL scheme {parts.scheme!r}: use "
            "sqlite:///file.db, redis://host:port/db or (tests) memory://"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    # "prefix" is ours, not redis-py's: take it out of the URL before redis-py parses it.
    url_prefix = [value for name, value in query if name == "prefix"]
    rest = [(name, value) for name, value in query if name != "prefix"]
    chosen = prefix if prefix is not None else (url_prefix[-1] if url_prefix else None)
    return (urlunsplit(parts._replace(query=urlencode(rest))),
            DEFAULT_PREFIX if chosen is None else chosen)
