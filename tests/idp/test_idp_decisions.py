"""The OpenID provider's pure decisions: which authorization requests go on, who may
use an application, which redemptions match their code, and which claims tokens carry."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest

from portcullis.config.idp import OidcSettings
from portcullis.identity.claims import Claims
from portcullis.idp.decisions import (
    Accepted,
    AuthorizeRequest,
    IssuedCode,
    Refused,
    check_authorize,
    check_redemption,
    claims_for,
    may_use,
    s256,
)

CALLBACK = "https://app.test/cb"
VERIFIER = "v" * 43
SETTINGS = OidcSettings.model_validate({"enabled": True, "clients": [
    {"id": "app", "redirect_uris": [CALLBACK], "groups": ["staff"],
     "scopes": ["openid", "profile"]}]})


def request(query: str) -> AuthorizeRequest:
    base = (f"response_type=code&client_id=app&redirect_uri={CALLBACK}&scope=openid+email"
            f"+profile&state=s&code_challenge={s256(VERIFIER)}&code_challenge_method=S256")
    return AuthorizeRequest.from_params(parse_qsl("&".join(filter(None, [base, query]))))


def refusal(query: str) -> Refused:
    # The base request without the keys `query` sets (a repeat would be its own error).
    changed = dict(parse_qsl(query, keep_blank_values=True))
    base = {key: value for key, value in parse_qsl(
        f"response_type=code&client_id=app&redirect_uri={CALLBACK}&scope=openid&state=s"
        f"&code_challenge={s256(VERIFIER)}&code_challenge_method=S256")
        if key not in changed}
    decision = check_authorize(SETTINGS, AuthorizeRequest.from_params(
        [*base.items(), *parse_qsl(query, keep_blank_values=True)]))
    assert isinstance(decision, Refused)
    return decision


def test_a_good_request_gets_the_scopes_asked_for_that_the_client_may_have() -> None:
    decision = check_authorize(SETTINGS, request(""))
    assert isinstance(decision, Accepted)
    assert decision.scopes == ("openid", "profile")


@pytest.mark.parametrize("query", [
    "client_id=nobody",
    f"redirect_uri={CALLBACK}x",
    f"redirect_uri={CALLBACK}/",
    "redirect_uri=https://APP.test/cb",
    "redirect_uri=",
])
def test_an_unknown_client_or_redirect_uri_is_never_redirected_to(query: str) -> None:
    assert refusal(query).redirectable is False


def test_a_client_id_given_twice_is_not_redirected_to() -> None:
    decision = check_authorize(SETTINGS, request("client_id=app"))
    assert isinstance(decision, Refused) and not decision.redirectable


@pytest.mark.parametrize(("query", "error", "why"), [
    ("code_challenge_method=plain", "invalid_request", "only S256"),
    ("code_challenge_method=", "invalid_request", "only S256"),
    ("code_challenge=", "invalid_request", "not an S256 challenge"),
    ("response_type=token", "unsupported_response_type", "only 'code'"),
    ("scope=profile", "invalid_scope", "openid"),
    ("state=again&state=twice", "invalid_request", "state given twice"),
    ("request=eyJ", "request_not_supported", "request objects"),
])
def test_a_bad_request_of_a_known_client_goes_back_to_it_with_the_error(
        query: str, error: str, why: str) -> None:
    decision = refusal(query)
    assert (decision.error, decision.redirectable) == (error, True)
    assert why in decision.reason


def test_no_pkce_is_refused_for_every_client() -> None:
    decision = check_authorize(SETTINGS, AuthorizeRequest.from_params(parse_qsl(
        f"response_type=code&client_id=app&redirect_uri={CALLBACK}&scope=openid")))
    assert isinstance(decision, Refused) and "no PKCE" in decision.reason


def test_only_members_of_the_clients_groups_may_use_it() -> None:
    client = SETTINGS.clients[0]
    member = Claims(sub="local:alice", username="alice", groups=("staff", "x"))
    outsider = Claims(sub="local:bob", username="bob", groups=("Staff",))
    assert may_use(client, member).allowed
    verdict = may_use(client, outsider)
    assert not verdict.allowed and "bob is in none of the groups" in verdict.reason


CODE = IssuedCode("app", CALLBACK, s256(VERIFIER), ("openid",), "n", "handle")


@pytest.mark.parametrize(("client_id", "redirect_uri", "verifier", "why"), [
    ("other", CALLBACK, VERIFIER, "issued to client app"),
    ("app", CALLBACK + "x", VERIFIER, "redirect_uri differs"),
    ("app", None, VERIFIER, "redirect_uri differs"),
    ("app", CALLBACK, None, "no valid PKCE"),
    ("app", CALLBACK, "w" * 43, "does not match"),
    ("app", CALLBACK, s256(VERIFIER), "does not match"),   # the challenge itself (plain)
])
def test_a_redemption_must_match_its_code(client_id: str, redirect_uri: str | None,
                                          verifier: str | None, why: str) -> None:
    verdict = check_redemption(CODE, client_id, redirect_uri, verifier)
    assert not verdict.allowed and why in verdict.reason


def test_the_claims_follow_the_scopes_and_the_directory_sid_is_onprem_sid() -> None:
    claims = Claims(sub="corp:alice", username="alice", groups=("staff",), idp="corp",
                    amr=("corp", "totp"), auth_time=1000.5, display_name="Alice",
                    email="alice@corp.test", upn="alice@corp.test", sid="S-1-5-21-1")
    assert claims_for(claims, ["openid"], "sess") == {
        "sub": "corp:alice", "auth_time": 1000, "amr": ["corp", "totp"], "idp": "corp",
        "sid": "sess"}
    full = claims_for(claims, ["openid", "profile", "email", "groups"], "sess")
    assert full["onprem_sid"] == "S-1-5-21-1" and full["sid"] == "sess"
    assert (full["name"], full["email"], full["groups"]) == (
        "Alice", "alice@corp.test", ["staff"])
    assert "guid" not in full      # unknown claims are left out, not null
