"""What the administrator's commands do: `auth test` (a flow dry run against the real
providers), `user show` (MFA and lockout), `user totp-reset` and `user unlock`.

A command that takes a user accepts any name the user can sign in with (for a directory:
sAMAccountName, UPN, mail — whatever the provider's login_attributes are), resolved the
way a sign-in resolves it, and an unknown name is an error, never a silent no-op.

The dry run talks to the configured directories and RADIUS servers for real but keeps
its flow state, replay cache and failure counters in a throwaway memory store, so trying
a flow never locks anyone out; it stops before a TOTP enrolment would store a secret.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ldap3.core.exceptions import LDAPException

from portcullis.audit import AuditTrail
from portcullis.config.auth import LdapProvider, LocalProvider
from portcullis.config.model import Settings
from portcullis.errors import AuthError, ConfigError, NotFoundError
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.conditions import LoginContext
from portcullis.identity.flow import FlowEvent, Prompt, Step
from portcullis.identity.login import CALLBACK_PATH, Authenticated, LoginService, NextStep, relay_of
from portcullis.identity.names import canonical_username
from portcullis.identity.providers import IdentityProviders
from portcullis.identity.sessions import SessionManager
from portcullis.identity.throttle import AccountLock, Throttle
from portcullis.net.dialer import Dialer, DirectDialer
from portcullis.net.dialers import dialer_from_settings
from portcullis.net.loopback import LoopbackReceiver
from portcullis.net.tls import ResumingClientContext, client_context
from portcullis.store import (
    DurableStore,
    EphemeralStore,
    MemoryStore,
    open_ephemeral,
    shared_between_processes,
)
from portcullis.tokens import TokenHasher

Answer = Callable[[Step, Prompt], str]
Report = Callable[[str], None]


@asynccontextmanager
async def opened_stores(settings: Settings, *, throwaway_ephemeral: bool
                        ) -> AsyncIterator[tuple[DurableStore, EphemeralStore, TokenHasher]]:
    durable = await DurableStore.open(settings.durable_url())
    ephemeral = MemoryStore() if throwaway_ephemeral else open_ephemeral(
        settings.ephemeral_url())
    try:
        yield durable, ephemeral, TokenHasher.from_directory(settings.path(settings.secrets_dir))
    finally:
        await ephemeral.close()
        await durable.close()


def _describe(event: FlowEvent) -> str:
    match event.kind:
        case "step_skipped":
            return f"  skipped {event.factor}: condition does not hold ({event.reason})"
        case "factor_passed":
            return f"  passed  {event.factor} as {event.user}"
        case "factor_retry":
            return f"  {event.factor} asks again: {event.reason}"
        case "factor_failed" | "failed":
            return f"  FAILED  {event.factor or 'flow'}: {event.reason}"
        case "succeeded":
            return f"  signed in as {event.user}"


def command_dialer(settings: Settings, flow_name: str, report: Report) -> Dialer | None:
    """The Dialer a command that runs `flow_name` in its own process asks the RADIUS
    servers and OpenID providers through: the node's, from `[dialer]` (classic mode: with
    the gateway's certificate), except in dial-out mode, where the relays' connections
    belong to the gateway process: then directly from this host, and said so. None when
    the flow asks neither."""
    providers = settings.auth.all_providers()
    if not any(providers[step.provider].type in ("radius", "oidc")
               for step in settings.auth.flow_named(flow_name).steps):
        return None
    if settings.dialer.via == "relay" and settings.dialer.mode == "dial-out":
        report("note: [dialer] mode is dial-out and this command holds no relay connections:"
               " it asks the RADIUS servers directly from this host")
        return DirectDialer(timeout=settings.dialer.timeout)

    def gateway_tls() -> ResumingClientContext:
        cert, key = settings.role_cert("gateway")
        try:
            return client_context(settings.ca_cert_path, cert_file=cert, key_file=key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"classic mode dials the relay with the gateway's certificate "
                              f"{cert}, which cannot be read here: {exc}",
                              key="dialer.mode") from None

    return dialer_from_settings(settings.dialer, gateway_tls=gateway_tls)


@dataclass(frozen=True)
class DryRun:
    outcome: Literal["signed in", "denied", "would enrol"]
    claims: Claims | None = None


async def dry_run(settings: Settings, flow_name: str, username: str, answer: Answer,
                  report: Report, context: LoginContext, *, browse: Report | None = None,
                  callback_port: int = 0, browser_timeout: float = 300.0,
                  device: bool = False) -> DryRun:
    """Walk the flow as `username` would, reporting each step's outcome and why, from the
    same events the audit trail gets. A redirect step's provider answers to a loopback
    listener of this process (`callback_port`; the provider must accept
    http://127.0.0.1:PORT/login/callback/NAME as a redirect URI); `browse` shows its URL.
    With `device`, a provider that offers it is asked for a device code instead: its URL
    and code are reported, and the step is polled until the provider answers (bounded
    by the code's expiry)."""
    async with opened_stores(settings, throwaway_ephemeral=True) as (durable, ephemeral,
                                                                      hasher):
        providers = IdentityProviders(settings, durable, ephemeral, hasher, dry_run=True,
                                      dialer=command_dialer(settings, flow_name, report))
        sessions = SessionManager(ephemeral, AccountStatus(durable), hasher, settings.session)
        with LoopbackReceiver(CALLBACK_PATH, port=callback_port) as receiver:
            service = LoginService(providers.flow(flow_name), ephemeral, hasher, sessions,
                                   settings.session, AuditTrail(None, echo=False),
                                   Throttle(ephemeral, settings.auth.throttle),
                                   public_url=receiver.base,
                                   observe=lambda event: report(_describe(event)))
            report(f"flow {flow_name} (realm {service.flow.realm}) for {username}, "
                   f"client {context.client_address}, "
                   f"{'with' if context.certificate else 'without'} a client certificate")
            result = await service.begin(context, device=device)
            while isinstance(result, NextStep):
                step = result.step
                report(f"step {result.provider}: {step.title} "
                       f"({', '.join(p.name for p in step.prompts) or step.kind})")
                if step.kind in ("totp-enrol", "totp-enrolment-code"):
                    needs = (", with the enrolment code an administrator issued"
                             if step.kind == "totp-enrolment-code" else "")
                    report(f"  the user has no TOTP secret: a real sign-in would enrol now"
                           f"{needs} (stopping here; nothing was stored)")
                    return DryRun("would enrol")
                if step.device is not None:
                    report(f"  open {step.device.verification_uri} on any device and enter "
                           f"the code {step.device.user_code}")
                    while isinstance(result, NextStep) and result.step.device is not None:
                        await asyncio.sleep(result.step.device.interval)
                        result = await service.submit(result.handle, {}, context)
                    continue
                if step.redirect is not None:
                    (browse or report)(receiver.start_at(step.redirect.url, step.redirect.form))
                    back = await asyncio.to_thread(receiver.wait, browser_timeout)
                    result = await service.callback(relay_of(back), back, context,
                                                    result.handle)
                    continue
                answers = {p.name: username if p.name == "username" else answer(step, p)
                           for p in step.prompts}
                result = await service.submit(result.handle, answers, context)
        if isinstance(result, Authenticated):
            return DryRun("signed in", result.session.claims)
        return DryRun("denied")


@dataclass(frozen=True)
class RealmReport:
    realm: str
    username: str | None              # None: no such user in this realm
    totp: str
    lock: AccountLock | None


def realms(settings: Settings) -> list[str]:
    """Every realm a flow signs users into, the default flow's first."""
    auth = settings.auth
    ordered = [auth.realm_of(auth.flow_named(auth.flow))] + [auth.realm_of(f) for f in auth.flows]
    return list(dict.fromkeys(realm for realm in ordered if realm))


async def _resolve(settings: Settings, stores: tuple[DurableStore, EphemeralStore, TokenHasher],
                   realm: str, typed: str, *, counters: bool,
                   accept_unsearchable: bool = False) -> str | None:
    """The account name `typed` signs in as in `realm`, or None if it names no one there.
    A directory is asked as a sign-in asks it; a realm that cannot be searched (RADIUS, a
    certificate) knows a user by what Portcullis keeps of them (TOTP, failure counters),
    or, with `accept_unsearchable`, takes the canonical name as given (a user who has
    never signed in, about to get an enrolment code)."""
    durable, ephemeral, hasher = stores
    canonical = canonical_username(typed)
    provider = settings.auth.all_providers()[realm]
    if isinstance(provider, LocalProvider):
        return canonical if await durable.get_user(canonical) is not None else None
    if isinstance(provider, LdapProvider):
        directory = IdentityProviders(settings, durable, ephemeral, hasher).directory(realm)
        try:
            found = await asyncio.to_thread(directory.find, canonical)
        except LDAPException as exc:
            raise AuthError(f"directory {realm!r} could not be searched: {exc}") from None
        if len(found) > 1:
            raise NotFoundError(f"{typed!r} matches {len(found)} entries of directory "
                                f"{realm!r}: give the account name")
        return canonical_username(found[0].username) if found else None
    identity = f"{realm}:{canonical}"
    if accept_unsearchable or await durable.get_totp(identity) is not None:
        return canonical
    if counters and (await Throttle(ephemeral, settings.auth.throttle).account(identity)
                     ).failures:
        return canonical
    return None


def _unknown(typed: str, where: list[str]) -> NotFoundError:
    return NotFoundError(f"no user {typed!r} in realm{'s' if len(where) > 1 else ''} "
                         f"{', '.join(where)} (a name the user signs in with: account name, "
                         "UPN or mail)")


async def account_report(settings: Settings, typed: str) -> tuple[str, list[RealmReport]]:
    """The local account line and, per realm, who `typed` is there, TOTP and lockout.
    NotFoundError when it names no one in any realm."""
    shared_counters = shared_between_processes(settings.store.ephemeral)
    async with opened_stores(settings, throwaway_ephemeral=not shared_counters) as stores:
        durable, ephemeral, _hasher = stores
        user = await durable.get_user(canonical_username(typed))
        if user is None:
            local = "no local account"
        else:
            local = (f"local account, {'disabled' if user.disabled else 'enabled'}, "
                     f"groups: {', '.join(user.groups) or '-'}")
        throttle = Throttle(ephemeral, settings.auth.throttle)
        reports = []
        for realm in realms(settings):
            username = await _resolve(settings, stores, realm, typed, counters=shared_counters)
            if username is None:
                reports.append(RealmReport(realm, None, "no such user", None))
                continue
            record = await durable.get_totp(f"{realm}:{username}")
            totp = (f"enrolled {record.enrolled_at:%Y-%m-%d %H:%M} UTC, "
                    f"{record.recovery_codes_left} recovery codes left"
                    if record else "not enrolled (enrols at next sign-in that needs TOTP)")
            lock = await throttle.account(f"{realm}:{username}") if shared_counters else None
            reports.append(RealmReport(realm, username, totp, lock))
        if user is None and all(report.username is None for report in reports):
            raise _unknown(typed, realms(settings))
        return local, reports


async def resolve_identity(settings: Settings, realm: str | None, typed: str, *,
                           accept_unsearchable: bool = False) -> str:
    """realm:account for what an administrator typed; NotFoundError if no such user."""
    realm = realm or realms(settings)[0]
    if realm not in realms(settings):
        raise NotFoundError(f"no flow signs users into realm {realm!r} (realms: "
                            f"{', '.join(realms(settings))})")
    shared_counters = shared_between_processes(settings.store.ephemeral)
    async with opened_stores(settings, throwaway_ephemeral=not shared_counters) as stores:
        username = await _resolve(settings, stores, realm, typed, counters=shared_counters,
                                  accept_unsearchable=accept_unsearchable)
    if username is None:
        raise _unknown(typed, [realm])
    return f"{realm}:{username}"


async def issue_enrolment_code(settings: Settings, identity: str) -> tuple[str, datetime]:
    """A single-use TOTP enrolment code for `identity` and when it expires (the realm's
    flow's TOTP provider keeps it; any earlier code of the identity stops working)."""
    async with opened_stores(settings, throwaway_ephemeral=True) as (durable, ephemeral,
                                                                      hasher):
        service = IdentityProviders(settings, durable, ephemeral, hasher).flow_totp()
        return await service.issue_enrolment_code(identity, settings.auth.totp.code_lifetime)


async def local_account(settings: Settings, typed: str) -> str:
    """The local account `typed` names: its own, or that of the account name a realm
    resolves it to (`user disable alice@corp.example` disables the local `alice` that
    governs the directory's alice). NotFoundError when there is none."""
    shared_counters = shared_between_processes(settings.store.ephemeral)
    async with opened_stores(settings, throwaway_ephemeral=not shared_counters) as stores:
        durable = stores[0]
        canonical = canonical_username(typed)
        if await durable.get_user(canonical) is not None:
            return canonical
        for realm in realms(settings):
            name = await _resolve(settings, stores, realm, typed, counters=shared_counters)
            if name is not None and await durable.get_user(name) is not None:
                return name
    raise NotFoundError(f"no local account {typed!r}, nor one for the user it names in "
                        f"realm{'s' if len(realms(settings)) > 1 else ''} "
                        f"{', '.join(realms(settings))}")


async def reset_totp(settings: Settings, identity: str) -> bool:
    async with opened_stores(settings, throwaway_ephemeral=True) as (durable, _e, _h):
        return await durable.delete_totp(identity)


async def unlock(settings: Settings, identity: str) -> None:
    async with opened_stores(settings, throwaway_ephemeral=False) as (_d, ephemeral, _h):
        await Throttle(ephemeral, settings.auth.throttle).unlock(identity)
