"""Links a federated identity to the directory account it stands for (config/linking.py).

An IdP (Okta or Azure AD over OIDC, a SAML IdP) says who signed in and what it knows of
them. Where group decisions belong to Active Directory, the account behind that identity
is looked up in an ldap provider by a claim the IdP carries (SID, ImmutableID/GUID, UPN,
mail, user name), and the session's claims are taken from both per the link's settings.

`link_key` and `decide_link` are pure and return their reason; `DirectoryLinkedFactor`
wraps any factor and adds the one directory lookup. It never binds as the user (the IdP
checked the credential), and a claim that matches no account is a refusal, never a fall
back to a weaker claim.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from ldap3.core.exceptions import LDAPException

from portcullis.config.linking import DirectoryLink, LinkClaim
from portcullis.errors import AuthError
from portcullis.identity.claims import Attributes
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.ldap import DirectoryUser, LdapDirectory, sid_bytes
from portcullis.identity.flow import (
    AnyFactor,
    Attempt,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    RedirectFactor,
    Refused,
    Step,
    Unavailable,
)
from portcullis.identity.names import canonical_username


@dataclass(frozen=True)
class IdpAnswer:
    """What the wrapped factor said when it accepted the user."""

    provider: str
    username: str | None
    attributes: Attributes


@dataclass(frozen=True)
class LinkKey:
    claim: LinkClaim
    shown: str                        # as the IdP sent it, for the reasons
    value: str | bytes                # as the directory compares it (SID, GUID: binary)


@dataclass(frozen=True)
class Lookup:
    """The directory's answer for one key."""

    key: LinkKey
    attribute: str                    # what the directory compared the key with
    accounts: tuple[DirectoryUser, ...]


@dataclass(frozen=True)
class Linked:
    username: str | None
    attributes: Attributes
    reason: str


@dataclass(frozen=True)
class LinkRefused:
    reason: str
    unavailable: bool = False         # the directory could not answer: not the user's fault


def link_key(link: DirectoryLink, idp: IdpAnswer) -> LinkKey | LinkRefused | None:
    """The first of `link.by` that the IdP's answer carries, in the form the directory
    compares; LinkRefused if that claim is malformed; None if the answer carries none."""
    for claim in link.by:
        given = _claim(idp, claim)
        if not given:
            continue
        if claim == "sid":
            sid = sid_bytes(given)
            if sid is None:
                return LinkRefused(f"the sid {given!r} from {idp.provider} is not a SID")
            return LinkKey(claim, given, sid)
        if claim == "guid":
            return _guid_key(idp.provider, given)
        return LinkKey(claim, given, given)
    return None


def decide_link(link: DirectoryLink, idp: IdpAnswer, lookup: Lookup | None) -> Linked | LinkRefused:
    """The user name and claims of a linked sign-in, or why it is refused. `lookup` is
    None when the IdP's answer carried no claim to look the account up by."""
    directory = link.directory
    if lookup is None:
        why = (f"the answer from {idp.provider} carries none of {', '.join(link.by)}, "
               f"which link it to directory {directory}")
        return _unlinked(link, idp, why)
    key, accounts = lookup.key, lookup.accounts
    if not accounts:
        return _unlinked(link, idp, f"no account in directory {directory} has "
                                    f"{lookup.attribute} {key.shown}")
    if len(accounts) > 1:
        return LinkRefused(f"{len(accounts)} accounts in directory {directory} have "
                       f"{lookup.attribute} {key.shown}; a link needs exactly one")
    account = accounts[0]
    if account.missing:
        return LinkRefused(f"the account {account.dn} in directory {directory} lacks "
                       f"{', '.join(account.missing)}")
    username = idp.username
    if link.username_from == "directory":
        try:
            username = canonical_username(account.username)
        except AuthError:
            return LinkRefused(f"the user name {account.username!r} of {account.dn} in "
                           f"directory {directory} is not usable")
    # The account's values first (its SID and GUID are the ones Windows resources know),
    # the IdP's where the directory has none; groups from the source of truth.
    merged = account.attributes.merge(idp.attributes)
    groups = {"idp": idp.attributes.groups, "directory": account.attributes.groups,
              "both": merged.groups}[link.groups]
    source = {"idp": (idp.provider,), "directory": (f"directory {directory}",),
              "both": (idp.provider, f"directory {directory}")}[link.groups]
    return Linked(username, replace(merged, groups=groups, groups_from=source),
                  f"linked to {account.dn} in directory {directory} by {lookup.attribute}")


