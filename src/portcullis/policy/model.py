"""One access rule as written under [[policies]] in portcullis.toml, validated once.

A rule is checked and normalised here, when the configuration is read: networks are
parsed into `ip_network` objects, ports into (lo, hi) pairs, host patterns and
protocols lowercased, user names put into their canonical form. Every error message
names the offending value and says what would be accepted, because the loader prints it
after "portcullis.toml:LINE: policies[N].<field>: ".

This module never evaluates a request (that is `engine.py`) and never resolves a name,
reads a file or logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from portcullis.errors import AuthError
from portcullis.identity.names import canonical_username

PROTOCOLS: tuple[str, ...] = ("tcp", "udp", "icmp")

_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_PORT_ITEM = re.compile(r"\s*([0-9]{1,5})\s*(?:-\s*([0-9]{1,5})\s*)?", re.ASCII)
# Host names as DNS carries them: ASCII labels; "_" is common in internal zones.
_LABEL = re.compile(r"[a-z0-9_-]{1,63}", re.ASCII)
_MAPPED_V4 = IPv6Network("::ffff:0:0/96")


def is_host_name(name: str) -> bool:
    """True for a lowercase ASCII name of 1-253 characters made of non-empty labels."""
    return (0 < len(name) <= 253 and name.isascii()
            and all(_LABEL.fullmatch(label) for label in name.split(".")))


def _items(value: object) -> list[object] | None:
    """The entries of a TOML array, or None to let pydantic's type check report it."""
    if isinstance(value, list | tuple):
        return list(value)
    return None


def _text(item: object, what: str) -> str:
    if not isinstance(item, str):
        raise ValueError(f"{item!r} is not a {what} (write it as a quoted string)")
    return item


class PolicyRule(BaseModel):
    """One rule; the first rule that matches a request decides it (see engine.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    action: Literal["allow", "deny"]
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    networks: tuple[IPv4Network | IPv6Network, ...] = ()
    hosts: tuple[str, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    protocols: tuple[Literal["tcp", "udp", "icmp"], ...] = ()
    description: str = ""

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: object) -> object:
        if isinstance(value, str) and not _RULE_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a rule name: use 1-63 lowercase letters, digits, '-' or"
                " '_', starting with a letter or digit (e.g. 'staff-web')")
        return value

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, value: object) -> object:
        if value not in ("allow", "deny"):
            raise ValueError(f"{value!r} is not an action: write \"allow\" or \"deny\"")
        return value

    @field_validator("groups", mode="before")
    @classmethod
    def _groups(cls, value: object) -> object:
        items = _items(value)
        if items is None:
            return value
        groups = [_text(item, "group name") for item in items]
        for group in groups:
            # Groups are compared exactly: a stray space would make a rule match no one.
            if not group or group != group.strip() or not group.isprintable():
                raise ValueError(
                    f"{group!r} is not a group name: groups are compared exactly, so write"
                    " the name without surrounding spaces or control characters")
        return tuple(groups)

    @field_validator("users", mode="before")
    @classmethod
    def _users(cls, value: object) -> object:
        items = _items(value)
        if items is None:
            return value
        users: list[str] = []
        for item in items:
            raw = _text(item, "user name")
            try:
                # Compared with signed-in users' canonical names, so stored the same way.
                users.append(canonical_username(raw))
            except AuthError as exc:
                raise ValueError(f"{raw!r} is not a valid user name ({exc})") from None
        return tuple(users)

    @field_validator("networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        items = _items(value)
        if items is None:
            return value
        return tuple(parse_network(_text(item, "network")) for item in items)

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, value: object) -> object:
        items = _items(value)
        if items is None:
            return value
        return tuple(_parse_host_pattern(_text(item, "host name")) for item in items)

    @field_validator("ports", mode="before")
    @classmethod
    def _ports(cls, value: object) -> object:
        items = _items(value)
        if items is None:
            return value
        return tuple(parse_port_range(item) for item in items)

    @field_validator("protocols", mode="before")
    @classmethod
    def _protocols(cls, value: object) -> object:
        items = _items(value)
        if items is None:
            return value
        protocols: list[str] = []
        for item in items:
            protocol = _text(item, "protocol").strip().lower()
            if protocol not in PROTOCOLS:
                raise ValueError(f"{item!r} is not a protocol: use any of tcp, udp, icmp")
            protocols.append(protocol)
        return tuple(protocols)

    @field_validator("description", mode="before")
    @classmethod
    def _description(cls, value: object) -> object:
        # Printed by `policy explain`: control characters could rewrite the terminal.
        if isinstance(value, str) and not value.isprintable():
            raise ValueError("must not contain control characters or line breaks")
        return value


def parse_network(text: str) -> IPv4Network | IPv6Network:
    written = text.strip()
    if "%" in written:
        raise ValueError(f"{text!r} has a scope id (%...); policies name networks without one")
    try:
        network = ip_network(written)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ip_network(written, strict=False)
            raise ValueError(f"{text!r} has host bits set; did you mean '{fixed}'?") from None
        raise ValueError(
            f"{text!r} is not an IPv4 or IPv6 network (write e.g. '10.1.0.0/16',"
            " 'fd00:1::/64' or a single address)") from None
    if isinstance(network, IPv6Network) and network.subnet_of(_MAPPED_V4):
        # The engine treats ::ffff:a.b.c.d as the IPv4 address it stands for.
        raise ValueError(f"{text!r} is an IPv4-mapped IPv6 network: write it in IPv4 form")
    return network


def _parse_host_pattern(text: str) -> str:
    pattern = text.strip().lower().removesuffix(".")
    wildcard = pattern.startswith("*.")
    name = pattern[2:] if wildcard else pattern
    try:
        ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"{text!r} is an address, not a name: list it under networks")
    if not is_host_name(name):
        raise ValueError(
            f"{text!r} is not a host name or '*.domain' pattern (ASCII letters, digits,"
            " '-', '_' and dots; write internationalised names in their xn-- form)")
    return pattern


def parse_port_range(item: object) -> tuple[int, int]:
    if isinstance(item, int) and not isinstance(item, bool):
        item = str(item)
    text = _text(item, "port")
    match = _PORT_ITEM.fullmatch(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a port or a range lo-hi (write e.g. '443' or '8000-8099')")
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) else lo
    if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
        raise ValueError(f"{text!r} is outside 1-65535")
    if lo > hi:
        raise ValueError(f"{text!r} is not a range lo-hi with lo <= hi")
    return lo, hi


def check_unique_names(rules: Iterable[PolicyRule]) -> None:
    """Raise ValueError naming the first rule name that appears twice."""
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ValueError(f"policy name {rule.name!r} is used twice")
        seen.add(rule.name)
