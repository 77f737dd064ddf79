"""`portcullis shadow DEVICE`: the operator's console proxy. Parsing and printing only;
the lead hooks `open_shadow` into its `shadow` group, e.g.
`shadow.command("open")(...)` or as the group's default with the options below."""

from __future__ import annotations

import sys

import click


@click.command("open")
@click.argument("device")
@click.option("--exec", "command",
              help="Start this viewer against the listener; {host} and {port} are "
                   "replaced, e.g. 'vncviewer {host}::{port}'.")
@click.option("--listen", default="127.0.0.1:0", show_default=True,
              help="Local HOST:PORT the viewer connects to (port 0: any free port).")
def open_shadow(device: str, command: str | None, listen: str) -> None:
    """Shadow DEVICE: open the secure channel and relay one VNC viewer over it."""
    from portcullis.cli.common import fail, run_async
    from portcullis.client.state import ClientState, client_home
    from portcullis.config import parse_host_port
    from portcullis.shadow.console import ConsoleProxy

    try:
        host, port = parse_host_port(listen, what="--listen", any_port=True)
    except ValueError as exc:
        fail(str(exc), 2)
    state = ClientState.load(client_home())

    def listening(bound_host: str, bound_port: int) -> None:
        click.echo(f"{device}: listening on {bound_host}:{bound_port}")
        sys.stdout.flush()

    async def shadow() -> int:
        proxy = ConsoleProxy(state, device, say=click.echo)
        return await proxy.run(host=host, port=port, command=command,
                               on_listening=listening)

    sys.exit(run_async(shadow()))
