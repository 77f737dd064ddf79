"""The EphemeralStore contract: every test runs on MemoryStore and on RedisStore.

Expiry is checked without wall-clock assertions: `tick` moves the fake clock (memory) or
waits briefly (Redis), and we poll a bounded number of times.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

import pytest

from portcullis.errors import StoreError
from portcullis.store import EphemeralStore, MemoryStore, RedisStore, open_ephemeral

Tick = Callable[[], Awaitable[None]]

SHORT_TTL = 0.2
LONG_TTL = 60.0


async def eventually(condition: Callable[[], Awaitable[bool]], tick: Tick) -> bool:
    """True once `condition` holds, False if it never does within 200 ticks (10 s)."""
    for _ in range(200):
        if await condition():
            return True
        await tick()
    return False


async def test_a_stored_value_is_read_back(ephemeral_store: EphemeralStore) -> None:
    await ephemeral_store.put("ticket:a", b"\x00value\xff", LONG_TTL)
    assert await ephemeral_store.get("ticket:a") == b"\x00value\xff"


async def test_a_missing_key_reads_as_none(ephemeral_store: EphemeralStore) -> None:
    assert await ephemeral_store.get("never-written") is None


async def test_put_replaces_the_previous_value(ephemeral_store: EphemeralStore) -> None:
    await ephemeral_store.put("k", b"first", LONG_TTL)
    await ephemeral_store.put("k", b"second", LONG_TTL)
    assert await ephemeral_store.get("k") == b"second"


async def test_a_value_disappears_after_its_ttl(
    ephemeral_store: EphemeralStore, tick: Tick
) -> None:
    await ephemeral_store.put("short", b"v", SHORT_TTL)
    await ephemeral_store.put("long", b"v", LONG_TTL)

    async def short_is_gone() -> bool:
        return await ephemeral_store.get("short") is None

    assert await eventually(short_is_gone, tick)
    assert await ephemeral_store.get("long") == b"v"


async def test_take_returns_the_value_once_then_none(ephemeral_store: EphemeralStore) -> None:
    await ephemeral_store.put("ticket", b"v", LONG_TTL)
    assert await ephemeral_store.take("ticket") == b"v"
    assert await ephemeral_store.take("ticket") is None
    assert await ephemeral_store.get("ticket") is None


async def test_take_of_a_missing_key_returns_none(ephemeral_store: EphemeralStore) -> None:
    assert await ephemeral_store.take("never-written") is None


async def test_a_ticket_is_taken_by_exactly_one_of_20_concurrent_callers(
    ephemeral_store: EphemeralStore,
) -> None:
    # Open 20 connections first (Redis), so the takes really run side by side.
    await asyncio.gather(*(ephemeral_store.ping() for _ in range(20)))
    for round_ in range(5):
        await ephemeral_store.put(f"ticket:{round_}", b"secret-ish", LONG_TTL)
        results = await asyncio.gather(
            *(ephemeral_store.take(f"ticket:{round_}") for _ in range(20))
        )
        assert [r for r in results if r is not None] == [b"secret-ish"]


async def test_put_new_stores_only_when_the_key_is_absent(
    ephemeral_store: EphemeralStore,
) -> None:
    assert await ephemeral_store.put_new("nonce", b"first", LONG_TTL) is True
    assert await ephemeral_store.put_new("nonce", b"second", LONG_TTL) is False
    assert await ephemeral_store.get("nonce") == b"first"


async def test_put_new_wins_for_exactly_one_of_20_concurrent_callers(
    ephemeral_store: EphemeralStore,
) -> None:
    outcomes = await asyncio.gather(
        *(ephemeral_store.put_new("nonce", str(i).encode(), LONG_TTL) for i in range(20))
    )
    assert outcomes.count(True) == 1
    winner = outcomes.index(True)
    assert await ephemeral_store.get("nonce") == str(winner).encode()


async def test_put_new_stores_again_once_the_old_value_expired(
    ephemeral_store: EphemeralStore, tick: Tick
) -> None:
    await ephemeral_store.put_new("nonce", b"old", SHORT_TTL)

    async def replaced() -> bool:
        return await ephemeral_store.put_new("nonce", b"new", LONG_TTL)

    assert await eventually(replaced, tick)
    assert await ephemeral_store.get("nonce") == b"new"


async def test_delete_removes_a_key(ephemeral_store: EphemeralStore) -> None:
    await ephemeral_store.put("k", b"v", LONG_TTL)
    await ephemeral_store.delete("k")
    await ephemeral_store.delete("k")  # deleting an absent key is fine
    assert await ephemeral_store.get("k") is None


async def test_touch_keeps_a_key_alive_past_its_first_ttl(
    ephemeral_store: EphemeralStore, tick: Tick
) -> None:
    await ephemeral_store.put("session", b"v", SHORT_TTL)
    await ephemeral_store.put("witness", b"v", SHORT_TTL)
    assert await ephemeral_store.touch("session", LONG_TTL) is True

    async def witness_is_gone() -> bool:
        return await ephemeral_store.get("witness") is None

    assert await eventually(witness_is_gone, tick)
    assert await ephemeral_store.get("session") == b"v"


async def test_touch_of_a_missing_key_returns_false(ephemeral_store: EphemeralStore) -> None:
    assert await ephemeral_store.touch("never-written", LONG_TTL) is False
    assert await ephemeral_store.get("never-written") is None


async def test_incr_counts_from_one(ephemeral_store: EphemeralStore) -> None:
    counts = [await ephemeral_store.incr("attempts", LONG_TTL) for _ in range(3)]
    assert counts == [1, 2, 3]


async def test_incr_counts_every_one_of_20_concurrent_increments(
    ephemeral_store: EphemeralStore,
) -> None:
    counts = await asyncio.gather(*(ephemeral_store.incr("attempts", LONG_TTL) for _ in range(20)))
    assert sorted(counts) == list(range(1, 21))


async def test_a_counter_restarts_from_one_after_its_ttl(
    ephemeral_store: EphemeralStore, tick: Tick
) -> None:
    await ephemeral_store.incr("attempts", SHORT_TTL)
    await ephemeral_store.incr("attempts", SHORT_TTL)

    async def counter_is_gone() -> bool:
        return await ephemeral_store.get("attempts") is None

    assert await eventually(counter_is_gone, tick)
    assert await ephemeral_store.incr("attempts", LONG_TTL) == 1


async def test_incr_does_not_extend_the_window_it_opened(
    ephemeral_store: EphemeralStore, tick: Tick
) -> None:
    await ephemeral_store.incr("attempts", SHORT_TTL)
    await ephemeral_store.incr("attempts", LONG_TTL)  # a later, longer TTL is ignored

    async def counter_is_gone() -> bool:
        return await ephemeral_store.get("attempts") is None

    assert await eventually(counter_is_gone, tick)


async def test_incr_of_a_non_counter_value_raises_store_error(
    ephemeral_store: EphemeralStore,
) -> None:
    await ephemeral_store.put("k", b"not a number", LONG_TTL)
    with pytest.raises(StoreError):
        await ephemeral_store.incr("k", LONG_TTL)


async def test_set_members_are_added_and_removed(ephemeral_store: EphemeralStore) -> None:
    await ephemeral_store.add_to_set("sessions:alice", "s1", LONG_TTL)
    await ephemeral_store.add_to_set("sessions:alice", "s2", LONG_TTL)
    await ephemeral_store.add_to_set("sessions:alice", "s2", LONG_TTL)
    assert await ephemeral_store.set_members("sessions:alice") == {"s1", "s2"}

    await ephemeral_store.remove_from_set("sessions:alice", "s1")
    await ephemeral_store.remove_from_set("sessions:alice", "absent")
    assert await ephemeral_store.set_members("sessions:alice") == {"s2"}


async def test_a_missing_set_has_no_members(ephemeral_store: EphemeralStore) -> None:
    assert await ephemeral_store.set_members("never-written") == set()
    await ephemeral_store.remove_from_set("never-written", "x")  # no error


async def test_adding_to_a_set_refreshes_its_ttl(
    ephemeral_store: EphemeralStore, tick: Tick
) -> None:
    await ephemeral_store.add_to_set("sessions", "old", SHORT_TTL)
    await ephemeral_store.put("witness", b"v", SHORT_TTL)
    await ephemeral_store.add_to_set("sessions", "new", LONG_TTL)

    async def witness_is_gone() -> bool:
        return await ephemeral_store.get("witness") is None

    assert await eventually(witness_is_gone, tick)
    assert await ephemeral_store.set_members("sessions") == {"old", "new"}


async def test_a_set_disappears_after_its_ttl(
    ephemeral_store: EphemeralStore, tick: Tick
) -> None:
    await ephemeral_store.add_to_set("sessions", "s1", SHORT_TTL)

    async def set_is_gone() -> bool:
        return await ephemeral_store.set_members("sessions") == set()

    assert await eventually(set_is_gone, tick)


async def test_reading_a_set_as_a_value_raises_store_error(
    ephemeral_store: EphemeralStore,
) -> None:
    await ephemeral_store.add_to_set("sessions", "s1", LONG_TTL)
    with pytest.raises(StoreError):
        await ephemeral_store.get("sessions")


async def test_delete_removes_a_set(ephemeral_store: EphemeralStore) -> None:
    await ephemeral_store.add_to_set("sessions", "s1", LONG_TTL)
    await ephemeral_store.delete("sessions")
    assert await ephemeral_store.set_members("sessions") == set()


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("nan"), float("inf")])
async def test_a_ttl_that_is_not_a_positive_number_is_refused(
    ephemeral_store: EphemeralStore, ttl: float
) -> None:
    with pytest.raises(ValueError, match="TTL"):
        await ephemeral_store.put("k", b"v", ttl)
    assert await ephemeral_store.get("k") is None


async def test_ping_succeeds_on_a_reachable_store(ephemeral_store: EphemeralStore) -> None:
    await ephemeral_store.ping()


# Backend-specific behaviour, outside the contract.


async def test_memory_store_purges_expired_entries_as_it_is_written() -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    for i in range(1000):
        await store.put(f"old:{i}", b"v", 1.0)
    now[0] = 2.0
    for i in range(1000):
        await store.put(f"new:{i}", b"v", LONG_TTL)
    assert len(store) < 1100  # the 1000 expired entries were swept, not kept forever


async def test_redis_store_on_a_wrong_port_raises_store_error_naming_the_address() -> None:
    store = open_ephemeral("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StoreError, match=r"cannot reach Redis at 127\.0\.0\.1:1\b"):
            await store.ping()
        with pytest.raises(StoreError, match=r"127\.0\.0\.1:1\b"):
            await store.get("k")
    finally:
        await store.close()


async def test_redis_stores_with_different_url_prefixes_do_not_see_each_other(
    redis_url: str,
) -> None:
    tenant = f"pc-test-{secrets.token_hex(6)}"
    first = open_ephemeral(f"{redis_url}?prefix={tenant}-a:")
    second = open_ephemeral(f"{redis_url}?prefix={tenant}-b:")
    again = open_ephemeral(redis_url, prefix=f"{tenant}-a:")
    try:
        await first.put("k", b"from a", LONG_TTL)
        assert await second.get("k") is None
        assert await again.get("k") == b"from a"
    finally:
        await first.delete("k")
        for store in (first, second, again):
            await store.close()


async def test_redis_store_prefix_defaults_to_portcullis(redis_url: str) -> None:
    store = open_ephemeral(redis_url)
    try:
        assert isinstance(store, RedisStore)
        assert store.prefix == "portcullis:"
    finally:
        await store.close()


def test_a_redis_url_with_a_bad_port_raises_store_error() -> None:
    with pytest.raises(StoreError, match=r"invalid Redis URL '127\.0\.0\.1:notaport'"):
        open_ephemeral("redis://user:pw@127.0.0.1:notaport/0")


def test_memory_url_opens_a_memory_store() -> None:
    assert isinstance(open_ephemeral("memory://"), MemoryStore)


def test_an_unknown_ephemeral_url_scheme_raises_store_error_naming_it() -> None:
    with pytest.raises(StoreError, match="'memcached'"):
        open_ephemeral("memcached://127.0.0.1:11211")
