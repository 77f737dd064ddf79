"""SessionWatch: a gateway ends the connections of an ended session at the event, and
finds the endings no event told it of (a bus that was down, an expiry) at its checks.

Connections carry real MuxSessions (without a WebSocket): what their codec was told to
send, `ended_here`, is the GOAWAY the client receives. Waits are on conditions, bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from portcullis.audit import AuditTrail
from portcullis.config.model import SessionSettings
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.gateway.revocation import SessionWatch
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.endings import Ending, notice
from portcullis.identity.passwords import hash_password
from portcullis.identity.sessions import Session, SessionManager
from portcullis.net.muxsession import MuxSession
from portcullis.proto.mux import MuxConnection
from portcullis.store import DurableStore, EphemeralStore, MemoryEventBus
from portcullis.tokens import TokenHasher

ALICE = Claims(sub="local:alice", username="alice")


@dataclass
class Gateway:
    registry: ConnectionRegistry
    sessions: SessionManager          # announces endings on the bus
    silent: SessionManager            # ends sessions without telling anyone
    audit: Path

    def connect(self, session: Session, kind: str = "tunnel") -> Connection:
        connection = Connection(kind, session.username, "192.0.2.1",  # type: ignore[arg-type]
                                MuxSession(MuxConnection("gateway")),
                                session_handle=session.handle)
        self.registry.add(connection)
        return connection


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


def told(connection: Connection) -> tuple[object, str] | None:
    return connection.session.ended_here


async def start(ephemeral_store: EphemeralStore, durable: DurableStore, tmp_path: Path, *,
                interval: float = 60.0, absolute: float = 600.0) -> tuple[Gateway,
                                                                           asyncio.Task[None]]:
    await durable.add_user("alice", hash_password("secret"), ["staff"])
    settings = SessionSettings(idle_timeout=60, absolute_timeout=absolute)
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditTrail(audit_path)
    bus = MemoryEventBus()
    accounts = AccountStatus(durable)
    hasher = TokenHasher(b"s" * 32)
    sessions = SessionManager(ephemeral_store, accounts, hasher, settings, events=bus)
    silent = SessionManager(ephemeral_store, accounts, hasher, settings)
    registry = ConnectionRegistry(audit)
    watch = SessionWatch(registry, sessions, accounts, bus, audit, lambda: interval)
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0)   # subscribed
    return Gateway(registry, sessions, silent, audit_path), task


@pytest.fixture
async def stopping() -> AsyncIterator[list[asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []
    yield tasks
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_sign_out_ends_that_sessions_tunnel_and_launch_and_no_other(
        ephemeral_store: EphemeralStore, durable: DurableStore, tmp_path: Path,
        stopping: list[asyncio.Task[None]]) -> None:
    gateway, task = await start(ephemeral_store, durable, tmp_path)
    stopping.append(task)
    token, session = await gateway.sessions.create(ALICE, "c")
    _, other = await gateway.sessions.create(ALICE, "c")
    tunnel, launch = gateway.connect(session), gateway.connect(session, "launch")
    untouched = gateway.connect(other)
    await gateway.sessions.end(token)
    await until(lambda: told(tunnel) is not None and told(launch) is not None)
    expected = notice(Ending.SIGNED_OUT)
    assert told(tunnel) == told(launch) == (expected.reason, expected.message)
    assert told(untouched) is None
    assert '"session.connections_ended"' in gateway.audit.read_text()


async def test_a_users_ending_ends_every_connection_of_theirs(
        ephemeral_store: EphemeralStore, durable: DurableStore, tmp_path: Path,
        stopping: list[asyncio.Task[None]]) -> None:
    gateway, task = await start(ephemeral_store, durable, tmp_path)
    stopping.append(task)
    connections = [gateway.connect((await gateway.sessions.create(ALICE, "c"))[1])
                   for _ in range(3)]
    await gateway.sessions.revoke_user("alice", Ending.ADMIN_REVOKED)
    await until(lambda: all(told(c) is not None for c in connections))
    assert {told(c)[1] for c in connections} == {notice(Ending.ADMIN_REVOKED).message}  # type: ignore[index]


async def test_an_ending_no_one_announced_is_found_at_the_next_check_with_its_reason(
        ephemeral_store: EphemeralStore, durable: DurableStore, tmp_path: Path,
        stopping: list[asyncio.Task[None]]) -> None:
    gateway, task = await start(ephemeral_store, durable, tmp_path, interval=0.2)
    stopping.append(task)
    token, session = await gateway.sessions.create(ALICE, "c")
    tunnel = gateway.connect(session)
    await asyncio.sleep(0.05)
    assert told(tunnel) is None     # the session is valid: the check let it be
    await gateway.silent.end(token)
    await until(lambda: told(tunnel) is not None)
    assert told(tunnel) == (notice(Ending.SIGNED_OUT).reason,
                            notice(Ending.SIGNED_OUT).message)


async def test_a_connection_whose_session_ended_while_it_was_set_up_is_ended_at_once(
        ephemeral_store: EphemeralStore, durable: DurableStore, tmp_path: Path,
        stopping: list[asyncio.Task[None]]) -> None:
    gateway, task = await start(ephemeral_store, durable, tmp_path)
    stopping.append(task)
    _, session = await gateway.sessions.create(ALICE, "c")
    await durable.set_password("alice", hash_password("changed"))
    late = gateway.connect(session)
    await until(lambda: told(late) is not None)
    assert told(late)[1] == notice(Ending.PASSWORD_CHANGED).message  # type: ignore[index]


async def test_a_session_reaching_its_absolute_limit_ends_its_connections_on_time(
        ephemeral_store: EphemeralStore, durable: DurableStore, tmp_path: Path,
        stopping: list[asyncio.Task[None]]) -> None:
    # The limit (0.5 s) falls long before the next check (60 s): a timer ends it.
    gateway, task = await start(ephemeral_store, durable, tmp_path, absolute=0.5)
    stopping.append(task)
    _, session = await gateway.sessions.create(ALICE, "c")
    tunnel = gateway.connect(session)
    await until(lambda: told(tunnel) is not None, seconds=3)
    assert told(tunnel)[1] == notice(Ending.EXPIRED).message  # type: ignore[index]
