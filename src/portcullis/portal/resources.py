"""The resources a signed-in user may use: the list (page and JSON API) and launches.

Which resources a user sees and may launch is the broker's decision (portal/broker.py),
the same for the page, the API and every kind; an unknown resource and a forbidden one
are answered alike, so users cannot map what exists. Each kind is used from its own URL
(`page_url`, `api_url`): tcp resources are launched here (a launch file), web and vnc ones open in
the browser at the routes their packages serve beside the portal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.config.model import Resource
from portcullis.errors import TicketError
from portcullis.identity.sessions import Session
from portcullis.net.websocket import websocket_url
from portcullis.portal.api import api_error
from portcullis.portal.broker import authorize_launch, visible_resources
from portcullis.portal.deps import PortalDeps
from portcullis.portal.error_pages import HOME
from portcullis.portal.guard import Guard, client_of
from portcullis.portal.pages import error_page, page
from portcullis.proto.launchfile import MIME_TYPE, LaunchFile, format_launch_file
from portcullis.sta.authority import TicketRequest


class Refusal(Enum):
    DENIED = "denied"             # unknown, forbidden, or not a launched kind: alike
    UNAVAILABLE = "unavailable"   # the ticket authority did not answer


def resource_routes(deps: PortalDeps, guard: Guard) -> list[BaseRoute]:
    settings = deps.settings
    gateway_ws = websocket_url(settings.gateway.public_url, "/api/v1/launch")

    def page_url(resource: Resource) -> str:
        """Where the resource list sends a browser: the launch (tcp: a launch file for the
        rich client), the web proxy's entry (web), the portal's VNC viewer (vnc)."""
        if resource.kind == "tcp":
            return f"/launch/{resource.name}"
        return f"/{resource.kind}/{resource.name}"

    def api_url(resource: Resource) -> str:
        """The same for an API client: tcp resources are launched by the launch API."""
        if resource.kind == "tcp":
            return f"/api/v1/resources/{resource.name}/launch"
        return page_url(resource)

    async def launch_file_for(request: Request, session: Session) -> Response | Refusal:
        """The launch file of the tcp resource this request names, or why not."""
        name, client = request.path_params["name"], client_of(request)
        decision = authorize_launch(settings.resources, session.claims, name)
        resource = decision.resource
        if not decision.allowed or resource is None or resource.kind != "tcp":
            reason = (decision.reason if not decision.allowed or resource is None
                      else f"{name} is a {resource.kind} resource: it opens in the browser")
            deps.audit.record("launch.denied", user=session.username, resource=name,
                              reason=reason, client=client)
            return Refusal.DENIED
        try:
            issued = await deps.authorities.issue(TicketRequest(
                user=session.username, resource=resource.name, address=resource.address,
                client_address=client, session=session.handle))
        except TicketError as exc:
            deps.audit.record("launch.failed", user=session.username, resource=name,
                              reason=str(exc))
            return Refusal.UNAVAILABLE
        text = format_launch_file(LaunchFile(
            resource=resource.name, title=resource.title, gateway_url=gateway_ws,
            ticket=issued.ticket, expires=datetime.fromtimestamp(issued.expires_at, UTC)))
        return Response(text, media_type=MIME_TYPE, headers={
            "content-disposition": f'attachment; filename="{resource.name}.portcullis"',
            "cache-control": "no-store"})

    async def home(request: Request, session: Session) -> Response:
        return page(request, "resources.html", session=session, csrf=guard.form_token(request),
                    resources=[(resource, page_url(resource)) for resource
                               in visible_resources(settings.resources, session.claims)],
                    shadowing=deps.shadowing)

    async def api_resources(request: Request, session: Session) -> Response:
        return JSONResponse({"resources": [
            {"name": r.name, "title": r.title, "description": r.description,
             "kind": r.kind, "open": api_url(r),
             **({"launch": api_url(r)} if r.kind == "tcp" else {})}
            for r in visible_resources(settings.resources, session.claims)]})

    async def api_launch(request: Request, session: Session) -> Response:
        answer = await launch_file_for(request, session)
        if answer is Refusal.DENIED:
            return api_error(403, "denied")
        if answer is Refusal.UNAVAILABLE:
            return api_error(503, "the ticket authority is unavailable")
        return answer

    async def launch_page(request: Request, session: Session) -> Response:
        answer = await launch_file_for(request, session)
        if answer is Refusal.DENIED:
            # Unknown and forbidden look the same, so users cannot map what exists.
            return error_page(request, 403, "Not available to you",
                              "This resource does not exist or is not published for you.",
                              "Choose one from your resources.", action=HOME)
        if answer is Refusal.UNAVAILABLE:
            return error_page(request, 503, "Launching is unavailable",
                              "The gateway could not prepare the launch just now.",
                              "Try again in a minute.", action=HOME)
        return answer

    return [
        Route("/", guard.page(home), methods=["GET"]),
        Route("/api/v1/resources", guard.api(api_resources), methods=["GET"]),
        Route("/api/v1/resources/{name}/launch", guard.api(api_launch, csrf=True),
              methods=["POST"]),
        Route("/launch/{name}", guard.page(launch_page, csrf=True), methods=["POST"]),
    ]
