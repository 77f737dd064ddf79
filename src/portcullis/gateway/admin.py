"""The administration API of a gateway: the launches and tunnels it carries, and ending
them. Only sessions of the configured admin groups may use it; it lives on the gateway
because that is where the connections are (each node answers for its own)."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from portcullis.audit import AuditTrail
from portcullis.errors import AuthError
from portcullis.gateway.connections import ADMIN_ENDED, ConnectionRegistry
from portcullis.identity.names import canonical_username
from portcullis.identity.sessions import Session, SessionManager
from portcullis.proto.mux import Reason


def admin_routes(registry: ConnectionRegistry, sessions: SessionManager,
                 admin_groups: Sequence[str], audit: AuditTrail) -> list[Route]:
    async def administrator(request: Request) -> Session | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        session = await sessions.validate(header[7:].strip())
        if session is None or not set(admin_groups) & set(session.claims.groups):
            return None
        return session

    async def list_sessions(request: Request) -> JSONResponse:
        if await administrator(request) is None:
            return JSONResponse({"error": "denied"}, 403)
        return JSONResponse({"sessions": [c.describe() for c in registry.list()]})

    async def end_session(request: Request) -> JSONResponse:
        admin = await administrator(request)
        if admin is None:
            return JSONResponse({"error": "denied"}, 403)
        connection = registry.end(request.path_params["id"], Reason.ADMIN_ENDED, ADMIN_ENDED)
        if connection is None:
            return JSONResponse({"error": "no such session on this gateway"}, 404)
        audit.record("admin.session_ended", admin=admin.username, user=connection.user,
                     session=connection.id, kind=connection.kind)
        return JSONResponse({"ended": [connection.id]})

    async def end_user_sessions(request: Request) -> JSONResponse:
        admin = await administrator(request)
        if admin is None:
            return JSONResponse({"error": "denied"}, 403)
        try:
            user = canonical_username(request.query_params.get("user", ""))
        except AuthError:
            return JSONResponse({"error": "give ?user=NAME"}, 400)
        ended = [c.id for c in registry.list() if c.user == user]
        registry.end_user(user, Reason.ADMIN_ENDED, ADMIN_ENDED)
        audit.record("admin.sessions_ended", admin=admin.username, user=user, sessions=ended)
        return JSONResponse({"ended": ended})

    return [
        Route("/api/v1/admin/sessions", list_sessions, methods=["GET"]),
        Route("/api/v1/admin/sessions", end_user_sessions, methods=["DELETE"]),
        Route("/api/v1/admin/sessions/{id}", end_session, methods=["DELETE"]),
    ]
