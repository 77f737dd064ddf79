"""Someone who can write to the ephemeral store (Redis) cannot grant a session groups,
more time or another account, nor a sign-in in progress a step it did not pass: the edited
record is refused, deleted and audited. Over both backends (memory and a real Redis)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from peers.stores import FakeClock
from portcullis.audit import AuditTrail
from portcullis.config.auth import Flow, FlowStep, ThrottleSettings, TotpProvider
from portcullis.config.model import SessionSettings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.local import LocalPasswordFactor
from portcullis.identity.flow import FlowState, LoginFlow
from portcullis.identity.login import Authenticated, Denied, LoginService, NextStep
from portcullis.identity.passwords import hash_password
from portcullis.identity.sessions import SessionManager
from portcullis.identity.throttle import Throttle
from portcullis.identity.totp import SelfEnrolment, TotpService
from portcullis.store import DurableStore, EphemeralStore, RecordSeal
from portcullis.tokens import TokenHasher

SETTINGS = SessionSettings(idle_timeout=60, absolute_timeout=600, login_step_timeout=30)
HASHER = TokenHasher(b"s" * 32)
ATTACKER = TokenHasher(b"m" * 32)     # a key of the attacker's: not the deployment's
CLIENT = LoginContext("192.0.2.1")
ALICE = Claims(sub="local:alice", username="alice", groups=("staff",))
ADMIN = Claims(sub="local:root", username="root", groups=("admins",))


@pytest.fixture
async def durable(durable: DurableStore) -> DurableStore:
    await durable.add_user("alice", hash_password("secret"), ["staff"])
    await durable.add_user("root", hash_password("root-pw"), ["admins"])
    return durable


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sessions(ephemeral_store: EphemeralStore, durable: DurableStore, wall: FakeClock,
             audit_path: Path) -> SessionManager:
    return SessionManager(ephemeral_store, AccountStatus(durable, ttl=0), HASHER, SETTINGS,
                          clock=wall, audit=AuditTrail(audit_path))


@pytest.fixture
def login(ephemeral_store: EphemeralStore, durable: DurableStore, sessions: SessionManager,
          audit_path: Path) -> LoginService:
    definition = Flow(name="default", steps=[FlowStep(provider="local")] * 2)
    flow = LoginFlow(definition, "local", {"local": LocalPasswordFactor("local", durable)})
    return LoginService(flow, ephemeral_store, HASHER, sessions, SETTINGS,
                        AuditTrail(audit_path), Throttle(ephemeral_store, ThrottleSettings()))


def tampered_events(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [event for event in map(json.loads, lines) if event["event"] == "store.tampered"]


def session_key(token: str) -> str:
    return f"session:{HASHER.digest('session', token)}"


def session_record(claims: Claims, created_at: float) -> bytes:
    return json.dumps({"claims": claims.to_json(), "client_address": "192.0.2.1",
                       "created_at": created_at}).encode()


# --- sessions ---------------------------------------------------------------------------------

async def test_a_session_record_edited_in_the_store_to_add_a_group_is_refused_and_audited(
        sessions: SessionManager, ephemeral_store: EphemeralStore, wall: FakeClock,
        audit_path: Path) -> None:
    token, session = await sessions.create(ALICE, "192.0.2.1")
    assert await sessions.validate(token) is not None
    promoted = Claims(**{**asdict(ALICE), "groups": ("staff", "admins")})
    # What an attacker can write: the record in clear (the format before sealing), or one
    # sealed under a key of their own.
    for forged in (session_record(promoted, wall.now),
                   RecordSeal.for_kind(ATTACKER, "session").seal(
                       session_key(token), session_record(promoted, wall.now))):
        await ephemeral_store.put(session_key(token), forged, 60)
        assert await sessions.validate(token) is None
        assert await ephemeral_store.get(session_key(token)) is None   # deleted
    events = tampered_events(audit_path)
    assert [(e["kind"], e["namespace"], e["record"]) for e in events] == [
        ("session", "session", session.handle[:12])] * 2
    assert token[:6] not in json.dumps(events)


async def test_a_session_record_with_groups_added_opens_only_under_the_deployments_key(
        sessions: SessionManager, ephemeral_store: EphemeralStore, wall: FakeClock) -> None:
    """The control of the test above: the same edit, sealed with the token key (which an
    attacker with Redis access does not have), is believed, so the refusal is the seal's."""
    token, _ = await sessions.create(ALICE, "192.0.2.1")
    promoted = Claims(**{**asdict(ALICE), "groups": ("staff", "admins")})
    sealed = RecordSeal.for_kind(HASHER, "session").seal(
        session_key(token), session_record(promoted, wall.now))
    await ephemeral_store.put(session_key(token), sealed, 60)
    session = await sessions.validate(token)
    assert session is not None and session.claims.groups == ("staff", "admins")


