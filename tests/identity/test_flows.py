"""Login flows: the pure step choice, the seed flows of `[auth]` with local accounts and
TOTP (codes made by the real `oathtool`), one identity per canonical name, and
throttling, over both ephemeral backends.

TOTP codes here are for the real time (the services come from IdentityProviders): a
code for the current step or the next one is accepted even if a step boundary passes
while the test runs, so each user answers at most those two codes per test."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import time
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, assume, event, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from peers.login import BuildLogin, Login, flow
from peers.stores import FakeClock
from peers.totp import oathtool_code
from portcullis.config.auth import Condition, Flow, FlowStep
from portcullis.identity.conditions import ClientCertificate, Facts, LoginContext, evaluate
from portcullis.identity.flow import FlowState, Step, next_step
from portcullis.identity.login import MAX_ANSWER, Authenticated, Denied, NextStep
from portcullis.identity.passwords import hash_password
from portcullis.identity.throttle import Throttle
from portcullis.pki.ca import create_ca, issue_certificate
from portcullis.store import DurableStore, EphemeralStore, MemoryStore, SqliteStore

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "fred": "fred-pw"}
GROUPS = {"alice": ["staff"], "bob": ["staff"], "fred": ["FINANCE", "staff"]}
OFFICE = LoginContext("192.0.2.10")
ELSEWHERE = LoginContext("198.51.100.20")


# --- a real client certificate ----------------------------------------------------------

def _client_certificate(common_name: str, ca_name: str) -> ClientCertificate:
    ca = create_ca(ca_name)
    issued = issue_certificate(ca, common_name, server=False, client=True)
    der = x509.load_pem_x509_certificate(issued.cert_pem).public_bytes(
        serialization.Encoding.DER)
    return ClientCertificate.from_der(der)


LAPTOP = _client_certificate("laptop-17", "Device CA")
assert LAPTOP.subject == "CN=laptop-17" and LAPTOP.issuer == "CN=Device CA"
WITH_CERT = LoginContext("192.0.2.10", LAPTOP)


# --- pure: evaluate and next_step --------------------------------------------------------

def facts(address: str = "192.0.2.10", certificate: ClientCertificate | None = None,
          username: str | None = None, groups: tuple[str, ...] = (),
          passed: tuple[str, ...] = ()) -> Facts:
    return Facts(LoginContext(address, certificate), username, frozenset(groups),
                 frozenset(passed))


C = Condition.model_validate

EVALUATE_CASES: list[tuple[str, Condition | None, Facts, bool, str]] = [
    ("none", None, facts(), True, "always"),
    ("empty", C({}), facts(), True, "always"),
    ("cert valid, has one", C({"certificate": "valid"}), facts(certificate=LAPTOP), True,
     "a valid client certificate"),
    ("cert valid, has none", C({"certificate": "valid"}), facts(), False,
     "no client certificate"),
    ("cert absent, has none", C({"certificate": "absent"}), facts(), True,
     "no client certificate"),
    ("cert absent, has one", C({"certificate": "absent"}), facts(certificate=LAPTOP), False,
     "a valid client certificate"),
    ("issuer equal", C({"certificate_issuer": "CN=Device CA"}), facts(certificate=LAPTOP),
     True, "certificate issuer CN=Device CA"),
    ("issuer other", C({"certificate_issuer": "CN=Other CA"}), facts(certificate=LAPTOP),
     False, "certificate issuer CN=Device CA"),
    ("issuer differs in case", C({"certificate_issuer": "CN=device ca"}),
     facts(certificate=LAPTOP), False, "certificate issuer CN=Device CA"),
    ("issuer, no cert", C({"certificate_issuer": "CN=Device CA"}), facts(), False,
     "no client certificate"),
    ("subject regex", C({"certificate_subject": r"CN=laptop-\d+"}),
     facts(certificate=LAPTOP), True, "certificate subject CN=laptop-17"),
    ("subject regex is whole-subject", C({"certificate_subject": "CN=laptop"}),
     facts(certificate=LAPTOP), False, "certificate subject CN=laptop-17"),
    ("subject regex no match", C({"certificate_subject": "CN=phone-.*"}),
     facts(certificate=LAPTOP), False, "certificate subject"),
    ("subject, no cert", C({"certificate_subject": ".*"}), facts(), False,
     "no client certificate"),
    ("v4 inside", C({"client_address": ["10.0.0.0/8", "192.0.2.0/24"]}),
     facts("192.0.2.10"), True, "client 192.0.2.10 in 192.0.2.0/24"),
    ("v4 outside", C({"client_address": ["10.0.0.0/8"]}), facts("192.0.2.10"), False,
     "client 192.0.2.10 in none of 10.0.0.0/8"),
    ("v4 host route", C({"client_address": ["192.0.2.10"]}), facts("192.0.2.10"), True,
     "in 192.0.2.10"),
    ("v6 inside", C({"client_address": ["2001:db8::/32"]}), facts("2001:db8::7"), True,
     "client 2001:db8::7 in 2001:db8::/32"),
    ("v6 outside", C({"client_address": ["2001:db8::/32"]}), facts("2001:db9::7"), False,
     "in none of"),
    ("v4 vs v6 network", C({"client_address": ["::/0"]}), facts("192.0.2.10"), False,
     "in none of"),
    ("v6 vs v4 network", C({"client_address": ["0.0.0.0/0"]}), facts("2001:db8::7"), False,
     "in none of"),
    ("address unknown", C({"client_address": ["0.0.0.0/0"]}), facts("unknown"), False,
     "client address 'unknown' unknown"),
    ("group member", C({"groups": ["finance", "hr"]}), facts(groups=("finance",)), True,
     "member of finance"),
    ("group configured in capitals", C({"groups": ["Finance"]}), facts(groups=("finance",)),
     True, "member of finance"),
    ("group not member", C({"groups": ["finance"]}), facts(groups=("staff",)), False,
     "not a member of finance"),
    ("group, none known yet", C({"groups": ["finance"]}), facts(), False,
     "not a member of finance"),
    ("user listed", C({"users": ["ALICE", "bob"]}), facts(username="alice"), True,
     "user alice"),
    ("user full-width in config", C({"users": ["ａｌｉｃｅ"]}), facts(username="alice"), True,
     "user alice"),
    ("user not listed", C({"users": ["bob"]}), facts(username="alice"), False, "user alice"),
    ("user not known yet", C({"users": ["alice"]}), facts(), False,
     "user (not yet known)"),
    ("passed all", C({"passed": ["local", "totp"]}), facts(passed=("local", "totp")), True,
     "passed local, totp"),
    ("passed some", C({"passed": ["local", "totp"]}), facts(passed=("local",)), False,
     "totp not passed"),
    ("any, second holds", C({"any": [{"users": ["bob"]}, {"groups": ["staff"]}]}),
     facts(username="alice", groups=("staff",)), True, "member of staff"),
    ("any, none holds", C({"any": [{"users": ["bob"]}, {"certificate": "valid"}]}),
     facts(username="alice"), False,
     "none of: user alice; no client certificate"),
    ("not, inner false", C({"not": {"certificate": "valid"}}), facts(), True,
     "no client certificate"),
    ("not, inner true", C({"not": {"certificate": "valid"}}), facts(certificate=LAPTOP),
     False, "a valid client certificate"),
    ("all fields hold",
     C({"certificate": "valid", "certificate_issuer": "CN=Device CA",
        "certificate_subject": "CN=laptop-.*", "client_address": ["192.0.2.0/24"],
        "groups": ["staff"], "users": ["alice"], "passed": ["local"],
        "any": [{"users": ["alice"]}], "not": {"users": ["bob"]}}),
     facts(certificate=LAPTOP, username="alice", groups=("staff",), passed=("local",)),
     True, "a valid client certificate and certificate issuer CN=Device CA and "
           "certificate subject CN=laptop-17 and client 192.0.2.10 in 192.0.2.0/24 and "
           "member of staff and user alice and passed local and user alice and user alice"),
    ("first failing field decides",
     C({"certificate": "valid", "groups": ["finance"], "users": ["bob"]}),
     facts(certificate=LAPTOP, username="alice", groups=("staff",)), False,
     "not a member of finance"),
]


@pytest.mark.parametrize(("condition", "given_facts", "holds", "reason"),
                         [case[1:] for case in EVALUATE_CASES],
                         ids=[case[0] for case in EVALUATE_CASES])
def test_evaluate(condition: Condition | None, given_facts: Facts, holds: bool,
                  reason: str) -> None:
    verdict = evaluate(condition, given_facts)
    assert verdict.holds is holds
    assert reason in verdict.reason, verdict.reason


def test_an_ipv4_mapped_client_meets_ipv4_networks() -> None:
    condition = C({"client_address": ["192.0.2.0/24"]})
    assert evaluate(condition, facts("::ffff:192.0.2.10")).holds


def test_group_facts_from_a_flow_are_case_insensitive() -> None:
    flow = Flow(name="f", steps=[FlowStep(provider="local"),
                                 FlowStep(provider="totp", when=C({"groups": ["Finance"]}))])
    state = FlowState(flow="f", username="fred", attributes={"groups": ["FINANCE"]},
                      passed=["local"])
    assert next_step(flow, 1, state, OFFICE).index == 1
    staff = FlowState(flow="f", username="alice", attributes={"groups": ["Staff"]},
                      passed=["local"])
    choice = next_step(flow, 1, staff, OFFICE)
    assert choice.index is None
    assert choice.skipped == (("totp", "not a member of finance"),)


def test_next_step_skips_with_reasons() -> None:
    flow = Flow(name="f", steps=[
        FlowStep(provider="totp", when=C({"not": {"certificate": "valid"}})),
        FlowStep(provider="local"),
        FlowStep(provider="totp", when=C({"users": ["fred"]})),
        FlowStep(provider="totp", when=C({"client_address": ["10.0.0.0/8"]})),
    ])
    fresh = FlowState(flow="f")
    with_cert = next_step(flow, 0, fresh, WITH_CERT)
    assert with_cert.index == 1
    assert with_cert.skipped == (("totp", "a valid client certificate"),)
    without = next_step(flow, 0, fresh, OFFICE)
    assert (without.index, without.skipped) == (0, ())
    after = FlowState(flow="f", username="alice", passed=["local"])
    end = next_step(flow, 2, after, OFFICE)
    assert end.index is None
    assert end.skipped == (("totp", "user alice"),
                           ("totp", "client 192.0.2.10 in none of 10.0.0.0/8"))
    assert next_step(flow, 4, after, OFFICE).index is None
    # Pure: asking twice gives the same answer, and nothing in the state changed.
    assert next_step(flow, 2, after, OFFICE) == end
    assert after == FlowState(flow="f", username="alice", passed=["local"],
                              started=after.started)


# Conditions and facts over small vocabularies, so that conditions often hold.
NAMES = ["alice", "bob", "fred"]
GROUP_NAMES = ["staff", "finance", "hr"]
PROVIDERS = ["local", "totp", "corp"]
ADDRESSES = ["192.0.2.10", "10.1.2.3", "2001:db8::7", "fe80::1", "unknown"]
NETWORKS = ["192.0.2.0/24", "10.0.0.0/8", "2001:db8::/32", "0.0.0.0/0", "::/0"]
CERTIFICATES = [LAPTOP, _client_certificate("phone-3", "Other CA")]


def _leaf_conditions() -> st.SearchStrategy[Condition]:
    subsets = st.lists
    return st.builds(
        Condition,
        certificate=st.none() | st.sampled_from(["valid", "absent"]),
        certificate_issuer=st.none() | st.sampled_from(["CN=Device CA", "CN=Other CA"]),
        certificate_subject=st.none() | st.sampled_from([".*", "CN=laptop-.*", "CN=x"]),
        client_address=st.none() | subsets(st.sampled_from(NETWORKS), max_size=2),
        groups=st.none() | subsets(st.sampled_from(GROUP_NAMES), max_size=2),
        users=st.none() | subsets(st.sampled_from(NAMES), max_size=2),
        passed=st.none() | subsets(st.sampled_from(PROVIDERS), max_size=2),
    )


CONDITIONS = st.recursive(
    _leaf_conditions(),
    lambda children: st.one_of(
        st.builds(lambda c: Condition(not_=c), children),
        st.builds(lambda cs: Condition(any=cs), st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda c, d: Condition(not_=c, any=[d]), children, children),
    ),
    max_leaves=6)

FACTS = st.builds(
    facts,
    address=st.sampled_from(ADDRESSES),
    certificate=st.none() | st.sampled_from(CERTIFICATES),
    username=st.none() | st.sampled_from(NAMES),
    groups=st.lists(st.sampled_from(GROUP_NAMES), max_size=3).map(tuple),
    passed=st.lists(st.sampled_from(PROVIDERS), max_size=3).map(tuple),
)


@given(condition=CONDITIONS, known=FACTS)
def test_not_is_the_negation(condition: Condition, known: Facts) -> None:
    inner = evaluate(condition, known)
    outer = evaluate(Condition(not_=condition), known)
    assert outer.holds is (not inner.holds)
    assert outer.reason == inner.reason


@given(conditions=st.lists(CONDITIONS, min_size=1, max_size=3), known=FACTS)
def test_any_holds_when_one_holds(conditions: list[Condition], known: Facts) -> None:
    assert evaluate(Condition(any=conditions), known).holds is any(
        evaluate(c, known).holds for c in conditions)


# --- the services ----------------------------------------------------------------------

@pytest.fixture
async def durable(durable: DurableStore) -> DurableStore:
    """The shared SQLite store, with the local users of these tests."""
    for name, password in PASSWORDS.items():
        await durable.add_user(name, hash_password(password), GROUPS[name])
    return durable


def code(secret: str, steps_ahead: int = 0) -> str:
    """oathtool's code for `secret` now, or `steps_ahead` 30-second steps from now."""
    return oathtool_code(secret, time.time() + 30 * steps_ahead)


