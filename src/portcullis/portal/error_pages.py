"""The portal's answers to errors no endpoint answered itself: an unknown address (404), a
wrong method (405), a body too large (413), a store that does not answer (503) and any
bug (500). A browser gets a page in the portal's style saying what happened and what to
do; the JSON API keeps JSON; other clients plain text (web/answers.py decides which).
Never a stack trace: a bug's detail goes to our log only.

The node also hands these to the application it mounts the portal in, so the packages
served beside the portal (device list, web proxy entry, VNC viewer) answer alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from portcullis.errors import StoreError
from portcullis.portal.pages import error_page
from portcullis.web.answers import answer_for, explained

log = structlog.get_logger("portcullis.portal")

HOME = ("Go to your resources", "/")

def error_answer(request: Request, status: int, message: str,
                 headers: Mapping[str, str] | None = None) -> Response:
    """`status` for whoever asked: `message` in the API's JSON or in plain text, or, for
    a browser, the page that explains the status."""
    kind = answer_for(request.url.path, request.headers.get("accept", ""))
    response: Response
    if kind == "json":
        response = JSONResponse({"error": message}, status, headers=headers)
    elif kind == "text":
        response = PlainTextResponse(message, status, headers=headers)
    else:
        title, what, todo = explained(status)
        action = ("Sign in", "/login") if status == 401 else HOME
        response = error_page(request, status, title, what, todo, action=action)
        response.headers.update(headers or {})
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):   # not errors: nothing to draw
        return Response(status_code=exc.status_code, headers=exc.headers)
    return error_answer(request, exc.status_code, exc.detail.lower(), exc.headers)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    log.error("store unavailable", path=request.url.path, error=str(exc))
    return error_answer(request, 503, "temporarily unavailable; try again shortly")


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unexpected error", path=request.url.path, method=request.method,
              exc_info=exc)
    return error_answer(request, 500, "internal error")


Handler = Callable[[Request, Exception], Awaitable[Response]]


def error_handlers() -> dict[type[Exception] | int, Handler]:
    """Starlette's `exception_handlers` for the portal and the application around it."""
    return {HTTPException: http_error, StoreError: store_unavailable, Exception: server_error}
