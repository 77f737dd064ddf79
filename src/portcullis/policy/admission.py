"""The one admission decision: may a stream, datagram flow or echo go out, and to which
address. The tunnel endpoint, launches and `portcullis policy explain` all call `admit()`,
so what the administrator is told is what the gateway does.

It puts together everything that decides a destination, in this order:

- ::ffff:a.b.c.d is a.b.c.d (rules, checks and sockets see the IPv4 address);
- the unspecified, "this network" (0.0.0.0/8), multicast and broadcast addresses are
  never destinations, whatever the rules say (0.0.0.0 and :: reach the host itself);
- a tunnel whose connections leave from a pool address reaches only that address's family;
- the access policy, first matching rule wins (`AccessPolicy.decide`);
- the gateway host's loopback (127.0.0.0/8, ::1), link-local addresses (169.254.0.0/16,
  fe80::/10, where cloud metadata services answer) and every address of the gateway's own
  interfaces are opened only when the deciding allow rule's `networks` names a network
  inside that range: `127.0.0.0/8` or `169.254.169.254/32` is the administrator's informed
  choice; "any destination", a host name or `0.0.0.0/0` is not.

A name may resolve to several addresses: the first that passes every check is the one to
dial, and an address that fails is never dialled (the reason says it was skipped). The
caller resolves, then dials exactly `Admission.address`: the address checked is the address
dialled, so a name that resolves differently a moment later cannot slip past.

A name is looked up on the inside only for users some rule could allow there
(`needs_lookup`): the gateway's resolver is not an oracle for everyone who signs in.

Pure: never resolves a name, reads the interfaces, looks at the clock or logs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from portcullis.policy.engine import (
    DEFAULT_DENY,
    AccessPolicy,
    Destination,
    PolicyDecision,
    Subject,
)
from portcullis.policy.model import PolicyRule, is_host_name
from portcullis.proto.mux import ProtocolName

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network
Protocol = ProtocolName

GATEWAY_HOST = "the gateway host"
HOST_TOLD = f"{GATEWAY_HOST} is never a destination"
LOOPBACK: tuple[Network, ...] = (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))
LINK_LOCAL: tuple[Network, ...] = (IPv4Network("169.254.0.0/16"), IPv6Network("fe80::/10"))
_THIS_NETWORK = IPv4Network("0.0.0.0/8")
_BROADCAST = IPv4Address("255.255.255.255")
#: The one rule a launch is admitted under (see `resource_policy`).
RESOURCE_RULE = "resource"


@dataclass(frozen=True)
class Admission:
    """The decision for one stream, flow or echo.

    `address` is the one address to dial, always one of those checked (None when
    refused). `reason` is precise, for the audit line and `policy explain`; `refusal` is
    what the signed-in client is told, in its terms and without internals. `decision` is
    the access policy's own decision for the address decided on (its checks are what
    `policy explain` prints), None when no rule was asked.
    """

    allowed: bool
    address: Address | None
    rule: str | None
    reason: str
    refusal: str
    decision: PolicyDecision | None


@dataclass(frozen=True)
class Guard:
    """Why an address is kept from rules that do not name it: the range it falls in."""

    network: Network
    what: str          # "the gateway host's loopback"
    told: str          # what the client is told when it is refused


def plain(address: Address) -> Address:
    """The address as rules see it: IPv4-mapped IPv6 as IPv4, without an IPv6 scope."""
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:
            return IPv6Address(int(address))
    return address


def unmapped(address: Address) -> Address:
    """::ffff:a.b.c.d is a.b.c.d (a scope id, if any, is kept: it is needed to dial)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# Every stream open parses its destination two or three times, and a tunnel opens
# thousands to the same few: parsing costs more than the rest of the decision. Bounded,
# as the strings come from clients; the answers are immutable.
@lru_cache(maxsize=4096)
def parse_address(host: str) -> Address | None:
    """The address `host` is written as, unmapped; None when it is a name."""
    try:
        return unmapped(ip_address(host))
    except ValueError:
        return None


