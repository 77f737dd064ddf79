"""An identity provider's answer that no step asked for (a SAML IdP-initiated sign-in) in
the login service: taken only from a provider that allows it and begins the flow; it then
begins a flow of its own. The factor is the double of tests/identity/test_redirect_steps.py
(an answer with no `state` is one no step asked for); the real SAML IdP's unsolicited
answers are in tests/e2e/test_saml_sign_in.py."""

from __future__ import annotations

import time

from identity.test_redirect_steps import IdentityProviderDouble
from peers.login import CLIENT, BuildLogin, Login, flow
from peers.totp import oathtool_code
from portcullis.identity.flow import LoginFlow
from portcullis.identity.login import Authenticated, Denied, NextStep


class UnsolicitedDouble(IdentityProviderDouble):
    kind = "saml"

    def __init__(self, name: str, allowed: bool) -> None:
        super().__init__(name)
        self.allowed = allowed

    def accepts_unsolicited(self) -> bool:
        return self.allowed


def with_unsolicited(login: Login, *, allowed: bool) -> Login:
    """The login's flow with its `local` step played by a provider that may answer
    unasked (`allowed`) or not."""
    flow_ = login.service.flow
    factors = {**flow_.factors, "local": UnsolicitedDouble("local", allowed)}
    login.service.flow = LoginFlow(flow_.definition, flow_.realm, factors)
    return login


async def test_an_unsolicited_answer_begins_and_finishes_a_flow_when_allowed(
        build_login: BuildLogin) -> None:
    login = with_unsolicited(build_login(flow({"provider": "local"})), allowed=True)
    done = await login.service.callback("", {"user": "alice"}, CLIENT, None,
                                        provider="local")
    assert isinstance(done, Authenticated) and done.session.claims.amr == ("local",)
    assert login.events("login.unsolicited")[-1]["factor"] == "local"


async def test_an_unsolicited_answer_is_refused_by_default(build_login: BuildLogin) -> None:
    login = with_unsolicited(build_login(flow({"provider": "local"})), allowed=False)
    refused = await login.service.callback("", {"user": "alice"}, CLIENT, None,
                                           provider="local")
    assert isinstance(refused, Denied)
    assert "local may not begin a sign-in" in login.last_failure()
    assert not login.events("login.unsolicited")


async def test_only_the_provider_named_by_the_callback_may_answer_unasked(
        build_login: BuildLogin) -> None:
    login = with_unsolicited(build_login(flow({"provider": "local"})), allowed=True)
    for named in (None, "another"):
        refused = await login.service.callback("", {"user": "alice"}, CLIENT, None,
                                               provider=named)
        assert isinstance(refused, Denied)
        assert login.last_failure() == "unknown, used or expired callback state"


async def test_a_provider_that_is_not_the_first_step_may_not_answer_unasked(
        build_login: BuildLogin) -> None:
    login = with_unsolicited(build_login(flow({"provider": "totp"}, {"provider": "local"})),
                             allowed=True)
    refused = await login.service.callback("", {"user": "alice"}, CLIENT, None,
                                           provider="local")
    assert isinstance(refused, Denied)
    assert "local may not begin a sign-in" in login.last_failure()


async def test_the_flow_an_unsolicited_answer_begins_goes_on_with_its_next_step(
        build_login: BuildLogin) -> None:
    login = with_unsolicited(build_login(flow({"provider": "local"}, {"provider": "totp"})),
                             allowed=True)
    enrolment = login.totp.new_enrolment("alice")
    assert (await login.totp.confirm("local:alice", enrolment,
                                     oathtool_code(enrolment.secret))).ok
    totp = await login.service.callback("", {"user": "alice"}, CLIENT, None,
                                        provider="local")
    assert isinstance(totp, NextStep) and totp.step.kind == "totp"
    # The next period's code: the one confirming the enrolment is spent.
    code = oathtool_code(enrolment.secret, time.time() + 30)
    done = await login.service.submit(totp.handle, {"code": code}, CLIENT)
    assert isinstance(done, Authenticated) and done.session.claims.amr == ("local", "totp")
