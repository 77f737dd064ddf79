"""Events the nodes of a deployment share: short messages published on a named channel.

One interface, `EventBus`, and three backends chosen by the ephemeral store's URL with
`open_event_bus()`: `SqliteEventBus` is a table in the embedded store's file that every
process of the node polls (its workers, and the CLI publishing), `RedisEventBus` is Redis
pub/sub on a channel under the store's key prefix, so every node sharing the store hears
every event, and `MemoryEventBus` delivers within the process (tests, as `memory://` is).

Delivery is at most once and only to listeners subscribed at the time, as pub/sub is: a
listener is told each time it is (re)subscribed (`on_ready`), and whoever relies on the
events re-checks then what it may have missed while it was not. A listener whose Redis
drops reconnects by itself with backoff. Never lets a redis-py exception escape:
failures to publish leave as `StoreError` naming the Redis address.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as redis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import RedisError

from portcullis.errors import StoreError
from portcullis.store.embedded import EmbeddedFile, sqlite_path
from portcullis.store.ephemeral import redis_url_and_prefix

Deliver = Callable[[bytes], None]
log = structlog.get_logger("portcullis.store")

# A subscription that has not answered our PING within this long is presumed dead.
LIVENESS_SECONDS = 5.0
RECONNECT_BACKOFF = (0.05, 0.2, 0.5, 1.0, 2.0)
MAX_MESSAGE = 4096
# The embedded bus: how often a listener looks for new events, and how long they are
# kept for it (a listener that fell further behind says so with on_ready).
POLL_SECONDS = 0.05
KEEP_SECONDS = 60.0
# Events swept per publish, oldest first: bounded work, and more than one publish adds.
SWEEP_EVENTS = 64


def _nothing() -> None:
    return None


class EventBus(abc.ABC):
    """Publish bytes on a channel; listen to a channel until cancelled."""

    @abc.abstractmethod
    async def publish(self, channel: str, message: bytes) -> None:
        """Send `message` to every listener of `channel` now (none: it is dropped)."""

    @abc.abstractmethod
    async def listen(self, channel: str, deliver: Deliver,
                     on_ready: Callable[[], None] = _nothing) -> None:
        """Call `deliver` with each message on `channel`, until cancelled.

        `on_ready` is called once subscribed and again after every resubscription (a
        reconnect): messages published in between were not delivered.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the bus is not used afterwards."""


class MemoryEventBus(EventBus):
    """One process's bus: listeners are called soon after `publish`, in order."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Deliver]] = {}

    async def publish(self, channel: str, message: bytes) -> None:
        _checked(message)
        loop = asyncio.get_running_loop()
        for deliver in list(self._listeners.get(channel, ())):
            # Soon, not inside the publisher's call: both backends deliver after publish.
            loop.call_soon(deliver, bytes(message))

    async def listen(self, channel: str, deliver: Deliver,
                     on_ready: Callable[[], None] = _nothing) -> None:
        listeners = self._listeners.setdefault(channel, [])
        listeners.append(deliver)
        try:
            on_ready()
            await asyncio.get_running_loop().create_future()   # until cancelled
        finally:
            # close() may have cleared every channel before the listeners are cancelled.
            if deliver in listeners:
                listeners.remove(deliver)
            if not listeners:
                self._listeners.pop(channel, None)

    async def close(self) -> None:
        self._listeners.clear()


class RedisEventBus(EventBus):
    """Redis pub/sub under the store's key prefix ("portcullis:events:CHANNEL").

    Each listener has its own connection, without redis-py's silent reconnects, so that
    every resubscription is seen (and reported with `on_ready`); a subscription that
    stops answering PINGs is dropped and made again.
    """

    def __init__(self, url: str, *, prefix: str) -> None:
        parts = urlsplit(url)
        try:
            self._address = f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
        except ValueError as exc:
            raise StoreError(f"invalid Redis URL: {exc}") from exc
        self._url = url
        self._prefix = prefix
        try:
            self._publisher = redis.Redis.from_url(
                url, socket_connect_timeout=5.0, socket_timeout=5.0,
                retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries=2))
        except (ValueError, RedisError) as exc:
            raise StoreError(f"invalid Redis URL for {self._address}: {exc}") from exc

    def channel_name(self, channel: str) -> str:
        return f"{self._prefix}events:{channel}"

    async def publish(self, channel: str, message: bytes) -> None:
        _checked(message)
        with self._mapped_errors("PUBLISH"):
            await self._publisher.publish(self.channel_name(channel), message)

    async def listen(self, channel: str, deliver: Deliver,
                     on_ready: Callable[[], None] = _nothing) -> None:
        attempt = 0

        def ready() -> None:
            nonlocal attempt
            attempt = 0   # subscribed again: the next loss reconnects at once
            on_ready()

        while True:
            try:
                await self._subscribed(channel, deliver, ready)
            except (RedisError, OSError, _Silent) as exc:
                delay = RECONNECT_BACKOFF[min(attempt, len(RECONNECT_BACKOFF) - 1)]
                log.warning("event subscription lost; resubscribing", redis=self._address,
                            error=str(exc) or type(exc).__name__, retry_in=delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _subscribed(self, channel: str, deliver: Deliver,
                          on_ready: Callable[[], None]) -> None:
        """One subscription, until its connection fails."""
        client = redis.Redis.from_url(
            self._url, socket_connect_timeout=5.0, socket_keepalive=True,
            retry=Retry(NoBackoff(), retries=0), client_name=f"{self._prefix}events")
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.channel_name(channel))
            ready = False
            pinged_at = answered_at = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=1.0)
                now = time.monotonic()
                if message is not None:
                    kind = message["type"]
                    if kind == "subscribe" and not ready:
                        ready = True
                        on_ready()
                    elif kind == "message" and isinstance(message["data"], bytes):
                        try:
                            deliver(message["data"])
                        except Exception:   # one bad handler must not drop the subscription
                            log.exception("an event handler failed")
                    answered_at = now
                if now - answered_at > 2 * LIVENESS_SECONDS:
                    raise _Silent("Redis stopped answering the subscription")
                if now - pinged_at > LIVENESS_SECONDS:
                    pinged_at = now
                    await pubsub.ping()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def close(self) -> None:
        with self._mapped_errors("close"):
            await self._publisher.aclose()

    @contextmanager
    def _mapped_errors(self, command: str) -> Iterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            raise StoreError(f"cannot {command} an event on Redis at {self._address}: {exc}; "
                             "check that it runs and that the ephemeral store URL is "
                             "right") from exc


