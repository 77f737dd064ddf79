"""The administrator's commands of `portcullis`: set up and run a deployment, manage its
accounts and certificates, try its sign-in flows and policies, and end sessions. They
run on a gateway's host (most read the deployment directory, --dir) or, for `sessions`,
as a signed-in administrator. Parsing and printing only; everything is a call into the
package. The client's commands are in `cli/client.py`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from portcullis.cli.common import answer_options, client_tls, fail, run_async
from portcullis.cli.shadow import shadow
from portcullis.cli.shadow_agent import shadow_agent
from portcullis.pki.roles import ROLES

T = TypeVar("T")
DEFAULT_DIR = "./.portcullis"


dir_option = click.option("--dir", "directory", type=click.Path(path_type=Path),
                          default=DEFAULT_DIR, show_default=True,
                          help="The deployment directory (holds portcullis.toml).")


# -- deployment ---------------------------------------------------------------------
@click.command()
@dir_option
@click.option("--hostname", default="localhost", show_default=True,
              help="The name users reach the gateway by (goes into its certificate).")
@click.option("--port", default=8443, show_default=True, help="The gateway's TLS port.")
def init(directory: Path, hostname: str, port: int) -> None:
    """Create a deployment: config, CA and certificates, database, admin account."""
    from portcullis.deployment import init_deployment

    result = init_deployment(directory, hostname=hostname, port=port)
    click.echo(f"Created a deployment in {result.directory}")
    click.echo(f"  portal:   {result.portal_url}")
    click.echo(f"  CA:       {result.directory / 'pki' / 'ca.crt'} (give it to clients: --ca)")
    click.echo(f"  account:  {result.admin_user}")
    click.echo(f"  password: {result.admin_password}   (shown once: change it with "
               f"'portcullis user passwd {result.admin_user}')")


def _load(directory: Path) -> Any:
    from portcullis.config import config_path, load_settings

    return load_settings(config_path(directory))


def _settings(directory: Path) -> Any:
    """The settings, with logging configured as they say (for the servers)."""
    from portcullis.audit import configure_logging

    settings = _load(directory)
    configure_logging(settings.log.level, settings.log.format)
    return settings


def _serve(directory: Path, roles: tuple[str, ...]) -> None:
    from portcullis.node import ListenAddress
    from portcullis.workers import serve_node

    settings = _settings(directory)

    def ready(addresses: Sequence[ListenAddress]) -> None:
        for address in addresses:
            click.echo(f"{address.role} listening on https://{address.host}:{address.port}")
        if "gateway" in roles and "portal" in roles:
            click.echo(f"Portal: {settings.gateway.public_url}/")
        sys.stdout.flush()

    serve_node(settings, roles, ready, run_async)


@click.command()
@dir_option
def up(directory: Path) -> None:
    """Run the gateway, portal, STA and shadow hub in one process."""
    _serve(directory, ("gateway", "portal", "sta", "shadow-hub"))


@click.command()
@click.argument("roles", nargs=-1, required=True,
                type=click.Choice(ROLES))
@dir_option
def serve(roles: tuple[str, ...], directory: Path) -> None:
    """Run some roles only (a deployment spread over hosts). The relay runs alone: it
    belongs on another host, in the second DMZ."""
    if "relay" in roles:
        if set(roles) != {"relay"}:
            fail("the relay runs in a process of its own: 'portcullis serve relay' "
                 "(start the other roles with another command)", 2)
        _serve_relay(directory)
        return
    _serve(directory, roles)


def _serve_relay(directory: Path) -> None:
    from portcullis.relay.node import Listening, RelayNode

    settings = _settings(directory)

    def ready(listening: Listening) -> None:
        if listening.classic is not None:
            host, port = listening.classic
            click.echo(f"Relay: listening on {host}:{port}")
        if settings.relay.edges:
            click.echo(f"Relay: dialling out to {', '.join(settings.relay.edges)}")
        host, port = listening.health
        click.echo(f"Relay health: http://{host}:{port}/ready")
        sys.stdout.flush()

    async def serve() -> None:
        await RelayNode.build(settings).serve(ready)

    run_async(serve())


@click.group()
def relay() -> None:
    """The relay of the double hop (second DMZ)."""


@relay.command("status")
@dir_option
@click.option("--timeout", default=5.0, show_default=True, help="Seconds to wait for it.")
def relay_status(directory: Path, timeout: float) -> None:
    """Show a running relay's edges, connections, streams, bytes and refusals (read from
    relay.health_listen); exit 1 if it is not ready."""
    from portcullis.relay.health import read_status

    status = read_status(_load(directory).relay.health_listen, timeout=timeout)
    click.echo(f"ready:        {'yes' if status['ready'] else 'no'}")
    for reason in status["reasons"]:
        click.echo(f"  - {reason}")
    click.echo(f"connections:  {status['connections']}")
    click.echo(f"streams:      {status['streams']} open, {status['streams_total']} in all")
    click.echo(f"bytes:        {status['bytes_to_edges']} to edges, "
               f"{status['bytes_from_edges']} from edges")
    click.echo("edges:" + ("" if status["edges"] else "        none"))
    for edge, connections in status["edges"].items():
        click.echo(f"  {edge:<40} {connections} connections")
    click.echo("refusals:" + ("" if status["refusals"] else "     none"))
    for reason, count in status["refusals"].items():
        click.echo(f"  {reason:<40} {count}")
    if not status["ready"]:
        sys.exit(1)


# -- accounts -------------------------------------------------------------------------
@click.group()
def user() -> None:
    """Manage local accounts."""


def _with_store(directory: Path, action: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    from portcullis.store import DurableStore

    settings = _load(directory)

    async def run() -> T:
        store = await DurableStore.open(settings.durable_url())
        try:
            return await action(store)
        finally:
            await store.close()

    return asyncio.run(run())


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    from portcullis.identity.passwords import MAX_PASSWORD

    if not password or len(password) > MAX_PASSWORD:
        fail(f"a password must be 1 to {MAX_PASSWORD} characters", 2)
    return password


@user.command("add")
@click.argument("name")
@dir_option
@click.option("--group", "groups", multiple=True, help="A group to add the user to (repeat).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(name: str, directory: Path, groups: tuple[str, ...], password_stdin: bool) -> None:
    """Add a local account."""
    from portcullis.identity.names import canonical_username
    from portcullis.identity.passwords import hash_password

    canonical = canonical_username(name)
    password_hash = hash_password(_read_password(password_stdin))
    _with_store(directory, lambda store: store.add_user(canonical, password_hash, groups))
    click.echo(f"added {canonical}" + (f" (groups: {', '.join(sorted(groups))})" if groups else ""))


@user.command("passwd")
@click.argument("name")
@dir_option
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_passwd(name: str, directory: Path, password_stdin: bool) -> None:
    """Set a local account's password."""
    from portcullis.identity.names import canonical_username
    from portcullis.identity.passwords import hash_password

    canonical = canonical_username(name)
    password_hash = hash_password(_read_password(password_stdin))
    _with_store(directory, lambda store: store.set_password(canonical, password_hash))
    click.echo(f"password changed for {canonical}")
    _announce_ending(directory, canonical, "password changed")


