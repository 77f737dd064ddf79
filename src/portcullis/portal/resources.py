"""The resources a signed-in user may use: the list (page and JSON API) and launches.

Which resources a user sees and may launch is the broker's decision (portal/broker.py),
the same for the page, the API and every kind; an unknown resource and a forbidden one
are answered alike, so users cannot map what exists.
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.errors import TicketError
from portcullis.identity.sessions import Session
from portcullis.net.websocket import websocket_url
from portcullis.portal.api import api_error
from portcullis.portal.broker import authorize_launch, visible_resources
from portcullis.portal.deps import PortalDeps
from portcullis.portal.guard import Guard, client_of
from portcullis.portal.pages import page
from portcullis.proto.launchfile import MIME_TYPE, LaunchFile, format_launch_file
from portcullis.sta.authority import TicketRequest


def resource_routes(deps: PortalDeps, guard: Guard) -> list[BaseRoute]:
    settings = deps.settings
    gateway_ws = websocket_url(settings.gateway.public_url, "/api/v1/launch")

    async def launch_file_for(session: Session, name: str, client: str) -> Response:
        decision = authorize_launch(settings.resources, session.claims, name)
        resource = decision.resource
        if not decision.allowed or resource is None:
            deps.audit.record("launch.denied", user=session.username, resource=name,
                              reason=decision.reason, client=client)
            return api_error(403, "denied")
        try:
            issued = await deps.authorities.issue(TicketRequest(
                user=session.username, resource=resource.name, address=resource.address,
                client_address=client, session=session.handle))
        except TicketError as exc:
            deps.audit.record("launch.failed", user=session.username, resource=name,
                              reason=str(exc))
            return api_error(503, "the ticket authority is unavailable")
        text = format_launch_file(LaunchFile(
            resource=resource.name, title=resource.title, gateway_url=gateway_ws,
            ticket=issued.ticket, expires=datetime.fromtimestamp(issued.expires_at, UTC)))
        return Response(text, media_type=MIME_TYPE, headers={
            "content-disposition": f'attachment; filename="{resource.name}.portcullis"',
            "cache-control": "no-store"})

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
        return await launch_file_for(session, request.path_params["name"], client_of(request))

    return [
        Route("/", guard.page(home), methods=["GET"]),
        Route("/api/v1/resources", guard.api(api_resources), methods=["GET"]),
        Route("/api/v1/resources/{name}/launch", guard.api(launch, csrf=True),
              methods=["POST"]),
        Route("/launch/{name}", guard.page(launch, csrf=True), methods=["POST"]),
    ]
