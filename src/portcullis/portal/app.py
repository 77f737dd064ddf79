"""The portal: sign-in pages, the resource list, launches, and the JSON API behind them.

Authorisation is checked inside each endpoint, against the route it was dispatched
to, never by matching path prefixes. Sessions travel in a `__Host-` cookie (browsers)
or an `Authorization: Bearer` header (the CLI). Form posts carry a CSRF token bound to
the session (or, before login, to a double-submit cookie). Attackers are told "denied";
the reason goes to the audit trail.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.errors import PKIError, StoreError
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.totp import enrolment_step
from portcullis.identity.login import (
    CALLBACK_PATH,
    Authenticated,
    Denied,
    HandOff,
    LoginResult,
    LoginService,
    NextStep,
)
from portcullis.identity.sessions import SESSION_COOKIE, Session, SessionManager
from portcullis.identity.totp import SelfEnrolment
from portcullis.portal import guard
from portcullis.portal.broker import visible_resources
from portcullis.portal.guard import client_of, signed_in, token_of
from portcullis.portal.launching import issue_launch, launch_file_response, launch_routes
from portcullis.portal.redirects import (
    LOGIN_COOKIE,
    NEXT_COOKIE,
    callback_answers,
    forget_login,
    loopback_return_to,
    to_identity_provider,
)
from portcullis.sta.client import TicketIssuer
from portcullis.store import DurableStore, EphemeralStore
from portcullis.tokens import TokenHasher
from portcullis.web.client_certificate import certificate_forwarded, certificate_in_scope

log = structlog.get_logger("portcullis.portal")

CSRF_COOKIE = "__Host-portcullis-csrf"
HERE = Path(__file__).parent


@dataclass(frozen=True)
class PortalDeps:
    settings: Settings
    sessions: SessionManager
    login: LoginService
    authorities: TicketIssuer
    hasher: TokenHasher
    durable: DurableStore
    ephemeral: EphemeralStore
    audit: AuditTrail
    # Replacing one's authenticator app (a new phone).
    self_enrolment: SelfEnrolment
    # The portal runs apart and learns the user's certificate from the gateway's header.
    forwarded_certificates: bool = False
    # After a sign-out: the page that signs out at the identity provider too, if any.
    sign_out_at_idp: Callable[[Request, Session], Awaitable[Response | None]] | None = None
    # The shadow hub runs here: the resource page links to its device list.
    shadowing: bool = False


def safe_next(target: str | None) -> str:
    """Only same-origin relative paths: '/x' yes; '//evil', '/\\evil', 'https://…' no."""
    if (not target or not target.startswith("/") or target.startswith("//")
            or "\\" in target or any(ord(c) < 0x20 for c in target)):
        return "/"
    return target


def create_portal_app(deps: PortalDeps) -> Starlette:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    settings = deps.settings

    def login_context(request: Request) -> LoginContext:
        try:
            certificate = (certificate_forwarded(request.headers.raw)
                           if deps.forwarded_certificates
                           else certificate_in_scope(dict(request.scope)))
        except PKIError:
            certificate = None
        return LoginContext(client_of(request), certificate)

    async def current_session(request: Request) -> Session | None:
        return await signed_in(deps.sessions, request)

    def api_post_allowed(request: Request) -> bool:
        """A state-changing API call carries a Bearer token, or, signed in by cookie, a
        JSON content type, which no cross-site form can send (CSRF on the API)."""
        if request.headers.get("authorization", "").lower().startswith("bearer "):
            return True
        if SESSION_COOKIE not in request.cookies:
            return True   # no session at all: the endpoint answers 401
        if is_json(request):
            return True
        deps.audit.record("csrf.rejected", path=request.url.path, client=client_of(request))
        return False

    def csrf_for(token: str) -> str:
        return guard.csrf_for(deps.hasher, token)

    def csrf_ok(request: Request, form_value: object) -> bool:
        return guard.csrf_ok(deps.hasher, request, form_value)

    def set_session_cookie(response: Response, token: str) -> None:
        response.set_cookie(SESSION_COOKIE, token, secure=True, httponly=True,
                            samesite="strict", path="/",
                            max_age=int(settings.session.absolute_timeout))

    async def launch_file_for(session: Session, name: str, client: str) -> Response:
        return launch_file_response(await issue_launch(deps, session, name, client))

    # -- JSON API ------------------------------------------------------------------
    async def api_login(request: Request) -> JSONResponse:
        body = await _json_object(request)
        if body is None:
            return JSONResponse({"error": "expected a JSON object"}, 400)
        handle = body.get("handle")
        answers = body.get("answers")
        if answers is None and handle is None:
            return_to = body.get("return_to")
            if return_to is not None and loopback_return_to(return_to) is None:
                return JSONResponse({"error": "return_to must be a loopback http URL "
                                              "(http://127.0.0.1:PORT/...)"}, 400)
            device = body.get("device", False)
            if not isinstance(device, bool):
                return JSONResponse({"error": "device must be true or false"}, 400)
            result = await deps.login.begin(login_context(request), return_to=return_to,
                                            device=device)
        elif (not isinstance(answers, dict)
              or not all(isinstance(v, str) for v in answers.values())
              or not (handle is None or isinstance(handle, str))):
            return JSONResponse({"error": "answers must be an object of strings"}, 400)
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

    async def api_logout(request: Request) -> JSONResponse:
        if not api_post_allowed(request):
            return JSONResponse({"error": "denied"}, 403)
        token = token_of(request)
        if token:
            await deps.sessions.end(token)
        response = JSONResponse({"status": "signed out"})
        response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="strict")
        return response

    async def api_session(request: Request) -> JSONResponse:
        session = await current_session(request)
        if session is None:
            return JSONResponse({"error": "not signed in"}, 401)
        return JSONResponse({"user": session.username, "claims": session.claims.to_json()})

    async def api_resources(request: Request) -> JSONResponse:
        session = await current_session(request)
        if session is None:
            return JSONResponse({"error": "not signed in"}, 401)
        return JSONResponse({"resources": [
            {"name": r.name, "title": r.title, "description": r.description,
             "launch": f"/api/v1/resources/{r.name}/launch"}
            for r in visible_resources(settings.resources, session.claims)]})

    async def api_launch(request: Request) -> Response:
        if not api_post_allowed(request):
            return JSONResponse({"error": "denied"}, 403)
        session = await current_session(request)
        if session is None:
            return JSONResponse({"error": "not signed in"}, 401)
        return await launch_file_for(session, request.path_params["name"], client_of(request))

    def recently_signed_in(session: Session) -> bool:
        return time.time() - session.claims.auth_time <= settings.auth.recent_sign_in

    async def new_authenticator(session: Session, handle: str | None, code: str | None,
                                client: str) -> tuple[str, str, NextStep | None]:
        """(status, handle, step to show): begin with no handle, finish with a code."""
        identity = session.claims.sub
        if handle is not None:
            pending = await deps.self_enrolment.pending(identity, handle)
            if pending is None:
                return "expired", "", None
            check = await deps.self_enrolment.finish(identity, handle, pending, code or "")
            if check.ok:
                deps.audit.record("totp.enrolled", identity=identity, client=client,
                                  replaced=True)
                return "enrolled", handle, None
            deps.audit.record("totp.enrolment_failed", identity=identity, client=client,
                              reason=check.reason)
            return "continue", handle, NextStep(handle, enrolment_step(pending, retry=True))
        if await deps.self_enrolment.enrolled(identity) and not set(session.claims.amr) & {
                name for name, provider in settings.auth.all_providers().items()
                if provider.type == "totp"}:
            # Whoever signed in without the present app must not replace it.
            return "needs totp", "", None
        handle, enrolment = await deps.self_enrolment.begin(identity, session.username)
        return "continue", handle, NextStep(handle, enrolment_step(enrolment, retry=False))

    async def api_new_authenticator(request: Request) -> JSONResponse:
        if not api_post_allowed(request):
            return JSONResponse({"error": "denied"}, 403)
        session = await current_session(request)
        if session is None:
            return JSONResponse({"error": "not signed in"}, 401)
        if not recently_signed_in(session):
            return JSONResponse({"error": "sign in again first: setting up a new "
                                          "authenticator app needs a recent sign-in"}, 403)
        body = await _json_object(request)
        if body is None:
            return JSONResponse({"error": "expected a JSON object"}, 400)
        handle, answers = body.get("handle"), body.get("answers") or {}
        if not (handle is None or isinstance(handle, str)) or not isinstance(answers, dict):
            return JSONResponse({"error": "answers must be an object of strings"}, 400)
        code = answers.get("code")
        status, handle, step = await new_authenticator(
            session, handle, code if isinstance(code, str) else None, client_of(request))
        if status == "expired":
            return JSONResponse({"error": "this enrolment has expired; begin again"}, 410)
        if status == "needs totp":
            return JSONResponse({"error": "sign in with your authenticator app first (or "
                                          "ask an administrator to reset it)"}, 403)
        if step is None:
            return JSONResponse({"status": status})
        return JSONResponse({"status": status, "handle": handle, "step": step.step.to_json()})

    async def authenticator_page(request: Request) -> Response:
        session = await current_session(request)
        if session is None:
            return RedirectResponse("/login?next=/account/authenticator", 303)
        token = request.cookies.get(SESSION_COOKIE) or ""
        if request.method == "POST":
            form = await request.form()
            if not csrf_ok(request, form.get("csrf")):
                deps.audit.record("csrf.rejected", path="/account/authenticator",
                                  client=client_of(request))
                return Response("denied", 403, media_type="text/plain")
            handle, code = form.get("handle"), form.get("code")
        else:
            handle = code = None
        if not recently_signed_in(session):
            return render(request, "authenticator.html", 403, session=session,
                          csrf=csrf_for(token), outcome="stale", step=None, handle="")
        status, new_handle, step = await new_authenticator(
            session, handle if isinstance(handle, str) else None,
            code if isinstance(code, str) else None, client_of(request))
        code_of = {"expired": 410, "needs totp": 403}
        return render(request, "authenticator.html", code_of.get(status, 200),
                      session=session, csrf=csrf_for(token), outcome=status,
                      step=step.step if step else None, handle=new_handle)

    async def api_health(request: Request) -> JSONResponse:
        checks: dict[str, str] = {}
        for name, probe in (("durable", deps.durable.ping), ("ephemeral", deps.ephemeral.ping)):
            try:
                await probe()
                checks[name] = "ok"
            except StoreError as exc:
                checks[name] = str(exc)
        healthy = all(value == "ok" for value in checks.values())
        if not healthy:
            log.warning("health check failed", **checks)   # the detail stays in our log
        public = {name: "ok" if value == "ok" else "unavailable"
                  for name, value in checks.items()}
        return JSONResponse({"status": "ok" if healthy else "degraded", "checks": public},
                            200 if healthy else 503)

    # -- pages -----------------------------------------------------------------------
    def render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
        return templates.TemplateResponse(request, template, context, status_code=status)

    async def login_page(request: Request) -> Response:
        # fresh=1: an application asked for the user to sign in again (prompt=login).
        if (await current_session(request) is not None
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
            response = (render(request, "continue.html", target=target)
                        if arrived_cross_site or (request.method == "POST" and target != "/")
                        else RedirectResponse(target, 303))
            set_session_cookie(response, result.token)
            return forget_login(response)
        if isinstance(result, NextStep) and result.step.kind == "redirect":
            return to_identity_provider(templates, request, result, target,
                                        settings.session.login_step_timeout)
        if isinstance(result, NextStep):
            return login_form(request, result, error=error)
        if isinstance(result, HandOff):
            return RedirectResponse(result.url, 303)
        return forget_login(render(request, "denied.html", 401))

    async def login_callback(request: Request) -> Response:
        """An identity provider's answer to a redirect step."""
        relay, answers = await callback_answers(request)
        result = await deps.login.callback(relay, answers, login_context(request),
                                           request.cookies.get(LOGIN_COOKIE),
                                           provider=str(request.path_params["provider"]))
        return login_result(request, result, safe_next(request.cookies.get(NEXT_COOKIE)))

    def login_form(request: Request, step: NextStep, error: str | None,
                   status: int = 200) -> Response:
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        response = render(request, "login.html", status, step=step.step, handle=step.handle,
                          csrf=csrf, error=error,
                          next=safe_next(request.query_params.get("next")))
        response.set_cookie(CSRF_COOKIE, csrf, secure=True, httponly=True, samesite="strict",
                            path="/")
        return response

    async def login_submit(request: Request) -> Response:
        form = await request.form()
        cookie = request.cookies.get(CSRF_COOKIE)
        posted = form.get("csrf")
        if not cookie or not isinstance(posted, str) or not hmac.compare_digest(cookie, posted):
            deps.audit.record("csrf.rejected", path="/login", client=client_of(request))
            return Response("denied", 403, media_type="text/plain")
        handle = form.get("handle")
        answers = {key: value for key, value in form.items()
                   if key not in ("csrf", "handle", "next") and isinstance(value, str)}
        context = login_context(request)
        result = await deps.login.submit(handle if isinstance(handle, str) else None, answers,
                                         context)
        target = safe_next(str(form.get("next") or "/"))
        if isinstance(result, Denied):
            # Start over; the reason is in the audit trail only.
            begun = await deps.login.begin(context)
            if isinstance(begun, NextStep) and begun.step.kind != "redirect":
                return login_form(request, begun, error="Sign-in failed.", status=401)
        return login_result(request, result, target)

    async def home(request: Request) -> Response:
        session = await current_session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        token = request.cookies.get(SESSION_COOKIE) or ""
        return render(request, "resources.html", session=session, csrf=csrf_for(token),
                      resources=visible_resources(settings.resources, session.claims),
                      shadowing=deps.shadowing)

    async def logout_page(request: Request) -> Response:
        form = await request.form()
        token = request.cookies.get(SESSION_COOKIE)
        if token and not csrf_ok(request, form.get("csrf")):
            deps.audit.record("csrf.rejected", path="/logout", client=client_of(request))
            return Response("denied", 403, media_type="text/plain")
        session = await deps.sessions.validate(token) if token else None
        if token:
            await deps.sessions.end(token)
        onward = (await deps.sign_out_at_idp(request, session)
                  if session is not None and deps.sign_out_at_idp is not None else None)
        response = onward or RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="strict")
        return response

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        log.error("store unavailable", path=request.url.path, error=str(exc))
        return JSONResponse({"error": "temporarily unavailable; try again shortly"}, 503)

    return Starlette(exception_handlers={StoreError: store_unavailable}, routes=[
        Route("/api/v1/login", api_login, methods=["POST"]),
        Route("/api/v1/logout", api_logout, methods=["POST"]),
        Route("/api/v1/session", api_session, methods=["GET"]),
        Route("/api/v1/resources", api_resources, methods=["GET"]),
        Route("/api/v1/resources/{name}/launch", api_launch, methods=["POST"]),
        Route("/api/v1/health", api_health, methods=["GET"]),
        Route("/", home, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route(CALLBACK_PATH + "{provider}", login_callback, methods=["GET", "POST"]),
        *launch_routes(deps),
        Route("/logout", logout_page, methods=["POST"]),
        Route("/api/v1/account/authenticator", api_new_authenticator, methods=["POST"]),
        Route("/account/authenticator", authenticator_page, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ])


def is_json(request: Request) -> bool:
    """The media type exactly: 'text/plain; x=application/json' is not JSON."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0]
    return media_type.strip().lower() == "application/json"


async def _json_object(request: Request) -> dict[str, Any] | None:
    if not is_json(request):
        return None
    try:
        value = json.loads(await request.body() or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
