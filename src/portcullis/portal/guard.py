"""Who is asking: the signed-in session of a portal request, and the CSRF token bound to it.

Every portal page and API, and every package that serves pages beside the portal (the
device list, the web proxy's entry, the VNC viewer), asks here, so there is one answer to
"signed in?" and one CSRF rule. Sessions travel in a `__Host-` cookie (browsers) or an
`Authorization: Bearer` header (the CLI); form posts carry a CSRF token derived from the
session token with the deployment's hasher (before sign-in: a double-submit cookie).
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from portcullis.identity.sessions import SESSION_COOKIE, Session, SessionManager
from portcullis.tokens import TokenHasher


def client_of(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def token_of(request: Request) -> str | None:
    """The session token: a Bearer header (the CLI) before the cookie (browsers)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(SESSION_COOKIE)


async def signed_in(sessions: SessionManager, request: Request) -> Session | None:
    """The live session this request carries, or None (none, expired, ended, unknown)."""
    token = token_of(request)
    return await sessions.validate(token) if token else None


def csrf_for(hasher: TokenHasher, token: str) -> str:
    """The CSRF token a form of this session carries."""
    return hasher.digest("csrf", token)[:32]


def csrf_ok(hasher: TokenHasher, request: Request, form_value: object) -> bool:
    """A form post of a cookie session carries its session's CSRF token."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or not isinstance(form_value, str):
        return False
    return hmac.compare_digest(csrf_for(hasher, token), form_value)
