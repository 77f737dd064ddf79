"""The client's commands: sign in, list and launch resources (also from a `portcullis://`
link), open the VPN tunnel. `portcullis-client` is these commands alone, in a light
package of its own (client-dist/); `portcullis` has them beside the administrator's
(`cli/admin.py`). Parsing and printing only; everything is a call into
`portcullis.client`. Nothing here, nor anything it imports, belongs to a server role
(tests/client/test_client_boundary.py holds that line)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

import portcullis
from portcullis.cli.common import PortcullisGroup, answer_options, client_tls, fail, run_async

if TYPE_CHECKING:
    from portcullis.proto.launchfile import LaunchFile


@click.command()
@click.argument("url")
@click.option("--user", "username", help="Your user name (asked if the sign-in needs it).")
@click.option("--answer", "answers", multiple=True, metavar="PROMPT=VALUE",
              help="Answer a prompt by name without being asked, e.g. code=123456 "
                   "(repeatable; for scripts).")
@click.option("--password-stdin", is_flag=True,
              help="Read secret answers (password, code) from standard input, one per line.")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False),
              help="The deployment's CA certificate, if the system does not trust the gateway.")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False),
              help="Your client certificate (PEM), for flows that read one.")
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False),
              help="The private key of --cert (PEM).")
@click.option("--no-browser", is_flag=True,
              help="Only print the URL of an identity provider's sign-in page; do not open "
                   "a browser.")
@click.option("--device", is_flag=True,
              help="In an ssh session: sign in at the identity provider on any device with "
                   "a code (RFC 8628), where the provider offers it.")
def login(url: str, username: str | None, answers: tuple[str, ...], password_stdin: bool,
          ca_file: str | None, cert_file: str | None, key_file: str | None,
          no_browser: bool, device: bool) -> None:
    """Sign in to a Portcullis gateway and remember the session.

    Each step of the sign-in flow is asked in turn (password, verification code, a
    RADIUS challenge); a first sign-in that must set up an authenticator app shows its
    QR code here. A step at an identity provider (OpenID Connect, SAML) opens a browser
    on this machine (or prints the URL to open); the answer comes back to this command.
    In an ssh session, --device prints a URL and a code to sign in with on any device.
    """
    from portcullis.client.browser import browse_instead_of_device, browse_to, show_device
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home, keep_ca_file
    from portcullis.net.tls import client_context

    if not url.startswith("https://"):
        fail(f"the gateway URL must start with https:// (got {url!r})", 2)
    if (cert_file is None) != (key_file is None):
        fail("--cert and --key go together", 2)
    given = answer_options(answers)
    if username is not None:
        given.setdefault("username", username)
    home = client_home()
    stdin_lines = iter(sys.stdin.readline, "") if password_stdin else iter(())
    shown: set[str] = set()

    def answer(step: dict[str, Any], prompt: dict[str, Any]) -> str:
        _show_step(step, shown)
        name = str(prompt["name"])
        if name in given:
            return given.pop(name)
        line = next(stdin_lines, None) if prompt.get("secret") or name == "code" else None
        if line is not None:
            return str(line).rstrip("\r\n")
        return str(click.prompt(prompt["label"], hide_input=bool(prompt.get("secret"))))

    tls = client_context(Path(ca_file) if ca_file else None,
                         cert_file=Path(cert_file) if cert_file else None,
                         key_file=Path(key_file) if key_file else None)
    with PortalApi(url, tls) as api:
        browse = browse_instead_of_device if device else browse_to
        signed_in = api.login(answer, lambda to: browse(to, open_browser=not no_browser),
                              device=show_device if device else None)
    kept_ca = str(keep_ca_file(home, Path(ca_file))) if ca_file else None
    ClientState(url.rstrip("/"), signed_in.user, signed_in.token, kept_ca).save(home)
    click.echo(f"signed in as {signed_in.user}"
               + (f" (groups: {', '.join(signed_in.groups)})" if signed_in.groups else ""))


def _show_step(step: dict[str, Any], shown: set[str]) -> None:
    """Print a step's message and enrolment once, to stderr (stdout stays for results)."""
    key = repr((step.get("kind"), step.get("message"), step.get("title")))
    if key in shown:
        return
    shown.add(key)
    enrolment = step.get("enrolment")
    if enrolment:
        click.echo(enrolment.get("qr_text", ""), err=True)
        click.echo(f"Key: {enrolment.get('secret')}", err=True)
        click.echo(f"URI: {enrolment.get('otpauth_uri')}", err=True)
        codes = enrolment.get("recovery_codes") or []
        if codes:
            click.echo("Recovery codes (each works once; keep them safe, they are not "
                       "shown again):", err=True)
            for code in codes:
                click.echo(f"  {code}", err=True)
    if step.get("message"):
        click.echo(str(step["message"]), err=True)


