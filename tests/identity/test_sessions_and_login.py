"""Login steps and sessions over the real stores (both ephemeral backends)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from peers.stores import FakeClock
from portcullis.audit import AuditTrail
from portcullis.config.auth import Flow, FlowStep, ThrottleSettings
from portcullis.config.model import SessionSettings
from portcullis.errors import AuthError
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims, SamlSubject
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.local import LocalPasswordFactor
from portcullis.identity.flow import LoginFlow
from portcullis.identity.login import Authenticated, Denied, LoginService, NextStep
from portcullis.identity.names import canonical_username
from portcullis.identity.passwords import hash_password, verify_password
from portcullis.identity.sessions import SessionManager
from portcullis.identity.throttle import Throttle
from portcullis.store import DurableStore, EphemeralStore
from portcullis.store.durable import UserRecord
from portcullis.tokens import TokenHasher

SETTINGS = SessionSettings(idle_timeout=60, absolute_timeout=600, login_step_timeout=30)


@pytest.fixture
async def durable(durable: DurableStore) -> DurableStore:
    """The shared SQLite store, with alice."""
    await durable.add_user("alice", hash_password("secret"), ["staff"])
    return durable


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sessions(ephemeral_store: EphemeralStore, durable: DurableStore,
             wall: FakeClock) -> SessionManager:
    return SessionManager(ephemeral_store, AccountStatus(durable, ttl=0),
                          TokenHasher(b"s" * 32), SETTINGS,
                          clock=wall)


def login_service(flow: LoginFlow, ephemeral_store: EphemeralStore, sessions: SessionManager,
                  tmp_path: Path) -> LoginService:
    return LoginService(flow, ephemeral_store, TokenHasher(b"s" * 32), sessions, SETTINGS,
                        AuditTrail(tmp_path / "audit.jsonl"),
                        Throttle(ephemeral_store, ThrottleSettings()))


def local_flow(durable: DurableStore, steps: int = 1) -> LoginFlow:
    definition = Flow(name="default", steps=[FlowStep(provider="local")] * steps)
    return LoginFlow(definition, "local", {"local": LocalPasswordFactor("local", durable)})


@pytest.fixture
def login(ephemeral_store: EphemeralStore, durable: DurableStore, sessions: SessionManager,
          tmp_path: Path) -> LoginService:
    return login_service(local_flow(durable), ephemeral_store, sessions, tmp_path)


CLIENT = LoginContext("192.0.2.1")


@pytest.mark.parametrize("variant", ["Alice", " alice ", "ＡＬＩＣＥ", "ALICE\u00a0"])
def test_user_name_variants_are_one_identity(variant: str) -> None:
    assert canonical_username(variant) == "alice"


@pytest.mark.parametrize("bad", ["", "   ", "a/b", "a\\b", "a\x00b", "x" * 300])
def test_malformed_user_names_are_refused(bad: str) -> None:
    with pytest.raises(AuthError):
        canonical_username(bad)


def test_password_hashes_are_argon2id_and_verify() -> None:
    stored = hash_password("pw")
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, "pw") and not verify_password(stored, "pW")
    assert not verify_password(None, "pw")


async def test_login_begins_with_a_step_then_answers_yield_a_session(
        login: LoginService, sessions: SessionManager) -> None:
    begun = await login.begin(CLIENT)
    assert isinstance(begun, NextStep) and begun.step.kind == "password"
    result = await login.submit(begun.handle, {"username": " ALICE", "password": "secret"},
                                CLIENT)
    assert isinstance(result, Authenticated)
    session = await sessions.validate(result.token)
    assert session is not None
    assert session.claims.username == "alice" and session.claims.groups == ("staff",)
    assert session.claims.amr == ("local",) and session.claims.sub == "local:alice"


async def test_a_login_handle_cannot_be_replayed_after_failure(login: LoginService) -> None:
    begun = await login.begin(CLIENT)
    assert isinstance(begun, NextStep)
    failed = await login.submit(begun.handle, {"username": "alice", "password": "x"}, CLIENT)
    assert isinstance(failed, Denied)
    again = await login.submit(begun.handle, {"username": "alice", "password": "secret"}, CLIENT)
    assert isinstance(again, Denied)


async def test_disabled_user_cannot_sign_in(login: LoginService,
                                            durable: DurableStore) -> None:
    await durable.set_disabled("alice", True)
    result = await login.submit(None, {"username": "alice", "password": "secret"}, CLIENT)
    assert isinstance(result, Denied)


@dataclass
class IdleClocked:
    """Sessions whose store expires records by `idle_clock` (the store's time), while
    the manager reads `wall`."""

    sessions: SessionManager
    idle_clock: FakeClock


@pytest.fixture
def idle_clocked(durable: DurableStore, wall: FakeClock) -> IdleClocked:
    # Idle expiry is the ephemeral store's TTL; the memory store's clock makes it testable
    # without sleeping (Redis TTLs are covered by the store contract tests).
    from portcullis.store import MemoryStore

    idle_clock = FakeClock()
    sessions = SessionManager(MemoryStore(clock=idle_clock), AccountStatus(durable, ttl=0),
                              TokenHasher(b"s" * 32), SETTINGS, clock=wall)
    return IdleClocked(sessions, idle_clock)


async def test_session_ends_after_idle_timeout(idle_clocked: IdleClocked) -> None:
    sessions, idle_clock = idle_clocked.sessions, idle_clocked.idle_clock
    token, _ = await sessions.create(Claims(sub="local:alice", username="alice"), "c")
    idle_clock.now += 59
    assert await sessions.validate(token) is not None   # use refreshes the idle TTL
    idle_clock.now += 59
    assert await sessions.validate(token) is not None
    idle_clock.now += 61
    assert await sessions.validate(token) is None


async def test_uses_within_a_second_restart_the_idle_time_once(
        idle_clocked: IdleClocked, wall: FakeClock) -> None:
    # A launch checks its session three times: one store write, not three.
    sessions, idle_clock = idle_clocked.sessions, idle_clocked.idle_clock
    token, _ = await sessions.create(Claims(sub="local:alice", username="alice"), "c")
    idle_clock.now += 30
    assert await sessions.validate(token) is not None   # idle time restarts: ends at 90
    idle_clock.now += 30
    wall.now += 0.9
    assert await sessions.validate(token) is not None   # within the second: not again
    idle_clock.now += 31
    assert await sessions.validate(token) is None        # so it ended at 90

    token, _ = await sessions.create(Claims(sub="local:alice", username="alice"), "c")
    for _ in range(3):   # a use each second keeps it alive past its idle timeout
        idle_clock.now += 59
        wall.now += 1
        assert await sessions.validate(token) is not None


async def test_a_failed_idle_time_write_is_tried_again_at_the_next_use(
        durable: DurableStore, wall: FakeClock) -> None:
    from portcullis.errors import StoreError
    from portcullis.store import MemoryStore

    class FailsOnce(MemoryStore):
        failed = False

        async def touch(self, key: str, ttl: float) -> bool:
            if not self.failed:
                self.failed = True
                raise StoreError("the store is unreachable")
            return await super().touch(key, ttl)

    idle_clock = FakeClock()
    sessions = SessionManager(FailsOnce(clock=idle_clock), AccountStatus(durable, ttl=0),
                              TokenHasher(b"s" * 32), SETTINGS, clock=wall)
    token, _ = await sessions.create(Claims(sub="local:alice", username="alice"), "c")
    idle_clock.now += 30
    with pytest.raises(StoreError):
        await sessions.validate(token)
    assert await sessions.validate(token) is not None   # the same second: written now
    idle_clock.now += 59
    assert await sessions.validate(token) is not None   # so it did not end at 60


async def test_session_ends_at_absolute_timeout_despite_use(
        sessions: SessionManager, login: LoginService, wall: FakeClock) -> None:
    result = await login.submit(None, {"username": "alice", "password": "secret"}, CLIENT)
    assert isinstance(result, Authenticated)
    wall.now += 601
    assert await sessions.validate(result.token) is None


async def test_disabling_a_user_invalidates_their_sessions(
        sessions: SessionManager, login: LoginService, durable: DurableStore) -> None:
    result = await login.submit(None, {"username": "alice", "password": "secret"}, CLIENT)
    assert isinstance(result, Authenticated)
    await durable.set_disabled("alice", True)
    assert await sessions.validate(result.token) is None


async def test_session_store_holds_no_usable_token(
        sessions: SessionManager, login: LoginService, ephemeral_store) -> None:  # type: ignore[no-untyped-def]
    result = await login.submit(None, {"username": "alice", "password": "secret"}, CLIENT)
    assert isinstance(result, Authenticated)
    assert await ephemeral_store.get(f"session:{result.token}") is None
    assert result.session.handle != result.token
    assert len(result.token) >= 22  # >= 128 bits of base64url


async def test_next_step_is_returned_while_factors_remain(
        ephemeral_store, durable, sessions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    service = login_service(local_flow(durable, 2), ephemeral_store, sessions, tmp_path)
    first = await service.submit(None, {"username": "alice", "password": "secret"}, CLIENT)
    assert isinstance(first, NextStep)
    # The second step knows the user: it asks only for the password.
    assert [prompt.name for prompt in first.step.prompts] == ["password"]
    second = await service.submit(first.handle, {"password": "secret"}, CLIENT)
    assert isinstance(second, Authenticated)
    assert second.session.claims.amr == ("local", "local")


async def test_account_status_is_remembered_for_its_ttl_then_asked_again(
        durable: DurableStore) -> None:
    clock = FakeClock()
    accounts = AccountStatus(durable, ttl=1.0, clock=clock)
    assert (await accounts.state("alice")).active
    await durable.set_disabled("alice", True)
    clock.now += 0.5
    assert (await accounts.state("alice")).active      # still the remembered answer
    clock.now += 0.6
    assert not (await accounts.state("alice")).active  # asked again after the TTL
    nobody = await accounts.state("nobody")
    # No local account: a local session is void, a directory user's is not blocked.
    assert not nobody.admits("local") and nobody.admits("corp")


class CountingDurable:
    """The durable store, counting the account lookups that reach it."""

    def __init__(self, durable: DurableStore) -> None:
        self.durable = durable
        self.lookups = 0

    async def get_user(self, name: str) -> UserRecord | None:
        self.lookups += 1
        await asyncio.sleep(0)   # the query takes a moment: others ask meanwhile
        return await self.durable.get_user(name)


async def test_callers_asking_while_the_answer_is_looked_up_share_one_query(
        durable: DurableStore) -> None:
    clock = FakeClock()
    counting = CountingDurable(durable)
    accounts = AccountStatus(counting, ttl=1.0, clock=clock)  # type: ignore[arg-type]
    states = await asyncio.gather(*(accounts.state("alice") for _ in range(20)))
    assert all(state.active for state in states) and counting.lookups == 1
    await durable.set_disabled("alice", True)
    clock.now += 1.1
    states = await asyncio.gather(*(accounts.state("alice") for _ in range(20)))
    assert not any(state.active for state in states) and counting.lookups == 2


async def test_an_account_forgotten_during_its_lookup_is_asked_again(
        durable: DurableStore) -> None:
    counting = CountingDurable(durable)
    accounts = AccountStatus(counting, ttl=60.0)  # type: ignore[arg-type]
    under_way = asyncio.ensure_future(accounts.state("alice"))
    await asyncio.sleep(0)                    # the lookup has started
    await durable.set_disabled("alice", True)
    accounts.forget("alice")                  # what the disabling process says
    assert not (await accounts.state("alice")).active
    await under_way                           # its answer predates the change...
    assert not (await accounts.state("alice")).active   # ...and is not remembered
    assert counting.lookups == 2


async def test_a_caller_that_gives_up_does_not_cancel_the_shared_lookup(
        durable: DurableStore) -> None:
    counting = CountingDurable(durable)
    accounts = AccountStatus(counting, ttl=60.0)  # type: ignore[arg-type]
    impatient = asyncio.ensure_future(accounts.state("alice"))
    patient = asyncio.ensure_future(accounts.state("alice"))
    await asyncio.sleep(0)
    impatient.cancel()
    assert (await patient).active and counting.lookups == 1


async def test_re_enabling_a_user_does_not_revive_sessions_from_before_the_disable(
        login: LoginService, durable: DurableStore, ephemeral_store: EphemeralStore,
        tmp_path: Path) -> None:
    # The real clock here: the durable store stamps the disable with the time of day.
    sessions = SessionManager(ephemeral_store, AccountStatus(durable, ttl=0),
                              TokenHasher(b"s" * 32), SETTINGS)
    token, _ = await sessions.create(Claims(sub="local:alice", username="alice"), "c")
    assert await sessions.validate(token) is not None
    await durable.set_disabled("alice", True)
    await durable.set_disabled("alice", False)
    assert await sessions.validate(token) is None
    fresh, _ = await sessions.create(Claims(sub="local:alice", username="alice"), "c")
    assert await sessions.validate(fresh) is not None


async def test_changing_the_password_ends_existing_sessions(
        durable: DurableStore, ephemeral_store: EphemeralStore) -> None:
    sessions = SessionManager(ephemeral_store, AccountStatus(durable, ttl=0),
                              TokenHasher(b"s" * 32), SETTINGS)
    token, _ = await sessions.create(Claims(sub="local:alice", username="alice"), "c")
    await durable.set_password("alice", hash_password("new"))
    assert await sessions.validate(token) is None


async def test_a_saml_idps_nameid_finds_the_user_it_signed_in_as(
        sessions: SessionManager) -> None:
    """A linked sign-in: the IdP's NameID is not the session's user name, and the IdP's
    LogoutRequest names only the NameID."""
    subject = SamlSubject("corp", "alice@idp.example", None, "session-7")
    token, _ = await sessions.create(Claims(sub="local:alice", username="alice",
                                            saml=subject), "c")
    assert (await sessions.validate(token)).claims.saml == subject  # type: ignore[union-attr]
    assert await sessions.saml_subject_user("corp", "alice@idp.example") == "alice"
    assert await sessions.saml_subject_user("other", "alice@idp.example") is None