async def enrol_totp(site: Login, username: str) -> str:
    """Enrol `username` directly (as an administrator's tool would); the secret."""
    enrolment = site.totp.new_enrolment(username)
    check = await site.totp.confirm(f"local:{username}", enrolment, code(enrolment.secret))
    assert check.ok, check.reason
    secret: str = enrolment.secret
    return secret


def prompts(step: Step) -> list[str]:
    return [prompt.name for prompt in step.prompts]


def shape(result: object, username: str | None = None) -> tuple[Any, ...]:
    """What a client can see of an answer, with the user's own name blanked out."""
    if not isinstance(result, NextStep):
        return (type(result).__name__,)
    body = json.dumps(result.step.to_json(), sort_keys=True)
    return ("NextStep", body.replace(username, "<user>") if username else body)


# --- (a) "Finance always needs TOTP" --------------------------------------------------------

FINANCE_TOTP = flow({"provider": "local"},
                    {"provider": "totp", "when": {"groups": ["Finance"]}})


async def test_finance_enrols_then_signs_in_with_a_code(build_login: BuildLogin) -> None:
    site = build_login(FINANCE_TOTP)
    first = await site.submit(None, {"username": "fred", "password": "fred-pw"}, OFFICE)
    assert isinstance(first, NextStep) and first.step.kind == "totp-enrol"
    assert prompts(first.step) == ["code"]
    enrolment = first.step.enrolment
    assert enrolment is not None
    secret = enrolment["secret"]
    assert enrolment["otpauth_uri"].startswith("otpauth://totp/Portcullis:fred?")
    assert f"secret={secret}" in enrolment["otpauth_uri"]
    assert enrolment["qr_svg"].startswith("data:image/svg+xml")
    assert enrolment["qr_text"].strip()
    assert len(enrolment["recovery_codes"]) == 10
    # Nothing is stored before a correct code; a wrong one asks again, same secret.
    assert await site.totp.record("local:fred") is None
    retry = await site.submit(first.handle, {"code": "000000"}, OFFICE)
    assert isinstance(retry, NextStep) and retry.step.kind == "totp-enrol"
    assert retry.step.enrolment is not None and retry.step.enrolment["secret"] == secret
    enrol_code = code(secret)
    done = await site.submit(first.handle, {"code": enrol_code}, OFFICE)
    assert isinstance(done, Authenticated)
    assert done.session.claims.amr == ("local", "totp")
    assert set(done.session.claims.groups) == {"FINANCE", "staff"}
    assert await site.totp.record("local:fred") is not None

    again = await site.submit(None, {"username": "fred", "password": "fred-pw"}, OFFICE)
    assert isinstance(again, NextStep) and again.step.kind == "totp"
    assert prompts(again.step) == ["code"] and again.step.enrolment is None
    replayed = await site.submit(again.handle, {"code": enrol_code}, OFFICE)
    assert isinstance(replayed, Denied)
    assert site.events("login.failed")[-1]["reason"] == "code already used"
    third = await site.submit(None, {"username": "fred", "password": "fred-pw"}, OFFICE)
    assert isinstance(third, NextStep)
    signed_in = await site.submit(third.handle, {"code": code(secret, 1)}, OFFICE)
    assert isinstance(signed_in, Authenticated)
    assert signed_in.session.claims.amr == ("local", "totp")
    # A recovery code from the enrolment works once.
    fourth = await site.submit(None, {"username": "fred", "password": "fred-pw"}, OFFICE)
    assert isinstance(fourth, NextStep)
    recovery = enrolment["recovery_codes"][0]
    assert isinstance(await site.submit(fourth.handle, {"code": recovery}, OFFICE), Authenticated)
    fifth = await site.submit(None, {"username": "fred", "password": "fred-pw"}, OFFICE)
    assert isinstance(fifth, NextStep)
    assert isinstance(await site.submit(fifth.handle, {"code": recovery}, OFFICE), Denied)


