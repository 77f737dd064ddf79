"""`portcullis shadow-agent`: the device agent of secure shadowing, and `cert-info`.

Parsing and printing only; the agent is `portcullis.shadow.agent.DeviceAgent`. The lead
registers the group in `portcullis.cli.main` (`main.add_command(shadow_agent)`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import sys
from pathlib import Path

import click

from portcullis.errors import ClientError


def _say(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@click.group("shadow-agent", invoke_without_command=True)
@click.option("--hub", "hub_url", metavar="URL", help="The shadow hub, e.g. https://hub:8445.")
@click.option("--code", help="The one-time enrolment code ('portcullis shadow device add NAME' "
                             "printed it); without one the device waits for approval.")
@click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The deployment's CA certificate, to verify the hub.")
@click.option("--vnc", default="127.0.0.1:5901", show_default=True,
              help="The device's own VNC server (loopback).")
@click.option("--listen", default=None,
              help="Where the device proxy listens (secure and plain VNC) [default: "
                   "0.0.0.0:5900; 127.0.0.1:0 with --dial-out].")
@click.option("--dial-out", is_flag=True,
              help="Behind NAT: keep connections to the hub and take consoles' channels "
                   "over them; nothing listens beyond loopback.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="The agent's state directory (device key and certificate, agent.json, "
                   "audit.log).")
@click.option("--advertise", metavar="HOST:PORT",
              help="Where consoles reach this device (default: the address the hub sees "
                   "and the listen port).")
@click.option("--name", help="The device's name (default: this host's name).")
@click.option("--consent-command", metavar="CMD",
              help="Asked when the device's group wants consent: exit 0 means yes. Gets "
                   "PORTCULLIS_OPERATOR, PORTCULLIS_DEVICE and PORTCULLIS_CONSENT.")
@click.pass_context
def shadow_agent(ctx: click.Context, hub_url: str | None, code: str | None,
                 ca_file: Path | None, vnc: str, listen: str | None, dial_out: bool,
                 directory: Path | None, advertise: str | None, name: str | None,
                 consent_command: str | None) -> None:
    """Run the device agent: register at the hub and serve secure shadowing."""
    if ctx.invoked_subcommand is not None:
        return
    from portcullis.cli.common import fail, run_async
    from portcullis.config import parse_host_port
    from portcullis.shadow.agent import AgentSettings, DeviceAgent

    missing = [flag for flag, value in (("--hub", hub_url), ("--ca", ca_file),
                                        ("--dir", directory)) if value is None]
    if missing:
        fail(f"give {', '.join(missing)} (see 'portcullis shadow-agent --help')", 2)
    assert hub_url is not None and ca_file is not None and directory is not None
    if listen is None:
        listen = "127.0.0.1:0" if dial_out else "0.0.0.0:5900"
    try:
        vnc_address = parse_host_port(vnc, what="--vnc")
        listen_address = parse_host_port(listen, what="--listen", any_port=True)
        if dial_out and not _loopback(listen_address[0]):
            raise ValueError(f"--listen {listen}: with --dial-out the device proxy listens "
                             "on loopback only (127.0.0.1 or ::1); consoles come through "
                             "the hub")
        if dial_out and advertise is not None:
            raise ValueError("--advertise and --dial-out exclude each other: a device that "
                             "dials out is reached through the hub")
        if advertise is not None:
            parse_host_port(advertise, what="--advertise")
    except ValueError as exc:
        fail(str(exc), 2)
    settings = AgentSettings(hub_url=hub_url, ca_file=ca_file, directory=directory,
                             name=name or socket.gethostname(), vnc=vnc_address,
                             listen=listen_address, code=code, advertise=advertise,
                             consent_command=consent_command, dial_out=dial_out)

    async def serve() -> str | None:
        agent = DeviceAgent(settings, say=_say)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, agent.stop)
        await agent.run()
        return agent.stopped_because

    reason = run_async(serve())
    if reason is not None and reason.startswith("the hub refused"):
        raise ClientError(reason)
    _say(reason or "stopped")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@shadow_agent.command("cert-info")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="The agent's state directory.")
def cert_info_command(directory: Path) -> None:
    """Print the device certificate as `x11vnc -sslCertInfo` shows it."""
    from portcullis.shadow.certificates import DEVICE_FILE_STEM, cert_info

    path = directory / f"{DEVICE_FILE_STEM}.crt"
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}; has the agent run with "
                          f"--dir {directory}?") from None
    click.echo(cert_info(pem, str(path)), nl=False)
