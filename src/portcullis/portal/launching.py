"""What the portal does when a user launches a resource: issue the single-use ticket,
then hand it over as a launch file (the JSON API, for `portcullis launch NAME`) or as a
page (the browser) that says, per platform, how to open it: an "Open in Portcullis
client" `portcullis://` link, the launch file as a fallback, and the client to download.

The page carries the ticket (a bearer secret until redeemed) in both forms, so it is
never cached, and the fallback file is a `data:` link: nothing is issued twice and no
second URL holds a ticket. The downloads are served from the built `dist/` (`make
dist`); a name not in the short list of client files is never looked up on disk.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

from portcullis.errors import TicketError
from portcullis.identity.sessions import Session
from portcullis.net.websocket import websocket_url
from portcullis.portal.api import api_error
from portcullis.portal.broker import authorize_launch
from portcullis.portal.deps import PortalDeps
from portcullis.portal.guard import SessionEndpoint, client_of
from portcullis.portal.pages import error_page, page
from portcullis.proto.launchfile import (
    FILE_EXTENSION,
    MIME_TYPE,
    LaunchFile,
    format_launch_file,
    format_launch_url,
)
from portcullis.sta.authority import TicketRequest

LAUNCH_PATH = "/api/v1/launch"
# The source checkout's dist/, where `make dist` writes the client.
DIST = Path(__file__).resolve().parents[3] / "dist"
PYZ = "portcullis-client.pyz"
_WHEEL = re.compile(r"portcullis_client-[0-9A-Za-z.+!]+-py3-none-any\.whl\Z")
Platform = Literal["linux", "macos", "windows"]
PLATFORMS: dict[Platform, str] = {"linux": "Linux", "macos": "macOS", "windows": "Windows"}


@dataclass(frozen=True)
class Refused:
    """A launch the portal did not issue: 403 (unknown and forbidden alike, so users
    cannot map what exists) or 503 (the ticket authority is unavailable)."""

    status: int
    error: str


async def issue_launch(deps: PortalDeps, session: Session, name: str,
                       client: str) -> LaunchFile | Refused:
    """Authorise the launch of `name` for `session` and issue its ticket; audited."""
    decision = authorize_launch(deps.settings.resources, session.claims, name)
    resource = decision.resource
    if not decision.allowed or resource is None:
        deps.audit.record("launch.denied", user=session.username, resource=name,
                          reason=decision.reason, client=client)
        return Refused(403, "denied")
    try:
        issued = await deps.authorities.issue(TicketRequest(
            user=session.username, resource=resource.name, address=resource.address,
            client_address=client, session=session.handle))
    except TicketError as exc:
        deps.audit.record("launch.failed", user=session.username, resource=name,
                          reason=str(exc))
        return Refused(503, "the ticket authority is unavailable")
    return LaunchFile(
        resource=resource.name, title=resource.title,
        gateway_url=websocket_url(deps.settings.gateway.public_url, LAUNCH_PATH),
        ticket=issued.ticket, expires=datetime.fromtimestamp(issued.expires_at, UTC))


def launch_file_response(launch: LaunchFile | Refused) -> Response:
    """The JSON API's answer: the launch file, or the refusal as JSON."""
    if isinstance(launch, Refused):
        return api_error(launch.status, launch.error)
    return Response(format_launch_file(launch), media_type=MIME_TYPE, headers={
        "content-disposition": f'attachment; filename="{launch.resource}{FILE_EXTENSION}"',
        "cache-control": "no-store"})


def platform_of(user_agent: str) -> Platform:
    """The platform to show first; every platform's steps are on the page anyway."""
    if "Windows" in user_agent:
        return "windows"
    if "Macintosh" in user_agent or "Mac OS X" in user_agent:
        return "macos"
    return "linux"


def client_files(dist: Path) -> list[str]:
    """The client downloads `make dist` left in `dist`, the single file first."""
    if not dist.is_dir():
        return []
    wheels = sorted(path.name for path in dist.iterdir() if _WHEEL.match(path.name))
    return ([PYZ] if (dist / PYZ).is_file() else []) + wheels


def launch_page(deps: PortalDeps, dist: Path = DIST) -> SessionEndpoint:
    """`POST /launch/{name}` (the resource list's Launch button), for the portal's guard
    to wrap (signed in, CSRF): the launch page, or a page saying why there is none."""

    async def launched(request: Request, session: Session) -> Response:
        launch = await issue_launch(deps, session, request.path_params["name"],
                                    client_of(request))
        if isinstance(launch, Refused):
            if launch.status == 403:
                return error_page(request, 403, "Launch refused",
                                  "This resource is not available to you.",
                                  "Choose one from your resources, or ask your "
                                  "administrator for access.", action=("Your resources", "/"))
            return error_page(request, 503, "Launch unavailable",
                              "The gateway could not issue a ticket just now.",
                              "Try again in a moment.", action=("Your resources", "/"))
        platform = platform_of(request.headers.get("user-agent", ""))
        file_data = base64.b64encode(format_launch_file(launch).encode()).decode()
        return page(request, "launch.html", launch=launch, url=format_launch_url(launch),
                    file_name=launch.resource + FILE_EXTENSION,
                    file_href=f"data:{MIME_TYPE};base64,{file_data}",
                    platform=platform,
                    platforms=sorted(PLATFORMS.items(), key=lambda item: item[0] != platform),
                    downloads=client_files(dist), public_url=deps.settings.gateway.public_url)

    return launched


def download_routes(dist: Path = DIST) -> list[BaseRoute]:
    """`GET /download/{file}`: the client `make dist` built, for anyone (it holds nothing
    secret)."""

    async def download(request: Request) -> Response:
        name = request.path_params["file"]
        if name != PYZ and not _WHEEL.match(name):
            return error_page(request, 404, "No such download",
                              "The portal offers the Portcullis client only.",
                              "Go back to your resources.", action=("Your resources", "/"))
        if name not in client_files(dist):
            return error_page(request, 404, "The client is not built here",
                              f"This server has no {name} to offer yet.",
                              "Ask your administrator to build it: 'make dist' in the "
                              "Portcullis checkout writes the client into dist/.",
                              action=("Your resources", "/"))
        media_type = "application/zip" if name.endswith(".whl") else "application/x-python-zip"
        return FileResponse(dist / name, media_type=media_type, filename=name)

    return [Route("/download/{file}", download, methods=["GET"])]