def _announce_ending(directory: Path, user: str, ending: str) -> None:
    """Tell the gateways (through the shared store) to end the user's connections now."""
    from portcullis.errors import StoreError
    from portcullis.identity.endings import Ending, SessionEnded, announce_from_elsewhere

    try:
        asyncio.run(announce_from_elsewhere(_load(directory).ephemeral_url(),
                                            SessionEnded(Ending(ending), user=user)))
    except StoreError as exc:
        click.echo(f"portcullis: warning: the gateways could not be told at once ({exc}); "
                   "they end the connections at their next check", err=True)


def _set_disabled(name: str, directory: Path, disabled: bool) -> None:
    from portcullis.identity.tooling import local_account

    canonical = asyncio.run(local_account(_load(directory), name))
    _with_store(directory, lambda store: store.set_disabled(canonical, disabled))
    click.echo(f"{'disabled' if disabled else 'enabled'} {canonical}")
    if disabled:
        _announce_ending(directory, canonical, "account disabled")


@user.command("disable")
@click.argument("name")
@dir_option
def user_disable(name: str, directory: Path) -> None:
    """Disable an account: its sessions and connections end within about a second."""
    _set_disabled(name, directory, True)


@user.command("enable")
@click.argument("name")
@dir_option
def user_enable(name: str, directory: Path) -> None:
    """Enable a disabled account."""
    _set_disabled(name, directory, False)


