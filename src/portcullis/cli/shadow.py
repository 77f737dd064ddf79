"""`portcullis shadow …`: shadow a device, and the hub administrator's commands.

    portcullis shadow DEVICE [--exec COMMAND]      an operator, signed in to the gateway
    portcullis shadow device add|list|approve|remove   on the hub's host (--dir)
    portcullis shadow sessions [end ID]            an administrator, signed in

`shadow DEVICE` is the group's default: any first word that is not one of its commands
is a device name (so a device cannot be called "device" or "sessions").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import socket
from pathlib import Path
from typing import Any

import click

from portcullis.cli.shadow_console import open_shadow

DEFAULT_DIR = "./.portcullis"
dir_option = click.option("--dir", "directory", type=click.Path(path_type=Path),
                          default=DEFAULT_DIR, show_default=True,
                          help="The deployment directory (holds portcullis.toml).")


class ShadowGroup(click.Group):
    """Subcommands by name; anything else is `shadow DEVICE`."""

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "open", open_shadow, args
        return super().resolve_command(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "DEVICE [--exec COMMAND] | device … | "
                                                "sessions …")


@click.group(cls=ShadowGroup)
def shadow() -> None:
    """Shadow a managed device's screen (any VNC viewer), and manage the devices.

    portcullis shadow DEVICE --exec 'vncviewer {host}::{port}' opens a secure channel to
    the device's agent and starts the viewer on it (see docs/shadow.md)."""


def _administration(directory: Path, action: Any) -> Any:
    from portcullis.config import config_path, load_settings
    from portcullis.shadow.admin import DeviceAdministration
    from portcullis.store import DurableStore

    settings = load_settings(config_path(directory))
    administrator = f"{getpass.getuser()}@{socket.gethostname()} (cli)"

    async def run() -> Any:
        store = await DurableStore.open(settings.durable_url())
        administration = DeviceAdministration(settings, store, administrator)
        try:
            return await action(administration)
        finally:
            administration.close()
            await store.close()

    return asyncio.run(run())


@shadow.group()
def device() -> None:
    """Register, approve, list and remove devices (run on the hub's host)."""


@device.command("add")
@click.argument("name")
@dir_option
def device_add(name: str, directory: Path) -> None:
    """Add a device and print its one-time enrolment code."""
    code = _administration(directory, lambda admin: admin.add(name))
    click.echo(f"Device {name} added. Its one-time enrolment code (shown once):\n  {code}")
    click.echo(f"On the device: portcullis shadow-agent --hub https://HUB:PORT --ca ca.crt "
               f"--name {name} --code {code} --dir DIR")


@device.command("approve")
@click.argument("name")
@click.argument("fingerprint")
@dir_option
def device_approve(name: str, fingerprint: str, directory: Path) -> None:
    """Approve a pending device whose agent printed FINGERPRINT."""
    _administration(directory, lambda admin: admin.approve(name, fingerprint))
    click.echo(f"Device {name} approved ({fingerprint.strip().lower()}).")


@device.command("remove")
@click.argument("name")
@dir_option
def device_remove(name: str, directory: Path) -> None:
    """Remove a device: refused everywhere at once, its shadow sessions end."""
    _administration(directory, lambda admin: admin.remove(name))
    click.echo(f"Device {name} removed.")


@device.command("list")
@dir_option
def device_list(directory: Path) -> None:
    """The registered devices."""
    records = _administration(directory, lambda admin: admin.list())
    click.echo(f"{'NAME':<24} {'STATUS':<10} {'ADDRESS':<22} {'LAST SEEN':<20} FINGERPRINT")
    for record in records:
        seen = (record.last_seen.isoformat(timespec="seconds") if record.last_seen
                else "never")
        click.echo(f"{record.name:<24} {record.status:<10} {record.advertise or '-':<22} "
                   f"{seen:<20} {record.fingerprint or '-'}")


def _api() -> Any:
    from portcullis.client.portal_api import PortalApi
    from portcullis.client.state import ClientState, client_home
    from portcullis.net.tls import client_context

    state = ClientState.load(client_home())
    tls = client_context(Path(state.ca_file) if state.ca_file else None)
    return PortalApi(state.url, tls, state.token)


@shadow.group(invoke_without_command=True)
@click.pass_context
def sessions(ctx: click.Context) -> None:
    """The running shadow sessions (administrators, signed in)."""
    if ctx.invoked_subcommand is not None:
        return
    with _api() as api:
        running = api.shadow("GET", "sessions")["sessions"]
    click.echo(f"{'ID':<17} {'DEVICE':<20} {'OPERATOR':<16} {'UP':<4} SINCE")
    for item in running:
        since = dt.datetime.fromtimestamp(item["started"]).isoformat(timespec="seconds")
        click.echo(f"{item['id']:<17} {item['device']:<20} {item['operator']:<16} "
                   f"{'yes' if item['up'] else 'no':<4} {since}")


@sessions.command("end")
@click.argument("session_id")
def sessions_end(session_id: str) -> None:
    """End a shadow session (the device closes the channel within a second)."""
    with _api() as api:
        api.shadow("DELETE", f"sessions/{session_id}")
    click.echo(f"ended shadow session {session_id}")
