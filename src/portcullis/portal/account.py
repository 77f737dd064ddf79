"""The signed-in user's account: replacing one's authenticator app (a new phone), as a
page and as a JSON API call. Only after a recent sign-in, and only by someone who signed
in with the present app (whoever did not must not replace it)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.identity.factors.totp import enrolment_step
from portcullis.identity.login import NextStep
from portcullis.identity.sessions import Session
from portcullis.portal.api import api_error, json_object
from portcullis.portal.deps import PortalDeps
from portcullis.portal.guard import Guard, client_of
from portcullis.portal.pages import page


def account_routes(deps: PortalDeps, guard: Guard) -> list[BaseRoute]:
    settings = deps.settings

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
            return "needs totp", "", None
        handle, enrolment = await deps.self_enrolment.begin(identity, session.username)
        return "continue", handle, NextStep(handle, enrolment_step(enrolment, retry=False))

    async def api_new_authenticator(request: Request, session: Session) -> Response:
        if not recently_signed_in(session):
            return api_error(403, "sign in again first: setting up a new authenticator "
                                  "app needs a recent sign-in")
        body = await json_object(request)
        if body is None:
            return api_error(400, "expected a JSON object")
        handle, answers = body.get("handle"), body.get("answers") or {}
        if not (handle is None or isinstance(handle, str)) or not isinstance(answers, dict):
            return api_error(400, "answers must be an object of strings")
        code = answers.get("code")
        status, handle, step = await new_authenticator(
            session, handle, code if isinstance(code, str) else None, client_of(request))
        if status == "expired":
            return api_error(410, "this enrolment has expired; begin again")
        if status == "needs totp":
            return api_error(403, "sign in with your authenticator app first (or ask an "
                                  "administrator to reset it)")
        if step is None:
            return JSONResponse({"status": status})
        return JSONResponse({"status": status, "handle": handle, "step": step.step.to_json()})

    async def authenticator_page(request: Request, session: Session) -> Response:
        if request.method == "POST":
            form = await request.form()
            handle, code = form.get("handle"), form.get("code")
        else:
            handle = code = None
        if not recently_signed_in(session):
            return page(request, "authenticator.html", 403, session=session,
                        csrf=guard.form_token(request), outcome="stale", step=None,
                        handle="")
        status, new_handle, step = await new_authenticator(
            session, handle if isinstance(handle, str) else None,
            code if isinstance(code, str) else None, client_of(request))
        code_of = {"expired": 410, "needs totp": 403}
        return page(request, "authenticator.html", code_of.get(status, 200),
                    session=session, csrf=guard.form_token(request), outcome=status,
                    step=step.step if step else None, handle=new_handle)

    return [
        Route("/api/v1/account/authenticator", guard.api(api_new_authenticator, csrf=True),
              methods=["POST"]),
        Route("/account/authenticator", guard.page(authenticator_page, csrf=True),
              methods=["GET", "POST"]),
    ]