@user.command("list")
@dir_option
def user_list(directory: Path) -> None:
    """List local accounts."""
    users = _with_store(directory, lambda store: store.list_users())
    click.echo(f"{'NAME':<24} {'STATE':<9} GROUPS")
    for record in users:
        state = "disabled" if record.disabled else "enabled"
        click.echo(f"{record.name:<24} {state:<9} {', '.join(record.groups)}")


def _realm_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--realm", help=help_text + " Default: the default flow's realm.")


@user.command("show")
@click.argument("name")
@dir_option
def user_show(name: str, directory: Path) -> None:
    """Show an account: local state, TOTP enrolment and lockout, per realm. NAME is any
    name the user signs in with (account name, UPN, mail)."""
    from portcullis.identity.names import canonical_username
    from portcullis.identity.tooling import account_report

    settings = _load(directory)
    canonical = canonical_username(name)
    local, reports = asyncio.run(account_report(settings, name))
    click.echo(f"{canonical}: {local}")
    for report in reports:
        if report.username is None:
            click.echo(f"  realm {report.realm}: no such user")
            continue
        click.echo(f"  realm {report.realm}: {report.username}")
        click.echo(f"    totp:    {report.totp}")
        if report.lock is None:
            click.echo("    lockout: unknown here (store.ephemeral is memory://: the counters "
                       "live in the running gateway)")
        else:
            state = "LOCKED" if report.lock.locked else "not locked"
            click.echo(f"    lockout: {state}, {report.lock.failures} recent failure(s)")


@user.command("totp-reset")
@click.argument("name")
@_realm_option("The realm whose TOTP secret to forget.")
@dir_option
def user_totp_reset(name: str, realm: str | None, directory: Path) -> None:
    """Forget a user's TOTP secret and recovery codes: they enrol at their next sign-in."""
    from portcullis.audit import AuditTrail
    from portcullis.identity.tooling import reset_totp, resolve_identity

    settings = _load(directory)
    identity = asyncio.run(resolve_identity(settings, realm, name))
    removed = asyncio.run(reset_totp(settings, identity))
    audit = AuditTrail(settings.path(settings.log.audit_file))
    audit.record("totp.reset", identity=identity, removed=removed, by="portcullis user")
    audit.close()
    click.echo(f"TOTP reset for {identity}: enrols at next sign-in" if removed
               else f"{identity} had no TOTP secret (nothing to reset)")


@user.command("totp-code")
@click.argument("name")
@_realm_option("The realm whose TOTP enrolment the code allows.")
@dir_option
def user_totp_code(name: str, realm: str | None, directory: Path) -> None:
    """Issue a one-time code that lets a user enrol their first authenticator app (with
    auth.totp.enrolment = "code"); it replaces any earlier code and expires."""
    from portcullis.audit import AuditTrail
    from portcullis.identity.tooling import issue_enrolment_code, resolve_identity

    settings = _load(directory)
    # A RADIUS user cannot be looked up before their first sign-in: taken as typed.
    identity = asyncio.run(resolve_identity(settings, realm, name, accept_unsearchable=True))
    code, expires = asyncio.run(issue_enrolment_code(settings, identity))
    audit = AuditTrail(settings.path(settings.log.audit_file))
    audit.record("totp.enrolment_code_issued", identity=identity,
                 expires=expires.isoformat(timespec="seconds"), by="portcullis user")
    audit.close()
    click.echo(f"enrolment code for {identity}: {code} (single use, valid until "
               f"{expires:%Y-%m-%d %H:%M} UTC)")
    if settings.auth.totp.enrolment != "code":
        click.echo('note: auth.totp.enrolment is "self": sign-ins do not ask for it')


