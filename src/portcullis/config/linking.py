"""`link`: ties a federated identity (OIDC, SAML) to the directory account it stands for.

Azure AD / Entra and Okta identities synchronised from Active Directory carry the AD
account's SID, UPN and ImmutableID (base64 of objectGUID). A provider with a `link`
looks that account up in an `ldap` provider after the IdP has answered, and takes the
groups (and, if asked, the user name) from it — the directory as the source of truth:

    [auth.providers.link]
    directory = "corp"          # an ldap provider
    by = ["sid", "guid"]        # the first of these claims the IdP's answer carries
    groups = "directory"        # or "idp", or "both"

Provider models that can be linked inherit `Linkable`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The claims an account can be found by, and (identity/factors/ldap.py) the attribute each
# is compared with: sid objectSid (binary), guid objectGUID (binary; the GUID string or
# the base64 ImmutableID), upn userPrincipalName, email mail, username the directory's
# username_attribute.
LinkClaim = Literal["sid", "guid", "upn", "email", "username"]


class DirectoryLink(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # The ldap provider that holds the accounts.
    directory: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    # Looked up by the first of these claims the IdP's answer carries. One that is present
    # but matches no account is a refusal, never a fall-through to a weaker claim.
    by: list[LinkClaim] = Field(min_length=1)
    # Where the session's groups come from (the source of truth for group decisions).
    groups: Literal["idp", "directory", "both"] = "directory"
    # No account in the directory (or no claim to find it by): refused. When false, such
    # a user signs in with the IdP's answer alone (and no groups if groups = "directory").
    required: bool = True
    # Whose user name the session carries (and TOTP and lockout are keyed by).
    username_from: Literal["directory", "idp"] = "directory"

    @field_validator("by")
    @classmethod
    def _once_each(cls, value: list[LinkClaim]) -> list[LinkClaim]:
        twice = sorted({claim for claim in value if value.count(claim) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} is listed twice")
        return value


class Linkable(BaseModel):
    """A provider whose answers may be linked to a directory account (OIDC, SAML)."""

    link: DirectoryLink | None = None


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...


def check_links(declared: Sequence[object], known: Mapping[str, _Named]) -> None:
    """Every `link.directory` names an ldap provider (ValueError naming the key)."""
    for index, provider in enumerate(declared):
        if not isinstance(provider, Linkable) or provider.link is None:
            continue
        name = provider.link.directory
        target = known.get(name)
        if target is None or target.type != "ldap":
            what = "is not defined" if target is None else f"is of type {target.type}"
            ldap = sorted(p.name for p in known.values() if p.type == "ldap")
            raise ValueError(
                f"auth.providers[{index}].link.directory names {name!r}, which {what}; "
                f"it must name an ldap provider (defined: {', '.join(ldap) or 'none'})")