def never_reachable(address: Address, *, host: str = GATEWAY_HOST) -> str | None:
    """Why no rule may open this address, or None. These are not peers: 0.0.0.0 and ::
    reach the host itself on Linux, multicast and broadcast reach many. `host` names the
    host deciding (the relay decides with the same rule)."""
    address = plain(address)
    if address.is_unspecified:
        return f"{address} is the unspecified address (it would reach {host} itself)"
    if isinstance(address, IPv4Address) and address in _THIS_NETWORK:
        return f"{address} is in 0.0.0.0/8 (this host on this network), never a destination"
    if address.is_multicast:
        return f"{address} is a multicast address, never a destination"
    if address == _BROADCAST:
        return f"{address} is the broadcast address, never a destination"
    return None


def guard_of(address: Address, host_addresses: Collection[Address], *,
             host: str = GATEWAY_HOST) -> Guard | None:
    """The protected range `address` falls in, or None. `host_addresses` are the deciding
    host's own interface addresses, in `plain()` form; `host` names that host."""
    told = f"{host} is never a destination"
    address = plain(address)
    for network in LOOPBACK:
        if address in network:
            return Guard(network, f"{host}'s loopback", told)
    for network in LINK_LOCAL:
        if address in network:
            return Guard(network, "link-local (where cloud metadata services answer)",
                         "link-local addresses are never a destination")
    if address in host_addresses:
        return Guard(ip_network(address), f"an address of {host}'s own interfaces", told)
    return None


def naming_network(rule: PolicyRule, address: Address, guard: Guard) -> Network | None:
    """The network of `rule` that names `address` explicitly: it contains the address and
    lies inside the guarded range (0.0.0.0/0 contains 127.0.0.1 but does not name it)."""
    address = plain(address)
    for network in rule.networks:
        if (network.version == address.version and address in network
                and network.subnet_of(guard.network)):   # type: ignore[arg-type]
            return network
    return None


def needs_lookup(policy: AccessPolicy, subject: Subject, asked: str, port: int,
                 protocol: Protocol) -> bool:
    """Whether the caller should resolve `asked` before calling `admit()`: only a name,
    only a well-formed ASCII one, and only for a user whom some rule could allow there
    (any allow rule with networks, or a rule that allows the name itself)."""
    if parse_address(asked) is not None:
        return False
    name = asked.lower().removesuffix(".") if asked.isascii() else ""
    if not is_host_name(name):
        return False   # `admit` denies it by name: never hand it to a resolver
    return (policy.has_networks_for(subject)
            or policy.decide(subject, Destination(asked, None, port, protocol)).allowed)


