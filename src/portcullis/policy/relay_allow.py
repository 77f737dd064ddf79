"""The relay's own decision: may it connect where an edge asks, and to which address.

The relay trusts no decision the edge made (defence in depth): whatever it is asked is
checked here against `[relay] allow`, and with the never-reachable rule of
`policy/admission.py` applied to the relay host. Everything that explains a relay refusal
(the audit line, the SOCKS reply, the mux REFUSE) comes from `decide()`.

An entry is `DESTINATION:PORTS`:

- `10.0.0.0/8:1-65535`, `10.1.2.3:443,8443` (a single address is its /32), IPv6 in
  brackets `[fd00::/8]:1-65535`, `[fd00::5]:22` — a NETWORK entry;
- `sta.corp.example:443` — a NAME entry: it matches a request that asks for that name
  (not for an address), and the name is resolved at the relay;
- PORTS: comma-separated ports and ranges `lo-hi`. An ICMP echo has no port: it is
  allowed to an address that an entry covers, whatever that entry's ports.

The relay host's loopback, link-local addresses (cloud metadata) and its own interface
addresses are opened only by a NETWORK entry whose network lies inside that range
(`127.0.0.1/32:8080` is the administrator's informed choice; `0.0.0.0/0`, or a name that
resolves there, is not). The unspecified, multicast and broadcast addresses are never
destinations.

Pure: never resolves a name, reads the interfaces, looks at the clock or logs.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from portcullis.policy.admission import (
    Address,
    Network,
    Protocol,
    guard_of,
    never_reachable,
    parse_address,
    plain,
    unmapped,
)
from portcullis.policy.model import is_host_name, parse_network, parse_port_range
from portcullis.proto.mux import Reason

RELAY_HOST = "the relay host"
_ENTRY = re.compile(r"\[(?P<v6>[^\]]*)\]:(?P<v6ports>[^:\[\]]*)"
                    r"|(?P<dest>[^:\[\]]+):(?P<ports>[^:\[\]]*)", re.DOTALL)
_SYNTAX = ("write DESTINATION:PORTS, e.g. '10.0.0.0/8:1-65535', '10.1.2.3:443,8443', "
           "'sta.corp.example:443' or '[fd00::/8]:1-65535'")


@dataclass(frozen=True)
class AllowEntry:
    """One `[relay] allow` entry, parsed: exactly one of `network` and `name` is set."""

    written: str
    network: Network | None
    name: str | None
    ports: tuple[tuple[int, int], ...]

    def covers_port(self, port: int, protocol: Protocol) -> bool:
        """An echo has no port: any entry covering the address allows it."""
        return protocol == "icmp" or any(lo <= port <= hi for lo, hi in self.ports)

    def covers_address(self, address: Address, port: int, protocol: Protocol) -> bool:
        address = plain(address)
        return (self.network is not None and self.network.version == address.version
                and address in self.network and self.covers_port(port, protocol))

    def __str__(self) -> str:
        return self.written


AllowList = tuple[AllowEntry, ...]


@dataclass(frozen=True)
class RelayDecision:
    """The relay's decision for one asked destination.

    `address` is the one address to dial, always one of those checked (None when
    refused). `entry` is the allow entry that decided, as written. `reason` is precise,
    for the relay's audit trail; `refusal` is what the edge is told (a mux Reason, which
    the classic server turns into a SOCKS reply code).
    """

    allowed: bool
    address: Address | None
    entry: str | None
    reason: str
    refusal: Reason


def parse_allow_entry(text: str) -> AllowEntry:
    """One entry, or ValueError naming it and saying what would be accepted."""
    written = text.strip()
    match = _ENTRY.fullmatch(written)
    if match is None:
        raise ValueError(f"{text!r} is not an allow entry: {_SYNTAX}")
    ports_text = match.group("v6ports") if match.group("v6") is not None else match.group(
        "ports")
    ports = _parse_ports(text, ports_text)
    if match.group("v6") is not None:
        network = _parse_entry_network(text, match.group("v6"))
        if network.version != 6:
            raise ValueError(f"{text!r}: brackets are for IPv6; write IPv4 without them")
        return AllowEntry(written, network, None, ports)
    destination = match.group("dest")
    if "/" in destination or parse_address(destination) is not None:
        return AllowEntry(written, _parse_entry_network(text, destination), None, ports)
    name = destination.lower().removesuffix(".")
    if not is_host_name(name):
        raise ValueError(
            f"{text!r}: {destination!r} is neither a network nor a host name (ASCII letters,"
            " digits, '-', '_' and dots; internationalised names in their xn-- form)")
    return AllowEntry(written, None, name, ports)


def parse_allow_list(entries: Iterable[str]) -> AllowList:
    """Every entry of `[relay] allow`, in order; ValueError names the first bad one."""
    return tuple(parse_allow_entry(entry) for entry in entries)


def asked_name(asked: str) -> str | None:
    """The host name `asked` stands for, normalised; None for an address literal or for
    text that is no host name (never handed to a resolver)."""
    if parse_address(asked) is not None or not asked.isascii():
        return None
    name = asked.lower().removesuffix(".")
    return name if is_host_name(name) else None


def needs_lookup(allow: AllowList, asked: str, port: int, protocol: Protocol) -> bool:
    """Whether the relay should resolve `asked` before `decide()`: only a name that a NAME
    entry allows on that port (the relay's resolver is no oracle for the edge)."""
    name = asked_name(asked)
    return name is not None and any(
        entry.name == name and entry.covers_port(port, protocol) for entry in allow)


def decide(allow: AllowList, asked: str, port: int, protocol: Protocol,
           resolved: Sequence[Address] | None = None,
           host_addresses: Collection[Address] = frozenset()) -> RelayDecision:
    """Decide one destination as the edge asked for it (`asked`: a name or an address
    literal) and say which address to dial.

    `resolved`: the addresses the relay resolved the name to, in the resolver's order
    (ignored for a literal; None or empty when not looked up). `host_addresses`: the relay
    host's own interface addresses.
    """
    own = frozenset(plain(a) for a in host_addresses)
    literal = parse_address(asked)
    where = f"{asked}:{port}/{protocol}"
    if literal is not None:
        return _decide_address(allow, literal, port, protocol, own, where)
    name = asked_name(asked)
    entry = next((e for e in allow if name is not None and e.name == name
                  and e.covers_port(port, protocol)), None)
    if entry is None:
        why = ("it is not a valid host name" if name is None
               else "no relay.allow entry names it on that port")
        return RelayDecision(False, None, None, f"{where} refused: {why}", Reason.DENIED)
    candidates = list(dict.fromkeys(unmapped(a) for a in resolved or ()))
    if not candidates:
        return RelayDecision(False, None, entry.written,
                             f"{where}: {asked} did not resolve at the relay",
                             Reason.NAME_NOT_FOUND)
    skipped: list[str] = []
    for address in candidates:
        why_not = never_reachable(address, host=RELAY_HOST)
        if why_not is None:
            guard = guard_of(address, own, host=RELAY_HOST)
            if guard is not None and _naming_entry(allow, address, port, protocol,
                                                   guard.network) is None:
                why_not = (f"{address} is {guard.what} ({guard.network}), which a name never"
                           " opens (only a NETWORK entry inside that range does)")
        if why_not is not None:
            skipped.append(why_not)
            continue
        reason = f"{where} allowed by relay.allow {entry.written!r}, dialled at {address}"
        if skipped:
            reason += f" (not at: {'; '.join(skipped)})"
        return RelayDecision(True, address, entry.written, reason, Reason.NONE)
    return RelayDecision(False, None, entry.written,
                         f"{where} refused: every address it resolved to is kept from the "
                         f"relay ({'; '.join(skipped)})", Reason.DENIED)


def _decide_address(allow: AllowList, address: Address, port: int, protocol: Protocol,
                    own: frozenset[Address], where: str) -> RelayDecision:
    never = never_reachable(address, host=RELAY_HOST)
    if never is not None:
        return RelayDecision(False, None, None, f"{where} refused: {never}", Reason.DENIED)
    covering = [e for e in allow if e.covers_address(address, port, protocol)]
    if not covering:
        return RelayDecision(False, None, None,
                             f"{where} refused: no relay.allow entry covers it",
                             Reason.DENIED)
    guard = guard_of(address, own, host=RELAY_HOST)
    if guard is None:
        entry = covering[0]
    else:
        naming = _naming_entry(covering, address, port, protocol, guard.network)
        if naming is None:
            return RelayDecision(
                False, None, covering[0].written,
                f"{where} refused: {plain(address)} is {guard.what} ({guard.network}); only a"
                f" relay.allow NETWORK inside that range opens it, and"
                f" {covering[0].written!r} is wider", Reason.DENIED)
        entry = naming
    return RelayDecision(True, address, entry.written,
                         f"{where} allowed by relay.allow {entry.written!r}", Reason.NONE)


def _naming_entry(allow: Iterable[AllowEntry], address: Address, port: int,
                  protocol: Protocol, guarded: Network) -> AllowEntry | None:
    """The NETWORK entry that names `address` explicitly: it covers it and lies inside the
    guarded range (0.0.0.0/0 covers 127.0.0.1 but does not name it)."""
    for entry in allow:
        if (entry.network is not None and entry.covers_address(address, port, protocol)
                and entry.network.subnet_of(guarded)):   # type: ignore[arg-type]
            return entry
    return None


def _parse_entry_network(text: str, written: str) -> Network:
    try:
        return parse_network(written)
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def _parse_ports(text: str, written: str) -> tuple[tuple[int, int], ...]:
    if not written.strip():
        raise ValueError(f"{text!r} names no port: {_SYNTAX}")
    try:
        return tuple(parse_port_range(item) for item in written.split(","))
    except ValueError as exc:
        raise ValueError(f"{text!r}: {exc}") from None
