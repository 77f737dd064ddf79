"""Showing the user an identity provider's sign-in page, as `tsh` and `gcloud` do: print
the URL, and open a browser when there is one to open."""

from __future__ import annotations

import os
import sys
import webbrowser
from typing import Any


def browse_to(url: str, *, open_browser: bool) -> None:
    print(f"To sign in, open this URL in a browser on this machine:\n  {url}",
          file=sys.stderr, flush=True)
    # A headless session (ssh, a container) has no browser to open; the URL is printed.
    graphical = sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if open_browser and graphical:
        webbrowser.open(url)


def show_device(device: dict[str, Any]) -> None:
    """A device step (RFC 8628): the user opens the URL on any device (a phone, the laptop
    the ssh session runs from) and types the code there."""
    complete = device.get("verification_uri_complete")
    print(f"To sign in, open this URL in a browser on any device:\n"
          f"  {device['verification_uri']}\nand enter the code: {device['user_code']}"
          + (f"\n(or open {complete} , which has the code in it)" if complete else "")
          + f"\nWaiting up to {int(device['expires_in'])} s for you to sign in...",
          file=sys.stderr, flush=True)


def browse_instead_of_device(url: str, *, open_browser: bool) -> None:
    """--device asked, but the step is a redirect: its provider offers no device sign-in."""
    print("The identity provider offers no device sign-in (RFC 8628); falling back to a "
          "browser on this machine.", file=sys.stderr, flush=True)
    browse_to(url, open_browser=open_browser)
