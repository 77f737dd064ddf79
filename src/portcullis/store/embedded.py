"""The embedded ephemeral store: one SQLite file that every process of a node shares.

`SqliteStore` keeps what `MemoryStore` keeps (tickets, sessions, counters, sets), but in a
file in WAL mode: every worker process of a node and the CLI see the same state, and a
restart keeps it. Expiry is wall-clock time (`time.time()`), stored per row, because it
must mean the same in every process and after a reboot; expired rows are invisible at
once, and each write sweeps a few of them away, so garbage stays proportional to writes.

Why statements run on the event loop, not in a thread: each is a few microseconds on a
local file (WAL, synchronous=NORMAL: a commit appends to the log without an fsync), and
handing it to a thread costs more than running it (bench/store_ops.py: direct calls do
about twice the operations per second of one thread; see docs/performance.md). What must
not block the loop is waiting for another process's write lock: SQLite's own busy wait
sleeps inside the call (measured: loop stalls of over a second with four processes
writing flat out), so SQLite is told not to wait, and `EmbeddedFile.run` retries a busy
statement after an asyncio sleep instead.

Atomicity comes from SQLite, against every caller in this process or another: `take` is
one DELETE … RETURNING, `put_new` and `incr` one UPSERT each, set changes one IMMEDIATE
transaction.

Never lets a sqlite3 exception escape: failures leave as `StoreError` naming the file,
never the keys or values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from portcullis.errors import StoreError
from portcullis.store.ephemeral import Clock, EphemeralStore, checked_ttl

T = TypeVar("T")

SCHEMA_VERSION = 1
# How long a write may wait for another process's write lock before it fails, and the
# pauses between its tries (doubling): short, as the lock is held for microseconds.
BUSY_SECONDS = 5.0
BUSY_FIRST_PAUSE = 0.0005
BUSY_LONGEST_PAUSE = 0.02
# Every SWEEP_EVERY writes, up to SWEEP_ROWS expired rows are deleted: on average one
# write removes SWEEP_ROWS / SWEEP_EVERY rows, more than it can add, at bounded cost.
SWEEP_EVERY = 16
SWEEP_ROWS = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    value BLOB,                     -- NULL: the key holds a set (its members below)
    expires_at REAL NOT NULL        -- time.time() seconds
);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_at);
CREATE TABLE IF NOT EXISTS members (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
-- A set's members go with its row: deleted, or replaced by a value.
CREATE TRIGGER IF NOT EXISTS entries_deleted AFTER DELETE ON entries
    WHEN OLD.value IS NULL
    BEGIN DELETE FROM members WHERE key = OLD.key; END;
CREATE TRIGGER IF NOT EXISTS entries_replaced AFTER UPDATE OF value ON entries
    WHEN OLD.value IS NULL AND NEW.value IS NOT NULL
    BEGIN DELETE FROM members WHERE key = OLD.key; END;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: listeners read id > last seen
    channel TEXT NOT NULL,
    message BLOB NOT NULL,
    created REAL NOT NULL
);
"""

# Digits only: what `incr` counts on (it refuses any other value, as MemoryStore does).
_IS_COUNTER = ("(entries.value IS NOT NULL AND CAST(entries.value AS TEXT) GLOB '[0-9]*' "
               "AND CAST(entries.value AS TEXT) NOT GLOB '*[^0-9]*')")


