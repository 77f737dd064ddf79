"""The `portcullis` command. It parses arguments and prints; everything it does is a
call into the package. Exit status: 0 success, 1 failure, 2 bad configuration or usage."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from portcullis.errors import ConfigError, PortcullisError

T = TypeVar("T")
DEFAULT_DIR = "./.portcullis"


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a long-lived command (servers, launches) on uvloop with the data-path tuning."""
    import uvloop

    from portcullis.net.allocator import tune_allocator

    tune_allocator()
    return uvloop.run(coroutine)


def fail(message: str, status: int = 1) -> None:
    click.echo(f"portcullis: {message}", err=True)
    sys.exit(status)


class PortcullisGroup(click.Group):
    """Turns our errors into one line on stderr and the documented exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail(str(exc), 2)
        except PortcullisError as exc:
            fail(str(exc), 1)
        except KeyboardInterrupt:
            fail("interrupted", 130)


dir_option = click.option("--dir", "directory", type=click.Path(path_type=Path),
                          default=DEFAULT_DIR, show_default=True,
                          help="The deployment directory (holds portcullis.toml).")


@click.group(cls=PortcullisGroup)
@click.version_option(package_name="portcullis")
def main() -> None:
    """Portcullis: a secure remote-access gateway."""


# -- deployment ---------------------------------------------------------------------
@main.command()
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
    from portcullis.node import Node

    settings = _settings(directory)

    def ready(node: Node) -> None:
        for listener in node.listeners:
            click.echo(f"{listener.role} listening on https://{listener.host}:{listener.port}")
        if "gateway" in node.roles and "portal" in node.roles:
            click.echo(f"Portal: {settings.gateway.public_url}/")
        sys.stdout.flush()

    async def serve() -> None:
        node = await Node.build(settings, roles)
        await node.serve(ready)

    run_async(serve())


@main.command()
@dir_option
def up(directory: Path) -> None:
    """Run the gateway, portal and STA in one process."""
    _serve(directory, ("gateway", "portal", "sta"))


@main.command()
@click.argument("roles", nargs=-1, required=True,
                type=click.Choice(["gateway", "portal", "sta"]))
@dir_option
def serve(roles: tuple[str, ...], directory: Path) -> None:
    """Run some roles only (a deployment spread over hosts)."""
    _serve(directory, roles)


# -- accounts -------------------------------------------------------------------------
@main.group()
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


def _set_disabled(name: str, directory: Path, disabled: bool) -> None:
    from portcullis.identity.names import canonical_username

    canonical = canonical_username(name)
    _with_store(directory, lambda store: store.set_disabled(canonical, disabled))
    click.echo(f"{'disabled' if disabled else 'enabled'} {canonical}")


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


# -- client ---------------------------------------------------------------------------
def _client_tls(ca_file: str | None) -> Any:
    from portcullis.net.tls import client_context

    return client_context(Path(ca_file) if ca_file else None)


@main.command()
@click.argument("url")
@click.option("--user", "username", required=True, help="Your user name.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False),
              help="The deployment's CA certificate, if the system does not trust the gateway.")
def login(url: str, username: str, password_stdin: bool, ca_file: str | None) -> None:
    """Sign in to a Portcullis gateway and remember the session."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home, keep_ca_file

    if not url.startswith("https://"):
        fail(f"the gateway URL must start with https:// (got {url!r})", 2)
    home = client_home()
    stdin_lines = iter(sys.stdin.readline, "") if password_stdin else iter(())

    def answer(name: str, label: str, secret: bool) -> str:
        if name == "username":
            return username
        line = next(stdin_lines, None)
        if line is not None:
            return str(line).rstrip("\r\n")
        return str(click.prompt(label, hide_input=secret))

    with PortalApi(url, _client_tls(ca_file)) as api:
        signed_in = api.login(answer)
    kept_ca = str(keep_ca_file(home, Path(ca_file))) if ca_file else None
    ClientState(url.rstrip("/"), signed_in.user, signed_in.token, kept_ca).save(home)
    click.echo(f"signed in as {signed_in.user}"
               + (f" (groups: {', '.join(signed_in.groups)})" if signed_in.groups else ""))


