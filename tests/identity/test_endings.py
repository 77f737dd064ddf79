"""Session endings: what the user is told, the event, and how SessionManager ends a
session (record gone, a marker saying why, the event published) on both ephemeral
backends."""

from __future__ import annotations

import asyncio

import pytest

from peers.stores import FakeClock
from portcullis.config.model import SessionSettings
from portcullis.identity.accounts import AccountState, AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.endings import CHANNEL, NOTICES, Ending, SessionEnded, notice
from portcullis.identity.passwords import hash_password
from portcullis.identity.sessions import Session, SessionManager, ended_by
from portcullis.proto.mux import Reason
from portcullis.store import DurableStore, EphemeralStore, MemoryEventBus
from portcullis.tokens import TokenHasher

SETTINGS = SessionSettings(idle_timeout=60, absolute_timeout=600, login_step_timeout=30)
ALICE = Claims(sub="local:alice", username="alice")


@pytest.mark.parametrize(("ending", "says", "helps", "reason"), [
    (Ending.SIGNED_OUT, "signed out", True, Reason.AUTH_FAILED),
    (Ending.PASSWORD_CHANGED, "sign in again with the new password", True, Reason.AUTH_FAILED),
    (Ending.ACCOUNT_DISABLED, "signing in again will not help", False, Reason.AUTH_FAILED),
    (Ending.ADMIN_REVOKED, "contact your administrator", None, Reason.ADMIN_ENDED),
    (Ending.ADMIN_CONNECTIONS, "you may connect again", True, Reason.ADMIN_ENDED),
    (Ending.EXPIRED, "expired; sign in again", True, Reason.AUTH_FAILED),
])
def test_each_ending_tells_the_user_why_and_whether_signing_in_again_helps(
        ending: Ending, says: str, helps: bool | None, reason: Reason) -> None:
    told = notice(ending)
    assert says in told.message and told.sign_in_helps is helps and told.reason == reason
    assert len(told.message.encode()) <= 512   # it fits a GOAWAY


def test_every_ending_has_a_notice() -> None:
    assert set(NOTICES) == set(Ending)


def test_an_event_round_trips_and_anything_else_is_ignored() -> None:
    event = SessionEnded(Ending.PASSWORD_CHANGED, user="alice", at=12.5)
    assert SessionEnded.decode(event.encode()) == event
    for garbage in (b"", b"{}", b"[1]", b'{"ending": "nope", "handle": "h", "user": null, '
                    b'"at": 1}', b'{"ending": "signed out", "handle": 3, "user": null, "at": 1}',
                    b'{"ending": "signed out", "handle": null, "user": null, "at": 1}'):
        assert SessionEnded.decode(garbage) is None


@pytest.mark.parametrize(("state", "created", "remaining", "expected"), [
    (AccountState(True), 100.0, 10.0, None),
    (AccountState(True, disabled=True, sessions_valid_after=200.0), 100.0, 10.0,
     Ending.ACCOUNT_DISABLED),
    (AccountState(False), 100.0, 10.0, Ending.ACCOUNT_DISABLED),   # a local account removed
    (AccountState(True, sessions_valid_after=200.0), 100.0, 10.0, Ending.PASSWORD_CHANGED),
    (AccountState(True, sessions_valid_after=50.0), 100.0, 10.0, None),
    (AccountState(True), 100.0, 0.0, Ending.EXPIRED),
])
def test_why_a_stored_session_may_not_go_on(state: AccountState, created: float,
                                            remaining: float, expected: Ending | None) -> None:
    assert ended_by(state, Session("h", ALICE, "c", created), remaining) == expected


class Heard:
    def __init__(self) -> None:
        self.events: list[SessionEnded] = []
        self.arrived = asyncio.Event()

    def deliver(self, raw: bytes) -> None:
        event = SessionEnded.decode(raw)
        assert event is not None
        self.events.append(event)
        self.arrived.set()


@pytest.fixture
async def alice_durable(durable: DurableStore) -> DurableStore:
    await durable.add_user("alice", hash_password("secret"), ["staff"])
    return durable


@pytest.fixture
async def bus_heard() -> tuple[MemoryEventBus, Heard]:
    return MemoryEventBus(), Heard()


async def listening(bus: MemoryEventBus, heard: Heard) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(bus.listen(CHANNEL, heard.deliver, ready.set))
    await asyncio.wait_for(ready.wait(), 5)
    return task