def sqlite_path(url: str) -> Path:
    """The file of a "sqlite:///path" URL (absolute with four slashes)."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite" or parts.netloc or not parts.path.strip("/"):
        raise StoreError(f"an embedded store URL is sqlite:///path/to/file.db, not {url!r}")
    # "sqlite:///x.db" is the relative x.db, "sqlite:////var/x.db" the absolute /var/x.db.
    return Path(unquote(parts.path[1:]))


# Connections a forked process inherited: never used nor closed there (SQLite forbids
# both), and kept referenced so that garbage collection does not close them either.
_INHERITED: list[sqlite3.Connection] = []


class EmbeddedFile:
    """One connection to the node's SQLite file, opened at first use with the schema.

    A process forked after the first use (workers started from a built node) opens a
    connection of its own at its first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._pid = 0

    @property
    def db(self) -> sqlite3.Connection:
        if self._connection is not None and self._pid != os.getpid():
            _INHERITED.append(self._connection)
            self._connection = None
        if self._connection is None:
            with self.mapped_errors("open"):
                self._connection = _connect(self.path)
            self._pid = os.getpid()
        return self._connection

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and self._pid == os.getpid():
            with self.mapped_errors("close"):
                connection.close()
        elif connection is not None:
            _INHERITED.append(connection)

    @contextmanager
    def mapped_errors(self, doing: str) -> Iterator[None]:
        """The one place where sqlite3 exceptions become ours (keys are not named)."""
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"the embedded store {self.path} failed to {doing}: {exc}; "
                             "check that the file and its directory are writable by this "
                             "user and the disk is not full") from exc
        except OSError as exc:
            raise StoreError(f"cannot open the embedded store {self.path}: "
                             f"{exc.strerror or exc}") from exc

    async def run(self, doing: str, operation: Callable[[sqlite3.Connection], T]) -> T:
        """`operation` on this process's connection. While another process holds the
        write lock, wait without holding up the event loop and try again, up to
        BUSY_SECONDS; `operation` must leave nothing done when it fails (one statement,
        or one `transaction`)."""
        pause, waited = BUSY_FIRST_PAUSE, 0.0
        while True:
            with self.mapped_errors(doing):
                try:
                    return operation(self.db)
                except sqlite3.OperationalError as exc:
                    if not _busy(exc) or waited >= BUSY_SECONDS:
                        raise
            await asyncio.sleep(pause)
            waited += pause
            pause = min(2 * pause, BUSY_LONGEST_PAUSE)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction that holds the file's write lock from its first statement (a
    busy file fails the BEGIN, before anything is done)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _busy(exc: sqlite3.OperationalError) -> bool:
    # The primary code, whatever the extended one (BUSY_SNAPSHOT, BUSY_RECOVERY, ...).
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _check_private(path: Path) -> None:
    """The file is ours alone: not a link planted to redirect it, not another user's, not
    readable by others (it holds sessions and tickets, hashed, but still). lstat, not
    open: opening and closing it here would drop this process's locks (see _connect)."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise StoreError(f"cannot open the embedded store {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise StoreError(f"the embedded store {path} is not a regular file: remove it")
    if info.st_uid != os.geteuid():
        raise StoreError(f"the embedded store {path} belongs to another user: run "
                         "portcullis as its owner, or remove the file")
    if info.st_mode & 0o077:
        raise StoreError(f"the embedded store {path} is open to other users: "
                         f"chmod 600 {path}")


def _connect(path: Path) -> sqlite3.Connection:
    # Created 0600 before SQLite opens it (the -wal and -shm files take its mode). Only
    # if it does not exist yet: closing a descriptor of a file drops every POSIX lock
    # this process holds on it, the locks of its open connections too, and another
    # process would then take itself for the last user and delete the write-ahead log.
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    _check_private(path)
    # Autocommit (isolation_level None): each statement is its own transaction unless we
    # BEGIN one; check_same_thread off so that close() may come from any thread. Opening
    # may wait for the lock (once per process); afterwards `run` waits, not SQLite.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=BUSY_SECONDS)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL loses at most the last commits on a power cut, never the
        # file's consistency: right for state that expires within hours anyway.
        db.execute("PRAGMA synchronous = NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise StoreError(f"the embedded store {path} was made by another version of "
                             f"Portcullis (schema {version}); stop the node and delete it "
                             "(it holds only sessions, tickets and counters)")
        if version == 0:
            # Processes starting together may all get here: the write lock orders them,
            # and IF NOT EXISTS makes the later ones do nothing.
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} "
                             f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        db.execute("PRAGMA busy_timeout = 0")
    except BaseException:
        db.close()
        raise
    return db


class SqliteStore(EphemeralStore):
    """The ephemeral store in one SQLite file, shared by the processes that open it."""

    def __init__(self, path: Path, *, clock: Clock = time.time) -> None:
        self._file = EmbeddedFile(path)
        self._clock = clock
        self._writes = 0

    @property
    def path(self) -> Path:
        return self._file.path

    @property
    def connection(self) -> sqlite3.Connection:
        """This process's connection to the file (for tests and diagnostics)."""
        return self._file.db

    def __len__(self) -> int:
        """Rows held, including expired ones not swept yet (for tests and metrics)."""
        with self._file.mapped_errors("count"):
            return int(self._file.db.execute("SELECT count(*) FROM entries").fetchone()[0])

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        now = self._clock()
        expires = now + checked_ttl(ttl)
        await self._file.run("store a value", lambda db: db.execute(
            "INSERT INTO entries (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at", (key, bytes(value), expires)))
        await self._written(now)

    async def put_new(self, key: str, value: bytes, ttl: float) -> bool:
        now = self._clock()
        expires = now + checked_ttl(ttl)
        # Stores when the key is absent, or present but expired: one statement.
        stored = await self._file.run("store a value", lambda db: db.execute(
            "INSERT INTO entries (key, value, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
            "expires_at = excluded.expires_at WHERE entries.expires_at <= ? "
            "RETURNING 1", (key, bytes(value), expires, now)).fetchone())
        await self._written(now)
        return stored is not None

    async def get(self, key: str) -> bytes | None:
        now = self._clock()
        row = await self._file.run("read a value", lambda db: db.execute(
            "SELECT value, value IS NULL FROM entries WHERE key = ? AND expires_at > ?",
            (key, now)).fetchone())
        if row is None:
            return None
        if row[1]:
            raise StoreError("the key holds a set, not a value")
        return bytes(row[0])

    async def take(self, key: str) -> bytes | None:
        now = self._clock()
        row = await self._file.run("take a value", lambda db: db.execute(
            "DELETE FROM entries WHERE key = ? AND expires_at > ? AND value IS NOT NULL "
            "RETURNING value", (key, now)).fetchone())
        if row is not None:
            return bytes(row[0])
        if await self._holds_set(key, now):
            raise StoreError("the key holds a set, not a value")
        return None

    async def delete(self, key: str) -> None:
        await self._file.run("delete a key", lambda db: db.execute(
            "DELETE FROM entries WHERE key = ?", (key,)))

    async def touch(self, key: str, ttl: float) -> bool:
        now = self._clock()
        expires = now + checked_ttl(ttl)
        touched = await self._file.run("refresh a key", lambda db: db.execute(
            "UPDATE entries SET expires_at = ? WHERE key = ? AND expires_at > ? "
            "RETURNING 1", (expires, key, now)).fetchone())
        return touched is not None

    async def incr(self, key: str, ttl: float) -> int:
        now = self._clock()
        expires = now + checked_ttl(ttl)
        # A new or expired counter starts at 1 with this TTL; a live one keeps its TTL.
        # A live value that is no counter (or a set) fails the WHERE: no row back.
        row = await self._file.run("count", lambda db: db.execute(
            "INSERT INTO entries (key, value, expires_at) VALUES (?, CAST('1' AS BLOB), ?) "
            "ON CONFLICT (key) DO UPDATE SET "
            "value = CASE WHEN entries.expires_at <= ? THEN excluded.value "
            "ELSE CAST(CAST(CAST(CAST(entries.value AS TEXT) AS INTEGER) + 1 AS TEXT) AS BLOB) "
            "END, "
            "expires_at = CASE WHEN entries.expires_at <= ? THEN excluded.expires_at "
            "ELSE entries.expires_at END "
            f"WHERE entries.expires_at <= ? OR {_IS_COUNTER} "
            "RETURNING CAST(value AS TEXT)", (key, expires, now, now, now)).fetchone())
        await self._written(now)
        if row is None:
            raise StoreError("incr on a value that is not an integer counter")
        return int(row[0])

    async def add_to_set(self, key: str, member: str, ttl: float) -> None:
        now = self._clock()
        expires = now + checked_ttl(ttl)

        def add(db: sqlite3.Connection) -> None:
            with transaction(db):
                row = db.execute("SELECT value IS NULL, expires_at > ? FROM entries "
                                 "WHERE key = ?", (now, key)).fetchone()
                if row is not None and row[1] and not row[0]:
                    raise StoreError("the key holds a value, not a set")
                if row is not None and not row[1]:
                    db.execute("DELETE FROM entries WHERE key = ?", (key,))  # and members
                db.execute("INSERT INTO entries (key, value, expires_at) VALUES (?, NULL, ?) "
                           "ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at",
                           (key, expires))
                db.execute("INSERT OR IGNORE INTO members (key, member) VALUES (?, ?)",
                           (key, member))

        await self._file.run("add to a set", add)
        await self._written(now)

    async def set_members(self, key: str) -> set[str]:
        now = self._clock()
        rows = await self._file.run("read a set", lambda db: db.execute(
            "SELECT entries.value IS NULL, members.member FROM entries "
            "LEFT JOIN members ON members.key = entries.key "
            "WHERE entries.key = ? AND entries.expires_at > ?", (key, now)).fetchall())
        if rows and not rows[0][0]:
            raise StoreError("the key holds a value, not a set")
        return {member for _, member in rows if member is not None}

    async def remove_from_set(self, key: str, member: str) -> None:
        now = self._clock()

        def remove(db: sqlite3.Connection) -> None:
            with transaction(db):
                row = db.execute("SELECT value IS NULL FROM entries WHERE key = ? AND "
                                 "expires_at > ?", (key, now)).fetchone()
                if row is None:
                    return
                if not row[0]:
                    raise StoreError("the key holds a value, not a set")
                db.execute("DELETE FROM members WHERE key = ? AND member = ?", (key, member))
                db.execute("DELETE FROM entries WHERE key = ? AND NOT EXISTS "
                           "(SELECT 1 FROM members WHERE key = ?)", (key, key))

        await self._file.run("remove from a set", remove)

    async def ping(self) -> None:
        await self._file.run("answer", lambda db: db.execute(
            "SELECT 1 FROM entries LIMIT 1").fetchall())

    async def close(self) -> None:
        self._file.close()

    async def _holds_set(self, key: str, now: float) -> bool:
        row = await self._file.run("read a value", lambda db: db.execute(
            "SELECT 1 FROM entries WHERE key = ? AND expires_at > ? AND value IS NULL",
            (key, now)).fetchone())
        return row is not None

    async def _written(self, now: float) -> None:
        self._writes += 1
        if self._writes % SWEEP_EVERY:
            return
        await self._file.run("sweep expired keys", lambda db: db.execute(
            "DELETE FROM entries WHERE rowid IN (SELECT rowid FROM entries "
            "WHERE expires_at <= ? ORDER BY expires_at LIMIT ?)", (now, SWEEP_ROWS)))
