"""Who is asking: the signed-in session of a portal request, and the CSRF token bound to it.

Every portal page and API, and every package that serves pages beside the portal (the
device list, the web proxy's entry, the VNC viewer), asks here, so there is one answer to
"signed in?" and one CSRF rule. Sessions travel in a `__Host-` cookie (browsers) or an
`Authorization: Bearer` header (the CLI); form posts carry a CSRF token derived from the
session token with the deployment's hasher (before sign-in: a double-submit cookie).

The portal's own endpoints state what they need once, by their wrapper (`Guard.page`,
`Guard.api`, with `csrf=True` for what changes state); the wrapper answers everyone else
(to the sign-in page, 401, 403) and audits a refused CSRF check. It never says why to
the client.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from portcullis.audit import AuditTrail
from portcullis.identity.sessions import SESSION_COOKIE, Session, SessionManager
from portcullis.portal.api import api_error, is_json
from portcullis.tokens import TokenHasher

Endpoint = Callable[[Request], Awaitable[Response]]
SessionEndpoint = Callable[[Request, Session], Awaitable[Response]]


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


class Guard:
    """The portal's one dependency for "signed in?" and one for CSRF, as endpoint wrappers."""

    def __init__(self, sessions: SessionManager, hasher: TokenHasher, audit: AuditTrail) -> None:
        self.sessions = sessions
        self.hasher = hasher
        self.audit = audit

    async def session(self, request: Request) -> Session | None:
        return await signed_in(self.sessions, request)

    def form_token(self, request: Request) -> str:
        """The CSRF token for the forms of the page this request draws."""
        return csrf_for(self.hasher, request.cookies.get(SESSION_COOKIE) or "")

    async def form_refused(self, request: Request, session: Session | None = None) -> bool:
        """Whether this form post lacks its session's CSRF token (audited if so)."""
        form = await request.form()   # Starlette keeps it: the endpoint reads it again
        if csrf_ok(self.hasher, request, form.get("csrf")):
            return False
        self.refused(request, session)
        return True

    def api_refused(self, request: Request, session: Session | None = None) -> bool:
        """Whether a state-changing API call could have come from another site: it has no
        Bearer token and, signed in by cookie, no JSON content type (which no cross-site
        form can send). Without any session the endpoint answers 401 instead."""
        if (request.headers.get("authorization", "").lower().startswith("bearer ")
                or SESSION_COOKIE not in request.cookies or is_json(request)):
            return False
        self.refused(request, session)
        return True

    def refused(self, request: Request, session: Session | None = None) -> None:
        self.audit.record("csrf.rejected", path=request.url.path, client=client_of(request),
                          **({"user": session.username} if session else {}))

    def page(self, endpoint: SessionEndpoint, *, csrf: bool = False) -> Endpoint:
        """A page for signed-in users; anyone else is sent to sign in. With `csrf`, a POST
        carries the session's CSRF token."""
        async def guarded(request: Request) -> Response:
            session = await self.session(request)
            if session is None:
                return RedirectResponse(sign_in_first(request), 303)
            if csrf and request.method == "POST" and await self.form_refused(request, session):
                return Response("denied", 403, media_type="text/plain")
            return await endpoint(request, session)
        return guarded

    def api(self, endpoint: SessionEndpoint, *, csrf: bool = False) -> Endpoint:
        """A JSON API call for signed-in users (401 otherwise). With `csrf`, it changes
        state and must pass `api_refused`."""
        async def guarded(request: Request) -> Response:
            if csrf and self.api_refused(request):
                return api_error(403, "denied")
            session = await self.session(request)
            if session is None:
                return api_error(401, "not signed in")
            return await endpoint(request, session)
        return guarded


def sign_in_first(request: Request) -> str:
    """Where a signed-out browser goes: the sign-in page, then back to a page it asked for
    (a form post's URL cannot be gone back to)."""
    path = request.url.path
    if request.method != "GET" or path == "/":
        return "/login"
    return "/login?next=" + quote(path, safe="/")
