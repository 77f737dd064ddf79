"""The slapd peer (tests/peers/ldap.py) is a usable AD-like directory, checked with ldap3."""

from __future__ import annotations

import ssl

import ldap3
import pytest
from ldap3.core.exceptions import LDAPSocketOpenError

from peers.ldap import PASSWORDS, USERS, Slapd, sid_bytes

pytestmark = pytest.mark.peer


def connect(url: str, user: str | None = None, password: str | None = None,
            **server_options: object) -> ldap3.Connection:
    server = ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=5, **server_options)
    return ldap3.Connection(server, user, password, receive_timeout=5)


def test_service_account_binds_and_reads_users_but_not_passwords(slapd: Slapd) -> None:
    conn = connect(slapd.ldap_url, slapd.bind_dn, slapd.bind_password)
    assert conn.bind(), conn.result
    conn.search(slapd.users_dn, "(sAMAccountName=ALICE)",  # AD matching is case-insensitive
                attributes=["sAMAccountName", "userPrincipalName", "mail", "displayName",
                            "objectGUID", "objectSid", "userPassword"])
    assert len(conn.response) == 1
    entry = conn.response[0]
    alice = USERS["alice"]
    assert entry["dn"] == alice.dn == slapd.user_dn("alice")
    raw = entry["raw_attributes"]
    assert raw["sAMAccountName"] == [b"alice"]
    assert raw["userPrincipalName"] == [b"alice@corp.example"]
    assert raw["mail"] == [b"alice@corp.example"]
    assert raw["displayName"] == [b"Alice Liddell"]
    assert raw["objectGUID"] == [alice.object_guid] and len(alice.object_guid) == 16
    assert raw["objectSid"] == [sid_bytes("S-1-5-21-1-2-3-1104")]
    # ldap3 lists a requested attribute it did not receive as empty: the ACL hides it.
    assert raw["userPassword"] == []
    conn.unbind()


def test_binary_ad_attributes_are_formatted_by_ldap3_with_schema(slapd: Slapd) -> None:
    # With the server schema loaded, ldap3 recognises the AD OIDs and formats the bytes.
    server = ldap3.Server(slapd.ldap_url, get_info=ldap3.SCHEMA, connect_timeout=5)
    conn = ldap3.Connection(server, slapd.bind_dn, slapd.bind_password, auto_bind=True)
    conn.search(slapd.users_dn, "(uid=bob)", attributes=["objectGUID", "objectSid"])
    attributes = conn.entries[0].entry_attributes_as_dict
    assert attributes["objectGUID"] == [f"{{{USERS['bob'].guid}}}"]
    assert attributes["objectSid"] == ["S-1-5-21-1-2-3-1105"]
    conn.unbind()


def test_carol_has_no_mail(slapd: Slapd) -> None:
    conn = connect(slapd.ldap_url, slapd.bind_dn, slapd.bind_password)
    assert conn.bind()
    conn.search(slapd.user_dn("carol"), "(objectClass=*)", ldap3.BASE,
                attributes=["mail", "sAMAccountName"])
    assert conn.response[0]["raw_attributes"]["mail"] == []
    assert conn.response[0]["raw_attributes"]["sAMAccountName"] == [b"carol"]
    conn.unbind()


@pytest.mark.parametrize("name", ["alice", "bob", "carol"])
def test_user_bind_needs_the_right_password(slapd: Slapd, name: str) -> None:
    good = connect(slapd.ldap_url, slapd.user_dn(name), PASSWORDS[name])
    assert good.bind(), good.result
    good.unbind()
    bad = connect(slapd.ldap_url, slapd.user_dn(name), PASSWORDS[name] + "x")
    assert not bad.bind()
    assert bad.result["description"] == "invalidCredentials"


def test_anonymous_sees_nothing(slapd: Slapd) -> None:
    conn = connect(slapd.ldap_url)
    assert conn.bind()
    conn.search(slapd.base_dn, "(objectClass=*)", ldap3.SUBTREE)
    assert conn.response == []
    conn.unbind()


def test_ldaps_verifies_with_the_ca(slapd: Slapd) -> None:
    conn = connect(slapd.ldaps_url, slapd.bind_dn, slapd.bind_password, tls=slapd.tls())
    assert conn.bind(), conn.result
    assert conn.extend.standard.who_am_i() == f"dn:{slapd.bind_dn}"
    conn.unbind()
    # Without the CA the certificate is not trusted.
    untrusted = ldap3.Tls(validate=ssl.CERT_REQUIRED)
    with pytest.raises(LDAPSocketOpenError):
        connect(slapd.ldaps_url, slapd.bind_dn, slapd.bind_password, tls=untrusted).open()


def test_starttls_on_the_plain_port(slapd: Slapd) -> None:
    conn = connect(slapd.ldap_url, slapd.user_dn("bob"), PASSWORDS["bob"], tls=slapd.tls())
    conn.open()
    assert conn.start_tls()
    assert conn.tls_started
    assert conn.bind(), conn.result
    assert conn.extend.standard.who_am_i() == f"dn:{slapd.user_dn('bob')}"
    conn.unbind()


def test_memberof_is_maintained_and_groups_nest(slapd: Slapd) -> None:
    conn = connect(slapd.ldap_url, slapd.bind_dn, slapd.bind_password)
    assert conn.bind()

    def member_of(dn: str) -> set[str]:
        # memberOf is operational in OpenLDAP: it must be asked for by name.
        conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["memberOf"])
        return {value.decode() for value in conn.response[0]["raw_attributes"]["memberOf"]}

    assert member_of(slapd.user_dn("alice")) == {slapd.group_dn("staff"),
                                                 slapd.group_dn("finance")}
    assert member_of(slapd.user_dn("bob")) == {slapd.group_dn("staff"), slapd.group_dn("emea")}
    assert member_of(slapd.user_dn("carol")) == {slapd.group_dn("staff")}
    assert member_of(slapd.group_dn("emea")) == {slapd.group_dn("sales")}
    # The reverse lookup a group search would do.
    conn.search(slapd.groups_dn, f"(member={slapd.user_dn('bob')})", attributes=["cn"])
    assert sorted(entry["attributes"]["cn"][0] for entry in conn.response) == ["emea", "staff"]
    conn.unbind()
