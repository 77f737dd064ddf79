"""Redirect steps (OIDC, SAML) in the login service: the relay token, the browser binding,
the CLI's loopback hand-off (RFC 8252), and the pure decision they go through.

The factor here is a double of an identity provider's factor, so that the service's rules
are tested on their own: it "redirects" to a made-up URL and accepts the answer
`{"state": relay, "user": NAME}`. The real OIDC and SAML factors are tested against real
providers in tests/federation."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from urllib.parse import parse_qs, urlsplit

import pytest

from peers.login import BuildLogin, Login, flow
from peers.totp import oathtool_code
from portcullis.config.auth import Flow, FlowStep
from portcullis.identity.claims import Attributes
from portcullis.identity.conditions import LoginContext
from portcullis.identity.flow import (
    AskStep,
    Attempt,
    Deny,
    FactorOutcome,
    Failed,
    Finish,
    FlowState,
    LoginFlow,
    Passed,
    Redirect,
    Refused,
    Retry,
    Unavailable,
    decide,
)
from portcullis.identity.login import CALLBACK_CODE, Authenticated, Denied, HandOff, NextStep

CLIENT = LoginContext("192.0.2.7")


class IdentityProviderDouble:
    """Stands in for an OIDC/SAML factor: no provider runs behind it."""

    kind = "oidc"
    primary = True

    def __init__(self, name: str) -> None:
        self.name = name

    async def redirect(self, state: FlowState, context: LoginContext, callback: str,
                       relay: str) -> Redirect:
        state.data["expect"] = relay
        return Redirect(f"https://idp.invalid/authorize?state={relay}&cb={callback}")

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        if answers.get("state") != state.data.get("expect"):
            return Failed("state does not match")
        user = answers["user"]
        if not await attempt.admit(user):
            return Refused("account locked", user)
        return Passed("signed in at the provider", user, Attributes(groups=("finance",)))


def with_idp(login: Login) -> Login:
    """The login's flow with its `local` step played by the double."""
    flow_ = login.service.flow
    factors = {**flow_.factors, "local": IdentityProviderDouble("local")}
    login.service.flow = LoginFlow(flow_.definition, flow_.realm, factors)
    return login


def relay_of(step: NextStep) -> str:
    assert step.step.kind == "redirect" and step.step.redirect is not None
    return parse_qs(urlsplit(step.step.redirect.url).query)["state"][0]


async def test_the_redirect_step_names_the_callback_and_the_browser_finishes_it(
        build_login: BuildLogin) -> None:
    login = with_idp(build_login(flow({"provider": "local"})))
    begun = await login.service.begin(CLIENT)
    assert isinstance(begun, NextStep) and begun.step.kind == "redirect"
    assert "cb=https://localhost/login/callback/local" in begun.step.redirect.url  # type: ignore[union-attr]
    relay = relay_of(begun)
    done = await login.service.callback(relay, {"state": relay, "user": "alice"}, CLIENT,
                                        begun.handle)
    assert isinstance(done, Authenticated)
    assert done.session.claims.groups == ("finance",) and done.session.claims.amr == ("local",)
    # The relay token is spent: the same answer again finishes nothing.
    again = await login.service.callback(relay, {"state": relay, "user": "alice"}, CLIENT,
                                         begun.handle)
    assert isinstance(again, Denied)
    assert login.last_failure() == "unknown, used or expired callback state"


async def test_an_answer_in_another_browser_finishes_nothing(build_login: BuildLogin) -> None:
    login = with_idp(build_login(flow({"provider": "local"})))
    begun = await login.service.begin(CLIENT)
    assert isinstance(begun, NextStep)
    relay = relay_of(begun)
    for browser in (None, "another-flows-handle"):
        result = await login.service.callback(relay, {"state": relay, "user": "alice"},
                                              CLIENT, browser)
        assert isinstance(result, Denied)
        relay = "spent"
    assert "another browser" in login.events("login.failed")[0]["reason"]


async def test_a_cli_flow_gets_a_one_time_code_on_its_loopback(build_login: BuildLogin) -> None:
    login = with_idp(build_login(flow({"provider": "local"})))
    loopback = "http://127.0.0.1:41234/callback"
    begun = await login.service.begin(CLIENT, return_to=loopback)
    assert isinstance(begun, NextStep)
    relay = relay_of(begun)
    # The provider's answer arrives in a browser that has no login cookie (the CLI's).
    handed = await login.service.callback(relay, {"state": relay, "user": "alice"}, CLIENT,
                                          None)
    assert isinstance(handed, HandOff) and handed.url.startswith(loopback + "?")
    code = parse_qs(urlsplit(handed.url).query)[CALLBACK_CODE][0]
    done = await login.service.submit(begun.handle, {CALLBACK_CODE: code}, CLIENT)
    assert isinstance(done, Authenticated) and done.session.username == "alice"