async def test_staff_needs_no_totp(build_login: BuildLogin) -> None:
    site = build_login(FINANCE_TOTP)
    result = await site.submit(None, {"username": "alice", "password": "alice-pw"}, OFFICE)
    assert isinstance(result, Authenticated)
    assert result.session.claims.amr == ("local",)
    skipped = site.events("login.step_skipped")
    assert [(e["factor"], e["reason"]) for e in skipped] == [
        ("totp", "not a member of finance")]
    assert await site.totp.record("local:alice") is None


async def test_a_wrong_password_never_reaches_enrolment(build_login: BuildLogin) -> None:
    site = build_login(FINANCE_TOTP)
    result = await site.submit(None, {"username": "fred", "password": "nope"}, OFFICE)
    assert result == Denied()
    assert await site.totp.record("local:fred") is None


# --- (b) "valid certificate → password only; others TOTP, then password" ---------------------

# client_ca only has to be set here: the gateway's TLS asks for certificates, and these
# tests hand the flow a verified certificate directly.
DEVICE_OR_TOTP = flow({"provider": "totp", "when": {"not": {"certificate": "valid"}}},
                      {"provider": "local"}, client_ca="pki/ca.crt")


async def test_with_a_certificate_only_the_password_is_asked(build_login: BuildLogin) -> None:
    site = build_login(DEVICE_OR_TOTP)
    await enrol_totp(site, "alice")
    begun = await site.service.begin(WITH_CERT)
    assert isinstance(begun, NextStep) and begun.step.kind == "password"
    assert prompts(begun.step) == ["username", "password"]
    result = await site.submit(begun.handle, {"username": "alice",
                                              "password": "alice-pw"}, WITH_CERT)
    assert isinstance(result, Authenticated)
    assert result.session.claims.amr == ("local",)
    assert site.events("login.succeeded")[-1]["factors"] == ["local"]