def _unlinked(link: DirectoryLink, idp: IdpAnswer, why: str) -> Linked | LinkRefused:
    if link.required:
        return LinkRefused(why)
    # The directory is the source of truth: without an account there, no groups.
    groups = () if link.groups == "directory" else idp.attributes.groups
    source = (f"directory {link.directory}",) if link.groups == "directory" else (idp.provider,)
    return Linked(idp.username, replace(idp.attributes, groups=groups, groups_from=source),
                  f"not linked ({why}; the link is not required)")


def _claim(idp: IdpAnswer, claim: LinkClaim) -> str | None:
    if claim == "username":
        return idp.username
    value: str | None = getattr(idp.attributes, claim)
    return value.strip() if value else None


def _guid_key(provider: str, given: str) -> LinkKey | LinkRefused:
    """objectGUID as a GUID string, or Azure AD's ImmutableID: base64 of its 16 bytes."""
    try:
        return LinkKey("guid", given, uuid.UUID(given).bytes_le)
    except ValueError:
        pass
    try:
        raw = base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        return LinkRefused(f"the guid {given!r} from {provider} is neither a GUID nor an "
                       "ImmutableID (base64 of 16 bytes)")
    return LinkKey("guid", f"{uuid.UUID(bytes_le=raw)} (ImmutableID {given})", raw)


async def _admit_later(username: str) -> bool:
    return True


class DirectoryLinkedFactor:
    """A factor whose accepted identities are linked to their directory account.

    Anything else the wrapped factor offers (a redirect factor's `redirect`) is passed
    through unchanged."""

    def __init__(self, factor: AnyFactor, link: DirectoryLink,
                 directory: LdapDirectory) -> None:
        self._factor = factor
        self._link = link
        self._directory = directory
        self.name = factor.name
        self.kind = factor.kind
        self.primary = factor.primary

    def __getattr__(self, name: str) -> Any:
        if name == "_factor":         # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._factor, name)

    async def step(self, state: FlowState, context: LoginContext) -> Step:
        # Asked only of a prompting factor: the login service runs redirect factors by
        # their `redirect`.
        assert not isinstance(self._factor, RedirectFactor)
        return await self._factor.step(state, context)

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        # With the directory's name, lockout is about the account, whose name is known
        # only after the lookup: the lock is checked then (the IdP checked the credential).
        deferred = self._link.username_from == "directory"
        inner = Attempt(attempt.context, _admit_later) if deferred else attempt
        outcome = await self._factor.verify(state, answers, inner)
        if not isinstance(outcome, Passed):
            return outcome
        idp = IdpAnswer(self.name, outcome.username, outcome.attributes or Attributes())
        decision = await self._link_account(idp)
        if isinstance(decision, LinkRefused):
            if decision.unavailable:
                return Unavailable(decision.reason, outcome.username)
            return Failed(decision.reason, outcome.username)
        if deferred and decision.username is not None and not await attempt.admit(
                decision.username):
            return Refused("account locked", decision.username)
        return Passed(f"{outcome.reason}; {decision.reason}", decision.username,
                      decision.attributes)

    async def _link_account(self, idp: IdpAnswer) -> Linked | LinkRefused:
        key = link_key(self._link, idp)
        if isinstance(key, LinkRefused):
            return key
        if key is None:
            return decide_link(self._link, idp, None)
        try:
            accounts = await asyncio.to_thread(self._directory.lookup, key.claim, key.value)
        except LDAPException as exc:
            return LinkRefused(f"directory {self._link.directory} unavailable: {exc}",
                           unavailable=True)
        return decide_link(self._link, idp, Lookup(
            key, self._directory.attribute_of(key.claim), tuple(accounts)))