async def test_an_administrators_session_record_copied_under_another_token_is_refused(
        sessions: SessionManager, ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    mine, _ = await sessions.create(ALICE, "192.0.2.1")
    admins, _ = await sessions.create(ADMIN, "192.0.2.9")
    copied = await ephemeral_store.get(session_key(admins))
    assert copied is not None
    await ephemeral_store.put(session_key(mine), copied, 60)
    assert await sessions.validate(mine) is None
    admin_session = await sessions.validate(admins)
    assert admin_session is not None and admin_session.username == "root"
    assert [e["kind"] for e in tampered_events(audit_path)] == ["session"]


async def test_a_session_record_with_a_later_creation_time_is_refused(
        sessions: SessionManager, ephemeral_store: EphemeralStore, wall: FakeClock,
        audit_path: Path) -> None:
    token, _ = await sessions.create(ALICE, "192.0.2.1")
    wall.advance(590)                       # 10 s before the absolute limit
    younger = RecordSeal.for_kind(ATTACKER, "session").seal(
        session_key(token), session_record(ALICE, wall.now))
    await ephemeral_store.put(session_key(token), younger, 60)
    assert await sessions.validate(token) is None
    assert len(tampered_events(audit_path)) == 1


async def test_a_longer_store_ttl_does_not_extend_a_session_past_its_absolute_limit(
        sessions: SessionManager, ephemeral_store: EphemeralStore, wall: FakeClock) -> None:
    token, _ = await sessions.create(ALICE, "192.0.2.1")
    assert await ephemeral_store.touch(session_key(token), 100_000)   # PEXPIRE by hand
    wall.advance(599)
    assert await sessions.validate(token) is not None
    wall.advance(2)
    assert await sessions.validate(token) is None


# --- sign-ins in progress ---------------------------------------------------------------------

def login_key(handle: str) -> str:
    return f"login:{HASHER.digest('login', handle)}"


def second_step_state(user: str, groups: list[str]) -> bytes:
    """A flow state that says `user` passed the first step and has `groups`."""
    state = FlowState(flow="default", current=1, resume=2, username=user,
                      attributes={"groups": groups}, passed=["local"])
    return json.dumps(asdict(state)).encode()


async def test_a_sign_in_state_forged_in_the_store_restarts_the_flow_and_is_audited(
        login: LoginService, ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    begun = await login.begin(CLIENT)
    assert isinstance(begun, NextStep)
    # Forged: alice's first step passed, with the admins group; she knows her password.
    forged = RecordSeal.for_kind(ATTACKER, "login").seal(
        login_key(begun.handle), second_step_state("alice", ["admins"]))
    await ephemeral_store.put(login_key(begun.handle), forged, 30)
    assert await login.submit(begun.handle, {"password": "secret"}, CLIENT) == Denied()
    assert [(e["kind"], e["namespace"]) for e in tampered_events(audit_path)] == [
        ("login", "login")]
    lines = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert lines[-1]["event"] == "login.failed"
    assert lines[-1]["reason"] == "unknown or expired login handle"


async def test_a_sign_in_state_with_groups_added_opens_only_under_the_deployments_key(
        login: LoginService, sessions: SessionManager,
        ephemeral_store: EphemeralStore) -> None:
    """The control: the same state sealed with the token key signs alice in as an admin,
    so what refuses the forgery above is the seal."""
    begun = await login.begin(CLIENT)
    assert isinstance(begun, NextStep)
    sealed = RecordSeal.for_kind(HASHER, "login").seal(
        login_key(begun.handle), second_step_state("alice", ["admins"]))
    await ephemeral_store.put(login_key(begun.handle), sealed, 30)
    result = await login.submit(begun.handle, {"password": "secret"}, CLIENT)
    assert isinstance(result, Authenticated)
    session = await sessions.validate(result.token)
    assert session is not None and "admins" in session.claims.groups


async def test_another_users_sign_in_state_copied_under_my_handle_is_refused(
        login: LoginService, ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    # root passes the first step; mallory copies root's state under her own handle.
    roots = await login.submit(None, {"username": "root", "password": "root-pw"}, CLIENT)
    mine = await login.begin(CLIENT)
    assert isinstance(roots, NextStep) and isinstance(mine, NextStep)
    copied = await ephemeral_store.get(login_key(roots.handle))
    assert copied is not None
    await ephemeral_store.put(login_key(mine.handle), copied, 30)
    assert await login.submit(mine.handle, {"password": "root-pw"}, CLIENT) == Denied()
    assert [e["kind"] for e in tampered_events(audit_path)] == ["login"]
    # root's own sign-in goes on untouched.
    assert isinstance(await login.submit(roots.handle, {"password": "root-pw"}, CLIENT),
                      Authenticated)


# --- a new authenticator being enrolled -------------------------------------------------------

async def test_a_pending_enrolment_copied_or_forged_in_the_store_reads_as_none_and_is_audited(
        durable: DurableStore, ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    totp = TotpService(TotpProvider(type="totp", name="totp"), durable, ephemeral_store, HASHER)
    enrolments = SelfEnrolment(totp, ephemeral_store, HASHER, 60, audit=AuditTrail(audit_path))
    alices, shown = await enrolments.begin("local:alice", "alice")
    mine, _ = await enrolments.begin("local:alice", "alice")
    assert await enrolments.pending("local:alice", alices) == shown

    def key(handle: str) -> str:
        return f"totp-enrolment:{HASHER.digest('totp-enrolment', handle)}"

    copied = await ephemeral_store.get(key(alices))
    assert copied is not None
    await ephemeral_store.put(key(mine), copied, 60)
    assert await enrolments.pending("local:alice", mine) is None
    forged = RecordSeal.for_kind(ATTACKER, "totp-enrolment").seal(key(alices), b"[]")
    await ephemeral_store.put(key(alices), forged, 60)
    assert await enrolments.pending("local:alice", alices) is None
    assert [e["kind"] for e in tampered_events(audit_path)] == ["totp-enrolment"] * 2