async def test_a_step_skipped_at_the_start_is_audited(build_login: BuildLogin) -> None:
    site = build_login(DEVICE_OR_TOTP)
    assert isinstance(await site.service.begin(WITH_CERT), NextStep)
    assert [(e["factor"], e["reason"]) for e in site.events("login.step_skipped")] == [
        ("totp", "a valid client certificate")]


async def test_without_a_certificate_totp_comes_first_then_the_password(
        build_login: BuildLogin) -> None:
    site = build_login(DEVICE_OR_TOTP)
    secret = await enrol_totp(site, "alice")
    begun = await site.service.begin(OFFICE)
    assert isinstance(begun, NextStep) and begun.step.kind == "totp"
    assert prompts(begun.step) == ["username", "code"]
    second = await site.submit(begun.handle, {"username": "Alice", "code": code(secret, 1)}, OFFICE)
    assert isinstance(second, NextStep) and second.step.kind == "password"
    assert prompts(second.step) == ["password"]          # the name is fixed now
    # A name typed again is ignored: the password is checked for alice.
    result = await site.submit(second.handle, {"username": "bob", "password": "alice-pw"}, OFFICE)
    assert isinstance(result, Authenticated)
    assert result.session.claims.username == "alice"
    assert result.session.claims.amr == ("totp", "local")


async def test_a_wrong_code_fails_late_like_an_unknown_user(build_login: BuildLogin) -> None:
    site = build_login(DEVICE_OR_TOTP)
    await enrol_totp(site, "alice")
    shapes = {}
    for name in ("alice", "mallory", "bob"):   # enrolled, unknown, not enrolled
        first = await site.submit(None, {"username": name, "code": "123456"}, OFFICE)
        assert isinstance(first, NextStep)
        shapes[name] = shape(first, name)
    assert shapes["alice"] == shapes["mallory"] == shapes["bob"]
    assert shapes["alice"][0] == "NextStep" and '"kind": "password"' in shapes["alice"][1]

    # Enrolled, wrong code, right password: denied only at the end.
    first = await site.submit(None, {"username": "alice", "code": "123456"}, OFFICE)
    assert isinstance(first, NextStep)
    end = await site.submit(first.handle, {"password": "alice-pw"}, OFFICE)
    assert end == Denied()
    failed = site.events("login.failed")[-1]
    assert (failed["user"], failed["reason"]) == ("alice", "totp: wrong code")
    late = site.events("login.factor_failed")
    assert {(e["user"], e["factor"], e["reason"]) for e in late} == {
        ("alice", "totp", "wrong code")}

    # Unknown, any code, any password: the same answers.
    first = await site.submit(None, {"username": "mallory", "code": "123456"}, OFFICE)
    assert isinstance(first, NextStep)
    end = await site.submit(first.handle, {"password": "alice-pw"}, OFFICE)
    assert end == Denied()
    assert site.events("login.failed")[-1]["reason"] == "unknown user"


