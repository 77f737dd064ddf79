"""The EventBus contract: every test runs on MemoryEventBus, SqliteEventBus and
RedisEventBus.

`two_buses` gives two handles on one bus: the same object in memory (one process), two
SqliteEventBus instances on one file (two processes of a node), two RedisEventBus
instances with one prefix on Redis (two nodes). Waits are on conditions, bounded in time.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as redis

from peers.stores import answering_redis_url
from portcullis.errors import StoreError
from portcullis.store import (
    EventBus,
    MemoryEventBus,
    RedisEventBus,
    SqliteEventBus,
    open_event_bus,
)
from portcullis.store.events import KEEP_SECONDS

WAIT = 5.0


class Heard:
    """What one listener received, with a way to wait for it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.ready = 0
        self._changed = asyncio.Event()

    def deliver(self, message: bytes) -> None:
        self.messages.append(message)
        self._changed.set()

    def on_ready(self) -> None:
        self.ready += 1
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class Listening:
    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, bus: EventBus, channel: str) -> Heard:
        heard = Heard()
        self._tasks.append(asyncio.create_task(bus.listen(channel, heard.deliver,
                                                          heard.on_ready)))
        await heard.until(lambda: heard.ready >= 1)
        return heard

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def listening() -> AsyncIterator[Listening]:
    tasks = Listening()
    yield tasks
    await tasks.stop()


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def two_buses(request: pytest.FixtureRequest,
                    tmp_path: Path) -> AsyncIterator[tuple[EventBus, EventBus]]:
    if request.param == "memory":
        bus = MemoryEventBus()
        yield bus, bus
        await bus.close()
        return
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ephemeral.db'}"
        near, far = open_event_bus(url), open_event_bus(url)
        yield near, far
        await near.close()
        await far.close()
        return
    url = await answering_redis_url()
    prefix = f"pc-test-{secrets.token_hex(6)}:"
    first, second = open_event_bus(url, prefix=prefix), open_event_bus(url, prefix=prefix)
    yield first, second
    await first.close()
    await second.close()


async def test_an_event_reaches_every_listener_of_its_channel(
        two_buses: tuple[EventBus, EventBus], listening: Listening) -> None:
    publisher, other = two_buses
    near = await listening.start(publisher, "session-ended")
    far = await listening.start(other, "session-ended")
    await publisher.publish("session-ended", b"\x00one\xff")
    await other.publish("session-ended", b"two")
    for heard in (near, far):
        await heard.until(lambda heard=heard: len(heard.messages) == 2)  # type: ignore[misc]
        assert heard.messages == [b"\x00one\xff", b"two"]


async def test_a_listener_hears_only_its_own_channel(
        two_buses: tuple[EventBus, EventBus], listening: Listening) -> None:
    publisher, other = two_buses
    heard = await listening.start(other, "wanted")
    await publisher.publish("unwanted", b"not for you")
    await publisher.publish("wanted", b"for you")
    await heard.until(lambda: bool(heard.messages))
    assert heard.messages == [b"for you"]


async def test_an_event_published_with_nobody_listening_is_dropped(
        two_buses: tuple[EventBus, EventBus], listening: Listening) -> None:
    publisher, other = two_buses
    await publisher.publish("later", b"lost")
    heard = await listening.start(other, "later")
    await publisher.publish("later", b"heard")
    await heard.until(lambda: bool(heard.messages))
    assert heard.messages == [b"heard"]


async def test_an_event_larger_than_the_limit_is_refused(
        two_buses: tuple[EventBus, EventBus]) -> None:
    with pytest.raises(ValueError, match="at most"):
        await two_buses[0].publish("big", b"x" * 5000)


async def test_a_stopped_listener_hears_nothing_more(two_buses: tuple[EventBus, EventBus],
                                                     listening: Listening) -> None:
    publisher, other = two_buses
    stopped = Listening()
    gone = await stopped.start(other, "c")
    await stopped.stop()
    kept = await listening.start(other, "c")
    await publisher.publish("c", b"after")
    await kept.until(lambda: bool(kept.messages))
    assert gone.messages == []


async def test_a_redis_listener_resubscribes_after_its_connection_is_killed_and_says_so(
        listening: Listening) -> None:
    url = await answering_redis_url()
    prefix = f"pc-test-{secrets.token_hex(6)}:"
    bus = open_event_bus(url, prefix=prefix)
    assert isinstance(bus, RedisEventBus)
    heard = await listening.start(bus, "session-ended")
    admin = redis.Redis.from_url(url)
    try:
        clients = await admin.client_list()
        ours = [c["id"] for c in clients if c.get("name") == f"{prefix}events"]
        assert len(ours) == 1
        await admin.client_kill_filter(_id=ours[0])
        await heard.until(lambda: heard.ready >= 2)
        await bus.publish("session-ended", b"after the drop")
        await heard.until(lambda: bool(heard.messages))
        assert heard.messages == [b"after the drop"]
    finally:
        await admin.aclose()
        await bus.close()


