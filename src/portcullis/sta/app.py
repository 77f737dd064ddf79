"""The STA's HTTPS API. Mutual TLS is enforced by the listener (only certificates
signed by the deployment CA connect); this app never logs a full ticket."""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from portcullis.errors import TicketError
from portcullis.sta.authority import TicketAuthority, TicketRequest

MAX_BODY = 4096


async def _json_body(request: Request) -> dict[str, Any] | None:
    body = await request.body()
    if len(body) > MAX_BODY:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def create_sta_app(authority: TicketAuthority) -> Starlette:
    async def issue(request: Request) -> JSONResponse:
        body = await _json_body(request)
        fields = ("user", "resource", "address")
        if body is None or not all(isinstance(body.get(name), str) for name in fields):
            return JSONResponse({"error": "expected user, resource and address"}, 400)
        client, session = body.get("client_address"), body.get("session")
        issued = await authority.issue(TicketRequest(
            user=body["user"], resource=body["resource"], address=body["address"],
            client_address=client if isinstance(client, str) else None,
            session=session if isinstance(session, str) else None))
        return JSONResponse({"ticket": issued.ticket, "expires_at": issued.expires_at}, 201)

    async def redeem(request: Request) -> JSONResponse:
        body = await _json_body(request)
        if body is None or not isinstance(body.get("ticket"), str):
            return JSONResponse({"error": "expected ticket"}, 400)
        client = body.get("client_address")
        try:
            grant = await authority.redeem(body["ticket"],
                                           client if isinstance(client, str) else None)
        except TicketError:
            return JSONResponse({"error": "denied"}, 403)
        return JSONResponse({"user": grant.user, "resource": grant.resource,
                             "address": grant.address, "expires_at": grant.expires_at,
                             "session": grant.session})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "sta": authority.sta_id})

    return Starlette(routes=[
        Route("/sta/v1/tickets", issue, methods=["POST"]),
        Route("/sta/v1/redemptions", redeem, methods=["POST"]),
        Route("/sta/v1/health", health, methods=["GET"]),
    ])