async def test_a_user_without_totp_enrols_after_the_password(build_login: BuildLogin) -> None:
    site = build_login(DEVICE_OR_TOTP)
    first = await site.submit(None, {"username": "bob", "code": "123456"}, OFFICE)
    assert isinstance(first, NextStep) and first.step.kind == "password"
    assert first.step.enrolment is None     # nothing shown before the password
    enrol = await site.submit(first.handle, {"password": "bob-pw"}, OFFICE)
    assert isinstance(enrol, NextStep) and enrol.step.kind == "totp-enrol"
    assert enrol.step.enrolment is not None
    secret = enrol.step.enrolment["secret"]
    done = await site.submit(enrol.handle, {"code": code(secret)}, OFFICE)
    assert isinstance(done, Authenticated)
    assert done.session.claims.amr == ("local", "totp")
    # Next time the code comes first.
    begun = await site.submit(None, {"username": "bob", "code": code(secret, 1)}, OFFICE)
    assert isinstance(begun, NextStep) and begun.step.kind == "password"
    result = await site.submit(begun.handle, {"password": "bob-pw"}, OFFICE)
    assert isinstance(result, Authenticated)
    assert result.session.claims.amr == ("totp", "local")


async def test_a_deferred_enrolment_needs_the_right_password(build_login: BuildLogin) -> None:
    site = build_login(DEVICE_OR_TOTP)
    first = await site.submit(None, {"username": "bob", "code": "123456"}, OFFICE)
    assert isinstance(first, NextStep)
    assert await site.submit(first.handle, {"password": "wrong"}, OFFICE) == Denied()
    assert await site.totp.record("local:bob") is None
    # The handle is gone: no second go at the enrolment with it.
    assert await site.submit(first.handle, {"password": "bob-pw"}, OFFICE) == Denied()


async def test_a_code_in_non_ascii_digits_is_denied(build_login: BuildLogin) -> None:
    site = build_login(DEVICE_OR_TOTP)
    await enrol_totp(site, "alice")
    first = await site.submit(None, {"username": "alice", "code": "١٢٣٤٥٦"}, OFFICE)
    assert isinstance(first, NextStep)


# --- (c) two local steps ----------------------------------------------------------------

async def test_two_local_steps_in_sequence(build_login: BuildLogin) -> None:
    site = build_login(flow({"provider": "local"}, {"provider": "local"}))
    first = await site.submit(None, {"username": "alice", "password": "alice-pw"}, OFFICE)
    assert isinstance(first, NextStep) and prompts(first.step) == ["password"]
    assert first.step.message == "Signing in as alice"
    done = await site.submit(first.handle, {"password": "alice-pw"}, OFFICE)
    assert isinstance(done, Authenticated)
    assert done.session.claims.amr == ("local", "local")
    # The second step cannot be answered for another user.
    first = await site.submit(None, {"username": "alice", "password": "alice-pw"}, OFFICE)
    assert isinstance(first, NextStep)
    other = await site.submit(first.handle, {"username": "bob", "password": "bob-pw"}, OFFICE)
    assert other == Denied()
    failed = site.events("login.failed")[-1]
    assert (failed["user"], failed["reason"]) == ("alice", "wrong password")


async def test_two_local_providers_in_sequence(build_login: BuildLogin) -> None:
    site = build_login(flow({"provider": "local"}, {"provider": "vault"},
                            providers=[{"type": "local", "name": "vault"}]))
    first = await site.submit(None, {"username": "bob", "password": "bob-pw"}, OFFICE)
    assert isinstance(first, NextStep) and prompts(first.step) == ["password"]
    assert await site.submit(first.handle, {"password": "alice-pw"}, OFFICE) == Denied()
    first = await site.submit(None, {"username": "bob", "password": "bob-pw"}, OFFICE)
    assert isinstance(first, NextStep)
    done = await site.submit(first.handle, {"password": "bob-pw"}, OFFICE)
    assert isinstance(done, Authenticated)
    assert done.session.claims.amr == ("local", "vault")
    assert done.session.claims.sub == "local:bob"


# --- one identity per canonical name -----------------------------------------------------

