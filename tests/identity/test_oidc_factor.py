"""The OpenID Connect factor end to end against a real OpenID provider (npm
oidc-provider, tests/peers/oidc.py): redirect() → the provider's authorization endpoint,
login and consent pages (driven over HTTP) → the callback's parameters → verify().

Crafted ID tokens travel the factor's real token endpoint path: the provider sits behind
a test proxy (TamperingProxy) that, when a test asks it to, rewrites the token
endpoint's JSON answer on its way back. A crafted token with changed claims is signed
again with the provider's own key (the test generated it and gave it to the provider), so
only the changed claim can be the reason it is refused. Each refusal is checked by its
reason, which the login service writes to the audit trail.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from peers.login import CLIENT, HASHER_KEY, flow, settings_for
from peers.oidc import (
    CALLBACK,
    CLIENT_SECRET,
    LOOPBACK_CALLBACK,
    OidcPeer,
    b64,
    sign_in,
    signing_key,
    start_oidc_provider,
    token_claims,
)
from portcullis.errors import FederationError
from portcullis.identity.factors.oidc import OidcFactor
from portcullis.identity.flow import (
    Attempt,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Unavailable,
)
from portcullis.identity.providers import IdentityProviders
from portcullis.net.dialer import DirectDialer
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

pytestmark = pytest.mark.peer

Build = Callable[..., Awaitable[OidcFactor]]


@pytest.fixture
async def build(oidc_provider: OidcPeer, durable: DurableStore,
                tmp_path: Path) -> AsyncIterator[Build]:
    """build(peer=oidc_provider, **provider keys) -> the factor the gateway would run for
    that `[[auth.providers]]` entry (built by IdentityProviders over a DirectDialer)."""
    built: list[IdentityProviders] = []
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "oidc").write_text(CLIENT_SECRET + "\n")

    async def make(peer: OidcPeer = oidc_provider, **keys: Any) -> OidcFactor:
        provider = peer.provider(**keys)
        settings = settings_for(flow({"provider": provider["name"]}, providers=[provider]),
                                tmp_path)
        providers = IdentityProviders(settings, durable, MemoryStore(), TokenHasher(HASHER_KEY),
                                      dialer=DirectDialer())
        built.append(providers)
        factor = providers.factor(settings.auth.all_providers()[provider["name"]], "idp")
        assert isinstance(factor, OidcFactor)
        return factor

    yield make
    oidc_provider.proxy.tamper_token = oidc_provider.proxy.tamper_userinfo = None
    for providers in built:
        await providers.close()


class SignIn:
    """One sign-in through the factor: the redirect, the provider, the callback."""

    def __init__(self, factor: OidcFactor, callback: str = CALLBACK) -> None:
        self.factor = factor
        self.callback = callback
        self.state = FlowState(flow="default")
        self.relay = secrets.token_urlsafe(32)
        self.admitted: list[str] = []
        self.url = ""

    async def answers(self, account: str) -> dict[str, str]:
        redirect = await self.factor.redirect(self.state, CLIENT, self.callback, self.relay)
        self.url = redirect.url
        return await sign_in(redirect.url, account, self.callback)

    async def verify(self, answers: dict[str, str],
                     state: FlowState | None = None) -> FactorOutcome:
        async def admit(username: str) -> bool:
            self.admitted.append(username)
            return True
        return await self.factor.verify(state or self.state, answers, Attempt(CLIENT, admit))

    async def run(self, account: str) -> FactorOutcome:
        return await self.verify(await self.answers(account))


def failed(outcome: FactorOutcome) -> Failed:
    """A refusal of the user's answer (counted against them, audited with its reason)."""
    assert isinstance(outcome, Failed), outcome
    return outcome


def crafted(peer: OidcPeer, make: Callable[[str], str]) -> None:
    """The proxy replaces the token endpoint's ID token with make(the real one)."""
    def tamper(body: dict[str, Any]) -> dict[str, Any]:
        return {**body, "id_token": make(body["id_token"])}
    peer.proxy.tamper_token = tamper


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()),
                     b64(signature)))


# -- sign-ins that succeed -------------------------------------------------------------------

