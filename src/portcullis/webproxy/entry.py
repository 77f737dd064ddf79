"""The portal's side of a web application: `GET /web/{name}?next=PATH` signs the user in
to the application's host, and `GET /.well-known/jwks.json` publishes the keys that
verify the assertions applications receive.

Entry: not signed in, the portal's sign-in and back; signed in but not allowed (the
broker's `decide`, as for launches), the portal's "not allowed" page and an audit line.
Without the digest of the browser's state cookie (`state`), first to the application's
host (`START_PATH`), which sets that cookie and sends the browser back here with it;
with it, a one-time code bound to the resource, the session and that digest, and a
redirect to the application's host, which redeems it (`webproxy.proxy`). The portal's
cookie never leaves the gateway's host.
"""

from __future__ import annotations

from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.audit import AuditTrail
from portcullis.identity.sessions import SessionManager
from portcullis.portal.broker import decide
from portcullis.portal.guard import client_of, signed_in
from portcullis.portal.pages import error_page
from portcullis.portal.redirects import safe_next
from portcullis.webproxy.assertion import JWKS_PATH, Asserter
from portcullis.webproxy.handoff import STATE_DIGEST, Binding, Handoff
from portcullis.webproxy.sites import Sites

# On an application's host, paths under /.portcullis/ are the gateway's.
OWN_PATHS = "/.portcullis/"
ENTER_PATH = OWN_PATHS + "enter"
START_PATH = OWN_PATHS + "start"


def entry_url(name: str, target: str, state: str | None = None) -> str:
    """The portal URL that (re)opens the web resource `name` at `target`, for the
    browser whose state cookie has the digest `state` (None: not known yet)."""
    query = {"next": target} if state is None else {"next": target, "state": state}
    return f"/web/{quote(name, safe='')}?{urlencode(query)}"


def web_routes(sites: Sites, sessions: SessionManager, handoff: Handoff, asserter: Asserter,
               audit: AuditTrail) -> list[BaseRoute]:
    async def enter(request: Request) -> Response:
        name = request.path_params["name"]
        target = safe_next(request.query_params.get("next"))
        session = await signed_in(sessions, request)
        if session is None:
            return RedirectResponse("/login?" + urlencode({"next": entry_url(name, target)}),
                                    303)
        site = sites.by_name(name)
        decision = decide(site.resource, session.claims) if site is not None else None
        if site is None or decision is None or not decision.allowed:
            audit.record("web.denied", resource=name, user=session.username,
                         client=client_of(request),
                         reason=decision.reason if decision else "no such web resource")
            return error_page(request, 403, "Not allowed",
                              "This application is not published for you.",
                              "Ask your administrator for access, or pick another "
                              "application.", action=("Your resources", "/"))
        state = request.query_params.get("state", "")
        if not STATE_DIGEST.fullmatch(state):
            return RedirectResponse(
                f"{site.public_origin}{START_PATH}?{urlencode({'next': target})}", 303)
        code = await handoff.issue_code(Binding(site.name, session.handle, state))
        audit.record("web.entered", resource=site.name, user=session.username,
                     client=client_of(request))
        return RedirectResponse(
            f"{site.public_origin}{ENTER_PATH}?{urlencode({'code': code, 'next': target})}",
            303)

    async def jwks(request: Request) -> Response:
        return JSONResponse(await asserter.jwks(),
                            headers={"cache-control": "public, max-age=300"})

    return [Route("/web/{name}", enter, methods=["GET"]),
            Route(JWKS_PATH, jwks, methods=["GET"])]
