"""The one admission decision (portcullis.policy.admission): the table of cases drives
the pure function and `policy explain`; hypothesis checks the invariants."""

from __future__ import annotations

import asyncio
import tomllib
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.admission_table import POLICIES, ROWS, USERS, Row, fill
from portcullis.config.model import Settings
from portcullis.errors import DialError
from portcullis.net.destinations import HostAddresses, read_interface_addresses, resolve
from portcullis.policy import AccessPolicy, PolicyRule, Subject
from portcullis.policy.admission import (
    LINK_LOCAL,
    LOOPBACK,
    Address,
    Admission,
    admit,
    guard_of,
    needs_lookup,
    parse_address,
    resource_policy,
)
from portcullis.policy.explain import Who, explain
from portcullis.proto.mux import Reason

OWN, OWN_NET, PORT = "198.18.7.1", "198.18.7.0/30", 8080
HOST_ADDRESSES = frozenset({ip_address(OWN), ip_address("127.0.0.1"), ip_address("::1"),
                            ip_address("fd00::2")})


def table_policy() -> AccessPolicy:
    text = fill(POLICIES, OWN, OWN_NET, PORT)
    return AccessPolicy([PolicyRule.model_validate(r) for r in tomllib.loads(text)["policies"]])


def subject(user: str) -> Subject:
    return Subject(user, frozenset({USERS[user]}))


def filled(row: Row) -> tuple[str, int, tuple[str, ...], str]:
    """The row's destination, port, resolved addresses and reason with placeholders set."""
    port = int(fill(str(row.port), OWN, OWN_NET, PORT))
    return (fill(row.asked, OWN, OWN_NET, PORT), port,
            tuple(fill(a, OWN, OWN_NET, PORT) for a in row.resolved),
            fill(row.reason, OWN, OWN_NET, PORT))


def decide_as_the_gateway(policy: AccessPolicy, row: Row) -> Admission:
    """What the tunnel does: look the name up only if needs_lookup says so, then admit."""
    asked, port, resolved, _ = filled(row)
    who = subject(row.user)
    looked_up = ([ip_address(a) for a in resolved]
                 if needs_lookup(policy, who, asked, port, row.protocol) else None)
    return admit(policy, who, asked, port, row.protocol, looked_up,
                 host_addresses=HOST_ADDRESSES)


def check(row: Row, allowed: bool, reason: str, told: str, address: Address | None) -> None:
    expected_reason = filled(row)[3]
    assert allowed == row.allowed, reason
    assert expected_reason in reason, reason
    if row.allowed:
        assert address == ip_address(fill(row.dials or "", OWN, OWN_NET, PORT))
    else:
        assert address is None
        assert row.told in told, told


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_the_admission_decision_matches_every_row_of_the_table(row: Row) -> None:
    decided = decide_as_the_gateway(table_policy(), row)
    check(row, decided.allowed, decided.reason, decided.refusal, decided.address)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_policy_explain_agrees_with_the_gateway_on_every_row(row: Row) -> None:
    asked, port, resolved, _ = filled(row)
    configured = Settings.model_validate(
        {"policies": tomllib.loads(fill(POLICIES, OWN, OWN_NET, PORT))["policies"]})

    async def resolver(host: str, port: int) -> list[Address]:
        if not resolved:
            raise DialError(f"cannot resolve {host}: unknown", Reason.NAME_NOT_FOUND)
        return [ip_address(a) for a in resolved]

    target = f"{asked}/icmp" if row.protocol == "icmp" else f"[{asked}]:{port}/{row.protocol}"
    admission, lines = asyncio.run(explain(configured, Who(subject(row.user), "user"), target,
                                           resolver=resolver, host_addresses=HOST_ADDRESSES))
    assert admission == decide_as_the_gateway(table_policy(), row)
    assert ("ALLOWED" if row.allowed else "DENIED") in lines
    assert admission.reason in lines
    check(row, admission.allowed, "\n".join(lines), admission.refusal, admission.address)


# --- invariants -------------------------------------------------------------------------

NETWORKS = st.sampled_from(["0.0.0.0/0", "::/0", "10.0.0.0/8", "127.0.0.0/8", "127.0.0.0/9",
                            "169.254.0.0/16", "169.254.169.254/32", "fe80::/10",
                            "198.18.7.0/30", "198.18.7.1/32", "::1/128", "fd00::/8"])
RULES = st.lists(st.builds(
    lambda i, action, networks, hosts: {"name": f"r{i}", "action": action,
                                        "networks": networks, "hosts": hosts},
    st.integers(), st.sampled_from(["allow", "allow", "deny"]),
    st.lists(NETWORKS, max_size=2), st.sampled_from([[], [], ["*.corp.example"]])),
    max_size=4, unique_by=lambda r: r["name"])
PROTECTED = st.one_of(
    st.sampled_from([ip_address(a) for a in
                     ("127.0.0.1", "127.255.255.254", "::1", "169.254.169.254", "fe80::1",
                      OWN, "fd00::2")]),
    st.integers(0x7F000000, 0x7FFFFFFF).map(IPv4Address),
    st.integers(0xA9FE0000, 0xA9FEFFFF).map(IPv4Address))