def admit(policy: AccessPolicy, subject: Subject, asked: str, port: int, protocol: Protocol,
          resolved: Sequence[Address] | None = None, *, pool_family: int | None = None,
          host_addresses: Collection[Address] = frozenset()) -> Admission:
    """Decide one destination as the client asked for it (`asked`: a name or an address
    literal) and say which address to dial.

    `resolved`: the addresses the name resolved to, in the resolver's order (ignored for
    a literal; None or empty when not looked up). `pool_family`: 4 or 6 when the tunnel's
    connections leave from a pool address of that family. `host_addresses`: the gateway
    host's own interface addresses.
    """
    literal = parse_address(asked)
    name = None if literal is not None else asked
    candidates = ([literal] if literal is not None
                  else list(dict.fromkeys(unmapped(a) for a in resolved or ())))
    if pool_family is not None and candidates:
        in_family = [a for a in candidates if a.version == pool_family]
        if not in_family:
            shown = ", ".join(str(a) for a in candidates)
            return Admission(
                False, None, None,
                f"{asked} ({shown}) has no IPv{pool_family} address, and this tunnel's "
                f"connections leave from an IPv{pool_family} pool address",
                f"the tunnel reaches only IPv{pool_family} destinations", None)
        candidates = in_family
    if not candidates:
        return _unresolved(policy, subject, asked, port, protocol)

    own = frozenset(plain(a) for a in host_addresses)
    refused: Admission | None = None
    rank = -1   # the most telling refusal is reported: never-reachable, guarded, policy
    skipped: list[str] = []
    for address in candidates:
        never = never_reachable(address)
        if never is not None:
            skipped.append(never)
            if rank < 2:
                refused, rank = Admission(False, None, None, never, _never_told(address),
                                          None), 2
            continue
        decision = policy.decide(subject, Destination(name, address, port, protocol))
        if not decision.allowed:
            if rank < 0:
                refused, rank = Admission(False, None, decision.rule, decision.reason,
                                          _policy_told(decision), decision), 0
            continue
        guard = guard_of(address, own)
        assert decision.rule is not None, "an allowed decision names its rule"
        rule = policy.rule_named(decision.rule)
        if guard is not None and naming_network(rule, address, guard) is None:
            why = (f"{address} is {guard.what} ({guard.network}): only a rule naming it in"
                   f" networks can open it, and {_how_rule_covers(rule, address)}")
            skipped.append(f"{address} is {guard.what}")
            if rank < 1:
                refused, rank = Admission(False, None, None, why, guard.told, decision), 1
            continue
        reason = decision.reason
        if skipped:
            reason += f"; {address} dialled, not the others ({'; '.join(skipped)})"
        return Admission(True, address, decision.rule, reason, "", decision)
    assert refused is not None, "every candidate left a refusal"
    return refused


# Built once per resource address (the administrator's list), not once per launch:
# validating and compiling the rule cost more than admitting the address with it.
@lru_cache(maxsize=1024)
def resource_policy(address: str) -> AccessPolicy:
    """The policy a launch is admitted under. The ticket already says who may go where, so
    the access rules do not apply; what remains is the never-reachable set. A resource
    whose address is written as an IP literal is the administrator's explicit choice (even
    127.0.0.1): its rule names that address. A name gets "any destination", so it never
    opens the gateway host, link-local or the gateway's own addresses, however it resolves.
    """
    literal = parse_address(address)
    networks = [str(ip_network(plain(literal)))] if literal is not None else []
    return AccessPolicy([PolicyRule.model_validate(
        {"name": RESOURCE_RULE, "action": "allow", "networks": networks,
         "description": "a launched resource's own address"})])


def _unresolved(policy: AccessPolicy, subject: Subject, asked: str, port: int,
                protocol: Protocol) -> Admission:
    decision = policy.decide(subject, Destination(asked, None, port, protocol))
    if not decision.allowed:
        return Admission(False, None, decision.rule, decision.reason, _policy_told(decision),
                         decision)
    return Admission(False, None, None,
                     f"{asked} has no address to dial (it did not resolve); "
                     f"{decision.reason}", f"{asked} does not resolve", decision)


def _how_rule_covers(rule: PolicyRule, address: Address) -> str:
    address = plain(address)
    wider = [str(n) for n in rule.networks if n.version == address.version and address in n]
    if wider:
        return f'rule "{rule.name}" covers it only by {wider[0]}, wider than that range'
    if rule.hosts:
        return f'rule "{rule.name}" names it only by host name'
    return f'rule "{rule.name}" allows any destination'


def _policy_told(decision: PolicyDecision) -> str:
    if decision.rule is not None:
        return f'denied by rule "{decision.rule}"'
    if decision.reason == DEFAULT_DENY:
        return "no rule allows it (default deny)"
    return "not an ASCII host name (write internationalised names in their xn-- form)"


def _never_told(address: Address) -> str:
    address = plain(address)
    if address.is_multicast:
        return "multicast addresses are never a destination"
    if address == _BROADCAST:
        return "the broadcast address is never a destination"
    return HOST_TOLD
