"""The relay's own decision (portcullis.policy.relay_allow): a table of cases, the entry syntax
and its errors, and invariants checked with hypothesis."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.config.loader import parse_settings
from portcullis.errors import ConfigError
from portcullis.policy.admission import LINK_LOCAL, LOOPBACK, Protocol, guard_of
from portcullis.policy.relay_allow import decide, needs_lookup, parse_allow_entry, parse_allow_list
from portcullis.proto.mux import Reason

OWN = ip_address("198.18.9.1")
HOST = frozenset({OWN, ip_address("127.0.0.1"), ip_address("::1")})
ALLOW = parse_allow_list([
    "10.0.0.0/8:1-65535",
    "10.1.2.3:443,8443",
    "[fd00::/8]:22,80-90",
    "sta.corp.example:443",
    "localhost:8080",
    "127.0.0.1/32:8080",
    "0.0.0.0/0:9000",
    "198.18.9.1:7000",
])


@dataclass(frozen=True)
class Row:
    id: str
    asked: str
    port: int
    resolved: tuple[str, ...] = ()
    protocol: Protocol = "tcp"
    dials: str | None = None          # None: refused
    refusal: Reason = Reason.DENIED
    reason: str = ""                  # in the audit reason


ROWS = [
    Row("network entry allows an inside address", "10.9.8.7", 22, dials="10.9.8.7",
        reason="'10.0.0.0/8:1-65535'"),
    Row("a port list is exact", "172.16.0.1", 443, reason="no relay.allow entry covers it"),
    Row("udp is allowed on the same ports", "10.9.8.7", 53, protocol="udp",
        dials="10.9.8.7"),
    Row("an echo needs only the address", "10.9.8.7", 0, protocol="icmp", dials="10.9.8.7"),
    Row("an echo outside every entry", "2001:db8::1", 0, protocol="icmp",
        reason="no relay.allow entry covers it"),
    Row("ipv6 network entry", "fd00::5", 85, dials="fd00::5"),
    Row("ipv6 port outside the list", "fd00::5", 443, reason="no relay.allow entry"),
    Row("mapped ipv4 is ipv4", "::ffff:10.1.1.1", 80, dials="10.1.1.1"),
    Row("name entry, resolved at the relay", "sta.corp.example", 443, ("10.5.5.5",),
        dials="10.5.5.5", reason="'sta.corp.example:443'"),
    Row("name entry matches case and the root dot", "STA.corp.example.", 443, ("10.5.5.5",),
        dials="10.5.5.5"),
    Row("name entry on another port", "sta.corp.example", 80, ("10.5.5.5",),
        reason="no relay.allow entry names it"),
    Row("name not in the list", "evil.example", 443, ("10.5.5.5",),
        reason="no relay.allow entry names it"),
    Row("name that did not resolve", "sta.corp.example", 443, (),
        refusal=Reason.NAME_NOT_FOUND, reason="did not resolve"),
    Row("a name never opens the relay's loopback", "sta.corp.example", 443, ("127.0.0.1",),
        reason="the relay host's loopback"),
    Row("a name skips the loopback, dials the next", "sta.corp.example", 443,
        ("127.0.0.1", "10.5.5.5"), dials="10.5.5.5", reason="not at: 127.0.0.1"),
    Row("a name resolving to metadata is refused", "sta.corp.example", 443,
        ("169.254.169.254",), reason="link-local"),
    Row("a name resolving to the relay's own address", "sta.corp.example", 443,
        ("198.18.9.1",), reason="own interfaces"),
    Row("a name resolving to loopback a network entry names", "localhost", 8080,
        ("127.0.0.1",), dials="127.0.0.1"),
    Row("loopback named by a network entry", "127.0.0.1", 8080, dials="127.0.0.1",
        reason="'127.0.0.1/32:8080'"),
    Row("loopback covered only by 0.0.0.0/0", "127.0.0.1", 9000,
        reason="'0.0.0.0/0:9000' is wider"),
    Row("another loopback address", "127.0.0.2", 8080, reason="no relay.allow entry covers"),
    Row("ipv6 loopback", "::1", 22, reason="no relay.allow entry covers it"),
    Row("the relay's own address named by an entry", "198.18.9.1", 7000, dials="198.18.9.1"),
    Row("the relay's own address covered by 0.0.0.0/0", "198.18.9.1", 9000,
        reason="own interfaces"),
    Row("metadata covered by 0.0.0.0/0", "169.254.169.254", 9000, reason="link-local"),
    Row("unspecified is never a destination", "0.0.0.0", 9000,
        reason="unspecified address (it would reach the relay host itself)"),
    Row("multicast is never a destination", "224.0.0.1", 9000, reason="multicast"),
    Row("broadcast is never a destination", "255.255.255.255", 9000, reason="broadcast"),
    Row("not a host name", "bad name!", 443, reason="not a valid host name"),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_the_relay_decision_matches_every_row_of_the_table(row: Row) -> None:
    resolved = [ip_address(a) for a in row.resolved]
    looked_up = resolved if needs_lookup(ALLOW, row.asked, row.port, row.protocol) else None
    decision = decide(ALLOW, row.asked, row.port, row.protocol, looked_up, HOST)
    assert row.reason in decision.reason, decision.reason
    if row.dials is None:
        assert not decision.allowed and decision.address is None
        assert decision.refusal == row.refusal
    else:
        assert decision.allowed, decision.reason
        assert decision.address == ip_address(row.dials)
        assert decision.refusal == Reason.NONE


@pytest.mark.parametrize(("written", "network", "name", "ports"), [
    ("10.0.0.0/8:1-65535", "10.0.0.0/8", None, ((1, 65535),)),
    ("10.1.2.3:443,8443", "10.1.2.3/32", None, ((443, 443), (8443, 8443))),
    ("[fd00::/8]:1-65535", "fd00::/8", None, ((1, 65535),)),
    ("[fd00::5]:22", "fd00::5/128", None, ((22, 22),)),
    ("Sta.Corp.Example.:443", None, "sta.corp.example", ((443, 443),)),
    (" intranet_host:80, 8000-8099 ", None, "intranet_host", ((80, 80), (8000, 8099))),
])
def test_an_allow_entry_is_read_as_written(written: str, network: str | None,
                                            name: str | None,
                                            ports: tuple[tuple[int, int], ...]) -> None:
    entry = parse_allow_entry(written)
    assert (str(entry.network) if entry.network else None) == network
    assert entry.name == name
    assert entry.ports == ports


@pytest.mark.parametrize(("written", "says"), [
    ("10.0.0.0/8", "is not an allow entry"),
    ("10.0.0.0/8:", "names no port"),
    ("10.0.0.1/8:443", "host bits set"),
    ("10.0.0.0/8:0", "outside 1-65535"),
    ("10.0.0.0/8:70000", "outside 1-65535"),
    ("10.0.0.0/8:90-80", "lo <= hi"),
    ("10.0.0.0/8:http", "not a port"),
    ("[10.0.0.0/8]:443", "brackets are for IPv6"),
    ("[fd00::]/8:443", "is not an allow entry"),
    ("fd00::/8:443", "is not an allow entry"),
    ("bad name:443", "neither a network nor a host name"),
    ("bücher.example:443", "neither a network nor a host name"),
    ("[fe80::1%eth0]:22", "scope id"),
])
def test_a_bad_allow_entry_is_refused_with_a_message_naming_it(written: str,
                                                               says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        parse_allow_entry(written)
    assert repr(written) in str(caught.value)


def test_a_bad_allow_entry_fails_the_configuration_load_naming_relay_allow() -> None:
    text = '[relay]\nallow = ["10.0.0.0/8:1-65535", "10.0.0.0/8:http"]\n'
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, path=Path("portcullis.toml"))
    assert caught.value.key == "relay.allow"
    assert "'10.0.0.0/8:http'" in str(caught.value)


def test_the_relay_resolves_only_names_a_name_entry_allows_on_that_port() -> None:
    assert needs_lookup(ALLOW, "sta.corp.example", 443, "tcp")
    assert not needs_lookup(ALLOW, "sta.corp.example", 80, "tcp")
    assert not needs_lookup(ALLOW, "elsewhere.example", 443, "tcp")
    assert not needs_lookup(ALLOW, "10.0.0.1", 443, "tcp")


addresses = st.one_of(
    st.ip_addresses(v=4).map(IPv4Address),
    st.ip_addresses(v=6).map(IPv6Address),
    st.sampled_from(["127.0.0.1", "127.5.5.5", "::1", "169.254.169.254", "fe80::1",
                     "198.18.9.1", "0.0.0.0", "::", "224.0.0.1", "10.1.2.3"]).map(ip_address),
)
entries = st.lists(st.sampled_from([
    "0.0.0.0/0:1-65535", "[::/0]:1-65535", "10.0.0.0/8:1-65535", "127.0.0.0/8:80",
    "127.0.0.1/32:1-65535", "169.254.169.254:80", "sta.corp.example:443",
    "198.18.0.0/15:1-65535", "198.18.9.1:22", "[fe80::/10]:1-65535"]), max_size=5)


@given(entries, addresses, st.integers(1, 65535),
       st.sampled_from(["tcp", "udp", "icmp"]))
def test_an_address_literal_is_allowed_only_by_an_entry_covering_it_and_never_guarded_by_a_wider_one(  # noqa: E501
        written: list[str], address: IPv4Address | IPv6Address, port: int,
        protocol: Protocol) -> None:
    allow = parse_allow_list(written)
    decision = decide(allow, str(address), port, protocol, None, HOST)
    if not decision.allowed:
        return
    assert decision.address is not None
    entry = next(e for e in allow if e.written == decision.entry)
    assert entry.covers_address(decision.address, port, protocol)
    assert not (decision.address.is_unspecified or decision.address.is_multicast)
    guard = guard_of(decision.address, HOST)
    if guard is not None:
        assert entry.network is not None and entry.network.subnet_of(guard.network)  # type: ignore[arg-type]


@given(entries, st.lists(addresses, max_size=4), st.integers(1, 65535))
def test_a_name_never_reaches_the_relay_host_unless_a_network_entry_names_it(
        written: list[str], resolved: list[IPv4Address | IPv6Address], port: int) -> None:
    allow = parse_allow_list(written)
    decision = decide(allow, "sta.corp.example", port, "tcp", resolved, HOST)
    if not decision.allowed:
        return
    assert decision.address in [a.ipv4_mapped or a if isinstance(a, IPv6Address) else a
                                for a in resolved]
    guarded = [n for n in (*LOOPBACK, *LINK_LOCAL) if decision.address in n]
    if guarded or decision.address == OWN:
        network = guard_of(decision.address, HOST)
        assert network is not None
        assert any(e.network is not None and decision.address in e.network
                   and e.network.subnet_of(network.network)  # type: ignore[arg-type]
                   for e in allow)