async def test_redis_buses_with_other_prefixes_do_not_hear_each_other(
        listening: Listening) -> None:
    url = await answering_redis_url()
    mine = open_event_bus(url, prefix=f"pc-test-{secrets.token_hex(6)}:")
    theirs = open_event_bus(url, prefix=f"pc-test-{secrets.token_hex(6)}:")
    try:
        heard = await listening.start(mine, "session-ended")
        await theirs.publish("session-ended", b"another deployment")
        await mine.publish("session-ended", b"ours")
        await heard.until(lambda: bool(heard.messages))
        assert heard.messages == [b"ours"]
    finally:
        await mine.close()
        await theirs.close()


async def test_publishing_to_an_unreachable_redis_is_a_store_error_naming_it() -> None:
    with socket.socket() as unused:   # bound, never listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        bus = open_event_bus(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(StoreError, match=f"127.0.0.1:{port}"):
            await bus.publish("session-ended", b"x")
        await bus.close()


def test_memory_url_gives_an_in_process_bus() -> None:
    assert isinstance(open_event_bus("memory://"), MemoryEventBus)


# A process of its own (the CLI, another worker) publishing on the embedded bus.
PUBLISHER = """
import asyncio, sys
from portcullis.store import open_event_bus

async def main(url):
    bus = open_event_bus(url)
    await bus.publish("session-ended", b"from another process")
    await bus.close()

asyncio.run(main(sys.argv[1]))
"""


async def test_an_embedded_event_published_by_another_process_is_heard(
        tmp_path: Path, listening: Listening) -> None:
    url = f"sqlite:///{tmp_path / 'ephemeral.db'}"
    bus = open_event_bus(url)
    assert isinstance(bus, SqliteEventBus)
    heard = await listening.start(bus, "session-ended")
    publisher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, url, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        _, err = await publisher.communicate()
    assert publisher.returncode == 0, err.decode()
    await heard.until(lambda: bool(heard.messages))
    assert heard.messages == [b"from another process"]
    await bus.close()


async def test_embedded_events_older_than_a_minute_are_swept(tmp_path: Path) -> None:
    now = [1000.0]
    bus = SqliteEventBus(tmp_path / "ephemeral.db", clock=lambda: now[0])
    for _ in range(100):
        await bus.publish("session-ended", b"old")
    now[0] += KEEP_SECONDS + 1
    for _ in range(3):
        await bus.publish("session-ended", b"new")
    db = sqlite3.connect(tmp_path / "ephemeral.db")
    kept = [row[0] for row in db.execute("SELECT message FROM events")]
    db.close()
    assert kept == [b"new"] * 3
    await bus.close()


async def test_an_embedded_listener_that_fell_behind_says_it_is_ready_again(
        tmp_path: Path) -> None:
    """Rows are swept after KEEP_SECONDS: a process that did not read for half of that
    (suspended, its loop blocked) may have missed some, so its listeners re-check."""
    now = [1000.0]
    bus = SqliteEventBus(tmp_path / "ephemeral.db", clock=lambda: now[0])
    heard = Heard()
    task = asyncio.create_task(bus.listen("session-ended", heard.deliver, heard.on_ready))
    try:
        await heard.until(lambda: heard.ready == 1)
        await asyncio.sleep(0.2)   # reads while the clock stands still: nothing to say
        assert heard.ready == 1
        now[0] += KEEP_SECONDS / 2 + 1
        await heard.until(lambda: heard.ready == 2)
        await bus.publish("session-ended", b"after")
        await heard.until(lambda: bool(heard.messages))
        assert heard.messages == [b"after"] and heard.ready == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()


async def test_an_embedded_listener_waits_for_its_file_and_then_says_it_is_ready(
        tmp_path: Path) -> None:
    directory = tmp_path / "not-yet"
    bus = SqliteEventBus(directory / "ephemeral.db")
    heard = Heard()
    task = asyncio.create_task(bus.listen("session-ended", heard.deliver, heard.on_ready))
    try:
        await asyncio.sleep(0.2)
        assert heard.ready == 0   # it cannot read the file: not listening yet
        directory.mkdir()
        await heard.until(lambda: heard.ready == 1)
        await bus.publish("session-ended", b"now")
        await heard.until(lambda: bool(heard.messages))
        assert heard.messages == [b"now"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