@main.command()
def logout() -> None:
    """End the saved session."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    home = client_home()
    state = ClientState.load(home)
    with PortalApi(state.url, _client_tls(state.ca_file), state.token) as api:
        api.logout()
    ClientState.forget(home)
    click.echo("signed out")


@main.command()
def resources() -> None:
    """List the resources you may launch."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    state = ClientState.load(client_home())
    with PortalApi(state.url, _client_tls(state.ca_file), state.token) as api:
        items = api.resources()
    if not items:
        click.echo("no resources are published for you")
    for item in items:
        click.echo(f"{item['name']:<20} {item['title']}")


@main.command()
@click.argument("name", required=False)
@click.option("--file", "launch_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A launch file downloaded from the portal.")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="Local HOST:PORT to listen on (port 0: any free port).")
@click.option("--exec", "command",
              help="Start this command against the listener; {host} and {port} are replaced.")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False),
              help="The deployment's CA certificate (default: the one saved at login).")
def launch(name: str | None, launch_file: Path | None, listen: str, command: str | None,
           ca_file: str | None) -> None:
    """Launch a resource: forward a local port to it through the gateway."""
    from portcullis.client.launcher import run_launch
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import STATE_FILE, ClientState, client_home
    from portcullis.config import parse_host_port
    from portcullis.errors import ClientError
    from portcullis.proto.launchfile import parse_launch_file

    if (name is None) == (launch_file is None):
        fail("give a resource NAME or --file FILE (one of them)", 2)
    try:
        host, port = parse_host_port(listen, what="--listen", any_port=True)
    except ValueError as exc:
        fail(str(exc), 2)
    home = client_home()
    if launch_file is not None:
        try:
            launch_data = parse_launch_file(launch_file.read_bytes())
        except OSError as exc:
            raise ClientError(f"cannot read {launch_file}: {exc.strerror}") from None
        if ca_file is None and (home / STATE_FILE).exists():
            ca_file = ClientState.load(home).ca_file
    else:
        state = ClientState.load(home)
        ca_file = ca_file or state.ca_file
        with PortalApi(state.url, _client_tls(ca_file), state.token) as api:
            assert name is not None
            launch_data = api.launch(name)

    def listening(bound_host: str, bound_port: int) -> None:
        click.echo(f"{launch_data.title}: listening on {bound_host}:{bound_port}")
        sys.stdout.flush()

    def refused(message: str) -> None:
        click.echo(f"portcullis: a connection to {launch_data.title} failed: {message}", err=True)

    status = run_async(run_launch(launch_data, _client_tls(ca_file), host=host, port=port,
                                  on_listening=listening, on_refused=refused,
                                  command=command))
    sys.exit(status)


# -- the VPN tunnel ---------------------------------------------------------------------
def _forward_spec(value: str) -> tuple[str, int, str, int]:
    """-L [BIND:]LPORT:HOST:PORT (HOST may be [v6])."""
    import re

    match = re.fullmatch(r"(?:(\[[^\]]+\]|[^:\[\]]+):)?(\d+):(\[[^\]]+\]|[^:\[\]]+):(\d+)",
                         value)
    if not match:
        raise click.BadParameter(f"{value!r}: expected [BIND:]LPORT:HOST:PORT")
    bind = (match.group(1) or "127.0.0.1").strip("[]")
    return bind, int(match.group(2)), match.group(3).strip("[]"), int(match.group(4))


@main.command()
@click.option("--socks", default="127.0.0.1:1080", show_default=True,
              help="Local SOCKS5 proxy address ('off' for none).")
@click.option("--http", "http_proxy", default="127.0.0.1:3128", show_default=True,
              help="Local HTTP CONNECT proxy address ('off' for none).")
@click.option("-L", "forwards", multiple=True, metavar="[BIND:]LPORT:HOST:PORT",
              help="Forward a local TCP port to HOST:PORT inside (repeat).")
@click.option("-U", "udp_forwards", multiple=True, metavar="[BIND:]LPORT:HOST:PORT",
              help="Forward a local UDP port to HOST:PORT inside (repeat).")
@click.option("--transparent", is_flag=True,
              help="Linux, root: capture the pushed networks' TCP, UDP and DNS (nftables).")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False),
              help="The deployment's CA certificate (default: the one saved at login).")
