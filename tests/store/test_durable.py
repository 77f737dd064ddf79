"""The DurableStore contract, on SQLite (a file under tmp_path) and PostgreSQL (own schema)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
from sqlalchemy import Connection, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from portcullis.errors import DuplicateError, NotFoundError, StoreError
from portcullis.store import LATEST_VERSION, MIGRATIONS, DurableStore, UserRecord
from portcullis.store.durable import async_database_url
from portcullis.store.migrations import Migration, migrate, schema_version


class DurableTarget(Protocol):
    """What the `durable_target` fixture gives: a database that can be opened repeatedly."""

    url: str
    connect_args: dict[str, Any]

    async def open(self) -> DurableStore: ...

# ---- users ------------------------------------------------------------------------------


async def test_an_added_user_is_read_back(durable_store: DurableStore) -> None:
    before = datetime.now(UTC)
    added = await durable_store.add_user("alice", "$argon2id$hash", ["staff", "admins"])
    fetched = await durable_store.get_user("alice")

    assert fetched == added
    assert fetched == UserRecord(
        name="alice",
        password_hash="$argon2id$hash",
        groups=("admins", "staff"),
        disabled=False,
        created_at=added.created_at,
    )
    assert fetched.created_at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=5) <= fetched.created_at <= datetime.now(UTC)


async def test_a_user_without_password_or_groups_is_stored(durable_store: DurableStore) -> None:
    await durable_store.add_user("ldap-only", None)
    user = await durable_store.get_user("ldap-only")
    assert user is not None
    assert user.password_hash is None
    assert user.groups == ()


async def test_an_unknown_user_reads_as_none(durable_store: DurableStore) -> None:
    assert await durable_store.get_user("nobody") is None


async def test_adding_an_existing_user_raises_duplicate_error(
    durable_store: DurableStore,
) -> None:
    await durable_store.add_user("alice", "h1")
    with pytest.raises(DuplicateError, match="'alice' already exists"):
        await durable_store.add_user("alice", "h2", ["admins"])
    user = await durable_store.get_user("alice")
    assert user is not None
    assert (user.password_hash, user.groups) == ("h1", ())


async def test_users_are_listed_sorted_by_name_with_their_groups(
    durable_store: DurableStore,
) -> None:
    await durable_store.add_user("carol", "h", ["ops"])
    await durable_store.add_user("alice", "h", ["staff", "admins"])
    await durable_store.add_user("bob", None)

    users = await durable_store.list_users()
    assert [(u.name, u.groups) for u in users] == [
        ("alice", ("admins", "staff")),
        ("bob", ()),
        ("carol", ("ops",)),
    ]


async def test_an_empty_store_lists_no_users(durable_store: DurableStore) -> None:
    assert await durable_store.list_users() == []


async def test_set_password_replaces_the_hash(durable_store: DurableStore) -> None:
    await durable_store.add_user("alice", "old")
    await durable_store.set_password("alice", "new")
    user = await durable_store.get_user("alice")
    assert user is not None and user.password_hash == "new"


async def test_set_disabled_disables_and_reenables_a_user(durable_store: DurableStore) -> None:
    await durable_store.add_user("alice", "h")
    await durable_store.set_disabled("alice", True)
    user = await durable_store.get_user("alice")
    assert user is not None and user.disabled is True

    await durable_store.set_disabled("alice", False)
    user = await durable_store.get_user("alice")
    assert user is not None and user.disabled is False


async def test_set_groups_replaces_the_groups_sorted_and_without_repeats(
    durable_store: DurableStore,
) -> None:
    await durable_store.add_user("alice", "h", ["staff"])
    await durable_store.set_groups("alice", ["ops", "admins", "ops"])
    user = await durable_store.get_user("alice")
    assert user is not None and user.groups == ("admins", "ops")

    await durable_store.set_groups("alice", [])
    user = await durable_store.get_user("alice")
    assert user is not None and user.groups == ()


async def test_groups_of_one_user_do_not_leak_to_another(durable_store: DurableStore) -> None:
    await durable_store.add_user("alice", "h", ["admins"])
    await durable_store.add_user("bob", "h", ["staff"])
    await durable_store.set_groups("alice", ["ops"])
    bob = await durable_store.get_user("bob")
    assert bob is not None and bob.groups == ("staff",)


@pytest.mark.parametrize(
    "change",
    [
        lambda store: store.set_password("ghost", "h"),
        lambda store: store.set_disabled("ghost", True),
        lambda store: store.set_groups("ghost", ["admins"]),
    ],
    ids=["set_password", "set_disabled", "set_groups"],
)
async def test_changing_an_unknown_user_raises_not_found_error(
    durable_store: DurableStore, change: Callable[[DurableStore], Awaitable[None]]
) -> None:
    with pytest.raises(NotFoundError, match="'ghost'"):
        await change(durable_store)
    assert await durable_store.list_users() == []


async def test_disabled_among_names_only_disabled_local_accounts(
    durable_store: DurableStore,
) -> None:
    await durable_store.add_user("alice", "h")
    await durable_store.add_user("bob", "h")
    await durable_store.add_user("carol", "h")
    await durable_store.set_disabled("bob", True)

    # "directory-user" has no local account: nothing here says it must go.
    assert await durable_store.disabled_among(["alice", "bob", "carol", "directory-user"]) == {
        "bob"
    }


async def test_disabled_among_no_names_is_empty(durable_store: DurableStore) -> None:
    assert await durable_store.disabled_among([]) == set()


async def test_disabled_among_handles_more_names_than_one_query_takes(
    durable_store: DurableStore,
) -> None:
    for name in ("alice", "zed"):
        await durable_store.add_user(name, "h")
        await durable_store.set_disabled(name, True)
    names = ["alice", *(f"other-{i}" for i in range(1200)), "zed"]
    assert await durable_store.disabled_among(names) == {"alice", "zed"}


async def test_concurrent_writers_do_not_fail(durable_store: DurableStore) -> None:
    await asyncio.gather(*(durable_store.add_user(f"user{i:02}", "h", ["g"]) for i in range(10)))
    assert len(await durable_store.list_users()) == 10


# ---- migrations ---------------------------------------------------------------------------


async def test_a_new_database_is_migrated_to_the_latest_version(
    durable_store: DurableStore,
) -> None:
    assert await durable_store.schema_version() == LATEST_VERSION


async def test_opening_a_database_twice_applies_each_migration_once(
    durable_target: DurableTarget,
) -> None:
    first = await durable_target.open()
    await first.add_user("alice", "h")
    await first.close()

    second = await durable_target.open()
    try:
        assert await second.schema_version() == LATEST_VERSION
        assert await _applied_versions(durable_target) == [m.version for m in MIGRATIONS]
        assert [u.name for u in await second.list_users()] == ["alice"]
    finally:
        await second.close()


async def test_a_database_at_an_older_version_is_migrated_to_the_latest(
    durable_target: DurableTarget,
) -> None:
    assert len(MIGRATIONS) >= 2, "this test needs an older version to start from"
    async with _raw_engine(durable_target) as engine, engine.begin() as conn:
        await conn.run_sync(lambda c: _migrate_only(c, MIGRATIONS[:1]))

    store = await durable_target.open()
    try:
        assert await store.schema_version() == LATEST_VERSION
        assert await _applied_versions(durable_target) == [m.version for m in MIGRATIONS]
        await store.add_user("alice", "h", ["admins"])
        user = await store.get_user("alice")
        assert user is not None and user.groups == ("admins",)
    finally:
        await store.close()


async def test_two_stores_opening_one_new_database_at_once_both_succeed(
    durable_target: DurableTarget,
) -> None:
    stores = await asyncio.gather(durable_target.open(), durable_target.open())
    try:
        assert await _applied_versions(durable_target) == [m.version for m in MIGRATIONS]
        await stores[0].add_user("alice", "h")
        assert await stores[1].get_user("alice") is not None
    finally:
        for store in stores:
            await store.close()


async def test_a_database_newer_than_the_code_is_refused(
    durable_target: DurableTarget,
) -> None:
    store = await durable_target.open()
    await store.close()
    async with _raw_engine(durable_target) as engine, engine.begin() as conn:
        await conn.execute(
            schema_version.insert().values(
                version=LATEST_VERSION + 1, description="future", applied_at=datetime.now(UTC)
            )
        )
    with pytest.raises(StoreError, match="newer than this Portcullis"):
        await durable_target.open()


# ---- opening and errors -------------------------------------------------------------------


async def test_plain_sqlite_url_is_opened_with_the_async_driver(tmp_path: Path) -> None:
    store = await DurableStore.open(f"sqlite:///{tmp_path / 'plain.sqlite'}")
    try:
        await store.add_user("alice", "h")
        assert (tmp_path / "plain.sqlite").exists()
    finally:
        await store.close()


def test_plain_postgresql_urls_are_rewritten_to_asyncpg() -> None:
    for url in ("postgresql://u@db/x", "postgres://u@db/x"):
        assert async_database_url(url).drivername == "postgresql+asyncpg"


async def test_an_unsupported_database_url_raises_store_error() -> None:
    with pytest.raises(StoreError, match="unsupported database URL scheme 'mysql'"):
        await DurableStore.open("mysql://root@localhost/portcullis")


async def test_a_sqlite_file_in_a_missing_directory_raises_store_error_naming_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "no-such-dir" / "db.sqlite"
    with pytest.raises(StoreError, match=f"cannot open database at {path}"):
        await DurableStore.open(f"sqlite:///{path}")


async def test_an_unreachable_postgresql_raises_store_error_naming_it_without_password() -> None:
    with pytest.raises(StoreError, match=r"cannot open database at .*127\.0\.0\.1:1/") as caught:
        await DurableStore.open("postgresql://admin:s3cret@127.0.0.1:1/portcullis")
    assert "s3cret" not in str(caught.value)


@asynccontextmanager
async def _raw_engine(target: DurableTarget) -> AsyncIterator[AsyncEngine]:
    """An engine on the target's database that bypasses DurableStore (and its migrations)."""
    engine = create_async_engine(async_database_url(target.url), connect_args=target.connect_args)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _applied_versions(target: DurableTarget) -> list[int]:
    async with _raw_engine(target) as engine, engine.connect() as conn:
        rows = await conn.execute(select(schema_version.c.version).order_by("version"))
        return list(rows.scalars())


def _migrate_only(conn: Connection, steps: Sequence[Migration]) -> None:
    migrate(conn, steps)
    count = conn.execute(select(func.count()).select_from(schema_version)).scalar_one()
    assert count == len(steps)
