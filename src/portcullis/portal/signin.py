"""Signing in and out: the sign-in pages, their JSON API (the CLI's), and the identity
provider's callback. One login flow (identity/login.py) is driven by both; this module
only carries its steps to a browser or a client and back.

Before sign-in a form post carries a double-submit CSRF cookie (there is no session to
bind a token to); sign-out is a form of the session like any other.
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.errors import PKIError
from portcullis.identity.conditions import LoginContext
from portcullis.identity.login import (
    CALLBACK_PATH,
    Authenticated,
    Denied,
    HandOff,
    LoginResult,
    NextStep,
)
from portcullis.identity.sessions import SESSION_COOKIE, Session
from portcullis.portal.api import api_error, json_object
from portcullis.portal.deps import PortalDeps
from portcullis.portal.guard import Guard, client_of, form_refused, token_of
from portcullis.portal.pages import page
from portcullis.portal.redirects import (
    LOGIN_COOKIE,
    NEXT_COOKIE,
    callback_answers,
    forget_login,
    loopback_return_to,
    safe_next,
    to_identity_provider,
)
from portcullis.web.client_certificate import certificate_forwarded, certificate_in_scope

CSRF_COOKIE = "__Host-portcullis-csrf"
# `/login?expired=1`: the sign-in began again because the page's own had gone.
RESTARTED = "expired"
# `/login?signed_out=1`: where a sign-out lands, saying so.
SIGNED_OUT = "signed_out"


def sign_in_routes(deps: PortalDeps, guard: Guard) -> list[BaseRoute]:
    settings = deps.settings

    def login_context(request: Request) -> LoginContext:
        try:
            certificate = (certificate_forwarded(request.headers.raw)
                           if deps.forwarded_certificates
                           else certificate_in_scope(dict(request.scope)))
        except PKIError:
            certificate = None
        return LoginContext(client_of(request), certificate)

    def set_session_cookie(response: Response, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, secure=True, httponly=True,
                            samesite="strict", path="/",
                            max_age=int(settings.session.absolute_timeout))

    # -- JSON API (the CLI) ------------------------------------------------------------
    async def api_login(request: Request) -> Response:
        body = await json_object(request)
        if body is None:
            return api_error(400, "expected a JSON object")
        handle = body.get("handle")
        answers = body.get("answers")
        if answers is None and handle is None:
            return_to = body.get("return_to")
            if return_to is not None and loopback_return_to(return_to) is None:
                return api_error(400, "return_to must be a loopback http URL "
                                      "(http://127.0.0.1:PORT/...)")
            device = body.get("device", False)
            if not isinstance(device, bool):
                return api_error(400, "device must be true or false")
            result = await deps.login.begin(login_context(request), return_to=return_to,
                                            device=device)
        elif (not isinstance(answers, dict)
              or not all(isinstance(v, str) for v in answers.values())
              or not (handle is None or isinstance(handle, str))):
            return api_error(400, "answers must be an object of strings")
        else:
            result = await deps.login.submit(handle, answers, login_context(request))
        if isinstance(result, NextStep):
            return JSONResponse({"status": "continue", "handle": result.handle,
                                 "step": result.step.to_json()})
        if isinstance(result, Authenticated):
            response = JSONResponse({"status": "authenticated", "token": result.token,
                                     "user": result.session.username,
                                     "groups": list(result.session.claims.groups)})
            set_session_cookie(response, result.token)
            return response
        return JSONResponse({"status": "denied", "error": "denied"}, 401)

    async def api_logout(request: Request) -> Response:
        if guard.api_refused(request):
            return api_error(403, "denied")
        token = token_of(request)
        if token:
            await deps.sessions.end(token)
        response = JSONResponse({"status": "signed out"})
        response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="strict")
        return response

    async def api_session(request: Request, session: Session) -> Response:
        return JSONResponse({"user": session.username, "claims": session.claims.to_json()})

    # -- pages -------------------------------------------------------------------------
    async def login_page(request: Request) -> Response:
        # fresh=1: an application asked for the user to sign in again (prompt=login).
        if (await guard.session(request) is not None
                and request.query_params.get("fresh") != "1"):
            return RedirectResponse(safe_next(request.query_params.get("next")), 303)
        return login_result(request, await deps.login.begin(login_context(request)),
                            safe_next(request.query_params.get("next")))

    def login_result(request: Request, result: LoginResult, target: str = "/",
                     error: str | None = None) -> Response:
        if isinstance(result, Authenticated):
            # A page that goes on, (1) after an identity provider's callback: the browser
            # came from the provider's site, and a redirect would not carry the SameSite
            # session cookie to the target; (2) after a form post whose target may leave
            # the portal (an application's OpenID sign-in), which a redirect of the post
            # could not do under the portal's `form-action 'self'`.
            arrived_cross_site = request.url.path.startswith(CALLBACK_PATH)
            response = (page(request, "continue.html", target=target)
                        if arrived_cross_site or (request.method == "POST" and target != "/")
                        else RedirectResponse(target, 303))
            set_session_cookie(response, result.token)
            return forget_login(response)
        if isinstance(result, NextStep) and result.step.kind == "redirect":
            return to_identity_provider(request, result, target,
                                        settings.session.login_step_timeout)
        if isinstance(result, NextStep):
            return login_form(request, result, target, error=error)
        if isinstance(result, HandOff):
            return RedirectResponse(result.url, 303)
        return forget_login(page(request, "denied.html", 401))

    async def login_callback(request: Request) -> Response:
        """An identity provider's answer to a redirect step."""
        relay, answers = await callback_answers(request)
        result = await deps.login.callback(relay, answers, login_context(request),
                                           request.cookies.get(LOGIN_COOKIE),
                                           provider=str(request.path_params["provider"]))
        return login_result(request, result, safe_next(request.cookies.get(NEXT_COOKIE)))

    def login_form(request: Request, step: NextStep, target: str, error: str | None,
                   status: int = 200) -> Response:
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        restarted = request.method == "GET" and request.query_params.get(RESTARTED) == "1"
        signed_out = request.method == "GET" and request.query_params.get(SIGNED_OUT) == "1"
        response = page(request, "login.html", status, step=step.step, handle=step.handle,
                        csrf=csrf, error=error, restarted=restarted, signed_out=signed_out,
                        next=target)
        response.set_cookie(CSRF_COOKIE, csrf, secure=True, httponly=True, samesite="strict",
                            path="/")
        return response

    def restart(target: str) -> Response:
        """A fresh sign-in page, saying why the user is back at the start."""
        query = {RESTARTED: "1", **({"next": target} if target != "/" else {})}
        return RedirectResponse("/login?" + urlencode(query), 303)

    async def login_submit(request: Request) -> Response:
        form = await request.form()
        target = safe_next(str(form.get("next") or "/"))
        cookie = request.cookies.get(CSRF_COOKIE)
        posted = form.get("csrf")
        if not cookie or not isinstance(posted, str) or not hmac.compare_digest(cookie, posted):
            # A page whose cookie is gone (a restarted browser) or another site's post:
            # nothing is checked either way, and a fresh page is all the answer.
            guard.refused(request)
            return restart(target)
        handle = form.get("handle")
        answers = {key: value for key, value in form.items()
                   if key not in ("csrf", "handle", "next") and isinstance(value, str)}
        context = login_context(request)
        result = await deps.login.submit(handle if isinstance(handle, str) else None, answers,
                                         context)
        if isinstance(result, Denied) and result.restart:
            # The page's sign-in is gone (expired, or finished in another tab): a correct
            # password must not meet "Sign-in failed".
            return restart(target)
        if isinstance(result, Denied):
            # Start over; the reason is in the audit trail only.
            begun = await deps.login.begin(context)
            if isinstance(begun, NextStep) and begun.step.kind != "redirect":
                return login_form(request, begun, target, error="Sign-in failed.",
                                  status=401)
        return login_result(request, result, target)

    async def logout_page(request: Request) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        if token and await guard.form_refused(request):
            return form_refused(request)
        session = await deps.sessions.validate(token) if token else None
        if token:
            await deps.sessions.end(token)
        onward = (await deps.sign_out_at_idp(request, session)
                  if session is not None and deps.sign_out_at_idp is not None else None)
        response = onward or RedirectResponse(f"/login?{SIGNED_OUT}=1", 303)
        response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="strict")
        return response

    return [
        Route("/api/v1/login", api_login, methods=["POST"]),
        Route("/api/v1/logout", api_logout, methods=["POST"]),
        Route("/api/v1/session", guard.api(api_session), methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route(CALLBACK_PATH + "{provider}", login_callback, methods=["GET", "POST"]),
        Route("/logout", logout_page, methods=["POST"]),
    ]
