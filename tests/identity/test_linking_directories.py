"""Federated identities linked to their directory account, against the real Samba Active
Directory (tests/peers/samba.py: objectSid, objectGUID, userPrincipalName) and the real
slapd (tests/peers/ldap.py: mail, uid, nested groups): seed 004's "Okta / Azure AD
identities carry AD's SID, UPN, ImmutableID; group decisions come from AD".

The IdP side is `FederatedFactorDouble`, a TEST DOUBLE of a federated (OIDC / SAML)
factor: it accepts whatever identity the test says the IdP asserted, as the real factors
(written by other helpers) do once they have checked the IdP's signed answer. Everything
after it — the link, the directory lookup, the login flow, throttle and audit — is the
gateway's own code."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from peers.ldap import USERS, Slapd
from peers.login import BuildLogin, Login, flow
from peers.samba import Samba
from portcullis.config.auth import Flow, FlowStep, LdapProvider
from portcullis.config.linking import DirectoryLink, Linkable
from portcullis.identity.claims import Attributes, Claims
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.ldap import DirectoryUser, LdapDirectory, sid_bytes
from portcullis.identity.flow import (
    Attempt,
    FactorOutcome,
    FlowState,
    LoginFlow,
    Passed,
    Refused,
    Step,
)
from portcullis.identity.login import Authenticated, Denied

pytestmark = pytest.mark.peer

BIND_PASSWORD_FILE = "bind.pw"
OKTA_GROUPS = ("okta-everyone", "okta-admins")


class FederatedProviderDouble(Linkable):
    """Stands for the OIDC / SAML provider models (other helpers write them): a provider
    model that inherits Linkable."""

    name: str = "okta"
    type: str = "oidc"


@dataclass
class FederatedFactorDouble:
    """A test double of a federated factor (see the module docstring)."""

    username: str
    attributes: Attributes
    name: str = "okta"
    kind: str = "redirect"
    primary: bool = True

    async def step(self, state: FlowState, context: LoginContext) -> Step:
        # No prompts: the flow verifies at once, as on the IdP's callback.
        return Step(kind=self.kind, title="Sign in with Okta", prompts=())

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        if not await attempt.admit(self.username):
            return Refused("account locked", self.username)
        return Passed("the IdP's answer verified", self.username, self.attributes)


class RedirectingDouble(FederatedFactorDouble):
    async def redirect(self, state: FlowState, context: LoginContext, callback: str,
                       relay: str) -> str:
        return f"https://idp.test/authorize?state={relay}&redirect_uri={callback}"


MakeLogin = Callable[..., Login]


@pytest.fixture
def make_login(build_login: BuildLogin, tmp_path: Path) -> MakeLogin:
    """make_login(directories, link, username=, throttle=, **asserted) -> a Login whose one
    step is the federated double linked per `link`; `directories` are the ldap providers
    of the configuration, `asserted` the Attributes the IdP asserts."""

    def make(directories: list[dict[str, Any]], link: dict[str, Any],
             username: str = "alice.okta", throttle: dict[str, Any] | None = None,
             **asserted: Any) -> Login:
        login = build_login(flow({"provider": directories[0]["name"]}, providers=directories),
                            throttle=throttle)
        provider = FederatedProviderDouble(link=DirectoryLink.model_validate(link))
        double = FederatedFactorDouble(username, Attributes(**{"groups": OKTA_GROUPS,
                                                               **asserted}))
        factor = login.providers.linked(provider, double)
        # The gateway's login service, with the double's step for its flow (the real
        # OIDC/SAML providers are not in the configuration model yet).
        login.service.flow = LoginFlow(Flow(name="default", steps=[FlowStep(provider="okta")]),
                                       "okta", {"okta": factor})
        return login

    return make


async def signed_in(login: Login) -> Claims:
    result = await login.submit(None, {})
    assert isinstance(result, Authenticated), login.events()[-1:]
    return result.session.claims


async def refused(login: Login) -> str:
    assert await login.submit(None, {}) == Denied()
    return login.last_failure()


def directory_of(provider: dict[str, Any], bind_password: str) -> LdapDirectory:
    settings = LdapProvider.model_validate(provider)
    return LdapDirectory(settings, bind_password, settings.ca_cert)


# --- Samba Active Directory ----------------------------------------------------------


@pytest.fixture
def ad(samba: Samba, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / BIND_PASSWORD_FILE).write_text(samba.bind_password + "\n")
    return samba.provider("corp", BIND_PASSWORD_FILE, timeout=10, nested_groups=True)


@pytest.fixture
def ad_alice(samba: Samba, ad: dict[str, Any]) -> DirectoryUser:
    """alice as the password sign-in finds her in the AD (her SID and GUID are Samba's)."""
    [alice] = directory_of(ad, samba.bind_password).find("alice")
    assert alice.attributes.sid and alice.attributes.guid
    return alice


async def test_an_okta_identity_carrying_ads_sid_gets_ads_groups_instead_of_its_own(
        make_login: MakeLogin, ad: dict[str, Any], ad_alice: DirectoryUser) -> None:
    sid = ad_alice.attributes.sid
    login = make_login([ad], {"directory": "corp", "by": ["sid", "upn"]}, sid=sid,
                       upn="alice@okta.example")
    claims = await signed_in(login)
    assert claims.username == "alice" and claims.sub == "okta:alice" and claims.idp == "okta"
    assert claims.groups == ad_alice.attributes.groups and "staff" in claims.groups
    assert (claims.sid, claims.guid, claims.upn) == (sid, ad_alice.attributes.guid,
                                                     "alice@pc.test")


async def test_an_azure_immutable_id_finds_the_ad_account(
        make_login: MakeLogin, ad: dict[str, Any], ad_alice: DirectoryUser) -> None:
    assert ad_alice.attributes.guid is not None
    immutable_id = base64.b64encode(uuid.UUID(ad_alice.attributes.guid).bytes_le).decode()
    login = make_login([ad], {"directory": "corp", "by": ["guid"]},
                       username="alice@contoso.onmicrosoft.com", guid=immutable_id)
    claims = await signed_in(login)
    assert claims.username == "alice" and "staff" in claims.groups
    assert claims.guid == ad_alice.attributes.guid


async def test_a_upn_finds_the_ad_account_whatever_its_case(
        make_login: MakeLogin, ad: dict[str, Any]) -> None:
    login = make_login([ad], {"directory": "corp", "by": ["upn"], "username_from": "idp"},
                       upn="Alice@PC.TEST")
    claims = await signed_in(login)
    # The IdP's name stays (username_from = "idp"); the groups are AD's.
    assert claims.username == "alice.okta" and "staff" in claims.groups
    assert not set(OKTA_GROUPS) & set(claims.groups)


async def test_groups_both_are_ads_and_the_idps(
        make_login: MakeLogin, ad: dict[str, Any], ad_alice: DirectoryUser) -> None:
    login = make_login([ad], {"directory": "corp", "by": ["sid"], "groups": "both"},
                       sid=ad_alice.attributes.sid)
    assert (await signed_in(login)).groups == ad_alice.attributes.groups + OKTA_GROUPS


async def test_a_sid_with_no_ad_account_is_refused_with_the_reason(
        make_login: MakeLogin, ad: dict[str, Any], ad_alice: DirectoryUser) -> None:
    assert ad_alice.attributes.sid is not None
    stranger = ad_alice.attributes.sid.rsplit("-", 1)[0] + "-999999"
    login = make_login([ad], {"directory": "corp", "by": ["sid"]}, sid=stranger)
    assert await refused(login) == f"no account in directory corp has objectSid {stranger}"
    assert login.events("login.failed")[-1]["factor"] == "okta"


@pytest.mark.parametrize("upn", ["*", "*)(sAMAccountName=*"])
async def test_a_filter_injection_in_a_claim_finds_no_ad_account(
        make_login: MakeLogin, ad: dict[str, Any], upn: str) -> None:
    login = make_login([ad], {"directory": "corp", "by": ["upn"]}, upn=upn)
    assert await refused(login) == f"no account in directory corp has userPrincipalName {upn}"


async def test_a_directory_that_cannot_answer_makes_the_sign_in_unavailable_not_failed(
        make_login: MakeLogin, ad: dict[str, Any], ad_alice: DirectoryUser) -> None:
    down = {**ad, "name": "down", "servers": [f"ldaps://127.0.0.1:{free_port()}"],
            "timeout": 2}
    login = make_login([ad, down], {"directory": "down", "by": ["sid"]},
                       sid=ad_alice.attributes.sid)
    reason = await refused(login)
    assert reason.startswith("directory down unavailable: no directory server answered")
    # Not the user's fault: nothing counted against the account or the address.
    assert await login.account_failures("okta:alice.okta") == 0
    assert await login.address_failures() == 0


async def test_the_lockout_of_the_linked_account_applies_to_a_federated_sign_in(
        make_login: MakeLogin, ad: dict[str, Any], ad_alice: DirectoryUser) -> None:
    login = make_login([ad], {"directory": "corp", "by": ["sid"]},
                       throttle={"account_failures": 1}, sid=ad_alice.attributes.sid)
    await login.throttle.failed("okta:alice", "192.0.2.99")
    assert await refused(login) == "account locked"
    assert login.events("login.failed")[-1]["user"] == "alice"


# --- slapd ---------------------------------------------------------------------------

BOB = USERS["bob"]


@pytest.fixture
def corp(slapd: Slapd, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / BIND_PASSWORD_FILE).write_text(slapd.bind_password + "\n")
    return slapd.provider("corp", BIND_PASSWORD_FILE, timeout=3, nested_groups=True,
                          username_attribute="uid")


async def test_a_lookup_by_any_claim_returns_the_record_a_password_sign_in_finds(
        slapd: Slapd, corp: dict[str, Any]) -> None:
    directory = directory_of(corp, slapd.bind_password)
    [bob] = directory.find("bob")
    assert bob.username == "bob" and "sales" in bob.attributes.groups   # via emea, nested
    assert directory.lookup("sid", sid_bytes(BOB.sid) or b"") == [bob]
    assert directory.lookup("guid", BOB.object_guid) == [bob]
    assert directory.lookup("email", "BOB@corp.example") == [bob]
    assert directory.lookup("username", "bob") == [bob]


@pytest.mark.parametrize(("claim", "value"), [
    ("email", "*"), ("username", "*)(uid=*"), ("upn", "bob@corp.example)(|(uid=*"),
])
def test_an_escaped_claim_value_matches_nothing(slapd: Slapd, corp: dict[str, Any],
                                                claim: Any, value: str) -> None:
    assert directory_of(corp, slapd.bind_password).lookup(claim, value) == []


async def test_a_mail_claim_links_to_the_ldap_account_and_its_nested_groups(
        make_login: MakeLogin, corp: dict[str, Any]) -> None:
    login = make_login([corp], {"directory": "corp", "by": ["email"]},
                       username="bob@idp.example", email="bob@corp.example")
    claims = await signed_in(login)
    assert claims.username == "bob" and claims.sub == "okta:bob"
    assert set(claims.groups) == {"staff", "emea", "sales"}
    assert claims.sid == BOB.sid and claims.guid == str(BOB.guid)


async def test_an_injection_in_the_mail_claim_is_refused(
        make_login: MakeLogin, corp: dict[str, Any]) -> None:
    login = make_login([corp], {"directory": "corp", "by": ["email"]}, email="*)(uid=*")
    assert await refused(login) == "no account in directory corp has mail *)(uid=*"


async def test_an_unlinked_user_may_sign_in_without_groups_when_the_link_is_optional(
        make_login: MakeLogin, corp: dict[str, Any]) -> None:
    login = make_login([corp], {"directory": "corp", "by": ["email"], "required": False},
                       email="guest@partner.example")
    claims = await signed_in(login)
    assert claims.username == "alice.okta" and claims.groups == ()


async def test_the_link_passes_a_redirect_factors_redirect_through(
        slapd: Slapd, corp: dict[str, Any], build_login: BuildLogin) -> None:
    login = build_login(flow({"provider": "corp"}, providers=[corp]))
    provider = FederatedProviderDouble(link=DirectoryLink(directory="corp", by=["email"]))
    redirecting = login.providers.linked(provider, RedirectingDouble("a", Attributes()))
    plain = login.providers.linked(provider, FederatedFactorDouble("a", Attributes()))
    assert (redirecting.name, redirecting.kind, redirecting.primary) == ("okta", "redirect",
                                                                         True)
    url = await redirecting.redirect(FlowState(flow="default"),  # type: ignore[attr-defined]
                                     LoginContext("192.0.2.7"), "https://gw/cb", "r1")
    assert url == "https://idp.test/authorize?state=r1&redirect_uri=https://gw/cb"
    assert not hasattr(plain, "redirect")
    # Without a link the factor is the provider's own.
    double = FederatedFactorDouble("a", Attributes())
    assert login.providers.linked(FederatedProviderDouble(), double) is double
