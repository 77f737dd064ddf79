"""The link between a federated identity and its directory account, as data: which claim
finds the account (`link_key`), and what the session carries or why it is refused
(`decide_link`), for every setting; and the `link` configuration's checks."""

from __future__ import annotations

import base64
import uuid
from typing import Any, Literal

import pytest
from pydantic import ValidationError

from peers.login import settings_for
from portcullis.config.linking import DirectoryLink, Linkable, check_links
from portcullis.identity.claims import Attributes
from portcullis.identity.factors.ldap import DirectoryUser, sid_bytes
from portcullis.identity.linking import (
    IdpAnswer,
    Linked,
    LinkKey,
    LinkRefused,
    Lookup,
    decide_link,
    link_key,
)

SID = "S-1-5-21-1004336348-1177238915-682003330-1104"
GUID = uuid.UUID("a11ce000-0000-4000-8000-000000001104")
IMMUTABLE_ID = base64.b64encode(GUID.bytes_le).decode()
IDP = IdpAnswer("okta", "alice.okta", Attributes(
    groups=("okta-everyone",), email="alice@corp.example", upn="alice@corp.example",
    sid=SID, guid=IMMUTABLE_ID, display_name="Alice (Okta)"))
ACCOUNT = DirectoryUser("CN=alice,CN=Users,DC=pc,DC=test", "Alice", Attributes(
    groups=("staff", "finance"), email="alice@pc.test", upn="alice@pc.test", sid=SID,
    guid=str(GUID)), ())


def link(**settings: Any) -> DirectoryLink:
    return DirectoryLink.model_validate({"directory": "corp", "by": ["sid"], **settings})


def idp(**attributes: Any) -> IdpAnswer:
    return IdpAnswer("okta", "alice.okta", Attributes(**attributes))


def found(*accounts: DirectoryUser, key: LinkKey | None = None) -> Lookup:
    return Lookup(key or LinkKey("sid", SID, sid_bytes(SID) or b""), "objectSid", accounts)


@pytest.mark.parametrize(("by", "answer", "expected"), [
    # The first listed claim the answer carries decides.
    (["sid", "upn"], IDP, LinkKey("sid", SID, sid_bytes(SID) or b"")),
    (["upn", "sid"], IDP, LinkKey("upn", "alice@corp.example", "alice@corp.example")),
    (["sid", "upn"], idp(upn="alice@corp.example"),
     LinkKey("upn", "alice@corp.example", "alice@corp.example")),
    (["email"], idp(email=" alice@corp.example "),
     LinkKey("email", "alice@corp.example", "alice@corp.example")),
    (["username"], IDP, LinkKey("username", "alice.okta", "alice.okta")),
    # objectGUID: Azure AD's ImmutableID (base64 of its bytes) or the GUID string, the
    # same 16 bytes in AD's mixed-endian order.
    (["guid"], idp(guid=IMMUTABLE_ID),
     LinkKey("guid", f"{GUID} (ImmutableID {IMMUTABLE_ID})", GUID.bytes_le)),
    (["guid"], idp(guid=str(GUID).upper()), LinkKey("guid", str(GUID).upper(), GUID.bytes_le)),
    (["guid"], idp(guid="{" + str(GUID) + "}"),
     LinkKey("guid", "{" + str(GUID) + "}", GUID.bytes_le)),
    # No claim to look up by.
    (["sid", "guid"], idp(upn="alice@corp.example"), None),
    (["sid"], idp(sid=""), None),
])
def test_the_first_claim_the_answer_carries_finds_the_account(
        by: list[str], answer: IdpAnswer, expected: LinkKey | None) -> None:
    assert link_key(link(by=by), answer) == expected


@pytest.mark.parametrize(("by", "answer", "reason"), [
    (["sid", "upn"], idp(sid="S-1-5-x", upn="alice@corp.example"),
     "the sid 'S-1-5-x' from okta is not a SID"),
    (["sid"], idp(sid="S-1-5-21-99999999999"), "the sid 'S-1-5-21-99999999999' from okta "
     "is not a SID"),
    (["guid"], idp(guid="bm90IDE2IGJ5dGVz"), "the guid 'bm90IDE2IGJ5dGVz' from okta is "
     "neither a GUID nor an ImmutableID (base64 of 16 bytes)"),
    (["guid"], idp(guid="*)(objectGUID=*"), "the guid '*)(objectGUID=*' from okta is "
     "neither a GUID nor an ImmutableID (base64 of 16 bytes)"),
])
def test_a_malformed_claim_is_refused_not_skipped(by: list[str], answer: IdpAnswer,
                                                  reason: str) -> None:
    assert link_key(link(by=by), answer) == LinkRefused(reason)


def test_sid_bytes_is_the_objectsid_layout() -> None:
    assert sid_bytes("S-1-5-21-1-2-3-1104") == (
        b"\x01\x05\x00\x00\x00\x00\x00\x05" + b"\x15\x00\x00\x00\x01\x00\x00\x00"
        + b"\x02\x00\x00\x00\x03\x00\x00\x00\x50\x04\x00\x00")