@user.command("unlock")
@click.argument("name")
@_realm_option("The realm whose lockout to clear.")
@dir_option
def user_unlock(name: str, realm: str | None, directory: Path) -> None:
    """Clear a user's failed sign-in count and lockout (in the store the gateway uses)."""
    from portcullis.identity.tooling import resolve_identity, unlock
    from portcullis.store import shared_between_processes

    settings = _load(directory)
    if not shared_between_processes(settings.store.ephemeral):
        fail("store.ephemeral is memory://: lockouts live in the running gateway and end "
             f"by themselves after auth.throttle.lockout_seconds "
             f"({settings.auth.throttle.lockout_seconds:g} s)", 2)
    identity = asyncio.run(resolve_identity(settings, realm, name))
    asyncio.run(unlock(settings, identity))
    click.echo(f"unlocked {identity}")


# -- certificates -------------------------------------------------------------------------
@click.group()
def cert() -> None:
    """Issue, renew and check the deployment's certificates."""


@cert.command("issue")
@click.argument("name", required=False)
@click.option("--role", type=click.Choice(ROLES),
              help="Issue a role's certificate (ROLE.crt) instead of a user's.")
@click.option("--hostname", "hostnames", multiple=True,
              help="A DNS name the role is reached by (repeat; with --role).")
@click.option("--ip", "ips", multiple=True,
              help="An IP address the role is reached at (repeat; with --role).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Where to write NAME.crt and NAME.key (or ROLE.*).")
@click.option("--days", default=365, show_default=True, help="How long it is valid.")
@dir_option
def cert_issue(name: str | None, role: str | None, hostnames: tuple[str, ...],
               ips: tuple[str, ...], out_dir: Path, days: int, directory: Path) -> None:
    """Issue a client certificate (common name NAME) for a user or a company device, or
    with --role a role's certificate (e.g. the relay's, for its own host).

    Flows read a user's certificate when auth.client_ca is the deployment CA
    (pki/ca.crt): conditions `certificate = "valid"` and the `certificate` factor, which
    takes the user name from the common name.
    """
    from portcullis.pki import issue_certificate, load_pair, write_pair
    from portcullis.pki.roles import ROLE_COMMON_NAMES

    if (name is None) == (role is None):
        fail("give a NAME for a user's certificate, or --role ROLE", 2)
    if name is not None and (hostnames or ips):
        fail("--hostname and --ip go with --role", 2)
    if name in ROLE_COMMON_NAMES.values():
        fail(f"{name!r} is the common name of a Portcullis role; choose another", 2)
    settings = _load(directory)
    pki = settings.path(settings.tls.directory)
    ca = load_pair(pki / "ca.crt", pki / "ca.key")
    if role is not None:
        issued = issue_certificate(ca, ROLE_COMMON_NAMES[role], dns_names=hostnames,
                                   ip_addresses=ips, valid_days=days)
        cert_path, key_path = write_pair(out_dir, role, issued)
    else:
        assert name is not None
        issued = issue_certificate(ca, name, server=False, client=True, valid_days=days)
        cert_path, key_path = write_pair(out_dir, name, issued)
    click.echo(f"issued {cert_path} and {key_path} (valid {days} days)")


@cert.command("renew")
@click.argument("roles", nargs=-1, type=click.Choice(ROLES))
@click.option("--all", "all_roles", is_flag=True, help="Renew every role certificate.")
@dir_option
def cert_renew(roles: tuple[str, ...], all_roles: bool, directory: Path) -> None:
    """Re-issue role certificates from the CA, keeping their names (needs pki/ca.key).

    A running node loads the new certificate at its daily check, or at once on SIGHUP.
    """
    from portcullis.pki import load_pair
    from portcullis.pki.renewal import renew_role

    if bool(roles) == all_roles:
        fail("name the roles to renew, or pass --all", 2)
    settings = _load(directory)
    pki = settings.path(settings.tls.directory)
    ca = load_pair(settings.ca_cert_path, pki / "ca.key")
    for role in roles or ROLES:
        renewed = renew_role(pki, role, ca)
        click.echo(f"renewed {renewed.path} (valid until {renewed.not_after:%Y-%m-%d})")