async def test_name_variants_share_one_totp_secret_and_one_lockout(build_login: BuildLogin) -> None:
    site = build_login(flow({"provider": "local"}, {"provider": "totp"},
                            throttle={"account_failures": 3}))
    first = await site.submit(None, {"username": "ALICE", "password": "alice-pw"}, OFFICE)
    assert isinstance(first, NextStep) and first.step.kind == "totp-enrol"
    assert first.step.enrolment is not None
    assert "Portcullis:alice?" in first.step.enrolment["otpauth_uri"]
    secret = first.step.enrolment["secret"]
    done = await site.submit(first.handle, {"code": code(secret)}, OFFICE)
    assert isinstance(done, Authenticated) and done.session.claims.username == "alice"

    second = await site.submit(None, {"username": " alice", "password": "alice-pw"}, OFFICE)
    assert isinstance(second, NextStep) and second.step.kind == "totp"
    assert prompts(second.step) == ["code"]
    signed = await site.submit(second.handle, {"code": code(secret, 1)}, OFFICE)
    assert isinstance(signed, Authenticated) and signed.session.claims.sub == "local:alice"
    third = await site.submit(None, {"username": "ａｌｉｃｅ", "password": "alice-pw"}, OFFICE)
    assert isinstance(third, NextStep) and third.step.kind == "totp"    # not a new enrolment
    assert third.step.message == "Signing in as alice"

    for _ in range(3):
        assert await site.submit(None, {"username": "alice", "password": "x"}, OFFICE) == Denied()
    for variant in ("ALICE", " alice", "ａｌｉｃｅ", "Alice\u00a0"):
        result = await site.submit(None, {"username": variant, "password": "alice-pw"}, ELSEWHERE)
        assert result == Denied()
    locked = site.events("login.failed")[-4:]
    assert {(e["user"], e["reason"]) for e in locked} == {("alice", "account locked")}
    assert (await site.throttle.account("local:alice")).locked


# --- throttling ------------------------------------------------------------------------

async def test_brute_force_locks_the_account_not_the_address(
        build_login: BuildLogin, ephemeral_store: EphemeralStore, clock: FakeClock) -> None:
    site = build_login(flow({"provider": "local"}, throttle={
        "account_failures": 5, "address_failures": 1000, "lockout_seconds": 600}),
        ephemeral=ephemeral_store)
    for attempt in range(50):
        result = await site.submit(None, {"username": "alice",
                                          "password": f"guess-{attempt}"}, OFFICE)
        assert result == Denied()
    right = await site.submit(None, {"username": "alice", "password": "alice-pw"}, OFFICE)
    assert right == Denied()
    # The client learns nothing more: a denial's one field says only whether the flow
    # was gone before anything was checked, which a locked account's answer is not.
    assert [field.name for field in dataclasses.fields(Denied)] == ["restart"]
    assert not right.restart

    failures = site.events("login.failed")
    assert len(failures) == 51
    assert all(e["user"] == "alice" and e["factor"] == "local" for e in failures)
    reasons = [e["reason"] for e in failures]
    assert reasons == ["wrong password"] * 5 + ["account locked"] * 46
    assert [e["locked"] for e in failures[:5]] == [False] * 4 + [True]
    assert all(e["client"] == OFFICE.client_address for e in failures)
    assert (await site.throttle.account("local:alice")).locked

    # Another user from the same address is not affected...
    bob = await site.submit(None, {"username": "bob", "password": "bob-pw"}, OFFICE)
    assert isinstance(bob, Authenticated)
    # ...and the locked user is locked from everywhere.
    assert await site.submit(None, {"username": "alice", "password": "alice-pw"},
                             ELSEWHERE) == Denied()
    assert site.events("login.failed")[-1]["reason"] == "account locked"

    if isinstance(ephemeral_store, MemoryStore | SqliteStore):
        # The lock ends by itself (Redis TTLs are covered by the store contract tests).
        clock.advance(601)
        after = await site.submit(None, {"username": "alice", "password": "alice-pw"}, OFFICE)
        assert isinstance(after, Authenticated)


async def test_too_many_failures_from_one_address_refuse_it_for_everyone(
        build_login: BuildLogin, ephemeral_store: EphemeralStore) -> None:
    site = build_login(flow({"provider": "local"}, throttle={
        "account_failures": 100, "address_failures": 10}), ephemeral=ephemeral_store)
    begun = await site.service.begin(OFFICE)
    for attempt in range(10):
        name = ["alice", "bob", f"nobody{attempt}"][attempt % 3]
        assert await site.submit(None, {"username": name, "password": "x"}, OFFICE) == Denied()
    for name in ("alice", "bob", "fred"):
        result = await site.submit(None, {"username": name, "password": PASSWORDS[name]}, OFFICE)
        assert result == Denied()
    throttled = site.events("login.throttled")
    assert len(throttled) == 3 and all(e["client"] == OFFICE.client_address
                                       for e in throttled)
    # The refusal is not counted against the accounts.
    assert (await site.throttle.account("local:fred")).failures == 0
    # A handle obtained before is no way around it, and no new one is given.
    assert await site.service.begin(OFFICE) == Denied()
    assert isinstance(begun, NextStep)
    assert await site.submit(begun.handle, {"username": "alice",
                                            "password": "alice-pw"}, OFFICE) == Denied()
    # Another address still works, for the same users.
    result = await site.submit(None, {"username": "alice", "password": "alice-pw"}, ELSEWHERE)
    assert isinstance(result, Authenticated)


async def test_a_success_resets_the_account_count(
        build_login: BuildLogin, ephemeral_store: EphemeralStore) -> None:
    site = build_login(flow({"provider": "local"}, throttle={
        "account_failures": 5, "address_failures": 1000}), ephemeral=ephemeral_store)
    for _round in range(2):
        for _ in range(4):
            assert await site.submit(None, {"username": "alice", "password": "x"},
                                     OFFICE) == Denied()
        assert (await site.throttle.account("local:alice")).failures == 4
        result = await site.submit(None, {"username": "alice", "password": "alice-pw"}, OFFICE)
        assert isinstance(result, Authenticated)
        assert (await site.throttle.account("local:alice")).failures == 0
    assert not (await site.throttle.account("local:alice")).locked


