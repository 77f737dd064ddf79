"""Deciding a stream whose name resolved to several addresses, and `policy explain`.

The gateway and `portcullis policy explain` both call `decide_resolved`, so what the
administrator is told is what the gateway does; the explanation is a print of the
decision's own checks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Literal

from portcullis.config.model import Settings
from portcullis.errors import AuthError, ConfigError
from portcullis.identity.names import canonical_username
from portcullis.policy.engine import AccessPolicy, Destination, PolicyDecision, Subject
from portcullis.store import DurableStore

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Protocol = Literal["tcp", "udp", "icmp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "icmp")


def decide_resolved(policy: AccessPolicy, subject: Subject, name: str | None,
                    addresses: Sequence[Address | None], port: int,
                    protocol: Protocol) -> tuple[PolicyDecision, Address | None]:
    """The first address the policy allows, with its decision; else the first denial."""
    first: tuple[PolicyDecision, Address | None] | None = None
    for address in addresses:
        decision = policy.decide(subject, Destination(name, address, port, protocol))
        if decision.allowed:
            return decision, address
        first = first or (decision, address)
    assert first is not None, "at least one address (or None for 'unresolved')"
    return first


def parse_target(target: str) -> tuple[str, int, Protocol]:
    """HOST:PORT/PROTO (PROTO defaults to tcp; icmp takes HOST/icmp)."""
    where, _, written = target.partition("/")
    protocol = next((p for p in PROTOCOLS if p == (written or "tcp").lower()), None)
    if protocol is None:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}", key="--to")
    if protocol == "icmp":
        return where.strip("[]"), 0, protocol
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("expected HOST:PORT/PROTO, e.g. db.corp.example:5432/tcp", key="--to")
    return host.strip("[]"), int(port), protocol


async def explain(settings: Settings, username: str, target: str) -> list[str]:
    """Lines for `portcullis policy explain`."""
    host, port, protocol = parse_target(target)
    try:
        user = canonical_username(username)
    except AuthError as exc:
        raise ConfigError(str(exc), key="--user") from None
    store = await DurableStore.open(settings.durable_url())
    try:
        record = await store.get_user(user)
    finally:
        await store.close()
    groups = record.groups if record is not None else ()
    lines = [f"user {user}: " + (f"groups {', '.join(groups) or '(none)'}"
                                 if record is not None else "no local account (no groups)")]
    name: str | None = host
    addresses: list[Address | None]
    try:
        addresses = [ipaddress.ip_address(host)]
        name = None
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port or None,
                                                                 type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        except socket.gaierror:
            addresses = [None]
            lines.append(f"{host} does not resolve here: only rules naming hosts can match")
    policy = AccessPolicy(settings.policies)
    decision, address = decide_resolved(policy, Subject(user, frozenset(groups)), name,
                                        addresses, port, protocol)
    shown = f"{host}:{port}/{protocol}" if protocol != "icmp" else f"{host}/icmp"
    lines.append(f"destination {shown}" + (f" ({address})" if address and name else ""))
    lines.append("ALLOWED" if decision.allowed else "DENIED")
    lines.extend(decision.explain().splitlines())
    return lines
