"""The relying party's pure checks: the callback, the ID token's header and claims, PKCE.
Each refusal is a sentence for the audit trail; these tests pin every one of them."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.errors import FederationError
from portcullis.federation.oidc import (
    ClaimExpectations,
    check_callback,
    check_claims,
    check_header,
    parse_device_grant,
    pkce_challenge,
)

ISSUER = "https://login.example.test/tenant/v2.0"
NOW = 1_800_000_000.0
EXPECT = ClaimExpectations(ISSUER, "portcullis", "n-0123456789", clock_skew=60)
GOOD: dict[str, Any] = {"iss": ISSUER, "aud": "portcullis", "exp": NOW + 300,
                        "iat": NOW - 5, "nonce": "n-0123456789", "sub": "u-1"}
ALGS = ("RS256", "PS256", "ES256")


def refusal(**changes: Any) -> str | None:
    claims = {**GOOD, **changes}
    return check_claims({k: v for k, v in claims.items() if v is not None}, EXPECT, NOW)


def test_rfc7636_appendix_b_challenge() -> None:
    assert (pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
            == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")


def test_good_claims_pass() -> None:
    assert refusal() is None


@pytest.mark.parametrize(("changes", "reason"), [
    ({"iss": ISSUER + "/"}, f"the ID token was issued by '{ISSUER}/', not '{ISSUER}'"),
    ({"iss": None}, "the ID token names no issuer (iss)"),
    ({"iss": [ISSUER]}, "the ID token names no issuer (iss)"),
    ({"aud": "other"}, "the ID token is for ['other'], not for client 'portcullis'"),
    ({"aud": None}, "the ID token's audience is missing or malformed"),
    ({"aud": ["portcullis", 7]}, "the ID token's audience is missing or malformed"),
    ({"aud": ["portcullis", "api"]}, "the ID token has several audiences and no azp"),
    ({"aud": ["portcullis", "api"], "azp": "api"},
     "the ID token was issued to 'api' (azp), not 'portcullis'"),
    ({"azp": "api"}, "the ID token was issued to 'api' (azp), not 'portcullis'"),
    ({"exp": None}, "the ID token has no expiry (exp)"),
    ({"exp": "2099-01-01"}, "the ID token has no expiry (exp)"),
    ({"exp": True}, "the ID token has no expiry (exp)"),
    ({"exp": NOW - 60}, "the ID token expired 60 s ago"),
    ({"iat": None}, "the ID token has no issue time (iat)"),
    ({"iat": NOW + 61}, "the ID token was issued 61 s in the future (check the clocks)"),
    ({"nbf": NOW + 61}, "the ID token is not valid yet (nbf)"),
    ({"nbf": "soon"}, "the ID token is not valid yet (nbf)"),
    ({"nonce": None}, "the ID token's nonce is not this sign-in's"),
    ({"nonce": "n-0123456788"}, "the ID token's nonce is not this sign-in's"),
    ({"sub": None}, "the ID token's subject (sub) is missing or malformed"),
    ({"sub": ""}, "the ID token's subject (sub) is missing or malformed"),
    ({"sub": "x" * 256}, "the ID token's subject (sub) is missing or malformed"),
])
def test_each_claim_refusal_says_which_claim(changes: dict[str, Any], reason: str) -> None:
    assert refusal(**changes) == reason


def test_several_audiences_with_azp_naming_this_client_pass() -> None:
    assert refusal(aud=["api", "portcullis"], azp="portcullis") is None


def test_the_device_grant_needs_no_nonce_and_the_code_flow_still_does() -> None:
    """RFC 8628 has no nonce: its expectations say None, and only then is a token without
    one (or with any) taken; the code flow's expectations always name one."""
    device = ClaimExpectations(ISSUER, "portcullis", None, clock_skew=60)
    without = {k: v for k, v in GOOD.items() if k != "nonce"}
    assert check_claims(without, device, NOW) is None
    assert check_claims({**GOOD, "nonce": "whatever"}, device, NOW) is None
    assert check_claims(without, EXPECT, NOW) == "the ID token's nonce is not this sign-in's"
    # Everything else is checked for the device grant as for the code flow.
    assert check_claims({**without, "aud": "other"}, device, NOW) == (
        "the ID token is for ['other'], not for client 'portcullis'")


def test_clock_skew_is_allowed_both_ways_and_no_further() -> None:
    assert refusal(exp=NOW - 59, iat=NOW + 60, nbf=NOW + 60) is None
    assert refusal(exp=NOW - 60) is not None


@given(st.integers(-10**6, 10**6))
def test_a_token_is_accepted_until_the_skew_after_its_expiry(offset: int) -> None:
    assert (refusal(exp=NOW + offset) is None) == (offset > -EXPECT.clock_skew)


@given(st.text(alphabet=string.printable, max_size=40))
def test_any_other_nonce_is_refused(nonce: str) -> None:
    assert (refusal(nonce=nonce) is None) == (nonce == EXPECT.nonce)


@given(st.integers(0, len(EXPECT.nonce) - 1), st.sampled_from("0123456789abcxyz-_"))
def test_a_nonce_differing_in_one_character_is_refused(index: int, char: str) -> None:
    altered = EXPECT.nonce[:index] + char + EXPECT.nonce[index + 1:]
    assert (refusal(nonce=altered) is None) == (altered == EXPECT.nonce)


