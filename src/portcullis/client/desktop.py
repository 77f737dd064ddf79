"""The `portcullis://` URL handler on a Linux desktop: a desktop entry (freedesktop.org
Desktop Entry Specification) whose `MimeType` is `x-scheme-handler/portcullis`, made the
default for that scheme with `xdg-mime`, so that the portal's "Open in Portcullis client"
link starts `portcullis-client open URL` in a terminal, which shows where the launch
listens and lives as long as the window.

It writes one file under $XDG_DATA_HOME/applications and asks xdg-mime to record the
default in $XDG_CONFIG_HOME/mimeapps.list; it never writes elsewhere and never runs
anything but xdg-mime and update-desktop-database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import portcullis
from portcullis.errors import ClientError

DESKTOP_FILE = "portcullis-client.desktop"
SCHEME_MIME_TYPE = "x-scheme-handler/portcullis"
# Characters the Desktop Entry Specification reserves inside an Exec argument.
_RESERVED = set(" \t\n\"'\\><~|&;$*?#()`")


def data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def handler_command() -> list[str]:
    """How to start this client again: `python portcullis-client.pyz` when running from
    the single-file build, else this interpreter with the client's module (which works
    for an installed wheel and for the full package alike)."""
    package = Path(portcullis.__file__).resolve()
    for parent in package.parents:
        if parent.is_file():          # the zip archive we are imported from
            return [sys.executable, str(parent)]
    return [sys.executable, "-m", "portcullis.cli.client"]


def exec_argument(argument: str) -> str:
    """One Exec argument, quoted as the specification says: reserved characters inside
    double quotes with ", `, $ and \\ escaped; % doubled (it starts a field code)."""
    argument = argument.replace("%", "%%")
    if _RESERVED.intersection(argument):
        escaped = "".join("\\" + char if char in '"`$\\' else char for char in argument)
        argument = f'"{escaped}"'
    # The file's string values escape backslashes once more.
    return argument.replace("\\", "\\\\")


def desktop_entry(command: list[str]) -> str:
    exec_line = " ".join([*(exec_argument(part) for part in command), "open", "--hold", "%u"])
    return "\n".join([
        "[Desktop Entry]",
        "Type=Application",
        "Name=Portcullis client",
        "Comment=Open launches from the Portcullis portal",
        f"Exec={exec_line}",
        # A launch tells its user where it listens, and ends when its window closes.
        "Terminal=true",
        "NoDisplay=true",
        f"MimeType={SCHEME_MIME_TYPE};",
        "Categories=Network;",
        "",
    ])


def register(command: list[str] | None = None) -> Path:
    """Install the handler for the current user; the path of the desktop file written.
    ClientError if this is not a desktop with xdg-utils."""
    if not sys.platform.startswith("linux"):
        raise ClientError("'register' installs the portcullis:// handler on Linux desktops; "
                          "elsewhere, open the launch file the portal offers")
    xdg_mime = shutil.which("xdg-mime")
    if xdg_mime is None:
        raise ClientError("xdg-mime is not installed: install xdg-utils "
                          "(apt-get install xdg-utils) and run 'register' again")
    applications = data_home() / "applications"
    applications.mkdir(parents=True, exist_ok=True)
    path = applications / DESKTOP_FILE
    path.write_text(desktop_entry(command or handler_command()), encoding="utf-8")
    _run([xdg_mime, "default", DESKTOP_FILE, SCHEME_MIME_TYPE])
    updater = shutil.which("update-desktop-database")
    if updater is not None:   # desktops that read the cache rather than the files
        _run([updater, str(applications)])
    return path


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClientError(f"{Path(argv[0]).name} failed: {exc}") from None
    if done.returncode != 0:
        raise ClientError(f"{Path(argv[0]).name} failed: {done.stderr.strip() or done.returncode}")