@cert.command("status")
@dir_option
def cert_status(directory: Path) -> None:
    """Show the deployment's certificates and their expiry; exit 1 if one needs attention."""
    from portcullis.pki.maintenance import check_deployment

    checks = check_deployment(_load(directory))
    for check in checks:
        click.echo(f"{check.name:<15} {check.subject:<32} until {check.not_after:%Y-%m-%d} "
                   f"({check.days_left} days)  {check.problem or 'ok'}")
    if any(check.problem for check in checks):
        sys.exit(1)


# -- identity ---------------------------------------------------------------------------
@click.group()
def auth() -> None:
    """Try sign-in flows against the configured providers."""


@auth.command("test")
@click.option("--flow", "flow_name", help="The flow (default: auth.flow).")
@click.option("--user", "username", required=True, help="Whom to sign in as.")
@click.option("--answer", "answers", multiple=True, metavar="PROMPT=VALUE",
              help="Answer a prompt without being asked (repeatable).")
@click.option("--client-address", default="127.0.0.1", show_default=True,
              help="The client address the flow's conditions see.")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False),
              help="A client certificate (PEM) the conditions see, as if TLS verified it.")
@click.option("--callback-port", type=click.IntRange(0, 65535), default=0,
              help="Loopback port for an identity provider's answer (0: any free port); "
                   "register http://127.0.0.1:PORT/login/callback/NAME with the provider.")
@click.option("--device", is_flag=True,
              help="Sign in at an identity provider with a device code, as 'login --device'.")
@dir_option
def auth_test(flow_name: str | None, username: str, answers: tuple[str, ...],
              client_address: str, cert_file: str | None, callback_port: int,
              device: bool, directory: Path) -> None:
    """Dry-run a flow: each step's outcome and why, and the claims a sign-in would carry.

    Directories and RADIUS servers are asked for real; lockout counters and the TOTP
    replay cache are not touched, and an enrolment is not stored. A step at an identity
    provider prints the URL to open and waits for the provider's answer.
    """
    import ssl

    from portcullis.identity.conditions import ClientCertificate, LoginContext
    from portcullis.identity.tooling import dry_run

    settings = _load(directory)
    name = flow_name or settings.auth.flow
    if name not in {flow.name for flow in settings.auth.flows}:
        fail(f"no flow named {name!r} in auth.flows", 2)
    given = answer_options(answers)
    certificate = (ClientCertificate.from_der(ssl.PEM_cert_to_DER_cert(
        Path(cert_file).read_text())) if cert_file else None)

    def answer(step: Any, prompt: Any) -> str:
        if prompt.name in given:
            return given.pop(prompt.name)
        return str(click.prompt(prompt.label, hide_input=prompt.secret))

    result = asyncio.run(dry_run(settings, name, username, answer, click.echo,
                                 LoginContext(client_address, certificate),
                                 callback_port=callback_port, device=device))
    if result.claims is None:
        if result.outcome == "denied":
            fail("the flow would not sign this user in", 1)
        return
    click.echo("claims:")
    for key, value in result.claims.to_json().items():
        if value not in (None, (), []):
            shown = ", ".join(value) if isinstance(value, list | tuple) else value
            click.echo(f"  {key:<13} {shown}")


# -- sessions and policies --------------------------------------------------------------
@click.group()
def sessions() -> None:
    """List and end the launches and tunnels on the gateway you are signed in to."""