ANY_ADDRESS = st.one_of(st.integers(0, 2**32 - 1).map(IPv4Address), PROTECTED,
                        st.integers(0, 2**128 - 1).map(IPv6Address))


def policy_of(rules: list[dict[str, Any]]) -> AccessPolicy:
    return AccessPolicy([PolicyRule.model_validate(r) for r in rules])


def named_explicitly(policy: AccessPolicy, rule: str | None, address: Address) -> bool:
    """Does the deciding rule list a network inside the address's protected range?"""
    guard = guard_of(address, HOST_ADDRESSES)
    assert guard is not None and rule is not None
    return any(n.version == address.version and address in n
               and n.subnet_of(guard.network)   # type: ignore[arg-type]
               for n in policy.rule_named(rule).networks)


@settings(max_examples=300, deadline=None)
@given(RULES, PROTECTED, st.sampled_from(["tcp", "udp", "icmp"]))
def test_no_protected_address_is_allowed_without_a_network_naming_it(
        rules: list[dict[str, Any]], address: Address, protocol: Any) -> None:
    policy = policy_of(rules)
    for asked, resolved in ((str(address), None), ("db.corp.example", [address])):
        decided = admit(policy, Subject("u", frozenset()), asked, 443, protocol, resolved,
                        host_addresses=HOST_ADDRESSES)
        if decided.allowed:
            assert named_explicitly(policy, decided.rule, address), decided.reason


@settings(max_examples=300, deadline=None)
@given(RULES, st.integers(0, 2**32 - 1).map(IPv4Address), st.integers(1, 65535))
def test_an_ipv4_mapped_address_decides_exactly_as_its_ipv4_address(
        rules: list[dict[str, Any]], address: IPv4Address, port: int) -> None:
    policy = policy_of(rules)
    mapped = IPv6Address(f"::ffff:{address}")
    who = Subject("u", frozenset())
    assert (admit(policy, who, str(mapped), port, "tcp", host_addresses=HOST_ADDRESSES)
            == admit(policy, who, str(address), port, "tcp", host_addresses=HOST_ADDRESSES))
    assert (admit(policy, who, "x.corp.example", port, "tcp", [mapped],
                  host_addresses=HOST_ADDRESSES)
            == admit(policy, who, "x.corp.example", port, "tcp", [address],
                     host_addresses=HOST_ADDRESSES))


@settings(max_examples=300, deadline=None)
@given(RULES, st.lists(ANY_ADDRESS, min_size=1, max_size=4))
def test_the_address_to_dial_is_always_one_of_those_resolved_and_itself_admitted(
        rules: list[dict[str, Any]], resolved: list[Address]) -> None:
    policy = policy_of(rules)
    who = Subject("u", frozenset())
    decided = admit(policy, who, "db.corp.example", 443, "tcp", resolved,
                    host_addresses=HOST_ADDRESSES)
    if decided.allowed:
        assert decided.address in resolved
        # Checked alone, the address dialled is admitted by the same rule.
        alone = admit(policy, who, "db.corp.example", 443, "tcp", [decided.address],
                      host_addresses=HOST_ADDRESSES)
        assert alone.allowed and alone.rule == decided.rule
    else:
        assert decided.address is None and decided.refusal


@settings(max_examples=200, deadline=None)
@given(RULES, st.sampled_from(["0.0.0.0", "::", "0.1.2.3", "224.0.0.1", "239.1.2.3",
                               "ff02::1", "255.255.255.255", "::ffff:0.0.0.0"]))
def test_unspecified_multicast_and_broadcast_are_refused_whatever_the_rules(
        rules: list[dict[str, Any]], address: str) -> None:
    everything = [{"name": "all-v4", "action": "allow", "networks": ["0.0.0.0/0"]},
                  {"name": "all-v6", "action": "allow", "networks": ["::/0"]}]
    for policy in (policy_of(rules), policy_of(everything)):
        assert not admit(policy, Subject("u", frozenset()), address, 53, "udp",
                         host_addresses=HOST_ADDRESSES).allowed


def test_loopback_and_link_local_are_the_ranges_the_issue_names() -> None:
    assert {str(n) for n in LOOPBACK + LINK_LOCAL} == {
        "127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10"}


# --- name lookup gating -------------------------------------------------------------------


def test_a_name_is_looked_up_only_for_users_some_rule_could_allow_there() -> None:
    policy = table_policy()
    assert needs_lookup(policy, subject("hannah"), "wiki.corp.example", 443, "tcp")
    assert not needs_lookup(policy, subject("hannah"), "intranet.example", 443, "tcp")
    assert needs_lookup(policy, subject("lou"), "intranet.example", 443, "tcp")   # networks
    assert not needs_lookup(policy, subject("bob"), "wiki.corp.example", 443, "tcp")
    assert not needs_lookup(policy, subject("alice"), "10.1.2.3", 443, "tcp")    # a literal
    assert not needs_lookup(policy, subject("alice"), "ſecret.corp.example", 443, "tcp")
    assert not needs_lookup(policy, subject("alice"), "a..b", 443, "tcp")