async def test_okta_like_user_signs_in_with_groups_and_the_ad_claims(build: Build) -> None:
    sign = SignIn(await build(preset="okta", required_claims=["sid", "upn"]))
    outcome = await sign.run("alice")
    assert isinstance(outcome, Passed), outcome.reason
    assert outcome.username == "alice" and sign.admitted == ["alice"]
    attributes = outcome.attributes
    assert attributes is not None
    assert attributes.groups == ("staff", "Finance")
    assert attributes.sid == "S-1-5-21-1004336348-1177238915-682003330-1105"
    assert attributes.upn == "alice@corp.example.test"
    assert attributes.guid == "8c6f6f5a-37a2-4c65-9d1e-0f6d3b7b2f11"
    assert (attributes.email, attributes.display_name) == ("alice@example.test",
                                                           "Alice Liddell")


async def test_the_redirect_asks_for_a_code_with_pkce_s256_state_and_nonce(
        build: Build, oidc_provider: OidcPeer) -> None:
    sign = SignIn(await build(prompt="login", extra_params={"login_hint": "alice"}))
    redirect = await sign.factor.redirect(sign.state, CLIENT, CALLBACK, sign.relay)
    query = {k: v[0] for k, v in parse_qs(urlsplit(redirect.url).query).items()}
    verifier = sign.state.data["oidc_verifier"]
    challenge = b64(hashlib.sha256(verifier.encode()).digest())
    assert redirect.url.startswith(oidc_provider.issuer + "/auth?")
    assert query == {"response_type": "code", "client_id": "portcullis",
                     "redirect_uri": CALLBACK, "scope": query["scope"],
                     "state": sign.relay, "nonce": sign.state.data["oidc_nonce"],
                     "code_challenge": challenge, "code_challenge_method": "S256",
                     "prompt": "login", "login_hint": "alice"}
    assert verifier not in redirect.url


async def test_azure_preset_maps_upn_oid_and_onprem_sid(build: Build) -> None:
    outcome = await SignIn(await build(preset="azure")).run("carol")
    assert isinstance(outcome, Passed), outcome.reason
    assert outcome.username == "carol"     # the subject
    assert outcome.attributes is not None
    assert outcome.attributes.upn == "carol@contoso.example"
    assert outcome.attributes.sid == "S-1-5-21-3623811015-3361044348-30300820-1013"
    assert outcome.attributes.guid == "00000000-0000-0000-0000-00000000c0de"
    assert outcome.attributes.groups == ("vpn-users",)


async def test_client_secret_post_client_signs_in(build: Build) -> None:
    outcome = await SignIn(await build(client_id="portcullis-post")).run("alice")
    assert isinstance(outcome, Passed), outcome.reason


async def test_public_client_on_a_loopback_redirect_signs_in_with_pkce_only(
        build: Build) -> None:
    # RFC 8252: the CLI listens on a port of its choosing; the provider lets it vary.
    callback = LOOPBACK_CALLBACK.replace("127.0.0.1", "127.0.0.1:53117")
    outcome = await SignIn(await build(client_id="portcullis-cli"), callback).run("alice")
    assert isinstance(outcome, Passed), outcome.reason


