"""Seed 004's federated flows, one test each, with real peers: the npm oidc-provider as
Okta (tests/peers/oidc.py), slapd as the directory (tests/peers/ldap.py), oathtool for
TOTP codes. (The gateway as another application's identity provider is
tests/e2e/test_openid_provider.py.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from peers.ldap import Slapd
from peers.login import CLIENT, BuildLogin, Login, flow
from peers.oidc import CLIENT_SECRET, SERVICE_CALLBACK, OidcPeer, sign_in
from peers.totp import oathtool_code
from portcullis.identity.login import Authenticated, LoginResult, NextStep

pytestmark = pytest.mark.peer


@pytest.fixture
def secrets(tmp_path: Path, slapd: Slapd) -> Path:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oidc").write_text(CLIENT_SECRET)
    (tmp_path / "bind.pw").write_text(slapd.bind_password + "\n")
    return tmp_path


@pytest.fixture
async def logins(build_login: BuildLogin) -> AsyncIterator[list[Login]]:
    built: list[Login] = []
    yield built
    for login in built:
        await login.providers.close()


async def through_the_provider(login: Login, account: str) -> LoginResult:
    """begin → the provider's pages as `account` → the gateway's callback."""
    begun = await login.service.begin(CLIENT)
    assert isinstance(begun, NextStep) and begun.step.redirect is not None
    answers = await sign_in(begun.step.redirect.url, account, SERVICE_CALLBACK)
    return await login.service.callback(answers["state"], answers, CLIENT, begun.handle)


async def test_okta_user_with_ads_sid_gets_the_directorys_account_and_groups(
        build_login: BuildLogin, logins: list[Login], oidc_provider: OidcPeer,
        slapd: Slapd, secrets: Path) -> None:
    """Okta signs the user in; the SID in Okta's token finds the AD account; the groups
    that decide are the directory's (the source of truth), not Okta's."""
    corp: dict[str, Any] = slapd.provider("corp", "bind.pw", timeout=3, nested_groups=True,
                                          username_attribute="uid")
    okta = oidc_provider.provider(preset="okta", link={
        "directory": "corp", "by": ["sid", "upn"], "groups": "directory"})
    login = build_login(flow({"provider": "idp"}, providers=[corp, okta]))
    logins.append(login)
    done = await through_the_provider(login, "alice.okta")
    assert isinstance(done, Authenticated), login.events()[-2:]
    claims = done.session.claims
    assert claims.username == "alice" and claims.sid == "S-1-5-21-1-2-3-1104"
    assert {"staff", "finance"} <= set(claims.groups) and "Everyone" not in claims.groups
    assert claims.groups_from == ("directory corp",)
    assert claims.amr == ("idp",)


async def test_oidc_then_totp_for_finance(build_login: BuildLogin, logins: list[Login],
                                          oidc_provider: OidcPeer, secrets: Path) -> None:
    """"OIDC, then TOTP for group Finance": the provider's groups decide the second step."""
    okta = oidc_provider.provider(preset="okta")
    login = build_login(flow({"provider": "idp"},
                             {"provider": "totp", "when": {"groups": ["finance"]}},
                             providers=[okta]))
    logins.append(login)
    enrolment = login.totp.new_enrolment("alice")
    assert (await login.totp.confirm("idp:alice", enrolment,
                                     oathtool_code(enrolment.secret))).ok

    # alice is in Finance at the provider: a code is asked after the provider's answer.
    totp = await through_the_provider(login, "alice")
    assert isinstance(totp, NextStep) and totp.step.kind == "totp", login.events()[-2:]
    done = await login.service.submit(totp.handle, {
        "code": oathtool_code(enrolment.secret, time.time() + 30)}, CLIENT)
    assert isinstance(done, Authenticated) and done.session.claims.amr == ("idp", "totp")
    assert done.session.claims.groups_from == ("idp",)

    # carol is not: the provider's answer is enough.
    carol = await through_the_provider(login, "carol")
    assert isinstance(carol, Authenticated) and carol.session.claims.amr == ("idp",)