def test_a_tunnel_with_a_pool_address_reaches_only_its_own_family() -> None:
    policy = table_policy()
    decided = admit(policy, subject("alice"), "dual.corp.example", 443, "tcp",
                    [ip_address("fd00::5"), ip_address("10.1.2.3")], pool_family=4)
    assert decided.allowed and decided.address == ip_address("10.1.2.3")
    only_v6 = admit(policy, subject("alice"), "v6.corp.example", 443, "tcp",
                    [ip_address("fd00::5")], pool_family=4)
    assert not only_v6.allowed
    assert "has no IPv4 address" in only_v6.reason
    assert only_v6.refusal == "the tunnel reaches only IPv4 destinations"


# --- launches -----------------------------------------------------------------------------


def test_a_resource_written_as_a_loopback_literal_is_the_administrators_choice() -> None:
    who = Subject("alice", frozenset())
    decided = admit(resource_policy("127.0.0.1"), who, "127.0.0.1", 8080, "tcp",
                    host_addresses=HOST_ADDRESSES)
    assert decided.allowed and decided.address == ip_address("127.0.0.1")


@pytest.mark.parametrize("resolved", ["127.0.0.1", "169.254.169.254", OWN, "::1"])
def test_a_resource_name_resolving_to_the_gateway_host_or_link_local_is_refused(
        resolved: str) -> None:
    policy = resource_policy("app.corp.example")
    who = Subject("alice", frozenset())
    assert needs_lookup(policy, who, "app.corp.example", 443, "tcp")
    decided = admit(policy, who, "app.corp.example", 443, "tcp", [ip_address(resolved)],
                    host_addresses=HOST_ADDRESSES)
    assert not decided.allowed
    assert f"{resolved} is" in decided.reason and "only a rule naming it" in decided.reason


def test_a_resource_name_resolving_to_an_intranet_address_is_dialled_there() -> None:
    decided = admit(resource_policy("app.corp.example"), Subject("alice", frozenset()),
                    "app.corp.example", 443, "tcp",
                    [ip_address("127.0.0.1"), ip_address("10.1.2.3")],
                    host_addresses=HOST_ADDRESSES)
    assert decided.allowed and decided.address == ip_address("10.1.2.3")


def test_a_resource_at_the_unspecified_address_is_refused_even_as_a_literal() -> None:
    assert not admit(resource_policy("0.0.0.0"), Subject("alice", frozenset()), "0.0.0.0",
                     80, "tcp").allowed


# --- the I/O side ---------------------------------------------------------------------------


def test_the_host_addresses_include_loopback_and_are_read_again_when_stale() -> None:
    assert {ip_address("127.0.0.1")} <= read_interface_addresses()
    now = [0.0]
    reads: list[frozenset[Address]] = [frozenset({ip_address("10.0.0.1")}),
                                       frozenset({ip_address("10.0.0.2")})]
    addresses = HostAddresses(2.0, read=lambda: reads.pop(0), clock=lambda: now[0])
    assert addresses.current() == {ip_address("10.0.0.1")}
    now[0] = 1.9
    assert addresses.current() == {ip_address("10.0.0.1")}
    now[0] = 2.0
    assert addresses.current() == {ip_address("10.0.0.2")}


def test_resolving_localhost_gives_loopback_and_an_unknown_name_a_dial_error() -> None:
    found = asyncio.run(resolve("localhost", 80))
    assert found and all(any(a in n for n in LOOPBACK) for a in found)
    with pytest.raises(DialError) as raised:
        asyncio.run(resolve("no-such-host.invalid", 80))
    assert raised.value.reason is Reason.NAME_NOT_FOUND


def test_explain_prints_what_the_client_is_told_when_refused() -> None:
    configured = Settings.model_validate({"policies": [{"name": "all", "action": "allow"}]})

    async def never(host: str, port: int) -> list[Address]:
        raise AssertionError("a literal is not looked up")

    admission, lines = asyncio.run(explain(
        configured, Who(Subject("alice", frozenset()), "user alice"), "127.0.0.1:6379/tcp",
        resolver=never, host_addresses=frozenset()))
    assert lines[0] == "user alice" and "DENIED" in lines
    assert "the client is told: the gateway host is never a destination" in lines
    assert not admission.allowed and admission.address is None


def test_a_destination_is_parsed_once_and_the_parsed_ones_are_bounded() -> None:
    first = parse_address("::ffff:10.0.0.7")
    assert first == IPv4Address("10.0.0.7")
    assert parse_address("::ffff:10.0.0.7") is first   # remembered, not parsed again
    assert parse_address("intranet.example") is None
    assert parse_address.cache_info().maxsize is not None   # clients choose the strings


def test_a_resource_policy_is_built_once_per_address() -> None:
    policy = resource_policy("10.0.0.7")
    assert resource_policy("10.0.0.7") is policy
    assert resource_policy("intranet.example") is not policy
    assert resource_policy.cache_info().maxsize is not None