async def test_a_wrong_totp_code_counts_against_the_account(
        build_login: BuildLogin, ephemeral_store: EphemeralStore) -> None:
    site = build_login(dict(DEVICE_OR_TOTP, throttle={"account_failures": 2}),
                       ephemeral=ephemeral_store)
    await enrol_totp(site, "alice")
    for _ in range(2):
        first = await site.submit(None, {"username": "alice", "code": "000000"}, OFFICE)
        assert isinstance(first, NextStep)
        assert await site.submit(first.handle, {"password": "alice-pw"}, OFFICE) == Denied()
    # One count per failed flow (not one for the code and one for the password).
    assert (await site.throttle.account("local:alice")).failures == 2
    assert (await site.throttle.account("local:alice")).locked
    # Locked: no code is checked, yet the answer looks like a wrong code's (the password
    # is asked), so it tells nothing about the lock or the enrolment.
    first = await site.submit(None, {"username": "alice", "code": "000000"}, OFFICE)
    assert isinstance(first, NextStep) and first.step.kind == "password"
    assert await site.submit(first.handle, {"password": "alice-pw"}, OFFICE) == Denied()
    assert site.events("login.failed")[-1]["reason"] == "account locked"


# --- answers that tell nothing ---------------------------------------------------------------

async def test_unknown_user_and_wrong_password_get_identical_answers(
        build_login: BuildLogin) -> None:
    site = build_login(flow({"provider": "local"}))
    begun = [await site.service.begin(OFFICE) for _ in range(2)]
    assert all(isinstance(b, NextStep) for b in begun)
    assert shape(begun[0]) == shape(begun[1])
    answers = {
        "wrong password": {"username": "alice", "password": "nope"},
        "unknown user": {"username": "mallory", "password": "nope"},
        "malformed user name": {"username": "a/b", "password": "nope"},
    }
    results = [await site.submit(None, answer, OFFICE) for answer in answers.values()]
    assert results == [Denied()] * 3
    assert [e["reason"] for e in site.events("login.failed")] == list(answers)


async def test_an_oversized_answer_is_denied(build_login: BuildLogin) -> None:
    site = build_login(flow({"provider": "local"}))
    at_limit = await site.submit(None, {"username": "alice", "password": "x" * MAX_ANSWER}, OFFICE)
    assert at_limit == Denied()
    assert site.events("login.failed")[-1]["reason"] == "wrong password"
    for answers in ({"username": "alice", "password": "x" * (MAX_ANSWER + 1)},
                    {"username": "a" * 10_000, "password": "alice-pw"},
                    {"username": "alice", "password": "alice-pw", "extra": "y" * 5000}):
        assert await site.submit(None, answers, OFFICE) == Denied()
        assert site.events("login.failed")[-1]["reason"] == "oversized answer"


async def test_an_unknown_or_oversized_handle_is_denied(build_login: BuildLogin) -> None:
    site = build_login(flow({"provider": "local"}))
    for handle in ("no-such-handle", "h" * 10_000, ""):
        denied = await site.submit(handle, {"username": "alice", "password": "alice-pw"},
                                   OFFICE)
        # Nothing was checked: a stale page begins again, and nothing counts as a failure.
        assert denied == Denied() and denied.restart
    assert await site.address_failures() == 0


def test_addresses_in_cases_are_valid() -> None:
    # Guard for the tables above: every address used as a fact parses (bar "unknown").
    for address in ADDRESSES:
        if address != "unknown":
            ipaddress.ip_address(address)


async def test_slow_failures_still_lock_when_each_comes_within_the_lockout_time() -> None:
    """The account count lives until lockout_seconds after the latest failure."""
    from portcullis.config.auth import ThrottleSettings

    clock = FakeClock()
    store = MemoryStore(clock=clock)
    throttle = Throttle(store, ThrottleSettings(account_failures=3, lockout_seconds=100))
    for _ in range(2):
        await throttle.failed("local:alice", "192.0.2.1")
        clock.now += 90                     # each well within 100 s of the one before
    lock = await throttle.failed("local:alice", "192.0.2.1")
    assert lock is not None and lock.locked and lock.failures == 3
    clock.now += 101
    assert not (await throttle.account("local:alice")).locked


# --- what a security review found: races, counts, provisional names, deferral ---------------

async def test_parallel_answers_on_one_handle_are_checked_once(
        build_login: BuildLogin, ephemeral_store: EphemeralStore) -> None:
    """A handle is taken, not read: 30 code guesses sent at once on one TOTP step get one
    verification, the others an unknown handle."""
    import asyncio

    site = build_login(flow({"provider": "local"}, {"provider": "totp"},
                            throttle={"account_failures": 3}), ephemeral=ephemeral_store)
    await enrol_totp(site, "alice")
    first = await site.sign_in("alice", "alice-pw")
    assert isinstance(first, NextStep) and first.step.kind == "totp"
    results = await asyncio.gather(*(
        site.submit(first.handle, {"code": f"{guess:06d}"}) for guess in range(30)))
    assert all(result == Denied() for result in results)
    reasons = [e["reason"] for e in site.events("login.failed")]
    assert reasons.count("unknown or expired login handle") == 29
    assert sum(reason.startswith("wrong code") for reason in reasons) <= 1


async def test_parallel_password_guesses_are_not_all_verified(
        build_login: BuildLogin, ephemeral_store: EphemeralStore) -> None:
    """One verification at a time per account: 30 guesses at once cannot all be checked
    before the lockout counts them."""
    import asyncio

    site = build_login(flow({"provider": "local"}, throttle={"account_failures": 3}),
                       ephemeral=ephemeral_store)
    results = await asyncio.gather(*(site.sign_in("alice", f"guess-{i}") for i in range(30)))
    assert all(result == Denied() for result in results)
    reasons = [e["reason"] for e in site.events("login.failed")]
    # Checked: as many as could be counted one after the other (here all at once: one).
    assert 1 <= reasons.count("wrong password") <= 3
    assert reasons.count("another sign-in of this account is being checked") >= 27
    assert (await site.throttle.account("local:alice")).failures == reasons.count(
        "wrong password")