async def test_a_loopback_code_works_once_and_only_for_its_own_flow(
        build_login: BuildLogin) -> None:
    login = with_idp(build_login(flow({"provider": "local"})))
    loopback = "http://127.0.0.1:41234/callback"
    flows = [await login.service.begin(CLIENT, return_to=loopback) for _ in range(2)]
    codes = []
    for begun in flows:
        assert isinstance(begun, NextStep)
        handed = await login.service.callback(relay_of(begun), {"state": relay_of(begun),
                                                                "user": "alice"}, CLIENT, None)
        assert isinstance(handed, HandOff)
        codes.append(parse_qs(urlsplit(handed.url).query)[CALLBACK_CODE][0])
    first, second = flows
    assert isinstance(first, NextStep) and isinstance(second, NextStep)
    # The second flow's code offered to the first: denied, and the code is spent.
    assert isinstance(await login.service.submit(first.handle, {CALLBACK_CODE: codes[1]},
                                                 CLIENT), Denied)
    assert isinstance(await login.service.submit(second.handle, {CALLBACK_CODE: codes[1]},
                                                 CLIENT), Denied)
    assert [e["reason"] for e in login.events("login.failed")] == [
        "a redirect step was answered without the identity provider's answer"] * 2


async def test_a_redirect_step_answered_with_typed_values_is_denied(
        build_login: BuildLogin) -> None:
    login = with_idp(build_login(flow({"provider": "local"})))
    begun = await login.service.begin(CLIENT)
    assert isinstance(begun, NextStep)
    relay = relay_of(begun)
    result = await login.service.submit(begun.handle, {"state": relay, "user": "alice"}, CLIENT)
    assert isinstance(result, Denied)
    assert "without the identity provider's answer" in login.last_failure()


async def test_provider_then_totp_for_finance(build_login: BuildLogin) -> None:
    """The seed's "OIDC, then TOTP for group Finance": the provider's groups decide."""
    login = with_idp(build_login(flow({"provider": "local"},
                                      {"provider": "totp", "when": {"groups": ["finance"]}})))
    enrolment = login.totp.new_enrolment("alice")
    assert (await login.totp.confirm("local:alice", enrolment,
                                     oathtool_code(enrolment.secret))).ok
    begun = await login.service.begin(CLIENT)
    assert isinstance(begun, NextStep)
    relay = relay_of(begun)
    totp = await login.service.callback(relay, {"state": relay, "user": "alice"}, CLIENT,
                                        begun.handle)
    assert isinstance(totp, NextStep) and totp.step.kind == "totp"
    code = oathtool_code(enrolment.secret, time.time() + 30)
    done = await login.service.submit(totp.handle, {"code": code}, CLIENT)
    assert isinstance(done, Authenticated) and done.session.claims.amr == ("local", "totp")


# --- the pure decision ------------------------------------------------------------------

DEFINITION = Flow(name="default", steps=[FlowStep(provider="idp"), FlowStep(provider="totp")])
PRIMARIES = frozenset({"idp"})


@pytest.mark.parametrize(("outcome", "action"), [
    (Passed("ok", "alice"), AskStep(1)),
    (Retry("again", "alice"), AskStep(0)),
    (Failed("wrong", "alice"), Deny("wrong", "alice", "idp")),
    (Unavailable("down", "alice"), Deny("down", "alice", "idp", count=False)),
    (Refused("account locked", "alice"), Deny("account locked", "alice", "idp", count=False)),
])
def test_decide_after_the_first_step(outcome: FactorOutcome, action: object) -> None:
    decision = decide(DEFINITION, PRIMARIES, FlowState(flow="default"), outcome, CLIENT)
    assert decision.action == action
    assert decision.state.rounds == 1


def test_decide_finishes_after_the_last_step_and_leaves_its_input_alone() -> None:
    state = FlowState(flow="default", current=1, resume=2, username="alice",
                      passed=["idp"])
    before = dataclasses.replace(state, passed=list(state.passed))
    decision = decide(DEFINITION, PRIMARIES, state, Passed("code ok", "alice"), CLIENT)
    assert decision.action == Finish("alice")
    assert decision.state.passed == ["idp", "totp"]
    assert state == before
    assert [e.kind for e in decision.events] == ["factor_passed"]


def test_a_factor_naming_another_user_is_denied() -> None:
    state = FlowState(flow="default", current=1, resume=2, username="alice", passed=["idp"])
    decision = decide(DEFINITION, PRIMARIES, state, Passed("ok", "mallory"), CLIENT)
    assert decision.action == Deny("totp named another user (mallory)", "alice", "totp")
