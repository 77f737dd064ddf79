"""From a federated provider's verified claims to a Portcullis user name and Attributes.

Pure: `map_claims` takes the claims and the provider's `ClaimMap` and returns the user
or the reason it refuses, written for the administrator (which claim is missing, where
the provider is told to send it). Presets hold what Azure AD / Entra ID and Okta call
things; a provider's `claims` and `username_claim` keys override them name by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from portcullis.config.federation import OidcProvider
from portcullis.identity.claims import Attributes

MAX_VALUE = 256
MAX_GROUPS = 1000


@dataclass(frozen=True)
class ClaimMap:
    """For each attribute, the claims tried in order: the first present one fills it."""

    # `sub` is the one claim every provider promises never to reassign: a name the
    # user (or a self-service profile) can change would let one account become another.
    # Readable names are a deliberate choice (`username_claim`), see docs/identity.md.
    username: tuple[str, ...] = ("sub",)
    email: tuple[str, ...] = ("email",)
    display_name: tuple[str, ...] = ("name",)
    upn: tuple[str, ...] = ()
    sid: tuple[str, ...] = ()
    guid: tuple[str, ...] = ()
    groups: tuple[str, ...] = ("groups",)


PRESETS: dict[str, ClaimMap] = {
    "generic": ClaimMap(),
    # Entra ID: `oid` is the user's object id in the tenant (not AD's objectGUID, which
    # reaches a token only through a claims-mapping policy: name that claim in
    # `claims.guid`); onprem_sid is the optional claim of synchronised users.
    # (Not preferred_username for the UPN: Microsoft documents it as mutable.)
    "azure": ClaimMap(upn=("upn",),
                      sid=("onprem_sid", "onPremisesSecurityIdentifier"), guid=("oid",)),
    # Okta: AD attributes reach the token as custom claims of the authorization server;
    # these are the names Okta's AD agent documentation uses.
    "okta": ClaimMap(upn=("ad_upn",), sid=("ad_sid",), guid=("ad_guid",)),
}

ADVICE = {
    "azure": "add it as an optional claim of the app registration (Token configuration)",
    "okta": "add it as a claim of the authorization server (Security > API > Claims)",
    "generic": "have the provider send it, or name the claim that carries it in the "
               "provider's 'claims' table",
}


@dataclass(frozen=True)
class MappedUser:
    username: str
    username_claim: str
    attributes: Attributes


@dataclass(frozen=True)
class Refusal:
    reason: str


def claim_map(provider: OidcProvider) -> ClaimMap:
    names = PRESETS[provider.preset]
    overrides = {key: tuple(value) for key, value in provider.claims.model_dump().items()
                 if value is not None}
    if provider.username_claim is not None:
        overrides["username"] = tuple(provider.username_claim)
    return replace(names, **overrides)


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip() and len(value) <= MAX_VALUE:
        return value.strip()
    return None


def _first(claims: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str, str] | None:
    for name in names:
        value = _text(claims.get(name))
        if value is not None:
            return name, value
    return None


def _groups(claims: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str, ...] | Refusal:
    for name in names:
        value = claims.get(name)
        if value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or len(values) > MAX_GROUPS:
            return Refusal(f"the {name!r} claim is not a list of at most {MAX_GROUPS} groups")
        return tuple(dict.fromkeys(group for group in map(_text, values) if group))
    return ()


def groups_overage(claims: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    """The claim the provider left out of the token because it was too large: Azure AD
    does this past 200 groups ("groups overage"), sending `_claim_names` (OpenID
    Connect distributed claims) or `hasgroups` instead."""
    distributed = claims.get("_claim_names")
    for name in names:
        if (isinstance(distributed, dict) and name in distributed) or (
                name == "groups" and claims.get("hasgroups") is True):
            return name
    return None


def trusted(claims: Mapping[str, Any]) -> Mapping[str, Any]:
    """The claims without an email address the provider has not verified: it must not
    name a user, link an account or reach an application (OpenID Connect Core 5.1)."""
    if "email" in claims and claims.get("email_verified") is not True:
        return {name: value for name, value in claims.items() if name != "email"}
    return claims


def map_claims(claims: Mapping[str, Any], names: ClaimMap, required: tuple[str, ...],
               preset: str = "generic") -> MappedUser | Refusal:
    claims = trusted(claims)
    user = _first(claims, names.username)
    if user is None:
        return Refusal(f"no claim names the user (looked for {', '.join(names.username)}); "
                       "set the provider's username_claim")
    overage = groups_overage(claims, names.groups)
    if overage is not None:
        return Refusal(f"the provider left the {overage!r} claim out of the token: the user "
                       "is in more groups than a token carries (Azure AD: the groups "
                       "overage, past 200). Have the app registration send only the groups "
                       "assigned to the application (groupMembershipClaims: "
                       "ApplicationGroup), or filter the groups claim")
    groups = _groups(claims, names.groups)
    if isinstance(groups, Refusal):
        return groups
    found: dict[str, str | None] = {}
    for attribute in ("email", "display_name", "upn", "sid", "guid"):
        hit = _first(claims, getattr(names, attribute))
        found[attribute] = hit[1] if hit else None
    for attribute in required:
        missing = not groups if attribute == "groups" else found.get(attribute) is None
        if missing:
            looked = getattr(names, attribute)
            return Refusal(f"the provider's answer has no {attribute} (looked for "
                           f"{', '.join(looked) or 'no claim: none is configured'}), which "
                           f"required_claims demands: {ADVICE[preset]}")
    return MappedUser(user[1], user[0], Attributes(
        groups=groups, email=found["email"], display_name=found["display_name"],
        upn=found["upn"], sid=found["sid"], guid=found["guid"]))
