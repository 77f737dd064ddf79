"""The portal's VNC viewer: `GET /vnc/{name}` draws noVNC in the portal's page, and
`POST /vnc/{name}/ticket` hands the page a single-use ticket for the gateway's WebSocket.

Both ask the same question a launch asks (`portal.broker.authorize_launch`), of the
signed-in session, through the portal's guard (`portal.guard.Guard`: a page sends a
signed-out browser to sign in and back; the ticket is a state-changing API call, so its
POST is JSON, which no cross-site form can send). The ticket is fetched by the page's
script, not written into the HTML: a page kept in the history or a cache holds nothing
usable, and each connection (a reconnect too) gets a fresh ticket. The page names neither
the server nor its address; the ticket travels to the gateway in the WebSocket's first
message, never in a URL or a header, so no access log can hold it. Never logs a ticket.

noVNC itself is the npm package `@novnc/novnc`, installed by the build into
`vendor/node_modules` (gitignored) and served as static files; without it the page says
how to install it.

Where the shadow hub runs in this process, `GET /vnc/device/{device}` is the same viewer
for a device the user may shadow (the hub's own decision, `ShadowHub.devices_for`); its
ticket names the resource `device:NAME`, and the gateway opens the device's secure
shadowing channel as its console proxy (`webvnc.device`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from portcullis.audit import AuditTrail
from portcullis.config.model import Resource
from portcullis.errors import TicketError
from portcullis.identity.sessions import Session, SessionManager
from portcullis.portal.api import api_error
from portcullis.portal.broker import authorize_launch
from portcullis.portal.guard import Guard, client_of
from portcullis.portal.pages import error_page, page
from portcullis.shadow.hub import ShadowHub
from portcullis.sta.authority import TicketRequest
from portcullis.sta.client import TicketIssuer
from portcullis.tokens import TokenHasher
from portcullis.webvnc.device import DEVICE_PREFIX
from portcullis.webvnc.relay import PATH as WEBSOCKET_PATH

HERE = Path(__file__).resolve().parent
NOVNC = HERE / "vendor" / "node_modules" / "@novnc" / "novnc"
# Resource names never start with "-", so these paths cannot shadow a resource's page.
ASSETS = "/vnc/-"
INSTALL_COMMAND = "make novnc"


@dataclass(frozen=True)
class VncPageDeps:
    resources: list[Resource]
    sessions: SessionManager
    authorities: TicketIssuer
    hasher: TokenHasher
    audit: AuditTrail
    shadow_hub: ShadowHub | None = None   # devices in the browser, when it runs here


def novnc_installed() -> bool:
    return (NOVNC / "core" / "rfb.js").is_file()


def vnc_pages(deps: VncPageDeps) -> list[BaseRoute]:
    guard = Guard(deps.sessions, deps.hasher, deps.audit)

    def not_allowed(request: Request) -> Response:
        # Unknown, forbidden and not-a-desktop look the same: users cannot map what exists.
        return error_page(request, 403, "Not allowed",
                          "You may not open this desktop, or it does not exist.",
                          "Pick one from your resources, or ask your administrator for "
                          "access.", action=("Your resources", "/"))

    def allowed(session: Session, name: str, client: str) -> Resource | None:
        decision = authorize_launch(deps.resources, session.claims, name)
        resource = decision.resource
        if decision.allowed and resource is not None and resource.kind == "vnc":
            return resource
        reason = decision.reason if not decision.allowed else "not a vnc resource"
        deps.audit.record("vnc.denied", user=session.username, resource=name,
                          reason=reason, client=client)
        return None

    async def viewer(request: Request, session: Session) -> Response:
        name = request.path_params["name"]
        resource = allowed(session, name, client_of(request))
        if resource is None:
            return not_allowed(request)
        return viewer_page(request, session, resource.title, f"/vnc/{name}/ticket")

    async def may_shadow(session: Session, device: str, client: str) -> bool:
        hub = deps.shadow_hub
        if hub is not None and any(record.name == device and record.status == "approved"
                                   for record in await hub.devices_for(session)):
            return True
        deps.audit.record("vnc.denied", user=session.username,
                          resource=DEVICE_PREFIX + device, client=client,
                          reason="not a device this user may shadow")
        return False

    async def device_viewer(request: Request, session: Session) -> Response:
        device = request.path_params["device"]
        if not await may_shadow(session, device, client_of(request)):
            return not_allowed(request)
        return viewer_page(request, session, device, f"/vnc/device/{device}/ticket")

    def viewer_page(request: Request, session: Session, title: str,
                    ticket_url: str) -> Response:
        if not novnc_installed():
            return error_page(request, 503, "Viewer not installed",
                              "The in-browser VNC viewer (noVNC) is not installed on this "
                              "gateway.",
                              f"An administrator installs it with `{INSTALL_COMMAND}` in the "
                              "Portcullis source directory (it runs npm ci), then reloads "
                              "this page.", action=("Your resources", "/"))
        return page(request, "vnc.html", session=session, title=title,
                    ticket_url=ticket_url, assets=ASSETS)

    async def ticket(request: Request, session: Session) -> Response:
        return await issue_ticket(request, session, request.path_params["name"], None)

    async def device_ticket(request: Request, session: Session) -> Response:
        return await issue_ticket(request, session, None, request.path_params["device"])

    async def issue_ticket(request: Request, session: Session, name: str | None,
                           device: str | None) -> Response:
        """A ticket for resource `name` or for shadowing `device`, on the same decision
        as the page."""
        client = client_of(request)
        if device is not None:
            target = (DEVICE_PREFIX + device, "")   # the hub knows where devices are
            if not await may_shadow(session, device, client):
                return api_error(403, "denied")
        else:
            resource = allowed(session, str(name), client)
            if resource is None:
                return api_error(403, "denied")
            target = (resource.name, resource.address)
        try:
            issued = await deps.authorities.issue(TicketRequest(
                user=session.username, resource=target[0], address=target[1],
                client_address=client, session=session.handle))
        except TicketError as exc:
            deps.audit.record("vnc.failed", user=session.username, resource=target[0],
                              reason=str(exc))
            return api_error(503, "the ticket authority is unavailable")
        return JSONResponse({"ticket": issued.ticket, "websocket": WEBSOCKET_PATH},
                            headers={"cache-control": "no-store"})

    return [
        Mount(f"{ASSETS}/novnc", app=StaticFiles(directory=NOVNC, check_dir=False)),
        Mount(ASSETS, app=StaticFiles(directory=HERE / "static")),
        Route("/vnc/{name}", guard.page(viewer), methods=["GET"]),
        Route("/vnc/{name}/ticket", guard.api(ticket, csrf=True), methods=["POST"]),
        Route("/vnc/device/{device}", guard.page(device_viewer), methods=["GET"]),
        Route("/vnc/device/{device}/ticket", guard.api(device_ticket, csrf=True),
              methods=["POST"]),
    ]
