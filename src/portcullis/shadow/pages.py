"""The portal's device list (`/devices`): the devices the signed-in operator may shadow,
with the one command that shadows each. Served beside the portal when the shadow hub
runs in the same process; it reads the portal's session cookie."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from portcullis.identity.sessions import SessionManager
from portcullis.portal.guard import signed_in
from portcullis.portal.pages import page
from portcullis.shadow.hub import ShadowHub


def device_pages(hub: ShadowHub, sessions: SessionManager, public_url: str) -> list[Route]:
    async def devices(request: Request) -> Response:
        session = await signed_in(sessions, request)
        if session is None:
            return RedirectResponse("/login?next=/devices", 303)
        return page(request, "devices.html", session=session,
                    devices=await hub.devices_for(session), gateway=public_url)

    return [Route("/devices", devices, methods=["GET"])]