class SqliteEventBus(EventBus):
    """Events in the embedded store's file: a publish is a row, listeners poll for rows
    newer than the last they saw (every POLL_SECONDS), so every process opening the file
    hears them. Rows older than KEEP_SECONDS are swept as others are published; a
    listener that could not read for half that long says it is ready again (`on_ready`),
    as after an outage, so that whoever relies on the events re-checks what they say."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._publisher = EmbeddedFile(path)
        self._listeners: set[EmbeddedFile] = set()
        self._clock = clock

    async def publish(self, channel: str, message: bytes) -> None:
        _checked(message)
        now = self._clock()
        await self._publisher.run("publish an event", lambda db: db.execute(
            "INSERT INTO events (channel, message, created) VALUES (?, ?, ?)",
            (channel, bytes(message), now)))
        await self._publisher.run("sweep old events", lambda db: db.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT ?) "
            "AND created < ?", (SWEEP_EVENTS, now - KEEP_SECONDS)))

    async def listen(self, channel: str, deliver: Deliver,
                     on_ready: Callable[[], None] = _nothing) -> None:
        # A connection of its own: a poll never waits behind this process's publishes.
        embedded = EmbeddedFile(self._publisher.path)
        self._listeners.add(embedded)
        last: int | None = None   # the newest event seen; None until listening
        ready = False              # on_ready said so, and no read failed since
        failing = False
        read_at = self._clock()    # when the last read succeeded
        try:
            while True:
                try:
                    if last is None:
                        last, rows = await self._newest(embedded), []
                    else:
                        rows = await self._since(embedded, channel, last)
                except StoreError as exc:
                    if not failing:
                        log.warning("cannot read events; retrying", error=str(exc))
                    failing, ready = True, False
                    await asyncio.sleep(RECONNECT_BACKOFF[-1])
                    continue
                failing = False
                now = self._clock()
                if ready and now - read_at > KEEP_SECONDS / 2:
                    # This process did not read for so long (stopped, its loop blocked)
                    # that events published meanwhile may have been swept unheard.
                    log.warning("events not read for a while; whoever relies on them "
                                "re-checks", seconds=round(now - read_at, 1))
                    ready = False
                read_at = now
                if not ready:
                    # Listening, or again after failed reads or a long pause, during which
                    # events may have been swept: whoever relies on them re-checks.
                    ready = True
                    on_ready()
                for event_id, message in rows:
                    last = event_id
                    try:
                        deliver(message)
                    except Exception:   # one bad handler must not stop the others' events
                        log.exception("an event handler failed")
                await asyncio.sleep(POLL_SECONDS)
        finally:
            self._listeners.discard(embedded)
            embedded.close()

    @staticmethod
    async def _newest(embedded: EmbeddedFile) -> int:
        row = await embedded.run("read events", lambda db: db.execute(
            "SELECT coalesce(max(id), 0) FROM events").fetchone())
        return int(row[0])

    @staticmethod
    async def _since(embedded: EmbeddedFile, channel: str,
                     last: int) -> list[tuple[int, bytes]]:
        rows = await embedded.run("read events", lambda db: db.execute(
            "SELECT id, message FROM events WHERE id > ? AND channel = ? ORDER BY id",
            (last, channel)).fetchall())
        return [(int(id_), bytes(message)) for id_, message in rows]

    async def close(self) -> None:
        self._publisher.close()
        for embedded in list(self._listeners):
            embedded.close()


class _Silent(Exception):
    """The subscription's connection is open but Redis does not answer on it."""


def _checked(message: bytes) -> None:
    if len(message) > MAX_MESSAGE:
        raise ValueError(f"an event is at most {MAX_MESSAGE} bytes, not {len(message)}")


def open_event_bus(url: str, *, prefix: str | None = None) -> EventBus:
    """The bus beside the ephemeral store at `url` (the same file; or the same Redis,
    same key prefix).

    "memory://" gives a bus of this process only: another process (the CLI) publishing
    on it reaches nobody.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryEventBus()
    if scheme == "sqlite":
        return SqliteEventBus(sqlite_path(url))
    redis_url, chosen = redis_url_and_prefix(url, prefix)
    return RedisEventBus(redis_url, prefix=chosen)