@sessions.command("list")
def sessions_list() -> None:
    """The gateway's launches and tunnels (admin groups only)."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    state = ClientState.load(client_home())
    with PortalApi(state.url, client_tls(state.ca_file), state.token) as api:
        items = api.admin_sessions()
    click.echo(f"{'ID':<17} {'KIND':<7} {'USER':<16} {'CLIENT':<16} {'STREAMS':>7} "
               f"{'BYTES IN':>12} {'BYTES OUT':>12}  SINCE")
    for item in items:
        since = __import__("datetime").datetime.fromtimestamp(item["since"]).isoformat(
            timespec="seconds")
        click.echo(f"{item['id']:<17} {item['kind']:<7} {item['user']:<16} "
                   f"{item['client']:<16} {item['streams']:>7} "
                   f"{item['bytes_from_client']:>12} {item['bytes_to_client']:>12}  {since}")


@sessions.command("kill")
@click.argument("session_id", required=False)
@click.option("--user", "username", help="End every session of this user.")
@click.option("--connections-only", is_flag=True,
              help="End the connections but keep the sign-in session (the user may "
                   "connect again); by default the session is revoked on every node.")
def sessions_kill(session_id: str | None, username: str | None,
                  connections_only: bool) -> None:
    """End a launch or tunnel by ID, or all of a user's, and revoke their sign-in."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    if (session_id is None) == (username is None):
        fail("give a session ID or --user NAME (one of them)", 2)
    state = ClientState.load(client_home())
    with PortalApi(state.url, client_tls(state.ca_file), state.token) as api:
        ended, revoked = api.end_sessions(session_id=session_id, user=username,
                                          connections_only=connections_only)
    click.echo(f"ended {len(ended)} connection(s) here: {' '.join(ended)}" if ended
               else "no such session on this gateway" if session_id is not None
               else "no connection of theirs on this gateway")
    if revoked:
        click.echo(f"revoked {revoked} sign-in session(s): their connections end on every "
                   "node, their tokens and tickets no longer work")


@click.group()
def policy() -> None:
    """Inspect the access policies."""


@policy.command("explain")
@click.option("--user", "username", help="A local account, or with --sign-in anyone.")
@click.option("--session", "token", help="A live session's token: its claims are used.")
@click.option("--sign-in", "sign_in", is_flag=True,
              help="Run the sign-in flow for --user (as `auth test` does) and use its claims.")
@click.option("--flow", "flow_name", help="The flow for --sign-in (default: auth.flow).")
@click.option("--answer", "answers", multiple=True, metavar="PROMPT=VALUE",
              help="Answer a sign-in prompt without being asked (repeatable; implies --sign-in).")
@click.option("--to", "target", metavar="HOST:PORT/PROTO",
              help="The destination, e.g. db.corp.example:5432/tcp or 10.1.2.3:53/udp.")
@click.option("--shadow", "device", metavar="DEVICE",
              help="Instead of --to: may the user shadow this device (shadow hub)?")
@dir_option
def policy_explain(username: str | None, token: str | None, sign_in: bool,
                   flow_name: str | None, answers: tuple[str, ...], target: str | None,
                   device: str | None, directory: Path) -> None:
    """Say whether the gateway admits a user to a destination (or the hub lets them
    shadow a device), which rule or protected range decides, and why. Run it on a
    gateway host."""
    from portcullis.identity.conditions import LoginContext
    from portcullis.policy import explain as explaining

    if (username is None) == (token is None):
        fail("give --user NAME or --session TOKEN (one of them)", 2)
    if (target is None) == (device is None):
        fail("give --to HOST:PORT/PROTO or --shadow DEVICE (one of them)", 2)
    settings = _load(directory)
    given = answer_options(answers)

    def answer(step: Any, prompt: Any) -> str:
        if prompt.name in given:
            return given.pop(prompt.name)
        return str(click.prompt(prompt.label, hide_input=prompt.secret))

    async def run() -> list[str]:
        if token is not None:
            who = await explaining.session_user(settings, token)
        elif sign_in or answers:
            who = await explaining.signed_in_user(
                settings, flow_name or settings.auth.flow, str(username), answer,
                lambda line: click.echo(line, err=True), LoginContext("127.0.0.1", None))
        else:
            who = await explaining.local_user(settings, str(username))
        if device is not None:
            return explaining.explain_shadow(settings, who, device)[1]
        return (await explaining.explain(settings, who, str(target)))[1]

    for line in asyncio.run(run()):
        click.echo(line)


# Every administrator's command by the name `portcullis` gives it.
ADMIN_COMMANDS: dict[str, click.Command] = {
    "init": init, "up": up, "serve": serve, "relay": relay, "user": user, "cert": cert,
    "auth": auth, "sessions": sessions, "policy": policy, "shadow": shadow,
    "shadow-agent": shadow_agent,
}
