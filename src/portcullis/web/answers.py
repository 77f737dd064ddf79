"""How an error is answered to whoever asked: the JSON API (`/api/…`) gets JSON, a browser
(a request that accepts `text/html`) a page in the portal's style, anything else plain
text. One rule for the edge (web/security.py, before any role sees the request) and the
portal's own error pages, so a browser never meets raw JSON or a bare status line.

Pure, and of the lowest floor: the edge must not import the portal, so it draws its few
pages itself (`edge_page`), with the portal's style sheet and the portal's markup.
"""

from __future__ import annotations

import json
from html import escape
from typing import Literal

Answer = Literal["json", "page", "text"]
# The portal's style sheet, at a path that is the gateway's on every host it answers for
# (the portal's and each web application's), so an error page is styled on all of them.
STYLESHEET = "/.portcullis/portal.css"

# status: (title, what happened, what to do), for a person.
EXPLAINED: dict[int, tuple[str, str, str]] = {
    400: ("Bad request", "The gateway could not understand this request.",
          "Go back, reload the page and try again."),
    401: ("Signed out", "You are not signed in, or your session has ended.",
          "Sign in, then try again."),
    403: ("Not allowed", "This request was refused.",
          "Go back, reload the page and try again. If it keeps happening, ask your "
          "administrator."),
    404: ("Page not found", "There is no page at this address.",
          "Check the address, or start again from your resources."),
    405: ("Not possible here", "This page cannot be used that way.",
          "Start again from your resources."),
    413: ("Too much data", "What was sent is larger than the gateway accepts.",
          "Send less at a time, or ask your administrator about the limit."),
    431: ("Request too large", "Your browser sent more than the gateway accepts (often "
          "too many cookies for this site).",
          "Clear this site's cookies in your browser, then try again."),
    500: ("Something went wrong", "The gateway could not answer this request.",
          "Try again in a moment. If it keeps happening, tell your administrator the time "
          "it happened."),
    502: ("Temporarily unavailable", "The gateway could not reach the service behind it.",
          "Try again in a minute."),
    503: ("Temporarily unavailable", "The gateway cannot answer right now.",
          "Try again in a minute."),
}


def explained(status: int) -> tuple[str, str, str]:
    """What a person is told about `status`: title, what happened, what to do."""
    return EXPLAINED.get(status, EXPLAINED[400 if status < 500 else 500])


def answer_for(path: str, accept: str) -> Answer:
    if path.startswith("/api/"):
        return "json"
    # Browsers name text/html in the Accept of every navigation and form post; a wildcard
    # alone (curl, scripts) gets plain text.
    media_types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return "page" if "text/html" in media_types else "text"


def error_body(path: str, accept: str, status: int, message: str) -> tuple[bytes, str]:
    """The body and media type of an error answered outside the portal (the edge, the
    gateway's forwarding to a portal elsewhere): `message` as JSON or plain text, or the
    page that explains `status`."""
    kind = answer_for(path, accept)
    if kind == "page":
        return edge_page(*explained(status)), "text/html; charset=utf-8"
    if kind == "json":
        return json.dumps({"error": message}).encode(), "application/json"
    return message.encode(), "text/plain; charset=utf-8"


def edge_page(title: str, what: str, todo: str) -> bytes:
    """The edge's error page: templates/error.html's markup, without the portal."""
    return (
        '<!doctype html>\n<html lang="en">\n<head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · Portcullis</title>"
        f'<link rel="stylesheet" href="{STYLESHEET}"></head>\n'
        '<body><header><span class="brand">Portcullis</span></header>\n'
        f'<main id="main"><div class="card"><h1>{escape(title)}</h1>'
        f'<p class="error" role="alert">{escape(what)}</p><p>{escape(todo)}</p>'
        '<p><a class="button" href="/">Go to your resources</a></p></div></main>\n'
        "</body>\n</html>\n").encode()
