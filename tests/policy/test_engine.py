"""The VPN access policy: rules as written in portcullis.toml, first match wins, default
deny, and every decision says which rule and which condition decided it."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from portcullis.policy import (
    DEFAULT_DENY,
    AccessPolicy,
    Destination,
    PolicyRule,
    Subject,
    check_unique_names,
)

ALICE = Subject("alice", frozenset({"staff"}))
BOB = Subject("bob", frozenset({"contractors"}))


def rule(name: str = "r", action: str = "allow", **fields: Any) -> PolicyRule:
    return PolicyRule.model_validate({"name": name, "action": action, **fields})


def to(address: str | None = None, port: int = 443,
       protocol: Literal["tcp", "udp", "icmp"] = "tcp", host: str | None = None) -> Destination:
    return Destination(host, ip_address(address) if address else None, port, protocol)


def allowed(policy_rule: PolicyRule, destination: Destination, subject: Subject = ALICE) -> bool:
    return AccessPolicy([policy_rule]).decide(subject, destination).allowed


# --- networks ------------------------------------------------------------------------


def test_an_ipv4_network_admits_its_first_and_last_address() -> None:
    r = rule(networks=["10.1.0.0/16"])
    assert allowed(r, to("10.1.0.0"))
    assert allowed(r, to("10.1.255.255"))


def test_an_ipv4_network_refuses_the_addresses_just_outside_it() -> None:
    r = rule(networks=["10.1.0.0/16"])
    assert not allowed(r, to("10.0.255.255"))
    assert not allowed(r, to("10.2.0.0"))


def test_an_ipv6_network_admits_its_edges_and_refuses_its_neighbours() -> None:
    r = rule(networks=["fd00:1::/64"])
    assert allowed(r, to("fd00:1::"))
    assert allowed(r, to("fd00:1::ffff:ffff:ffff:ffff"))
    assert not allowed(r, to("fd00:0:0:0:ffff:ffff:ffff:ffff"))
    assert not allowed(r, to("fd00:1:0:1::"))


def test_a_bare_address_is_a_network_of_one_address() -> None:
    assert rule(networks=["10.9.9.9", "fd00::1"]).networks == (
        ip_network("10.9.9.9/32"), ip_network("fd00::1/128"))
    r = rule(networks=["10.9.9.9", "fd00::1"])
    assert allowed(r, to("10.9.9.9"))
    assert not allowed(r, to("10.9.9.10"))
    assert allowed(r, to("fd00::1"))
    assert not allowed(r, to("fd00::2"))


def test_an_ipv4_network_does_not_match_an_ipv6_address_with_the_same_bits() -> None:
    # ::a01:203 has the integer value of 10.1.2.3 but is another address.
    assert not allowed(rule(networks=["10.1.0.0/16"]), to("::10.1.2.3"))


def test_an_ipv4_mapped_ipv6_address_meets_the_ipv4_rules() -> None:
    policy = AccessPolicy([rule("no-ten", "deny", networks=["10.0.0.0/8"]), rule("all")])
    decision = policy.decide(ALICE, to("::ffff:10.1.2.3"))
    assert not decision.allowed
    assert decision.rule == "no-ten"


def test_an_unresolved_destination_does_not_match_networks_and_the_check_says_so() -> None:
    decision = AccessPolicy([rule("net", networks=["10.1.0.0/16"])]).decide(
        ALICE, to(host="wiki.corp.example"))
    assert not decision.allowed
    assert decision.checks[0].why == "address not resolved, so not checked against 10.1.0.0/16"


# --- ports and protocols -------------------------------------------------------------


@pytest.mark.parametrize(("port", "admitted"), [(7999, False), (8000, True), (8099, True),
                                                (8100, False)])
def test_a_port_range_admits_exactly_lo_to_hi(port: int, admitted: bool) -> None:
    assert allowed(rule(ports=["8000-8099"]), to("10.0.0.1", port)) is admitted


@pytest.mark.parametrize(("port", "admitted"), [(442, False), (443, True), (444, False)])
def test_a_single_port_admits_only_itself(port: int, admitted: bool) -> None:
    assert allowed(rule(ports=["443"]), to("10.0.0.1", port)) is admitted


def test_ports_at_the_ends_of_the_port_space_are_accepted() -> None:
    assert rule(ports=["1", "65535", "1-65535"]).ports == ((1, 1), (65535, 65535), (1, 65535))


def test_ports_may_be_written_as_numbers() -> None:
    assert rule(ports=[443, "8000 - 8099"]).ports == ((443, 443), (8000, 8099))


def test_empty_ports_admit_any_port() -> None:
    assert allowed(rule(), to("10.0.0.1", 1))
    assert allowed(rule(), to("10.0.0.1", 65535))


def test_a_tcp_rule_does_not_match_udp() -> None:
    decision = AccessPolicy([rule("web", protocols=["tcp"])]).decide(ALICE, to("10.0.0.1",
                                                                                protocol="udp"))
    assert not decision.allowed
    assert decision.checks[0].why == "udp not in tcp"


def test_empty_protocols_admit_icmp() -> None:
    assert allowed(rule(), to("10.0.0.1", 0, "icmp"))


def test_a_rule_for_ports_does_not_cover_icmp_unless_it_names_icmp() -> None:
    decision = AccessPolicy([rule("no-ssh", action="deny", ports=["22"])]).decide(
        ALICE, to("10.0.0.1", 0, "icmp"))
    assert decision.rule is None
    assert "icmp has no port and the rule is for ports 22" in decision.checks[0].why


def test_icmp_ignores_ports() -> None:
    decision = AccessPolicy([rule("ping", ports=["443"], protocols=["icmp"])]).decide(
        ALICE, to("10.0.0.1", 0, "icmp"))
    assert decision.allowed
    assert "icmp has no port" in decision.reason


def test_protocols_are_written_in_any_case() -> None:
    assert rule(protocols=["TCP", "Udp"]).protocols == ("tcp", "udp")


# --- host names ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["a.lab.corp.example", "x.y.lab.corp.example"])
def test_a_wildcard_matches_any_subdomain(host: str) -> None:
    assert allowed(rule(hosts=["*.lab.corp.example"]), to(host=host))


@pytest.mark.parametrize("host", ["lab.corp.example", "evillab.corp.example",
                                  "lab.corp.example.evil.example", "corp.example"])
def test_a_wildcard_matches_neither_its_parent_nor_a_lookalike(host: str) -> None:
    assert not allowed(rule(hosts=["*.lab.corp.example"]), to(host=host))


@pytest.mark.parametrize("host", ["wiki.corp.example", "WIKI.Corp.Example",
                                  "wiki.corp.example."])
def test_a_name_matches_whatever_its_case_and_trailing_dot(host: str) -> None:
    assert allowed(rule(hosts=["wiki.corp.example"]), to(host=host))


def test_a_pattern_is_written_in_any_case_and_with_a_trailing_dot() -> None:
    r = rule(hosts=["Wiki.Corp.Example.", "*.LAB.corp.example."])
    assert r.hosts == ("wiki.corp.example", "*.lab.corp.example")
    assert allowed(r, to(host="a.lab.corp.example"))


def test_an_exact_name_does_not_match_its_subdomains() -> None:
    assert not allowed(rule(hosts=["wiki.corp.example"]), to(host="a.wiki.corp.example"))


def test_a_destination_matches_by_name_or_by_address() -> None:
    r = rule(networks=["10.1.0.0/16"], hosts=["wiki.corp.example"])
    assert allowed(r, to("192.0.2.1", host="wiki.corp.example"))
    assert allowed(r, to("10.1.2.3", host="other.corp.example"))
    assert not allowed(r, to("192.0.2.1", host="other.corp.example"))


def test_a_destination_given_as_an_address_does_not_match_a_hosts_only_rule() -> None:
    assert not allowed(rule(hosts=["wiki.corp.example"]), to("10.1.2.3"))


def test_a_non_ascii_destination_name_is_denied_before_any_rule() -> None:
    # "ſecret" (long s) resolves as "secret" in IDNA: it must not slip past a deny rule.
    policy = AccessPolicy([rule("no-secret", "deny", hosts=["secret.corp.example"]),
                           rule("all")])
    decision = policy.decide(ALICE, to("10.0.0.1", host="ſecret.corp.example"))
    assert not decision.allowed
    assert decision.rule is None
    assert decision.checks == ()
    assert "is not an ASCII host name" in decision.reason


def test_a_destination_name_with_an_empty_label_is_denied() -> None:
    assert not allowed(rule(), to("10.0.0.1", host="wiki..corp.example"))


# --- subject -------------------------------------------------------------------------


def test_a_listed_user_matches_whatever_their_groups() -> None:
    assert allowed(rule(users=["bob"], groups=["staff"]), to("10.0.0.1"), BOB)


def test_a_member_of_a_listed_group_matches() -> None:
    assert allowed(rule(groups=["admins", "staff"]), to("10.0.0.1"), ALICE)


def test_someone_neither_listed_nor_a_member_does_not_match() -> None:
    decision = AccessPolicy([rule("staff", users=["carol"], groups=["staff"])]).decide(
        BOB, to("10.0.0.1"))
    assert not decision.allowed
    assert decision.checks[0].why == (
        "user bob is not one of users carol and in none of groups staff")


def test_a_rule_without_users_or_groups_matches_everyone_signed_in() -> None:
    assert allowed(rule(), to("10.0.0.1"), BOB)


def test_groups_are_compared_exactly() -> None:
    assert not allowed(rule(groups=["Staff"]), to("10.0.0.1"), ALICE)


def test_user_names_in_rules_are_compared_in_canonical_form() -> None:
    r = rule(users=[" Carol "])
    assert r.users == ("carol",)
    assert allowed(r, to("10.0.0.1"), Subject("carol", frozenset()))
    assert allowed(r, to("10.0.0.1"), Subject("CAROL", frozenset()))


# --- order and the decision's reason -------------------------------------------------


def test_a_deny_rule_before_an_allow_rule_wins() -> None:
    policy = AccessPolicy([rule("no-db", "deny", ports=["5432"]), rule("staff-all")])
    decision = policy.decide(ALICE, to("10.0.0.1", 5432))
    assert (decision.allowed, decision.rule) == (False, "no-db")
    assert decision.reason.startswith('denied by rule "no-db": ')


def test_an_allow_rule_before_a_deny_rule_wins() -> None:
    policy = AccessPolicy([rule("db-admins", users=["alice"], ports=["5432"]),
                           rule("no-db", "deny", ports=["5432"])])
    decision = policy.decide(ALICE, to("10.0.0.1", 5432))
    assert (decision.allowed, decision.rule) == (True, "db-admins")


def test_nothing_matching_is_a_default_deny() -> None:
    decision = AccessPolicy([rule("web", ports=["443"])]).decide(ALICE, to("10.0.0.1", 22))
    assert (decision.allowed, decision.rule, decision.reason) == (False, None, DEFAULT_DENY)
    assert DEFAULT_DENY == "no rule matched: default deny"


def test_no_rules_at_all_is_a_default_deny() -> None:
    decision = AccessPolicy([]).decide(ALICE, to("10.0.0.1"))
    assert (decision.allowed, decision.rule, decision.checks) == (False, None, ())


def test_the_reason_names_the_rule_and_every_condition_that_held() -> None:
    policy = AccessPolicy([rule("staff-web", groups=["staff"], networks=["10.1.0.0/16"],
                                ports=["443"], protocols=["tcp"])])
    assert policy.decide(ALICE, to("10.1.2.3", 443)).reason == (
        'allowed by rule "staff-web": user alice in group staff; 10.1.2.3 in 10.1.0.0/16;'
        " port 443 in 443; tcp")


def test_the_checks_name_each_rule_looked_at_and_its_failing_condition() -> None:
    policy = AccessPolicy([
        rule("db", networks=["10.5.0.0/16"]),
        rule("web", ports=["443", "8000-8099"]),
        rule("any"),
        rule("never-reached", "deny"),
    ])
    decision = policy.decide(ALICE, to("10.1.2.3", 22))
    assert [(c.rule, c.matched, c.why) for c in decision.checks] == [
        ("db", False, "10.1.2.3 in none of networks 10.5.0.0/16"),
        ("web", False, "port 22 not in 443, 8000-8099"),
        ("any", True, "any signed-in user; any destination; any port; any protocol"),
    ]


def test_explain_prints_every_check_then_the_reason() -> None:
    policy = AccessPolicy([rule("web", hosts=["wiki.corp.example"]), rule("any", "deny")])
    assert policy.decide(ALICE, to(host="mail.corp.example")).explain() == (
        "skip   web: host mail.corp.example matches none of wiki.corp.example\n"
        "match  any: any signed-in user; any destination; any port; any protocol\n"
        'denied by rule "any": any signed-in user; any destination; any port; any protocol')


# --- networks_for --------------------------------------------------------------------


def test_networks_for_lists_the_allow_rules_networks_that_apply_in_order() -> None:
    policy = AccessPolicy([
        rule("no-db", "deny", networks=["10.5.0.0/16"]),
        rule("staff", groups=["staff"], networks=["10.1.0.0/16", "fd00:1::/64"]),
        rule("carol", users=["carol"], networks=["10.7.0.0/16"]),
        rule("wiki", hosts=["wiki.corp.example"]),
        rule("all", networks=["10.1.0.0/16", "10.9.9.9"]),
    ])
    assert policy.networks_for(ALICE) == [
        IPv4Network("10.1.0.0/16"), IPv6Network("fd00:1::/64"), IPv4Network("10.9.9.9/32")]
    assert policy.networks_for(BOB) == [IPv4Network("10.1.0.0/16"), IPv4Network("10.9.9.9/32")]


# --- validation ----------------------------------------------------------------------


class _Document(BaseModel):
    """Stands in for Settings: a list of rules under the key `policies`."""

    policies: list[PolicyRule]


def validation_error(**fields: Any) -> tuple[str, str]:
    """Where the loader would point (the dotted key) and the message it would print.
    A field given as None is left out of the rule."""
    fields = {key: value for key, value in {"name": "r", "action": "allow", **fields}.items()
              if value is not None}
    with pytest.raises(ValidationError) as caught:
        _Document.model_validate({"policies": [{"name": "a", "action": "allow"},
                                               {"name": "b", "action": "deny"}, fields]})
    error = caught.value.errors()[0]
    return ".".join(str(part) for part in error["loc"]), error["msg"].removeprefix(
        "Value error, ")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "Staff Web", "'Staff Web' is not a rule name: use 1-63 lowercase letters, "
                          "digits, '-' or '_', starting with a letter or digit (e.g. 'staff-web')"),
    ("name", "-web", "'-web' is not a rule name"),
    ("action", "permit", "'permit' is not an action: write \"allow\" or \"deny\""),
    ("groups", [" staff"], "' staff' is not a group name: groups are compared exactly, so "
                           "write the name without surrounding spaces or control characters"),
    ("groups", [""], "'' is not a group name"),
    ("groups", [7], "7 is not a group name (write it as a quoted string)"),
    ("users", ["a/b"], "'a/b' is not a valid user name (user names are 1-256 characters "
                       "without control characters or slashes)"),
    ("networks", ["10.0.0.0/33"], "'10.0.0.0/33' is not an IPv4 or IPv6 network (write e.g. "
                                  "'10.1.0.0/16', 'fd00:1::/64' or a single address)"),
    ("networks", ["fd00::/129"], "'fd00::/129' is not an IPv4 or IPv6 network"),
    ("networks", ["10.1.2.3/16"], "'10.1.2.3/16' has host bits set; did you mean "
                                  "'10.1.0.0/16'?"),
    ("networks", ["fe80::/64%eth0"], "'fe80::/64%eth0' has a scope id (%...); policies name "
                                     "networks without one"),
    ("networks", ["::ffff:10.0.0.0/104"], "'::ffff:10.0.0.0/104' is an IPv4-mapped IPv6 "
                                          "network: write it in IPv4 form"),
    ("hosts", ["*"], "'*' is not a host name or '*.domain' pattern (ASCII letters, digits, "
                     "'-', '_' and dots; write internationalised names in their xn-- form)"),
    ("hosts", ["wiki..corp"], "'wiki..corp' is not a host name or '*.domain' pattern"),
    ("hosts", ["a.*.example"], "'a.*.example' is not a host name or '*.domain' pattern"),
    ("hosts", ["wïki.example"], "'wïki.example' is not a host name or '*.domain' pattern"),
    ("hosts", ["10.1.2.3"], "'10.1.2.3' is an address, not a name: list it under networks"),
    ("ports", ["90-80"], "'90-80' is not a range lo-hi with lo <= hi"),
    ("ports", ["0"], "'0' is outside 1-65535"),
    ("ports", ["65536"], "'65536' is outside 1-65535"),
    ("ports", ["8000-70000"], "'8000-70000' is outside 1-65535"),
    ("ports", ["http"], "'http' is not a port or a range lo-hi (write e.g. '443' or "
                        "'8000-8099')"),
    ("ports", ["٤٤٣"], "'٤٤٣' is not a port or a range lo-hi"),
    ("ports", [True], "True is not a port (write it as a quoted string)"),
    ("protocols", ["sctp"], "'sctp' is not a protocol: use any of tcp, udp, icmp"),
    ("description", "two\nlines", "must not contain control characters or line breaks"),
])
def test_an_invalid_value_names_its_rule_field_and_what_to_write(
        field: str, value: object, message: str) -> None:
    where, said = validation_error(**{field: value})
    assert where == f"policies.2.{field}"
    assert said.startswith(message)


def test_an_unknown_key_is_refused() -> None:
    where, _ = validation_error(port=["443"])
    assert where == "policies.2.port"


def test_a_rule_without_a_name_is_refused() -> None:
    where, said = validation_error(name=None)
    assert (where, said) == ("policies.2.name", "Field required")


def test_a_rule_is_immutable() -> None:
    with pytest.raises(ValidationError):
        rule().name = "other"  # type: ignore[misc]


def test_a_name_used_twice_is_refused() -> None:
    rules = [rule("a"), rule("b"), rule("a", "deny")]
    with pytest.raises(ValueError, match=r"^policy name 'a' is used twice$"):
        check_unique_names(rules)
    with pytest.raises(ValueError, match=r"^policy name 'a' is used twice$"):
        AccessPolicy(rules)


def test_distinct_names_pass_the_uniqueness_check() -> None:
    check_unique_names([rule("a"), rule("b")])


# --- properties ----------------------------------------------------------------------

NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "fd00::/64", "fd00::1", "0.0.0.0/0"]
ADDRESSES = [None, "10.1.2.3", "10.1.2.4", "10.2.0.0", "9.255.255.255", "192.0.2.1",
             "fd00::1", "fd00::2", "fd00:0:0:1::", "::ffff:10.1.2.3"]
HOSTS = ["wiki.example", "*.lab.example", "*.x.lab.example"]
NAMES = [None, "wiki.example", "WIKI.example.", "a.lab.example", "a.x.lab.example",
         "lab.example", "evillab.example"]
PORTS = ["22", "80-443", "443", "8000-8099"]


@st.composite
def rules_strategy(draw: st.DrawFn) -> list[PolicyRule]:
    count = draw(st.integers(0, 6))
    return [PolicyRule(
        name=f"r{i}",
        action=draw(st.sampled_from(["allow", "deny"])),
        groups=draw(st.lists(st.sampled_from(["staff", "ops"]), max_size=2)),
        users=draw(st.lists(st.sampled_from(["alice", "bob"]), max_size=2)),
        networks=draw(st.lists(st.sampled_from(NETWORKS), max_size=2)),
        hosts=draw(st.lists(st.sampled_from(HOSTS), max_size=2)),
        ports=draw(st.lists(st.sampled_from(PORTS), max_size=2)),
        protocols=draw(st.lists(st.sampled_from(["tcp", "udp", "icmp"]), max_size=2)),
    ) for i in range(count)]


subjects = st.builds(Subject, st.sampled_from(["alice", "bob", "carol"]),
                     st.frozensets(st.sampled_from(["staff", "ops", "sales"])))
destinations = st.builds(
    Destination, st.sampled_from(NAMES),
    st.sampled_from(ADDRESSES).map(lambda a: ip_address(a) if a else None),
    st.sampled_from([0, 21, 22, 23, 79, 80, 443, 444, 7999, 8000, 8099, 8100]),
    st.sampled_from(["tcp", "udp", "icmp"]))


@settings(max_examples=200, deadline=None)
@given(rules_strategy(), subjects, destinations)
def test_the_first_rule_whose_check_matched_decides_and_decisions_repeat(
        rules: list[PolicyRule], subject: Subject, destination: Destination) -> None:
    policy = AccessPolicy(rules)
    decision = policy.decide(subject, destination)
    assert AccessPolicy(rules).decide(subject, destination) == decision
    matched = [check for check in decision.checks if check.matched]
    assert [check.rule for check in decision.checks] == [r.name for r in rules][
        :len(decision.checks)]
    if matched:
        assert matched == [decision.checks[-1]]
        deciding = next(r for r in rules if r.name == matched[0].rule)
        assert decision.allowed == (deciding.action == "allow")
        assert decision.rule == deciding.name
    else:
        assert len(decision.checks) == len(rules)
        assert (decision.allowed, decision.rule) == (False, None)


def _matches_as_specified(r: PolicyRule, subject: Subject, destination: Destination) -> bool:
    """The rule text of the specification, written out naively with ipaddress."""
    who = (not r.users and not r.groups) or subject.username in r.users or bool(
        set(r.groups) & subject.groups)
    address = destination.address
    if address is not None and address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    name = destination.host.lower().rstrip(".") if destination.host else None
    by_address = address is not None and any(
        address.version == net.version and address in net for net in r.networks)
    by_name = name is not None and any(
        name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
        for pattern in r.hosts)
    where = (not r.networks and not r.hosts) or by_address or by_name
    if destination.protocol == "icmp":
        port = not r.ports or "icmp" in r.protocols
    else:
        port = not r.ports or any(lo <= destination.port <= hi for lo, hi in r.ports)
    protocol = not r.protocols or destination.protocol in r.protocols
    return who and where and port and protocol


@settings(max_examples=200, deadline=None)
@given(rules_strategy(), subjects, destinations)
def test_every_check_agrees_with_the_rule_as_specified(
        rules: list[PolicyRule], subject: Subject, destination: Destination) -> None:
    decision = AccessPolicy(rules).decide(subject, destination)
    for check, r in zip(decision.checks, rules, strict=False):
        assert check.matched == _matches_as_specified(r, subject, destination), check.why
