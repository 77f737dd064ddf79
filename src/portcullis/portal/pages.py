"""How the portal draws a page: one template set, and one error page for every error a
browser can reach (what happened, what to do; never JSON, never a stack trace). Packages
that serve pages beside the portal (device list, web proxy, VNC viewer) draw with these,
so every page looks like the portal's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.templating import Jinja2Templates

HERE = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=str(HERE / "templates"))


async def stylesheet(request: Request) -> Response:
    """The portal's style sheet, served at `web.answers.STYLESHEET` on the portal's host
    and on every web application's, where the gateway's pages link it."""
    return FileResponse(HERE / "static" / "portal.css", media_type="text/css",
                        headers={"cache-control": "max-age=3600"})


def page(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    """A portal template; never cached (pages carry session-bound tokens)."""
    response = TEMPLATES.TemplateResponse(request, template, context, status_code=status)
    response.headers["cache-control"] = "no-store"
    return response


def error_page(request: Request, status: int, title: str, what: str, todo: str,
               *, action: tuple[str, str] | None = None) -> Response:
    """An error as a page: `title`, `what` happened, what the user can do (`todo`), and
    optionally one link (`action`: label, same-origin URL) to go on."""
    return page(request, "error.html", status, title=title, what=what, todo=todo,
                action=action)
