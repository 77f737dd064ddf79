"""The seed flows of config/auth.py that involve a directory, end to end against the real
FreeRADIUS and slapd: "RADIUS, then LDAP" and "LDAP, then TOTP for finance"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peers.ldap import USERS, Slapd
from peers.login import BuildLogin, Login, flow
from peers.radius import ALICE_CLASS, ALICE_PASSWORD, FreeRadius
from peers.totp import oathtool_code
from portcullis.identity.conditions import LoginContext
from portcullis.identity.login import Authenticated, Denied, NextStep

pytestmark = pytest.mark.peer

CLIENT = LoginContext("192.0.2.11")
ALICE_LDAP = USERS["alice"]
BOB_LDAP = USERS["bob"]


def corp(slapd: Slapd) -> dict[str, Any]:
    return slapd.provider("corp", "ldap-bind.pw", ca_cert="ldap-ca.pem", timeout=3)


def radius(server: FreeRadius) -> dict[str, Any]:
    return server.provider("radius", "radius.secret", timeout=0.5, retries=0)


@pytest.fixture
def make_login(slapd: Slapd, freeradius: FreeRadius, tmp_path: Path,
               build_login: BuildLogin) -> BuildLogin:
    """make_login(auth) -> Login, in a deployment directory that holds the secrets and the
    CA by relative path."""
    (tmp_path / "ldap-ca.pem").write_bytes(Path(slapd.ca_cert).read_bytes())
    (tmp_path / "ldap-bind.pw").write_text(slapd.bind_password + "\n")
    (tmp_path / "radius.secret").write_bytes(freeradius.secret + b"\n")

    def make(auth: dict[str, Any]) -> Login:
        return build_login(auth, client=CLIENT)

    return make


# --- "RADIUS, then LDAP" ------------------------------------------------------------


@pytest.fixture
def radius_then_ldap(make_login, slapd: Slapd, freeradius: FreeRadius) -> Login:  # type: ignore[no-untyped-def]
    return make_login(flow({"provider": "radius"}, {"provider": "corp"},
                           providers=[radius(freeradius), corp(slapd)]))


async def test_radius_then_ldap_asks_the_directory_password_for_the_same_user(
        radius_then_ldap: Login) -> None:
    first = await radius_then_ldap.submit(None, {"username": "Alice",
                                                 "password": ALICE_PASSWORD})
    assert isinstance(first, NextStep)
    # The second step knows who this is: it asks only for the password.
    assert [prompt.name for prompt in first.step.prompts] == ["password"]
    assert first.step.message == "Signing in as alice"
    second = await radius_then_ldap.submit(first.handle, {"password": ALICE_LDAP.password})
    assert isinstance(second, Authenticated), radius_then_ldap.events()[-1:]
    claims = second.session.claims
    assert claims.amr == ("radius", "corp")
    assert claims.username == "alice"
    # The realm is the first step's: the user name is RADIUS's.
    assert claims.idp == "radius" and claims.sub == "radius:alice"
    # Groups from both providers; the rest from the directory entry.
    assert claims.groups[0] == ALICE_CLASS
    assert set(claims.groups) == {"staff", "finance"}
    assert claims.display_name == "Alice Liddell"
    assert claims.email == ALICE_LDAP.mail and claims.upn == ALICE_LDAP.user_principal_name
    assert claims.sid == ALICE_LDAP.sid and claims.guid == str(ALICE_LDAP.guid)


async def test_radius_then_ldap_ignores_a_user_name_typed_at_the_ldap_step(
        radius_then_ldap: Login) -> None:
    first = await radius_then_ldap.submit(None, {"username": "alice",
                                                 "password": ALICE_PASSWORD})
    assert isinstance(first, NextStep)
    # bob's own, correct directory password, with bob's name slipped in.
    second = await radius_then_ldap.submit(first.handle, {"username": "bob",
                                                          "password": BOB_LDAP.password})
    assert isinstance(second, Denied)
    assert not [e for e in radius_then_ldap.events("login.factor_passed")
                if e["factor"] == "corp"]
    failure = radius_then_ldap.events("login.failed")[-1]
    # The directory was asked about alice, so the factor never named bob.
    assert failure["user"] == "alice" and failure["factor"] == "corp"
    assert "named another user" not in failure["reason"]


async def test_radius_then_ldap_needs_both_passwords(radius_then_ldap: Login) -> None:
    wrong_radius = await radius_then_ldap.submit(None, {"username": "alice",
                                                        "password": ALICE_LDAP.password})
    assert isinstance(wrong_radius, Denied)
    first = await radius_then_ldap.submit(None, {"username": "alice",
                                                 "password": ALICE_PASSWORD})
    assert isinstance(first, NextStep)
    # The RADIUS password is not the directory password.
    assert isinstance(await radius_then_ldap.submit(first.handle,
                                                    {"password": ALICE_PASSWORD}), Denied)
    assert not radius_then_ldap.events("login.succeeded")


# --- "LDAP, then TOTP for finance" -----------------------------------------------------


@pytest.fixture
def ldap_then_totp_for_finance(make_login, slapd: Slapd) -> Login:  # type: ignore[no-untyped-def]
    return make_login(flow({"provider": "corp"},
                           {"provider": "totp", "when": {"groups": ["finance"]}},
                           providers=[corp(slapd)]))


async def test_finance_user_must_enrol_then_give_a_code_every_time(
        ldap_then_totp_for_finance: Login) -> None:
    login = ldap_then_totp_for_finance
    first = await login.submit(None, {"username": "alice", "password": ALICE_LDAP.password})
    assert isinstance(first, NextStep), login.events()[-1:]
    assert first.step.kind == "totp-enrol"
    assert first.step.enrolment is not None
    secret = first.step.enrolment["secret"]
    assert first.step.enrolment["otpauth_uri"].startswith("otpauth://totp/")
    code = oathtool_code(secret)
    enrolled = await login.submit(first.handle, {"code": code})
    assert isinstance(enrolled, Authenticated), login.events()[-1:]
    claims = enrolled.session.claims
    assert claims.amr == ("corp", "totp") and claims.sub == "corp:alice"
    assert set(claims.groups) == {"staff", "finance"}

    # Enrolled now: signing in by mail is the same user, asked for a code, not enrolled
    # again; the code just used is not accepted twice.
    again = await login.submit(None, {"username": ALICE_LDAP.mail or "",
                                      "password": ALICE_LDAP.password})
    assert isinstance(again, NextStep)
    assert again.step.kind == "totp" and [p.name for p in again.step.prompts] == ["code"]
    assert isinstance(await login.submit(again.handle, {"code": code}), Denied)
    assert login.events("login.failed")[-1]["factor"] == "totp"


async def test_a_finance_user_cannot_skip_the_code(ldap_then_totp_for_finance: Login) -> None:
    login = ldap_then_totp_for_finance
    first = await login.submit(None, {"username": "alice", "password": ALICE_LDAP.password})
    assert isinstance(first, NextStep) and first.step.kind == "totp-enrol"
    # An empty or wrong code does not finish the sign-in.
    for code in ("", "12345", "abcdef"):
        result = await login.submit(first.handle, {"code": code})
        assert not isinstance(result, Authenticated)
    assert not login.events("login.succeeded")


async def test_a_user_outside_finance_is_not_asked_for_a_code(
        ldap_then_totp_for_finance: Login) -> None:
    login = ldap_then_totp_for_finance
    result = await login.submit(None, {"username": "bob", "password": BOB_LDAP.password})
    assert isinstance(result, Authenticated), login.events()[-1:]
    assert result.session.claims.amr == ("corp",)
    assert result.session.claims.username == "bob"
    skipped = login.events("login.step_skipped")
    assert [(e["user"], e["factor"]) for e in skipped] == [("bob", "totp")]


# --- TOTP first, then the directory: the typed name is provisional ---------------------------


async def test_totp_first_then_ldap_keys_everything_by_the_directory_name(
        make_login, slapd: Slapd) -> None:  # type: ignore[no-untyped-def]
    """A user who types their mail at a TOTP step before the directory step: the directory
    resolves "alice", which replaces the typed spelling, so a sign-in works and failures
    count against corp:alice, not against each spelling."""
    login = make_login({"flows": [{"name": "default", "realm": "corp", "steps": [
        {"provider": "totp"}, {"provider": "corp"}]}],
        "providers": [corp(slapd)], "throttle": {"account_failures": 50}})
    first = await login.submit(None, {"username": ALICE_LDAP.mail, "code": "000000"})
    assert isinstance(first, NextStep) and first.step.kind == "password"
    # Not enrolled yet: after the directory password, enrolment for alice.
    second = await login.submit(first.handle, {"password": ALICE_LDAP.password})
    assert isinstance(second, NextStep) and second.step.kind == "totp-enrol", login.events()[-2:]
    assert second.step.enrolment and "Portcullis:alice?" in second.step.enrolment["otpauth_uri"]
    # Wrong passwords typed under other spellings all count against one identity.
    for spelling in (ALICE_LDAP.mail, ALICE_LDAP.user_principal_name, "ALICE"):
        step = await login.submit(None, {"username": spelling, "code": "000000"})
        assert isinstance(step, NextStep)
        assert await login.submit(step.handle, {"password": "wrong"}) == Denied()
    assert await login.account_failures("corp:alice") == 3
    assert await login.account_failures(f"corp:{ALICE_LDAP.mail}") == 0