async def test_token_signed_with_the_providers_ec_key_is_accepted(
        build: Build, oidc_provider: OidcPeer) -> None:
    seen: list[str] = []

    def look(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(json.loads(base64.urlsafe_b64decode(body["id_token"].split(".")[0]
                                                        + "==="))["alg"])
        return body
    oidc_provider.proxy.tamper_token = look
    outcome = await SignIn(await build(client_id="portcullis-es")).run("alice")
    assert isinstance(outcome, Passed), outcome.reason
    assert seen == ["ES256"]


async def test_username_claim_chooses_the_user_name(build: Build) -> None:
    outcome = await SignIn(await build(username_claim=["email"])).run("alice")
    assert isinstance(outcome, Passed) and outcome.username == "alice@example.test"


# -- refused, each with its reason ----------------------------------------------------------

async def test_wrong_state_is_refused(build: Build) -> None:
    sign = SignIn(await build())
    answers = await sign.answers("alice")
    outcome = await sign.verify({**answers, "state": secrets.token_urlsafe(32)})
    assert isinstance(outcome, Failed)
    assert failed(outcome).reason == "the callback's state does not match the sign-in's"
    assert sign.admitted == []


async def test_replayed_code_is_refused_by_the_provider(build: Build) -> None:
    sign = SignIn(await build())
    answers = await sign.answers("alice")
    kept = FlowState(flow="default", data=dict(sign.state.data))
    assert isinstance(await sign.verify(answers), Passed)
    outcome = await sign.verify(answers, state=kept)
    assert isinstance(outcome, Failed)
    assert failed(outcome).reason.startswith("the token endpoint refused the code: invalid_grant")


async def test_a_second_callback_for_one_sign_in_finds_nothing_waiting(build: Build) -> None:
    sign = SignIn(await build())
    answers = await sign.answers("alice")
    assert isinstance(await sign.verify(answers), Passed)
    outcome = await sign.verify(answers)
    assert isinstance(outcome, Failed) and "already answered, or never started" in outcome.reason


async def test_wrong_nonce_is_refused(build: Build, oidc_provider: OidcPeer) -> None:
    crafted(oidc_provider, lambda token: oidc_provider.resign(token, nonce="another"))
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason == "the ID token's nonce is not this sign-in's"


async def test_wrong_audience_is_refused(build: Build, oidc_provider: OidcPeer) -> None:
    crafted(oidc_provider, lambda token: oidc_provider.resign(token, aud="another-app",
                                                              azp=None))
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason == ("the ID token is for ['another-app'], not for client "
                                      "'portcullis'")


async def test_several_audiences_need_azp_naming_this_client(
        build: Build, oidc_provider: OidcPeer) -> None:
    crafted(oidc_provider, lambda token: oidc_provider.resign(
        token, aud=["portcullis", "another-app"], azp="another-app"))
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason == ("the ID token was issued to 'another-app' (azp), "
                              "not 'portcullis'")


async def test_wrong_issuer_is_refused(build: Build, oidc_provider: OidcPeer) -> None:
    crafted(oidc_provider, lambda token: oidc_provider.resign(
        token, iss="https://attacker.example"))
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason == (f"the ID token was issued by 'https://attacker.example', "
                              f"not {oidc_provider.issuer!r}")


async def test_expired_token_is_refused(build: Build, oidc_provider: OidcPeer) -> None:
    def expired(token: str) -> str:
        issued = token_claims(token)["iat"] - 7200
        return oidc_provider.resign(token, iat=issued, exp=issued + 3600)
    crafted(oidc_provider, expired)
    outcome = await SignIn(await build(clock_skew=30)).run("alice")
    assert failed(outcome).reason.startswith("the ID token expired ")


async def test_unsigned_token_alg_none_is_refused(build: Build,
                                                  oidc_provider: OidcPeer) -> None:
    crafted(oidc_provider, lambda token: unsigned({"alg": "none"}, token_claims(token)))
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason == "the ID token is not signed (alg none)"


async def test_hmac_token_keyed_with_the_providers_public_key_is_refused(
        build: Build, oidc_provider: OidcPeer) -> None:
    public_pem = oidc_provider.signing.as_pem(private=False)

    def hs256(token: str) -> str:
        header = {"alg": "HS256", "kid": oidc_provider.signing.kid}
        head = unsigned(header, token_claims(token)).rsplit(".", 1)[0]
        mac = hmac.new(public_pem, head.encode(), hashlib.sha256).digest()
        return f"{head}.{b64(mac)}"
    crafted(oidc_provider, hs256)
    outcome = await SignIn(await build(algorithms=["RS256", "PS256", "ES256"])).run("alice")
    assert failed(outcome).reason.startswith("the ID token is signed with HMAC (HS256): refused")


async def test_token_signed_by_a_key_in_its_own_header_is_refused(
        build: Build, oidc_provider: OidcPeer) -> None:
    # An EC key: an RSA key's jwk header is past joserfc's 512-byte header limit, which
    # would refuse it for its size before the header is read.
    attacker = ECKey.generate_key("P-256", {"kid": "attacker"})

    def self_signed(token: str) -> str:
        header = {"alg": "ES256", "kid": "attacker", "jwk": attacker.as_dict(private=False)}
        return jws.serialize_compact(header, json.dumps(token_claims(token)).encode(),
                                     attacker)
    crafted(oidc_provider, self_signed)
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason == "the ID token's header carries its own key (jwk): refused"


async def test_token_signed_by_an_unknown_key_is_refused_after_one_refetch(
        build: Build, oidc_provider: OidcPeer) -> None:
    stranger = signing_key("stranger")
    factor = await build()
    # A sign-in that passes: the keys are fetched and kept.
    assert isinstance(await SignIn(factor).run("alice"), Passed)
    crafted(oidc_provider, lambda token: oidc_provider.resign(token, key=stranger))
    before = oidc_provider.proxy.count("/jwks")
    outcome = await SignIn(factor).run("alice")
    assert failed(outcome).reason == ("the ID token names key 'stranger' (RS256), which the "
                              "provider's JWKS does not hold, even refetched")
    assert oidc_provider.proxy.count("/jwks") - before == 1


async def test_token_with_a_tampered_signature_is_refused(
        build: Build, oidc_provider: OidcPeer) -> None:
    def flipped(token: str) -> str:
        head, _, signature = token.split(".")
        altered = {**token_claims(token), "groups": ["admins"]}
        return f"{head}.{b64(json.dumps(altered).encode())}.{signature}"
    crafted(oidc_provider, flipped)
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason.startswith("the ID token's signature does not verify (key 'k1'")


async def test_algorithm_outside_the_providers_list_is_refused(build: Build) -> None:
    outcome = await SignIn(await build(algorithms=["ES256"])).run("alice")
    assert failed(outcome).reason == ("the ID token's algorithm RS256 is not one of this "
                                      "provider's ['ES256']")


async def test_userinfo_about_another_subject_is_refused(
        build: Build, oidc_provider: OidcPeer) -> None:
    oidc_provider.proxy.tamper_userinfo = lambda body: {**body, "sub": "mallory"}
    outcome = await SignIn(await build()).run("alice")
    assert failed(outcome).reason == "userinfo describes another subject than the ID token"


async def test_groups_overage_is_refused_with_what_to_change_at_the_provider(
        build: Build) -> None:
    outcome = await SignIn(await build(preset="azure")).run("crowded")
    assert failed(outcome).reason.startswith(
        "the provider left the 'groups' claim out of the token")
    assert "groupMembershipClaims" in outcome.reason


async def test_missing_required_claim_is_refused_naming_the_claims_looked_for(
        build: Build) -> None:
    outcome = await SignIn(await build(preset="okta", required_claims=["sid"])).run("carol")
    assert failed(outcome).reason == ("the provider's answer has no sid (looked for ad_sid), which "
                              "required_claims demands: add it as a claim of the "
                              "authorization server (Security > API > Claims)")


async def test_issuer_spelled_differently_from_discovery_is_refused(
        build: Build, oidc_provider: OidcPeer) -> None:
    factor = await build(issuer=oidc_provider.issuer + "/")
    with pytest.raises(FederationError) as caught:
        await SignIn(factor).answers("alice")
    assert (f"names the issuer {oidc_provider.issuer!r}, not the configured "
            f"'{oidc_provider.issuer}/'") in str(caught.value)


async def test_unreachable_provider_is_unavailable_not_the_users_fault(
        build: Build, oidc_provider: OidcPeer) -> None:
    sign = SignIn(await build())
    answers = await sign.answers("alice")
    upstream, oidc_provider.proxy.upstream = oidc_provider.proxy.upstream, 1
    try:
        outcome = await sign.verify(answers)
    finally:
        oidc_provider.proxy.upstream = upstream
    assert isinstance(outcome, Unavailable)


# -- key rotation ----------------------------------------------------------------------------

async def test_rotated_key_is_accepted_after_one_jwks_refetch(
        build: Build, tmp_path: Path) -> None:
    peer = start_oidc_provider(tmp_path / "rotating", [signing_key("old")])
    try:
        factor = await build(peer)
        assert isinstance(await SignIn(factor).run("alice"), Passed)
        fetched = peer.proxy.count("/jwks")
        peer.restart([signing_key("new"), peer.keys[0]])
        outcome = await SignIn(factor).run("alice")
        assert isinstance(outcome, Passed), outcome.reason
        assert peer.proxy.count("/jwks") == fetched + 1
    finally:
        peer.close()