Groups = Literal["idp", "directory", "both"]


@pytest.mark.parametrize(("groups", "expected"), [
    ("directory", ("staff", "finance")),
    ("idp", ("okta-everyone",)),
    ("both", ("staff", "finance", "okta-everyone")),
])
def test_groups_come_from_the_source_of_truth(groups: Groups,
                                              expected: tuple[str, ...]) -> None:
    decision = decide_link(link(groups=groups), IDP, found(ACCOUNT))
    assert isinstance(decision, Linked) and decision.attributes.groups == expected
    assert decision.attributes.groups_from == {
        "idp": ("okta",), "directory": ("directory corp",),
        "both": ("okta", "directory corp")}[groups]


def test_a_linked_session_carries_the_accounts_name_and_identifiers() -> None:
    decision = decide_link(link(), IDP, found(ACCOUNT))
    assert decision == Linked("alice", Attributes(
        groups=("staff", "finance"), groups_from=("directory corp",), email="alice@pc.test",
        upn="alice@pc.test", sid=SID, guid=str(GUID), display_name="Alice (Okta)"),
        "linked to CN=alice,CN=Users,DC=pc,DC=test in directory corp by objectSid")


def test_username_from_idp_keeps_the_idps_name() -> None:
    decision = decide_link(link(username_from="idp"), IDP, found(ACCOUNT))
    assert isinstance(decision, Linked) and decision.username == "alice.okta"


@pytest.mark.parametrize(("settings", "lookup", "expected"), [
    ({}, found(), LinkRefused(f"no account in directory corp has objectSid {SID}")),
    ({}, None, LinkRefused("the answer from okta carries none of sid, which link it to "
                       "directory corp")),
    ({}, found(ACCOUNT, ACCOUNT), LinkRefused(
        f"2 accounts in directory corp have objectSid {SID}; a link needs exactly one")),
    ({}, found(DirectoryUser("CN=x,DC=pc", "x", Attributes(), ("employeeID",))),
     LinkRefused("the account CN=x,DC=pc in directory corp lacks employeeID")),
    ({}, found(DirectoryUser("CN=x,DC=pc", "", Attributes(), ())),
     LinkRefused("the user name '' of CN=x,DC=pc in directory corp is not usable")),
    # Not required: the IdP's answer alone, without groups if the directory owns them.
    ({"required": False}, found(), Linked("alice.okta", Attributes(
        groups_from=("directory corp",)), (
        f"not linked (no account in directory corp has objectSid {SID}; "
        "the link is not required)"))),
    ({"required": False, "groups": "both"}, None, Linked(
        "alice.okta", Attributes(groups=("okta-everyone",), groups_from=("okta",)),
        "not linked (the answer from okta carries none of sid, which link it to directory "
        "corp; the link is not required)")),
    # Several accounts is never "not linked": that is a directory to fix.
    ({"required": False}, found(ACCOUNT, ACCOUNT), LinkRefused(
        f"2 accounts in directory corp have objectSid {SID}; a link needs exactly one")),
])
def test_what_a_link_refuses_and_why(settings: dict[str, Any], lookup: Lookup | None,
                                     expected: Linked | LinkRefused) -> None:
    answer = idp(groups=("okta-everyone",)) if lookup is None or not lookup.accounts else IDP
    assert decide_link(link(**settings), answer, lookup) == expected


@pytest.mark.parametrize(("settings", "message"), [
    ({"by": []}, "at least 1 item"),
    ({"by": ["sid", "sid"]}, "'sid' is listed twice"),
    ({"by": ["objectSid"]}, "'sid', 'guid', 'upn', 'email' or 'username'"),
    ({"groups": "okta"}, "'idp', 'directory' or 'both'"),
    ({"directory": "Corp!"}, "should match pattern"),
    ({"sid_attribute": "x"}, "Extra inputs are not permitted"),
])
def test_a_malformed_link_is_refused_when_read(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        link(**settings)


class FederatedProviderDouble(Linkable):
    """Stands for the OIDC and SAML provider models (other helpers write them): a
    provider that inherits Linkable."""

    name: str
    type: str = "oidc"


def test_a_link_must_name_an_ldap_provider(tmp_path: Any) -> None:
    ldap = {"type": "ldap", "name": "corp", "servers": ["ldaps://127.0.0.1"],
            "bind_dn": "cn=x", "bind_password_file": "pw", "base_dn": "dc=x"}
    known = settings_for({"providers": [ldap]}, tmp_path).auth.all_providers()
    declared = [known["corp"], FederatedProviderDouble(name="okta", link=link(directory="totp"))]
    with pytest.raises(ValueError, match=r"auth.providers\[1\].link.directory names 'totp', "
                       r"which is of type totp; it must name an ldap provider \(defined: corp\)"):
        check_links(declared, known)
    declared[1] = FederatedProviderDouble(name="okta", link=link(directory="ad"))
    with pytest.raises(ValueError, match="names 'ad', which is not defined"):
        check_links(declared, known)
    declared[1] = FederatedProviderDouble(name="okta", link=link(directory="corp"))
    check_links(declared, known)
