"""OpenID Connect sign-in through the login service (the flow the portal, the JSON API and
the CLI drive), against the real oidc-provider of tests/peers/oidc.py: the redirect step,
the provider's pages, the callback found by its relay token, the session's claims; and a
forged answer denied with its reason in the audit trail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from peers.login import CLIENT, BuildLogin, Login, flow
from peers.oidc import CLIENT_SECRET, SERVICE_CALLBACK, OidcPeer, sign_in
from portcullis.identity.login import Authenticated, Denied, LoginResult, NextStep

pytestmark = pytest.mark.peer


@pytest.fixture
async def login(build_login: BuildLogin, oidc_provider: OidcPeer,
                tmp_path: Path) -> AsyncIterator[Login]:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oidc").write_text(CLIENT_SECRET)
    provider = oidc_provider.provider(preset="okta", required_claims=["sid"])
    built = build_login(flow({"provider": "idp"}, providers=[provider]))
    yield built
    oidc_provider.proxy.tamper_token = None
    await built.providers.close()


async def sign_in_through(login: Login, account: str) -> LoginResult:
    begun = await login.service.begin(CLIENT)
    assert isinstance(begun, NextStep) and begun.step.redirect is not None
    answers = await sign_in(begun.step.redirect.url, account, SERVICE_CALLBACK)
    return await login.service.callback(answers["state"], answers, CLIENT, begun.handle)


async def test_the_providers_user_gets_a_session_with_its_groups_and_ad_claims(
        login: Login) -> None:
    done = await sign_in_through(login, "alice")
    assert isinstance(done, Authenticated), login.events()[-1:]
    claims = done.session.claims
    assert (claims.username, claims.idp, claims.amr) == ("alice", "idp", ("idp",))
    assert claims.groups == ("staff", "Finance")
    assert claims.sid == "S-1-5-21-1004336348-1177238915-682003330-1105"
    assert claims.upn == "alice@corp.example.test"
    assert login.events("login.succeeded")[-1]["user"] == "alice"


async def test_a_forged_id_token_is_denied_and_audited_with_its_reason(
        login: Login, oidc_provider: OidcPeer) -> None:
    oidc_provider.proxy.tamper_token = lambda body: {
        **body, "id_token": oidc_provider.resign(body["id_token"], nonce="replayed")}
    denied = await sign_in_through(login, "alice")
    assert isinstance(denied, Denied)
    assert login.last_failure() == "the ID token's nonce is not this sign-in's"


async def test_a_user_without_the_required_claim_is_denied_saying_which(
        login: Login) -> None:
    denied = await sign_in_through(login, "bare")
    assert isinstance(denied, Denied)
    assert login.last_failure().startswith("the provider's answer has no sid (looked for "
                                           "ad_sid)")