def manager(ephemeral_store: EphemeralStore, durable: DurableStore, bus: MemoryEventBus | None,
            clock: FakeClock | None = None) -> SessionManager:
    if clock is None:
        return SessionManager(ephemeral_store, AccountStatus(durable, ttl=0),
                              TokenHasher(b"s" * 32), SETTINGS, events=bus)
    return SessionManager(ephemeral_store, AccountStatus(durable, ttl=0),
                          TokenHasher(b"s" * 32), SETTINGS, events=bus, clock=clock)


async def test_signing_out_ends_the_session_leaves_why_and_tells_every_node(
        ephemeral_store: EphemeralStore, alice_durable: DurableStore,
        bus_heard: tuple[MemoryEventBus, Heard]) -> None:
    bus, heard = bus_heard
    task = await listening(bus, heard)
    sessions = manager(ephemeral_store, alice_durable, bus)
    token, session = await sessions.create(ALICE, "c")
    await sessions.end(token)
    await asyncio.wait_for(heard.arrived.wait(), 5)
    assert heard.events[0].ending == Ending.SIGNED_OUT
    assert heard.events[0].handle == session.handle
    assert token not in heard.events[0].encode().decode()
    assert await sessions.validate(token) is None
    assert await sessions.standing(session.handle) == Ending.SIGNED_OUT
    task.cancel()


async def test_signing_out_with_a_token_that_has_no_session_stores_and_tells_nothing(
        ephemeral_store: EphemeralStore, alice_durable: DurableStore,
        bus_heard: tuple[MemoryEventBus, Heard]) -> None:
    bus, heard = bus_heard
    task = await listening(bus, heard)
    sessions = manager(ephemeral_store, alice_durable, bus)
    await sessions.end("made-up-token")
    await asyncio.sleep(0)   # memory delivery is call_soon: one turn is enough to see it
    await asyncio.sleep(0)
    assert heard.events == []
    assert await sessions.standing_of("made-up-token") == Ending.EXPIRED
    task.cancel()


async def test_revoking_a_user_ends_all_their_sessions_with_one_event(
        ephemeral_store: EphemeralStore, alice_durable: DurableStore,
        bus_heard: tuple[MemoryEventBus, Heard]) -> None:
    bus, heard = bus_heard
    task = await listening(bus, heard)
    sessions = manager(ephemeral_store, alice_durable, bus)
    created = [await sessions.create(ALICE, "c") for _ in range(3)]
    bob_token, _ = await sessions.create(Claims(sub="ldap:bob", username="bob", idp="ldap"), "c")
    assert await sessions.revoke_user("alice", Ending.ADMIN_REVOKED) == 3
    await asyncio.wait_for(heard.arrived.wait(), 5)
    assert heard.events == [SessionEnded(Ending.ADMIN_REVOKED, user="alice",
                                         at=heard.events[0].at)]
    for token, session in created:
        assert await sessions.validate(token) is None
        assert await sessions.standing(session.handle) == Ending.ADMIN_REVOKED
    assert await sessions.validate(bob_token) is not None
    task.cancel()


async def test_standing_says_a_password_change_or_a_disable_ended_the_session(
        ephemeral_store: EphemeralStore, alice_durable: DurableStore) -> None:
    sessions = manager(ephemeral_store, alice_durable, None)
    _, before_change = await sessions.create(ALICE, "c")
    await alice_durable.set_password("alice", hash_password("new"))
    assert await sessions.standing(before_change.handle) == Ending.PASSWORD_CHANGED
    _, before_disable = await sessions.create(ALICE, "c")
    await alice_durable.set_disabled("alice", True)
    assert await sessions.standing(before_disable.handle) == Ending.ACCOUNT_DISABLED


async def test_standing_says_a_session_past_its_absolute_limit_expired(
        ephemeral_store: EphemeralStore, alice_durable: DurableStore, clock: FakeClock) -> None:
    sessions = manager(ephemeral_store, alice_durable, None, clock)
    _, session = await sessions.create(ALICE, "c")
    assert isinstance(await sessions.standing(session.handle), Session)
    clock.advance(SETTINGS.absolute_timeout + 1)
    assert await sessions.standing(session.handle) == Ending.EXPIRED
    assert sessions.absolute_end(session) == session.created_at + SETTINGS.absolute_timeout