@click.command()
def logout() -> None:
    """End the saved session."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    home = client_home()
    state = ClientState.load(home)
    with PortalApi(state.url, client_tls(state.ca_file), state.token) as api:
        api.logout()
    ClientState.forget(home)
    click.echo("signed out")


@click.command()
def resources() -> None:
    """List the resources you may use: launch the tcp ones, open the others in a browser."""
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home

    state = ClientState.load(client_home())
    with PortalApi(state.url, client_tls(state.ca_file), state.token) as api:
        items = api.resources()
        if not items:
            click.echo("no resources are published for you")
        for item in items:
            kind = str(item.get("kind", "tcp"))
            where = "" if kind == "tcp" else f"  (in a browser: {api.browser_url(item)})"
            click.echo(f"{item['name']:<20} {kind:<4} {item['title']}{where}")


@click.command()
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
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import STATE_FILE, ClientState, client_home
    from portcullis.errors import ClientError
    from portcullis.net.addresses import parse_host_port
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
        with PortalApi(state.url, client_tls(ca_file), state.token) as api:
            assert name is not None
            launch_data = api.launch(name)

    _serve_launch(launch_data, ca_file, host, port, command)


def _serve_launch(launch_data: LaunchFile, ca_file: str | None, host: str, port: int,
                  command: str | None) -> None:
    from portcullis.client.launcher import run_launch

    def listening(bound_host: str, bound_port: int) -> None:
        click.echo(f"{launch_data.title}: listening on {bound_host}:{bound_port}")
        sys.stdout.flush()

    def refused(message: str) -> None:
        click.echo(f"portcullis: a connection to {launch_data.title} failed: {message}", err=True)

    status = run_async(run_launch(launch_data, client_tls(ca_file), host=host, port=port,
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


@click.command()
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
@click.option("--proxy-auth/--no-proxy-auth", default=None,
              help="Require a per-run secret on the SOCKS5 and HTTP proxies (default: "
                   "on when the machine has other users' accounts).")
@click.option("--handshake-timeout", default=10.0, show_default=True,
              type=click.FloatRange(0.1, 3600),
              help="Seconds a local client has to finish its SOCKS5 or HTTP handshake.")
@click.option("--carriers", default=2, show_default=True, type=click.IntRange(1, 16),
              envvar="PORTCULLIS_CARRIERS",
              help="WebSockets the tunnel's TCP streams spread over, so that gateway "
                   "worker processes can carry them on several cores (1: one, as "
                   "before; also PORTCULLIS_CARRIERS).")
def connect(socks: str, http_proxy: str, forwards: tuple[str, ...],
            udp_forwards: tuple[str, ...], transparent: bool, ca_file: str | None,
            proxy_auth: bool | None, handshake_timeout: float, carriers: int) -> None:
    """Open the VPN tunnel: local proxies and forwards into the protected networks."""
    from portcullis.client.connect import Listen, run_connect
    from portcullis.client.state import ClientState, client_home
    from portcullis.net.addresses import parse_host_port

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

    def listening(listen: Listen, host: str, port: int, url: str | None) -> None:
        click.echo(f"{listen.describe()}: listening on {host}:{port}"
                   + (f" ({url})" if url else ""))
        sys.stdout.flush()

    reason = run_async(run_connect(state, client_tls(ca_file or state.ca_file), listens,
                                   home=home, say=say, on_listening=listening,
                                   transparent=transparent, proxy_auth=proxy_auth,
                                   handshake_timeout=handshake_timeout,
                                   carriers=carriers))
    if reason != "stopped":
        fail(f"the tunnel ended: {reason}", 1)


@click.command()
@click.argument("host")
@click.option("-c", "--count", default=4, show_default=True, type=click.IntRange(1, 65535),
              help="How many echoes.")
@click.option("-i", "--interval", default=1.0, show_default=True, help="Seconds between them.")
def ping(host: str, count: int, interval: float) -> None:
    """ICMP echo to HOST inside, performed by the gateway through the tunnel."""
    from portcullis.client.ping import run_ping
    from portcullis.client.state import ClientState, client_home

    state = ClientState.load(client_home())
    answered = run_async(run_ping(state, client_tls(state.ca_file), host, count=count,
                                  interval=interval, say=click.echo))
    click.echo(f"{count} sent, {answered} answered, {100 * (count - answered) // count}% lost")
    if answered == 0:
        sys.exit(1)


@click.command()
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
    carriers = current.get("carriers") or []
    up = sum(1 for carrier in carriers if carrier.get("connected"))
    click.echo(f"{'carriers':<15} {up} up of {len(carriers)}")
    for carrier in carriers:
        state = f"up from {carrier.get('local')}" if carrier.get("connected") else "down"
        click.echo(f"  carrier {carrier.get('index')}: {state}, streams "
                   f"{carrier.get('streams')}, bytes_sent {carrier.get('bytes_sent')}, "
                   f"bytes_received {carrier.get('bytes_received')}")


@click.command("open")
@click.argument("url")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="Local HOST:PORT to listen on (port 0: any free port).")
@click.option("--ca", "ca_file", type=click.Path(exists=True, dir_okay=False),
              help="The deployment's CA certificate (default: the one saved at login).")
@click.option("--hold", is_flag=True,
              help="On failure, wait for Enter before exiting (the URL handler's terminal "
                   "window would otherwise close before the message can be read).")
def open_url(url: str, listen: str, ca_file: str | None, hold: bool) -> None:
    """Open a portcullis:// launch link from the portal, as a launch file would be.

    This is what the URL handler ('register') runs; the link carries the gateway and a
    single-use ticket, and nothing is written to disk."""
    from portcullis.client.launcher import foreign_gateway
    from portcullis.client.state import STATE_FILE, ClientState, client_home
    from portcullis.errors import PortcullisError
    from portcullis.net.addresses import parse_host_port
    from portcullis.proto.launchfile import parse_launch_url

    try:
        host, port = parse_host_port(listen, what="--listen", any_port=True)
        launch_data = parse_launch_url(url)
        home = client_home()
        if (home / STATE_FILE).exists():
            state = ClientState.load(home)
            ca_file = ca_file or state.ca_file
            note = foreign_gateway(launch_data, state.url)
            if note is not None:
                click.echo(f"portcullis: note: {note}", err=True)
        _serve_launch(launch_data, ca_file, host, port, None)
    except (PortcullisError, ValueError) as exc:
        click.echo(f"portcullis: {exc}", err=True)
        if hold and sys.stdin.isatty():
            click.echo("Press Enter to close this window.", err=True)
            sys.stdin.readline()
        sys.exit(2 if isinstance(exc, ValueError) else 1)


@click.command()
def register() -> None:
    """Make this client the desktop's handler of portcullis:// links (Linux, xdg-utils):
    the portal's "Open in Portcullis client" then starts the launch directly."""
    from portcullis.client.desktop import SCHEME_MIME_TYPE
    from portcullis.client.desktop import register as install_handler

    path = install_handler()
    click.echo(f"wrote {path}; it now opens {SCHEME_MIME_TYPE} links")


# Every client command by the name both `portcullis` and `portcullis-client` give it.
CLIENT_COMMANDS: dict[str, click.Command] = {
    "login": login, "logout": logout, "resources": resources, "launch": launch,
    "open": open_url, "register": register, "connect": connect, "ping": ping,
    "status": status,
}


@click.group(cls=PortcullisGroup, commands=CLIENT_COMMANDS)
@click.version_option(version=portcullis.__version__, prog_name="portcullis-client")
def main() -> None:
    """The Portcullis client: sign in, launch resources, open the VPN tunnel."""


if __name__ == "__main__":
    main(prog_name=os.path.basename(sys.argv[0]))
