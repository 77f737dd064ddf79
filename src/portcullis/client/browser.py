"""Showing the user an identity provider's sign-in page, as `tsh` and `gcloud` do: print
the URL, and open a browser when there is one to open."""

from __future__ import annotations

import os
import sys
import webbrowser


def browse_to(url: str, *, open_browser: bool) -> None:
    print(f"To sign in, open this URL in a browser on this machine:\n  {url}",
          file=sys.stderr, flush=True)
    # A headless session (ssh, a container) has no browser to open; the URL is printed.
    graphical = sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if open_browser and graphical:
        webbrowser.open(url)
