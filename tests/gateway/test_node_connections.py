"""Ending a connection another worker of the node carries: the holder ends it and says
so, and the asking worker answers only once it has (or says it could not confirm).

Two `NodeConnections` stand for two workers of one node: each with its own registry,
both on one store and one bus (in-process here; the e2e test in tests/e2e/test_workers.py
runs two real workers on the embedded store)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from portcullis.audit import AuditTrail
from portcullis.config.model import SessionSettings
from portcullis.gateway.admin import admin_routes
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.gateway.node_connections import NodeConnections
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.passwords import hash_password
from portcullis.identity.sessions import SessionManager
from portcullis.proto.mux import Reason
from portcullis.store import DurableStore, MemoryEventBus, MemoryStore
from portcullis.tokens import TokenHasher


@dataclass
class Carried:
    """What a connection carries, as far as ending it goes."""

    ended: list[tuple[Reason, str]] = field(default_factory=list)
    open_streams: int = 0

    def close(self, reason: Reason, message: str) -> None:
        self.ended.append((reason, message))

    def byte_counts(self) -> tuple[int, int]:
        return 0, 0


@dataclass
class Worker:
    registry: ConnectionRegistry
    node: NodeConnections


@pytest.fixture
async def workers() -> AsyncIterator[tuple[Worker, Worker, Worker]]:
    """Two workers of node A, and one worker of another node B, on one store and bus."""
    store, bus = MemoryStore(), MemoryEventBus()
    made = []
    for node, pid in (("a:443", "101"), ("a:443", "102"), ("b:443", "201")):
        registry = ConnectionRegistry(AuditTrail(None, echo=False))
        connections = NodeConnections(registry, store, bus, node)
        connections.worker, connections.siblings = pid, 1
        made.append(Worker(registry, connections))
    listening = [asyncio.create_task(worker.node.run()) for worker in made]
    await asyncio.sleep(0)   # each has subscribed
    try:
        yield made[0], made[1], made[2]
    finally:
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)


def carried_by(worker: Worker) -> tuple[Connection, Carried]:
    carried = Carried()
    connection = Connection("tunnel", "alice", "127.0.0.1", carried)
    worker.registry.add(connection)
    return connection, carried


async def test_the_holder_ends_it_and_the_asker_hears_that_it_did(
        workers: tuple[Worker, Worker, Worker]) -> None:
    holder, asker, _ = workers
    connection, carried = carried_by(holder)
    assert await asker.node.end_elsewhere(connection.id, holder.node.worker)
    assert [reason for reason, _ in carried.ended] == [Reason.ADMIN_ENDED]


async def test_a_connection_its_holder_no_longer_carries_counts_as_ended(
        workers: tuple[Worker, Worker, Worker]) -> None:
    holder, asker, _ = workers
    connection, carried = carried_by(holder)
    holder.registry.remove(connection)   # its client left after the list was read
    assert await asker.node.end_elsewhere(connection.id, holder.node.worker)
    assert carried.ended == []


async def test_a_holder_that_does_not_answer_is_not_confirmed(
        workers: tuple[Worker, Worker, Worker]) -> None:
    _, asker, _ = workers
    assert not await asker.node.end_elsewhere("0123456789abcdef", "999")


async def test_another_nodes_worker_neither_ends_it_nor_confirms(
        workers: tuple[Worker, Worker, Worker]) -> None:
    _, asker, elsewhere = workers
    connection, carried = carried_by(elsewhere)
    assert not await asker.node.end_elsewhere(connection.id, elsewhere.node.worker)
    assert carried.ended == []


async def test_an_unconfirmed_end_is_a_504_naming_the_worker_and_audited(
        workers: tuple[Worker, Worker, Worker], durable: DurableStore, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin API of the asking worker, for a holder that lists the connection but
    never confirms ending it (stuck): nothing claims it ended."""
    holder, asker, _ = workers
    connection, _ = carried_by(holder)

    async def stuck(connection_id: str) -> None:
        pass

    monkeypatch.setattr(holder.node, "_confirm_ended", stuck)
    await durable.add_user("root", hash_password("secret"), ["admins"])
    sessions = SessionManager(MemoryStore(), AccountStatus(durable), TokenHasher(b"s" * 32),
                              SessionSettings())
    token, _ = await sessions.create(Claims(sub="local:root", username="root",
                                            groups=("admins",)), "127.0.0.1")
    audit = AuditTrail(tmp_path / "audit.jsonl", echo=False)
    app = Starlette(routes=admin_routes(asker.registry, sessions, ["admins"], audit,
                                        MemoryEventBus(), MemoryStore(), asker.node))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway") as client:
        answer = await client.delete(f"/api/v1/admin/sessions/{connection.id}",
                                     params={"scope": "connections"},
                                     headers={"authorization": f"Bearer {token}"})
    assert answer.status_code == 504
    assert "worker 101" in answer.json()["error"] and "did not confirm" in answer.json()["error"]
    events = [json.loads(line)["event"] for line in
              (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert "admin.session_end_unconfirmed" in events and "admin.session_ended" not in events
