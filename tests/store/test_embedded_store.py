"""The embedded store beyond the EphemeralStore contract (test_ephemeral.py runs that on
it): wall-clock expiry, single use across processes, a restart, bounded garbage, the file.

Processes race for real: each worker is a Python subprocess that waits for a start file,
so all of them hit the store at once.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import sqlite3
import stat
import sys
from collections import Counter
from pathlib import Path

import pytest

from peers.stores import FakeClock
from portcullis.errors import StoreError
from portcullis.store import SqliteStore, embedded, open_ephemeral
from portcullis.store.embedded import SWEEP_EVERY, sqlite_path

LONG_TTL = 600.0
WORKERS = 8
KEYS = 100

# A racer: wait for the start file, then try every key in its own order; print what it won.
RACER = """
import asyncio, json, os, random, sys, time
from pathlib import Path
from portcullis.store import SqliteStore

async def main(path, start, mode, me, keys):
    store = SqliteStore(Path(path))
    await store.ping()
    print("ready", flush=True)
    order = list(range(keys))
    random.shuffle(order)
    deadline = time.monotonic() + 20
    while not os.path.exists(start) and time.monotonic() < deadline:
        time.sleep(0.001)
    won = []
    for i in order:
        if mode == "take":
            if await store.take(f"ticket:{i}") is not None:
                won.append(i)
        elif await store.put_new(f"nonce:{i}", me.encode(), 600):
            won.append(i)
    await store.close()
    print(json.dumps(won))

path, start, mode, me, keys = sys.argv[1:]
asyncio.run(main(path, start, mode, me, int(keys)))
"""


async def race(tmp_path: Path, mode: str) -> list[list[int]]:
    """What each of WORKERS processes won of KEYS keys, racing on one file."""
    path, start = tmp_path / "ephemeral.db", tmp_path / "go"
    racers = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", RACER, str(path), str(start), mode, f"w{n}", str(KEYS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        for n in range(WORKERS)]
    async with asyncio.timeout(60):
        for racer in racers:   # each has opened the file
            assert racer.stdout is not None
            assert await racer.stdout.readline() == b"ready\n"
        start.touch()
        outputs = [await racer.communicate() for racer in racers]
    for racer, (_, err) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, err.decode()
    return [json.loads(out) for out, _ in outputs]


async def test_a_ticket_is_taken_once_by_8_processes_racing_for_100(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ephemeral.db")
    for i in range(KEYS):
        await store.put(f"ticket:{i}", b"ticket", LONG_TTL)
    won = await race(tmp_path, "take")
    counts = Counter(key for keys in won for key in keys)
    assert sorted(counts) == list(range(KEYS))
    assert set(counts.values()) == {1}
    assert await store.get("ticket:0") is None
    await store.close()


async def test_put_new_has_one_winner_among_8_processes_for_each_of_100_keys(
        tmp_path: Path) -> None:
    won = await race(tmp_path, "put_new")
    counts = Counter(key for keys in won for key in keys)
    assert sorted(counts) == list(range(KEYS))
    assert set(counts.values()) == {1}
    store = SqliteStore(tmp_path / "ephemeral.db")
    for worker, keys in enumerate(won):
        for key in keys:   # the value stored is the winner's
            assert await store.get(f"nonce:{key}") == f"w{worker}".encode()
    await store.close()


async def test_expiry_follows_the_injected_clock(tmp_path: Path, clock: FakeClock) -> None:
    store = SqliteStore(tmp_path / "ephemeral.db", clock=clock)
    await store.put("ticket", b"v", 10.0)
    await store.add_to_set("sessions", "s1", 10.0)
    clock.advance(9.9)
    assert await store.get("ticket") == b"v"
    assert await store.set_members("sessions") == {"s1"}
    clock.advance(0.2)
    assert await store.get("ticket") is None
    assert await store.take("ticket") is None
    assert await store.touch("ticket", 10.0) is False
    assert await store.set_members("sessions") == set()
    # An expired set comes back empty but for what is added now.
    await store.add_to_set("sessions", "s2", 10.0)
    assert await store.set_members("sessions") == {"s2"}
    await store.close()


async def test_another_store_on_the_file_sees_the_same_state(tmp_path: Path) -> None:
    first, second = (SqliteStore(tmp_path / "ephemeral.db") for _ in range(2))
    await first.put("ticket", b"v", LONG_TTL)
    assert await second.take("ticket") == b"v"
    assert await first.get("ticket") is None
    assert await first.incr("attempts", LONG_TTL) == 1
    assert await second.incr("attempts", LONG_TTL) == 2
    await first.close()
    await second.close()


# Another process reading a key and exiting (as the CLI does).
READER = """
import asyncio, sys
from pathlib import Path
from portcullis.store import SqliteStore

