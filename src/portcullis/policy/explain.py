"""`portcullis policy explain`: the admission decision for a user and a destination,
printed with its reason.

It calls what the gateway calls (`admission.needs_lookup`, `admission.admit`) with what
the gateway would give it: the user as the gateway sees them (a local account's groups,
a live session's claims, or the claims a run of the sign-in flow yields, for directory
and RADIUS users), the name resolved by this host's resolver, this host's interface
addresses and the pool's address family. So it never says ALLOWED for a destination
the gateway refuses. Run it on a gateway host: the never-reachable set includes the
addresses of the host it runs on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Literal

from portcullis.config.model import Settings
from portcullis.errors import AuthError, ConfigError, DialError
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.conditions import LoginContext
from portcullis.identity.names import canonical_username
from portcullis.identity.sessions import SessionManager
from portcullis.identity.tooling import Answer, Report, dry_run, opened_stores
from portcullis.policy.admission import (
    Address,
    Admission,
    admit,
    needs_lookup,
    parse_address,
)
from portcullis.policy.engine import AccessPolicy, Subject
from portcullis.policy.shadow import ShadowDecision, may_shadow
from portcullis.store import shared_between_processes

Protocol = Literal["tcp", "udp", "icmp"]
PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "icmp")
Resolver = Callable[[str, int], Awaitable[list[Address]]]


@dataclass(frozen=True)
class Who:
    """The user as the gateway would see them, and a line saying where that came from."""

    subject: Subject
    told: str


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


def _claims_line(source: str, claims: Claims) -> Who:
    groups = ", ".join(claims.groups) or "(none)"
    # Group decisions name their source of truth: the provider, or a linked directory.
    origin = f" (from {', '.join(claims.groups_from)})" if claims.groups_from else ""
    return Who(Subject(claims.username, frozenset(claims.groups)),
               f"user {claims.username} ({source}, realm {claims.idp}): groups {groups}"
               f"{origin}")


async def local_user(settings: Settings, username: str) -> Who:
    """A local account, with its groups; an unknown name is an error, never "no groups"."""
    try:
        user = canonical_username(username)
    except AuthError as exc:
        raise ConfigError(str(exc), key="--user") from None
    async with opened_stores(settings, throwaway_ephemeral=True) as (durable, _e, _h):
        record = await durable.get_user(user)
    if record is None:
        raise ConfigError(
            f"no local account {user!r}: for a directory or RADIUS user add --sign-in (runs"
            " the sign-in flow as `auth test` does), or give --session TOKEN", key="--user")
    groups = ", ".join(record.groups) or "(none)"
    state = " (disabled: cannot sign in)" if record.disabled else ""
    return Who(Subject(user, frozenset(record.groups)),
               f"user {user} (local account{state}): groups {groups}")


async def session_user(settings: Settings, token: str) -> Who:
    """The claims of a live session, checked as the gateway checks a tunnel's session
    (which counts as a use of it, like any request with the token)."""
    if not shared_between_processes(settings.store.ephemeral):
        raise ConfigError("sessions live inside the gateway process with a memory store; "
                          "--session needs one the gateway shares (the default, "
                          "sqlite:///ephemeral.db, or redis://...)", key="--session")
    async with opened_stores(settings, throwaway_ephemeral=False) as (durable, ephemeral,
                                                                       hasher):
        sessions = SessionManager(ephemeral, AccountStatus(durable), hasher, settings.session)
        session = await sessions.validate(token.strip())
    if session is None:
        raise ConfigError("no live session has that token (signed out, expired, or the"
                          " account was disabled or its password changed)", key="--session")
    return _claims_line("live session", session.claims)


async def signed_in_user(settings: Settings, flow_name: str, username: str, answer: Answer,
                         report: Report, context: LoginContext) -> Who:
    """The claims a sign-in through `flow_name` would carry: the flow runs against the
    real directories and RADIUS servers, as `portcullis auth test` runs it."""
    if flow_name not in {flow.name for flow in settings.auth.flows}:
        raise ConfigError(f"no flow named {flow_name!r} in auth.flows", key="--flow")
    result = await dry_run(settings, flow_name, username, answer, report, context)
    if result.claims is None:
        raise AuthError(f"the flow would not sign {username} in ({result.outcome}), so there"
                        " are no claims to explain")
    return _claims_line(f"signed in through flow {flow_name}", result.claims)


async def explain(settings: Settings, who: Who, target: str, *,
                  resolver: Resolver | None = None,
                  host_addresses: Collection[Address] | None = None
                  ) -> tuple[Admission, list[str]]:
    """The gateway's decision for `who` opening `target`, and the lines to print.
    By default names resolve here and the interface addresses are this host's."""
    from portcullis.net.destinations import read_interface_addresses, resolve

    resolver = resolver or resolve
    if host_addresses is None:
        host_addresses = read_interface_addresses()
    host, port, protocol = parse_target(target)
    policy = AccessPolicy(settings.policies)
    pool = settings.vpn.address_pool
    pool_family = ipaddress.ip_network(pool).version if pool else None
    lines = [who.told]
    resolved: list[Address] | None = None
    if needs_lookup(policy, who.subject, host, port, protocol):
        try:
            resolved = await resolver(host, port)
        except DialError as exc:
            lines.append(f"{exc} (the gateway refuses the stream: name not found)")
        else:
            lines.append(f"{host} resolves to {', '.join(str(a) for a in resolved)}")
    elif parse_address(host) is None:
        lines.append(f"{host} is not looked up: no rule could allow this user there")
    admission = admit(policy, who.subject, host, port, protocol, resolved,
                      pool_family=pool_family, host_addresses=host_addresses)
    shown = f"{host}:{port}/{protocol}" if protocol != "icmp" else f"{host}/icmp"
    dialled = f" (dials {admission.address})" if admission.address is not None else ""
    lines.append(f"destination {shown}{dialled}")
    lines.append("ALLOWED" if admission.allowed else "DENIED")
    if admission.decision is not None:
        lines.extend(f"{'match' if check.matched else 'skip '}  {check.rule}: {check.why}"
                     for check in admission.decision.checks)
    lines.append(admission.reason)
    if not admission.allowed:
        lines.append(f"the client is told: {admission.refusal}")
    return admission, lines


def explain_shadow(settings: Settings, who: Who, device: str) -> tuple[ShadowDecision, list[str]]:
    """The hub's decision for `who` shadowing `device`, and the lines to print."""
    decision = may_shadow(settings.shadow, settings.admin_groups, who.subject, device)
    groups = ", ".join(decision.device_groups) or "none"
    lines = [who.told, f"device {device} (device groups: {groups})",
             "ALLOWED" if decision.allowed else "DENIED", decision.reason]
    if decision.allowed:
        lines.append(f"consent: {decision.consent}" + (
            f" (the device's user has {decision.consent_timeout:g} s to answer)"
            if decision.consent == "ask" else ""))
    return decision, lines