# -- the header ------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "reason"), [
    ({}, "the ID token's header names no algorithm"),
    ({"alg": 256}, "the ID token's header names no algorithm"),
    ({"alg": "none"}, "the ID token is not signed (alg none)"),
    ({"alg": "None"}, "the ID token is not signed (alg none)"),
    ({"alg": "HS256"}, "the ID token is signed with HMAC (HS256): refused, a provider "
                       "signs with its private key"),
    ({"alg": "hs512"}, "the ID token is signed with HMAC (hs512): refused, a provider "
                       "signs with its private key"),
    ({"alg": "RS512"}, "the ID token's algorithm RS512 is not one of this provider's "
                       "['RS256', 'PS256', 'ES256']"),
    ({"alg": "RS256", "jwk": {}}, "the ID token's header carries its own key (jwk): refused"),
    ({"alg": "RS256", "jku": "https://x"},
     "the ID token's header carries its own key (jku): refused"),
    ({"alg": "RS256", "x5u": "https://x"},
     "the ID token's header carries its own key (x5u): refused"),
    ({"alg": "RS256", "x5c": ["MII"]},
     "the ID token's header carries its own key (x5c): refused"),
    ({"alg": "RS256", "kid": 1}, "the ID token's key id is not a string"),
    ({"alg": "RS256", "crit": ["exp"]},
     "the ID token's header has critical extensions ['exp']"),
])
def test_each_header_refusal(header: dict[str, Any], reason: str) -> None:
    assert check_header(header, ALGS) == reason


def test_header_with_an_allowed_algorithm_and_key_id_passes() -> None:
    assert check_header({"alg": "ES256", "kid": "k1", "typ": "JWT", "x5t": "abc"}, ALGS) is None


def test_an_allowed_name_that_is_no_signature_algorithm_is_refused() -> None:
    assert check_header({"alg": "RSA-OAEP"}, ("RSA-OAEP",)) is not None


@given(st.text(max_size=12))
def test_only_allowed_algorithms_pass(alg: str) -> None:
    assert (check_header({"alg": alg}, ALGS) is None) == (alg in ALGS)


# -- the callback ----------------------------------------------------------------------------

STATE = "relay-0123456789abcdef"


def callback(answers: dict[str, str], required: bool = False) -> str | None:
    return check_callback(answers, STATE, ISSUER, required)


def test_a_callback_with_state_and_code_passes() -> None:
    assert callback({"state": STATE, "code": "c0de", "iss": ISSUER}) is None


@given(st.integers(0, len(STATE) - 1), st.characters(codec="utf-8"))
def test_a_state_differing_in_one_character_is_refused(index: int, char: str) -> None:
    altered = STATE[:index] + char + STATE[index + 1:]
    reason = callback({"state": altered, "code": "c0de"})
    expected = None if altered == STATE else "the callback's state does not match the sign-in's"
    assert reason == expected


@pytest.mark.parametrize(("answers", "required", "reason"), [
    ({"code": "c"}, False, "the callback's state does not match the sign-in's"),
    ({"state": STATE + "x", "code": "c"}, False,
     "the callback's state does not match the sign-in's"),
    ({"state": STATE, "code": "c", "iss": "https://evil.test"}, False,
     f"the callback comes from issuer 'https://evil.test', not '{ISSUER}'"),
    ({"state": STATE, "code": "c"}, True,
     "the callback lacks the iss parameter its provider promises (RFC 9207)"),
    ({"state": STATE, "error": "access_denied", "error_description": "User cancelled"},
     False, "the provider answered error='access_denied': 'User cancelled'"),
    ({"state": STATE, "error": "login_required"}, False,
     "the provider answered error='login_required'"),
    ({"state": STATE}, False, "the callback carries no code"),
    ({"state": STATE, "code": "c" * 2049}, False,
     "the callback's code is longer than 2048 characters"),
])
def test_each_callback_refusal(answers: dict[str, str], required: bool, reason: str) -> None:
    assert callback(answers, required) == reason


DEVICE_GRANT: dict[str, Any] = {
    "device_code": "GmRhmhcxhwAzkoEqiMEg_DnyEysNkuNhszIySk9eS", "user_code": "WDJB-MJHT",
    "verification_uri": "https://login.example.test/device",
    "verification_uri_complete": "https://login.example.test/device?user_code=WDJB-MJHT",
    "expires_in": 1800}


def test_a_device_authorization_response_interval_defaults_to_five_seconds() -> None:
    grant = parse_device_grant(DEVICE_GRANT, ISSUER)
    assert (grant.user_code, grant.expires_in, grant.interval) == ("WDJB-MJHT", 1800, 5)
    assert parse_device_grant({**DEVICE_GRANT, "interval": 7}, ISSUER).interval == 7


@pytest.mark.parametrize(("changes", "reason"), [
    ({"device_code": None}, "the device authorization response's device_code is missing "
                            "or malformed"),
    ({"user_code": ""}, "the device authorization response's user_code is missing or "
                        "malformed"),
    ({"verification_uri": "javascript:alert(1)"},
     "the device authorization response: 'javascript:alert(1)' is not an https URL"),
    ({"verification_uri_complete": "http://evil.test/device"},
     "the device authorization response: 'http://evil.test/device' is not an https URL"),
    ({"verification_uri_complete": 7}, "the device authorization response's "
                                       "verification_uri_complete is malformed"),
    ({"expires_in": True}, "the device authorization response's expires_in is not a "
                           "positive number of seconds"),
    ({"interval": 0}, "the device authorization response's interval is not a positive "
                      "number of seconds"),
])
def test_each_device_authorization_refusal_says_what(changes: dict[str, Any],
                                                      reason: str) -> None:
    body = {k: v for k, v in {**DEVICE_GRANT, **changes}.items() if v is not None}
    with pytest.raises(FederationError) as refused:
        parse_device_grant(body, ISSUER)
    assert str(refused.value) == reason
