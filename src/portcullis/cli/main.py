"""The `portcullis` command: the administrator's commands (`cli/admin.py`) and the
client's (`cli/client.py`, which `portcullis-client` has alone). It parses arguments
and prints; everything it does is a call into the package. Exit status: 0 success,
1 failure, 2 bad configuration or usage."""

from __future__ import annotations

import os
import sys

import click

from portcullis.cli.admin import ADMIN_COMMANDS
from portcullis.cli.client import CLIENT_COMMANDS
from portcullis.cli.common import PortcullisGroup


@click.group(cls=PortcullisGroup, commands={**ADMIN_COMMANDS, **CLIENT_COMMANDS})
@click.version_option(package_name="portcullis")
def main() -> None:
    """Portcullis: a secure remote-access gateway."""


if __name__ == "__main__":
    main(prog_name=os.path.basename(sys.argv[0]))