def connect(socks: str, http_proxy: str, forwards: tuple[str, ...],
            udp_forwards: tuple[str, ...], transparent: bool, ca_file: str | None) -> None:
    """Open the VPN tunnel: local proxies and forwards into the protected networks."""
    from portcullis.client.connect import Listen, run_connect
    from portcullis.client.state import ClientState, client_home
    from portcullis.config import parse_host_port

    home = client_home()
    state = ClientState.load(home)
    listens: list[Listen] = []
    proxies: tuple[tuple[Literal["socks", "http"], str], ...] = (
        ("socks", socks), ("http", http_proxy))
    for kind, value in proxies:
        if value != "off":
            try:
                host, port = parse_host_port(value, what=f"--{kind}", any_port=True)
            except ValueError as exc:
                fail(str(exc), 2)
            listens.append(Listen(kind, host, port))
    try:
        for spec in forwards:
            bind, local_port, host, port = _forward_spec(spec)
            listens.append(Listen("forward", bind, local_port, host, port))
        for spec in udp_forwards:
            bind, local_port, host, port = _forward_spec(spec)
            listens.append(Listen("udp", bind, local_port, host, port))
    except click.BadParameter as exc:
        fail(str(exc.message), 2)

    def say(line: str) -> None:
        click.echo(line, err=True)

    def listening(listen: Listen, host: str, port: int) -> None:
        click.echo(f"{listen.describe()}: listening on {host}:{port}")
        sys.stdout.flush()

    reason = run_async(run_connect(state, _client_tls(ca_file or state.ca_file), listens,
                                   home=home, say=say, on_listening=listening,
                                   transparent=transparent))
    if reason != "stopped":
        fail(f"the tunnel ended: {reason}", 1)


@main.command()
@click.argument("host")
@click.option("-c", "--count", default=4, show_default=True, type=click.IntRange(1, 65535),
              help="How many echoes.")
@click.option("-i", "--interval", default=1.0, show_default=True, help="Seconds between them.")
def ping(host: str, count: int, interval: float) -> None:
    """ICMP echo to HOST inside, performed by the gateway through the tunnel."""
    from portcullis.client.ping import run_ping
    from portcullis.client.state import ClientState, client_home

    state = ClientState.load(client_home())
    answered = run_async(run_ping(state, _client_tls(state.ca_file), host, count=count,
                                  interval=interval, say=click.echo))
    click.echo(f"{count} sent, {answered} answered, {100 * (count - answered) // count}% lost")
    if answered == 0:
        sys.exit(1)


@main.command()
def status() -> None:
    """Show the running tunnel: bytes, streams, round trip, networks."""
    from portcullis.client.connect import read_status
    from portcullis.client.state import client_home

    current = read_status(client_home())
    if current is None:
        fail("no tunnel is running ('portcullis connect' starts one)", 1)
    assert current is not None
    for key in ("gateway", "user", "tunnel", "connected", "intranet_ip", "networks",
                "streams", "bytes_sent", "bytes_received", "rtt_ms", "ended"):
        click.echo(f"{key:<15} {current.get(key)}")


@main.group()
def sessions() -> None:
    """List and end the launches and tunnels on the gateway you are signed in to."""


@sessions.command("list")
def sessions_list() -> None:
    """The gateway's launches and tunnels (admin groups only)."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    state = ClientState.load(client_home())
    with PortalApi(state.url, _client_tls(state.ca_file), state.token) as api:
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
def sessions_kill(session_id: str | None, username: str | None) -> None:
    """End a launch or tunnel by ID, or all of a user's."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    if (session_id is None) == (username is None):
        fail("give a session ID or --user NAME (one of them)", 2)
    state = ClientState.load(client_home())
    with PortalApi(state.url, _client_tls(state.ca_file), state.token) as api:
        ended = api.end_sessions(session_id=session_id, user=username)
    click.echo(f"ended {len(ended)} session(s): {' '.join(ended)}" if ended
               else "no such session on this gateway")


@main.group()
def policy() -> None:
    """Inspect the access policies."""


@policy.command("explain")
@click.option("--user", "username", required=True, help="The user (their groups are looked up).")
@click.option("--to", "target", required=True, metavar="HOST:PORT/PROTO",
              help="The destination, e.g. db.corp.example:5432/tcp or 10.1.2.3:53/udp.")
@dir_option
def policy_explain(username: str, target: str, directory: Path) -> None:
    """Say which rule decides whether USER may reach a destination, and why."""
    from portcullis.policy.explain import explain

    for line in asyncio.run(explain(_load(directory), username, target)):
        click.echo(line)


if __name__ == "__main__":
    main(prog_name=os.path.basename(sys.argv[0]))