async def main(path, key):
    store = SqliteStore(Path(path))
    value = await store.get(key)
    await store.close()
    print(value.decode() if value else "")

asyncio.run(main(*sys.argv[1:]))
"""


async def read_elsewhere(path: Path, key: str) -> str:
    reader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", READER, str(path), key,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(30):
        out, err = await reader.communicate()
    assert reader.returncode == 0, err.decode()
    return out.decode().strip()


async def test_writes_stay_visible_to_other_processes_after_one_of_them_exits(
        tmp_path: Path) -> None:
    # A node opens the file more than once (the store, the event bus): opening the second
    # must not drop the first's locks, or the CLI's exit deletes the write-ahead log
    # under the node, and what the node writes after that nobody else sees.
    path = tmp_path / "ephemeral.db"
    store = SqliteStore(path)
    await store.put("before", b"1", LONG_TTL)
    also = SqliteStore(path)
    await also.ping()
    assert await read_elsewhere(path, "before") == "1"
    await store.put("after", b"2", LONG_TTL)
    assert await read_elsewhere(path, "after") == "2"
    assert (tmp_path / "ephemeral.db-wal").exists()
    await also.close()
    await store.close()


async def test_state_survives_closing_and_opening_the_file_again(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ephemeral.db")
    await store.put("session:a", b"sealed", LONG_TTL)
    await store.incr("throttle:account:alice", LONG_TTL)
    await store.add_to_set("sessions:alice", "a", LONG_TTL)
    await store.close()
    await store.close()   # closing twice is fine

    again = open_ephemeral(f"sqlite:///{tmp_path / 'ephemeral.db'}")
    assert isinstance(again, SqliteStore)
    assert await again.get("session:a") == b"sealed"
    assert await again.incr("throttle:account:alice", LONG_TTL) == 2
    assert await again.set_members("sessions:alice") == {"a"}
    await again.close()


async def test_expired_rows_are_swept_as_the_store_is_written(tmp_path: Path,
                                                              clock: FakeClock) -> None:
    store = SqliteStore(tmp_path / "ephemeral.db", clock=clock)
    for i in range(1000):
        await store.put(f"old:{i}", b"v", 1.0)
    clock.advance(2.0)
    for i in range(1000):
        await store.put(f"new:{i}", b"v", LONG_TTL)
    assert len(store) < 1100   # the 1000 expired rows were swept, not kept forever
    assert SWEEP_EVERY < 1000
    await store.close()


async def test_a_set_and_a_value_under_one_key_are_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ephemeral.db")
    await store.put("value", b"v", LONG_TTL)
    await store.add_to_set("set", "m", LONG_TTL)
    for call in (store.add_to_set("value", "m", LONG_TTL), store.set_members("value"),
                 store.remove_from_set("value", "m"), store.take("set"),
                 store.incr("set", LONG_TTL)):
        with pytest.raises(StoreError, match=r"holds a|not an integer"):
            await call
    assert await store.set_members("set") == {"m"}   # nothing was changed
    await store.put("set", b"now a value", LONG_TTL)  # put replaces, as everywhere
    assert await store.get("set") == b"now a value"
    await store.close()


async def test_the_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ephemeral.db")
    await store.put("k", b"v", LONG_TTL)
    for name in ("ephemeral.db", "ephemeral.db-wal", "ephemeral.db-shm"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    await store.close()


async def test_an_unusable_file_is_a_store_error_naming_it_and_no_key(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "missing-directory" / "ephemeral.db")
    with pytest.raises(StoreError, match=r"missing-directory/ephemeral\.db") as raised:
        await store.put("secret-key-name", b"secret-value", LONG_TTL)
    assert "secret" not in str(raised.value)
    with pytest.raises(StoreError, match="missing-directory"):
        await store.ping()
    await store.close()


async def test_a_file_that_is_no_database_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "ephemeral.db").write_bytes(b"not a database at all" * 100)
    store = SqliteStore(tmp_path / "ephemeral.db")
    with pytest.raises(StoreError, match=r"ephemeral\.db"):
        await store.ping()
    await store.close()


def test_sqlite_urls_name_relative_and_absolute_files() -> None:
    assert sqlite_path("sqlite:///ephemeral.db") == Path("ephemeral.db")
    assert sqlite_path("sqlite:////var/lib/portcullis/e.db") == Path("/var/lib/portcullis/e.db")
    with pytest.raises(StoreError, match="sqlite:///path"):
        sqlite_path("sqlite://host/e.db")


def _put_in_a_forked_child(store: SqliteStore, inherited: sqlite3.Connection) -> None:
    async def put() -> None:
        await store.put("from-child", b"child", LONG_TTL)
        # SQLite forbids using a connection in a process forked after it was opened.
        assert store.connection is not inherited
        await store.close()
    asyncio.run(put())


async def test_a_store_opened_before_a_fork_works_in_the_child_and_the_parent(
        tmp_path: Path) -> None:
    # Worker processes may be forked from a node that has used its store already.
    store = SqliteStore(tmp_path / "ephemeral.db")
    await store.put("from-parent", b"parent", LONG_TTL)
    child = multiprocessing.get_context("fork").Process(target=_put_in_a_forked_child,
                                                        args=(store, store.connection))
    child.start()
    await asyncio.to_thread(child.join, 30)
    assert child.exitcode == 0
    assert await store.get("from-child") == b"child"
    await store.put("after", b"parent", LONG_TTL)
    assert await read_elsewhere(tmp_path / "ephemeral.db", "after") == "parent"
    await store.close()


async def test_a_write_waits_for_another_process_lock_without_holding_up_the_loop(
        tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ephemeral.db")
    await store.ping()
    holder = sqlite3.connect(tmp_path / "ephemeral.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")   # the write lock, as another process's write holds it
    try:
        writing = asyncio.create_task(store.put("k", b"v", LONG_TTL))
        await asyncio.sleep(0.1)   # runs: the waiting write does not block the loop
        assert not writing.done()
    finally:
        holder.execute("COMMIT")
        holder.close()
    async with asyncio.timeout(10):
        await writing
    assert await store.get("k") == b"v"
    await store.close()


async def test_a_write_that_never_gets_the_lock_is_a_store_error_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "BUSY_SECONDS", 0.1)
    store = SqliteStore(tmp_path / "ephemeral.db")
    await store.ping()
    holder = sqlite3.connect(tmp_path / "ephemeral.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match=r"ephemeral\.db.*locked"):
            await store.incr("k", LONG_TTL)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert await store.incr("k", LONG_TTL) == 1   # nothing was half done
    await store.close()


def test_a_store_file_others_may_read_or_a_link_is_refused(tmp_path: Path) -> None:
    from portcullis.errors import StoreError
    from portcullis.store.embedded import _check_private

    private = tmp_path / "ephemeral.db"
    private.touch(mode=0o600)
    _check_private(private)
    private.chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        _check_private(private)
    link = tmp_path / "link.db"
    link.symlink_to(tmp_path / "elsewhere.db")
    with pytest.raises(StoreError, match="not a regular file"):
        _check_private(link)
