"""From a provider's verified claims to the user name and Attributes: presets, overrides,
the groups overage, required claims. Each refusal tells the administrator what to change."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.config.federation import OidcProvider
from portcullis.identity.claim_mapping import (
    MappedUser,
    Refusal,
    claim_map,
    map_claims,
)

AZURE_TOKEN = {"sub": "AAAA-pairwise", "oid": "a1b2c3d4-0000-4000-8000-00000000beef",
               "preferred_username": "Carol@Contoso.example", "upn": "carol@contoso.example",
               "name": "Carol", "onprem_sid": "S-1-5-21-1-2-3-1013",
               "groups": ["3f1e...-finance", "vpn"]}


def provider(**keys: Any) -> OidcProvider:
    return OidcProvider.model_validate({"type": "oidc", "name": "idp",
                                        "issuer": "https://idp.test", "client_id": "c", **keys})


def mapped(token: dict[str, Any], **keys: Any) -> MappedUser | Refusal:
    """The mapping of `token` by a provider configured with `keys`."""
    config = provider(**keys)
    return map_claims(token, claim_map(config), tuple(config.required_claims), config.preset)


def test_azure_preset() -> None:
    user = mapped(AZURE_TOKEN, preset="azure")
    assert isinstance(user, MappedUser)
    # The pairwise subject, which Entra ID never reassigns (preferred_username can change).
    assert (user.username, user.username_claim) == ("AAAA-pairwise", "sub")
    assert user.attributes.upn == "carol@contoso.example"
    assert user.attributes.sid == "S-1-5-21-1-2-3-1013"
    assert user.attributes.guid == "a1b2c3d4-0000-4000-8000-00000000beef"
    assert user.attributes.groups == ("3f1e...-finance", "vpn")


def test_azure_preset_reads_the_directory_extension_name_of_the_sid() -> None:
    claims = {**AZURE_TOKEN, "onprem_sid": None, "onPremisesSecurityIdentifier": "S-1-5-9"}
    user = mapped(claims, preset="azure")
    assert isinstance(user, MappedUser) and user.attributes.sid == "S-1-5-9"


def test_okta_preset_with_a_renamed_ad_attribute() -> None:
    claims = {"sub": "00u1", "preferred_username": "alice@corp.test", "groups": ["Everyone"],
              "ad_sid": "S-1-5-21-9", "objectGUID": "guid-1", "ad_upn": "alice@corp.test"}
    user = mapped(claims, preset="okta", claims={"guid": "objectGUID"})
    assert isinstance(user, MappedUser)
    assert (user.attributes.sid, user.attributes.guid, user.attributes.upn) == (
        "S-1-5-21-9", "guid-1", "alice@corp.test")


def test_generic_maps_nothing_it_is_not_told() -> None:
    user = mapped({"sub": "s", "email": "e@x.test", "email_verified": True, "upn": "u@x.test",
                   "groups": "one"})
    assert isinstance(user, MappedUser)
    assert user.username == "s" and user.attributes.upn is None
    assert user.attributes.email == "e@x.test" and user.attributes.groups == ("one",)


@pytest.mark.parametrize("verified", [False, None, "true"])
def test_an_unverified_email_names_no_one_and_is_not_kept(verified: object) -> None:
    """An address anyone could have typed into their profile must not become the user
    name (that would be someone else's account) nor a claim linking a directory account."""
    claims = {"sub": "auth0|1", "email": "ceo@corp.example", "email_verified": verified}
    user = mapped(claims, username_claim=["email", "sub"])
    assert isinstance(user, MappedUser)
    assert user.username == "auth0|1" and user.attributes.email is None


def test_an_empty_list_turns_an_attribute_off() -> None:
    user = mapped(AZURE_TOKEN, preset="azure", claims={"groups": []})
    assert isinstance(user, MappedUser) and user.attributes.groups == ()


NAMES = ["preferred_username", "email", "sub"]


@given(st.lists(st.sampled_from(NAMES), unique=True))
def test_the_user_name_is_the_first_present_configured_claim(present: list[str]) -> None:
    claims: dict[str, Any] = {name: f"{name}-value" for name in present}
    claims["email_verified"] = True
    user = mapped(claims, username_claim=NAMES)
    order = [name for name in NAMES if name in present]
    if order:
        assert isinstance(user, MappedUser) and user.username == f"{order[0]}-value"
    else:
        assert user == Refusal("no claim names the user (looked for preferred_username, "
                               "email, sub); set the provider's username_claim")


def test_by_default_only_the_subject_names_the_user() -> None:
    user = mapped({"preferred_username": "root", "sub": "00u1"})
    assert isinstance(user, MappedUser) and user.username == "00u1"
    assert mapped({"preferred_username": "root"}) == Refusal(
        "no claim names the user (looked for sub); set the provider's username_claim")


@given(st.one_of(st.integers(), st.booleans(), st.none(), st.just(""), st.just("  "),
                 st.just("x" * 257), st.lists(st.text(max_size=3), max_size=2)))
def test_a_claim_that_is_no_usable_text_is_passed_over(value: Any) -> None:
    user = mapped({"preferred_username": value, "email": "fallback@x.test",
                   "email_verified": True}, username_claim=["preferred_username", "email"])
    assert isinstance(user, MappedUser) and user.username == "fallback@x.test"


@pytest.mark.parametrize("claims", [
    {"_claim_names": {"groups": "src1"}, "_claim_sources": {"src1": {"endpoint": "https://g"}}},
    {"hasgroups": True},
])
def test_groups_overage_is_refused_with_what_to_change(claims: dict[str, Any]) -> None:
    refusal = mapped({**AZURE_TOKEN, "groups": None, **claims}, preset="azure")
    assert isinstance(refusal, Refusal)
    assert refusal.reason.startswith("the provider left the 'groups' claim out of the token")
    assert "ApplicationGroup" in refusal.reason


def test_groups_that_are_no_list_are_refused() -> None:
    refusal = mapped({"sub": "s", "groups": {"a": 1}})
    assert refusal == Refusal("the 'groups' claim is not a list of at most 1000 groups")


def test_duplicate_and_empty_groups_are_dropped() -> None:
    user = mapped({"sub": "s", "groups": ["a", "", "a", 7, "b"]})
    assert isinstance(user, MappedUser) and user.attributes.groups == ("a", "b")


@pytest.mark.parametrize(("preset", "required", "reason"), [
    ("azure", "sid", "the provider's answer has no sid (looked for onprem_sid, "
                     "onPremisesSecurityIdentifier), which required_claims demands: add it "
                     "as an optional claim of the app registration (Token configuration)"),
    ("generic", "upn", "the provider's answer has no upn (looked for no claim: none is "
                       "configured), which required_claims demands: have the provider send "
                       "it, or name the claim that carries it in the provider's 'claims' "
                       "table"),
    ("okta", "groups", "the provider's answer has no groups (looked for groups), which "
                       "required_claims demands: add it as a claim of the authorization "
                       "server (Security > API > Claims)"),
])
def test_a_missing_required_claim_is_refused(preset: str, required: str, reason: str) -> None:
    assert mapped({"sub": "s"}, preset=preset, required_claims=[required]) == Refusal(reason)
