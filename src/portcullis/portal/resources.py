"""The resources a signed-in user may use: the list (page and JSON API) and launches.

Which resources a user sees and may launch is the broker's decision (portal/broker.py),
the same for the page, the API and every kind; an unknown resource and a forbidden one
are answered alike, so users cannot map what exists.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.identity.sessions import Session
from portcullis.portal.broker import visible_resources
from portcullis.portal.deps import PortalDeps
from portcullis.portal.guard import Guard, client_of
from portcullis.portal.launching import issue_launch, launch_file_response, launch_page
from portcullis.portal.pages import page


def resource_routes(deps: PortalDeps, guard: Guard) -> list[BaseRoute]:
    settings = deps.settings

    async def home(request: Request, session: Session) -> Response:
        return page(request, "resources.html", session=session, csrf=guard.form_token(request),
                    resources=visible_resources(settings.resources, session.claims),
                    shadowing=deps.shadowing)

    async def api_resources(request: Request, session: Session) -> Response:
        return JSONResponse({"resources": [
            {"name": r.name, "title": r.title, "description": r.description,
             "launch": f"/api/v1/resources/{r.name}/launch"}
            for r in visible_resources(settings.resources, session.claims)]})

    async def launch(request: Request, session: Session) -> Response:
        return launch_file_response(await issue_launch(
            deps, session, request.path_params["name"], client_of(request)))

    return [
        Route("/", guard.page(home), methods=["GET"]),
        Route("/api/v1/resources", guard.api(api_resources), methods=["GET"]),
        Route("/api/v1/resources/{name}/launch", guard.api(launch, csrf=True),
              methods=["POST"]),
        Route("/launch/{name}", guard.page(launch_page(deps), csrf=True), methods=["POST"]),
    ]