async def test_totp_first_counts_enrolled_and_unenrolled_users_alike(
        build_login: BuildLogin) -> None:
    """A wrong code and a wrong password in one sign-in count once, for an enrolled user
    as for one without TOTP: the counts (and so the lockout) tell nothing apart."""
    site = build_login(dict(DEVICE_OR_TOTP, throttle={"account_failures": 10}))
    await enrol_totp(site, "alice")
    for name in ("alice", "bob"):
        for _ in range(3):
            first = await site.submit(None, {"username": name, "code": "000000"}, OFFICE)
            assert isinstance(first, NextStep) and first.step.kind == "password"
            assert await site.submit(first.handle, {"password": "wrong"}, OFFICE) == Denied()
    assert (await site.throttle.account("local:alice")).failures == 3
    assert (await site.throttle.account("local:bob")).failures == 3


async def test_a_deferred_step_never_runs_when_no_password_step_did(
        build_login: BuildLogin) -> None:
    """TOTP first, the password only on the office network: from elsewhere, a user without
    TOTP is denied at once (no enrolment, no endless code prompts)."""
    site = build_login({"flows": [{"name": "default", "realm": "local", "steps": [
        {"provider": "totp"},
        {"provider": "local", "when": {"client_address": ["192.0.2.0/24"]}}]}]})
    first = await site.submit(None, {"username": "bob", "code": "000000"}, ELSEWHERE)
    assert first == Denied()
    assert site.last_failure() == "no factor established the user"


async def test_a_totp_secret_that_does_not_open_denies_and_tells_the_administrator(
        build_login: BuildLogin, durable: DurableStore) -> None:
    """As after the token key was replaced: fail closed, no server error."""
    site = build_login(flow({"provider": "local"}, {"provider": "totp"}))
    await durable.set_totp("local:alice", b"\x00" * 40, [])
    first = await site.sign_in("alice", "alice-pw")
    assert isinstance(first, NextStep) and first.step.kind == "totp"
    assert await site.submit(first.handle, {"code": "123456"}) == Denied()
    assert site.last_failure() == "TOTP secret unreadable: reset the user"


def test_a_certificate_with_a_broken_extension_is_a_clear_refusal() -> None:
    """Extensions are parsed when read: a malformed one must not escape as a 500."""
    import datetime

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    from portcullis.errors import PKIError

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")])
    now = datetime.datetime.now(datetime.UTC)
    broken_san = x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03junk")
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(1).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(broken_san, critical=False).sign(key, hashes.SHA256()))
    der = certificate.public_bytes(serialization.Encoding.DER)
    with pytest.raises(PKIError, match="extensions"):
        ClientCertificate.from_der(der)


# --- any flow, any answers: no crash, no sign-in without the password ---------------------

STEP_CONDITIONS = st.sampled_from([
    None, {"groups": ["finance"]}, {"not": {"groups": ["finance"]}}, {"users": ["fred"]},
    {"client_address": ["192.0.2.0/24"]}, {"passed": ["local"]},
    {"any": [{"users": ["alice"]}, {"groups": ["finance"]}]}])
ANSWER_KINDS = st.sampled_from(["right", "wrong", "garbage", "empty"])


@hyp_settings(max_examples=40, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["local", "totp"]), STEP_CONDITIONS),
                      min_size=1, max_size=3),
       user=st.sampled_from(["alice", "fred", "nobody"]),
       answers=st.lists(ANSWER_KINDS, min_size=1, max_size=6),
       client=st.sampled_from([OFFICE, ELSEWHERE]))
async def test_no_flow_signs_anyone_in_without_their_password(
        build_login: BuildLogin, steps: list[tuple[str, dict[str, Any] | None]], user: str,
        answers: list[str], client: LoginContext) -> None:
    """Whatever the flow's steps and conditions and whatever is answered: every result is
    a step, a session or "denied" (nothing escapes), and a session only ever follows the
    user's right password."""
    auth = flow(*({"provider": p, **({"when": w} if w else {})} for p, w in steps))
    try:
        site = build_login(auth)
    except ValidationError:
        assume(False)            # a flow the configuration refuses (no password step…)
    kinds = iter(answers)
    right_password_given = False
    result = await site.service.begin(client)
    while isinstance(result, NextStep):
        kind = next(kinds, None)
        if kind is None:
            return
        given_answers: dict[str, str] = {}
        for prompt in result.step.prompts:
            if prompt.name == "username":
                given_answers["username"] = user
            elif prompt.name == "password":
                right = kind == "right" and user in PASSWORDS
                right_password_given |= right
                given_answers["password"] = {"right": PASSWORDS.get(user, "x"), "wrong": "x",
                                             "garbage": "\x00" * 2000, "empty": ""}[kind]
            else:
                secret = (result.step.enrolment or {}).get("secret")
                given_answers[prompt.name] = (code(secret) if kind == "right" and secret
                                              else {"garbage": "１２３４５６", "empty": ""}.get(
                                                  kind, "000000"))
        result = await site.service.submit(result.handle, given_answers, client)
    assert isinstance(result, Authenticated | Denied)
    event(type(result).__name__)   # --hypothesis-show-statistics: both outcomes occur
    if isinstance(result, Authenticated):
        assert right_password_given and result.session.username == user
        assert "local" in result.session.claims.amr
