"""The edge's pool of dial-out relay connections and the registry of which node holds
which (the memory store here; the two-node e2e test reads it from Redis)."""

from __future__ import annotations

import asyncio

import pytest

from portcullis.errors import DialError
from portcullis.gateway.relays import (
    REGISTRY_TTL,
    RelayConnection,
    RelayPool,
    RelayRegistry,
    relay_connections,
)
from portcullis.net.muxsession import MuxSession
from portcullis.proto.mux import MuxConnection, Reason
from portcullis.store import MemoryStore


def relay_connection(name: str, streams: int = 0) -> RelayConnection:
    session = MuxSession(MuxConnection("gateway"))
    for index in range(streams):
        session.bridge(2 * index + 1, accepted=True)
    return RelayConnection(name, f"192.0.2.1:{name}", session, 1000.0)


async def test_a_new_stream_goes_to_the_relay_connection_with_the_fewest_streams() -> None:
    pool = RelayPool(wait=0.1)
    busy, idle = relay_connection("1", streams=3), relay_connection("2", streams=1)
    pool.add(busy)
    pool.add(idle)
    assert await pool.session() is idle.session
    idle.session.carrier_closed()   # ended: never picked again, even before removal
    assert await pool.session() is busy.session


async def test_a_stream_waits_for_a_relay_that_is_reconnecting_then_gives_up() -> None:
    pool = RelayPool(wait=1.0)
    arriving = relay_connection("1")
    asyncio.get_running_loop().call_later(0.05, pool.add, arriving)
    assert await pool.session() is arriving.session
    pool.remove(arriving)
    with pytest.raises(DialError, match="no relay is connected") as raised:
        await RelayPool(wait=0.05).session()
    assert raised.value.reason is Reason.UNREACHABLE


async def test_the_registry_shows_each_node_s_relay_connections_until_removed_or_expired(
        ) -> None:
    now = [0.0]
    store = MemoryStore(clock=lambda: now[0])
    first, second = RelayRegistry(store, "edge-a:1"), RelayRegistry(store, "edge-b:2")
    kept, dropped = relay_connection("1", streams=2), relay_connection("2")
    await first.record(kept)
    await second.record(dropped)
    listed = await relay_connections(store)
    assert {(entry["node"], entry["connection"]) for entry in listed} == {
        ("edge-a:1", "1"), ("edge-b:2", "2")}
    assert next(e for e in listed if e["connection"] == "1")["streams"] == 2
    await second.forget(dropped)
    assert [entry["node"] for entry in await relay_connections(store)] == ["edge-a:1"]
    now[0] += REGISTRY_TTL + 1   # edge-a died without forgetting: its entry expires
    assert await relay_connections(store) == []
