"""The discovery document: taken only if it names the configured issuer exactly, with
https endpoints (http only for a loopback issuer) and PKCE S256."""

from __future__ import annotations

from typing import Any

import pytest

from portcullis.errors import FederationError
from portcullis.federation.discovery import discovery_url, parse_metadata

ISSUER = "https://login.example.test/tenant/v2.0"
DOCUMENT: dict[str, Any] = {
    "issuer": ISSUER,
    "authorization_endpoint": "https://login.example.test/tenant/oauth2/v2.0/authorize",
    "token_endpoint": "https://login.example.test/tenant/oauth2/v2.0/token",
    "jwks_uri": "https://login.example.test/tenant/discovery/v2.0/keys",
    "userinfo_endpoint": "https://graph.example.test/oidc/userinfo",
    "authorization_response_iss_parameter_supported": True,
}


def refusal(issuer: str = ISSUER, **changes: Any) -> str:
    document = {k: v for k, v in {**DOCUMENT, **changes}.items() if v is not None}
    with pytest.raises(FederationError) as refused:
        parse_metadata(document, issuer)
    assert refused.value.unavailable
    return str(refused.value)


def test_discovery_url_drops_one_trailing_slash_of_the_issuer() -> None:
    assert discovery_url("https://idp.test/") == "https://idp.test/.well-known/openid-configuration"
    assert discovery_url(ISSUER) == ISSUER + "/.well-known/openid-configuration"


def test_a_good_document_gives_its_endpoints() -> None:
    metadata = parse_metadata(DOCUMENT, ISSUER)
    assert metadata.token_endpoint == DOCUMENT["token_endpoint"]
    assert metadata.userinfo_endpoint == DOCUMENT["userinfo_endpoint"]
    assert metadata.issuer_in_response


def test_userinfo_is_optional() -> None:
    assert parse_metadata({**DOCUMENT, "userinfo_endpoint": None}, ISSUER).userinfo_endpoint \
        is None


def test_the_device_authorization_endpoint_is_optional_and_checked_as_the_others() -> None:
    assert parse_metadata(DOCUMENT, ISSUER).device_authorization_endpoint is None
    device = "https://login.example.test/tenant/oauth2/v2.0/devicecode"
    assert parse_metadata({**DOCUMENT, "device_authorization_endpoint": device},
                          ISSUER).device_authorization_endpoint == device
    assert refusal(device_authorization_endpoint="http://login.example.test/devicecode") \
        .endswith("'http://login.example.test/devicecode' is not an https URL")


@pytest.mark.parametrize("issuer", [ISSUER + "/", ISSUER.upper(), ISSUER.replace("v2.0", "")])
def test_the_issuer_must_be_equal_character_for_character(issuer: str) -> None:
    assert f"names the issuer {ISSUER!r}, not the configured {issuer!r}" in refusal(issuer)


@pytest.mark.parametrize(("changes", "problem"), [
    ({"jwks_uri": None}, "jwks_uri is missing"),
    ({"token_endpoint": 7}, "token_endpoint is not a string"),
    ({"token_endpoint": "http://login.example.test/token"},
     "'http://login.example.test/token' is not an https URL"),
    ({"authorization_endpoint": "javascript:alert(1)"},
     "'javascript:alert(1)' is not an https URL"),
    ({"code_challenge_methods_supported": ["plain"]}, "does not offer PKCE with S256"),
])
def test_a_bad_document_is_refused_saying_what_is_wrong(changes: dict[str, Any],
                                                        problem: str) -> None:
    assert problem in refusal(**changes)


def test_http_endpoints_only_for_a_loopback_issuer() -> None:
    issuer = "http://127.0.0.1:8080"
    local = {key: value.replace("https://login.example.test", issuer)
             if isinstance(value, str) else value for key, value in DOCUMENT.items()}
    assert parse_metadata({**local, "issuer": issuer}, issuer).token_endpoint.startswith(
        "http://127.0.0.1")
    assert "is not an https URL" in refusal(**{**local, "issuer": ISSUER})
