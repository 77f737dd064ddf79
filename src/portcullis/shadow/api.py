"""The shadow hub's HTTP API: the agents' routes (its own listener, mutual TLS with the
devices' certificates) and the operators' (on the gateway's port, with a session token).
The paths and bodies are in docs/api.md; every refusal is JSON `{"error": "..."}` with a
message the operator or the device's administrator can act on."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from portcullis.identity.sessions import Session, SessionManager
from portcullis.shadow.hub import HubRefusal, ShadowHub
from portcullis.shadow.hublink import DIAL_OUT
from portcullis.store import ShadowDeviceRecord

Handler = Callable[[Request], Awaitable[JSONResponse]]
MAX_BODY = 16 * 1024


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise HubRefusal(413, "the request body is too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise HubRefusal(400, "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise HubRefusal(400, "the request body must be a JSON object")
    return body


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _answered(handler: Handler) -> Handler:
    async def answer(request: Request) -> JSONResponse:
        try:
            return await handler(request)
        except HubRefusal as exc:
            return JSONResponse({"error": str(exc)}, exc.status)

    return answer


def _peer_certificate(request: Request) -> bytes | None:
    chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain")
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None


def agent_routes(hub: ShadowHub) -> list[Route]:
    """On the hub's listener (`shadow.listen`)."""
    async def device(request: Request) -> ShadowDeviceRecord:
        return await hub.device_of(_peer_certificate(request), _client(request))

    async def register(request: Request) -> JSONResponse:
        return JSONResponse(await hub.register(await _body(request), _client(request)))

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(await hub.state(await device(request),
                                            dict(request.query_params), _client(request)))

    async def refused(request: Request) -> JSONResponse:
        await hub.refused_by_device(await device(request), await _body(request))
        return JSONResponse({})

    async def verify(request: Request) -> JSONResponse:
        return JSONResponse(await hub.verify(await device(request), await _body(request)))

    async def renew(request: Request) -> JSONResponse:
        return JSONResponse(await hub.renew(await device(request), await _body(request)))

    async def insecure(request: Request) -> JSONResponse:
        await hub.insecure(await device(request), await _body(request))
        return JSONResponse({})

    async def up(request: Request) -> JSONResponse:
        record = await hub.own_session(await device(request), request.path_params["id"])
        await hub.channel_up(record)
        return JSONResponse({})

    async def end(request: Request) -> JSONResponse:
        record = await hub.own_session(await device(request), request.path_params["id"])
        await hub.channel_ended(record, await _body(request))
        return JSONResponse({})

    async def watch(request: Request) -> JSONResponse:
        record = await hub.session(request.path_params["id"])
        owner = await device(request)
        if record is None:
            return JSONResponse({"end": True, "reason": "the hub no longer knows this "
                                                        "session"})
        if record.device != owner.name:
            raise HubRefusal(404, "no such shadow session of this device")
        return JSONResponse(await hub.watch(record))

    base = "/api/v1/shadow/agent"
    return [
        Route(f"{base}/register", _answered(register), methods=["POST"]),
        Route(f"{base}/state", _answered(state), methods=["GET"]),
        Route(f"{base}/verify", _answered(verify), methods=["POST"]),
        Route(f"{base}/renew", _answered(renew), methods=["POST"]),
        Route(f"{base}/insecure", _answered(insecure), methods=["POST"]),
        Route(f"{base}/refused", _answered(refused), methods=["POST"]),
        Route(f"{base}/sessions/{{id}}/up", _answered(up), methods=["POST"]),
        Route(f"{base}/sessions/{{id}}/end", _answered(end), methods=["POST"]),
        Route(f"{base}/sessions/{{id}}/watch", _answered(watch), methods=["GET"]),
    ]


def operator_routes(hub: ShadowHub, sessions: SessionManager,
                    admin_groups: Callable[[], Sequence[str]]) -> list[Route]:
    """On the gateway's port: operators signed in with a session token."""
    async def signed_in(request: Request) -> Session:
        header = request.headers.get("authorization", "")
        session = (await sessions.validate(header[7:].strip())
                   if header.lower().startswith("bearer ") else None)
        if session is None:
            raise HubRefusal(401, "sign in first ('portcullis login URL')")
        return session

    async def administrator(request: Request) -> Session:
        session = await signed_in(request)
        if not set(admin_groups()) & set(session.claims.groups):
            raise HubRefusal(403, "only administrators may do this")
        return session

    async def devices(request: Request) -> JSONResponse:
        session = await signed_in(request)
        return JSONResponse({"devices": [{
            "name": record.name, "status": record.status, "fingerprint": record.fingerprint,
            "address": record.advertise,
            "last_seen": record.last_seen.isoformat() if record.last_seen else None,
            # A device behind NAT: which hub node its agent is connected to (None: none).
            **({"node": await hub.dial_out_node(record.name)}
               if record.advertise == DIAL_OUT else {}),
        } for record in await hub.devices_for(session)]})

    async def issue(request: Request) -> JSONResponse:
        session = await signed_in(request)
        return JSONResponse(await hub.issue(session, await _body(request), _client(request)))

    async def report(request: Request) -> JSONResponse:
        session = await signed_in(request)
        await hub.report(session, request.path_params["id"], await _body(request),
                         _client(request))
        return JSONResponse({})

    async def running(request: Request) -> JSONResponse:
        await administrator(request)
        return JSONResponse({"sessions": [record.__dict__ for record in await hub.running()]})

    async def end(request: Request) -> JSONResponse:
        admin = await administrator(request)
        ended = await hub.end(request.path_params["id"], "ended by an administrator",
                              admin.username)
        if not ended:
            raise HubRefusal(404, "no such shadow session")
        return JSONResponse({"ended": request.path_params["id"]})

    base = "/api/v1/shadow"
    return [
        Route(f"{base}/devices", _answered(devices), methods=["GET"]),
        Route(f"{base}/requests", _answered(issue), methods=["POST"]),
        Route(f"{base}/requests/{{id}}/report", _answered(report), methods=["POST"]),
        Route(f"{base}/sessions", _answered(running), methods=["GET"]),
        Route(f"{base}/sessions/{{id}}", _answered(end), methods=["DELETE"]),
    ]
