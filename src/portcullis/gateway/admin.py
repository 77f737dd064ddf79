"""The administration API of a gateway: the launches and tunnels it carries, and ending
them. Only sessions of the configured admin groups may use it; it lives on the gateway
because that is where the connections are (each node lists its own: those of all its
workers, `NodeConnections`).

Ending takes a scope: `session` (the default) revokes the sign-in session(s) the
connections came from, so their tokens and tickets stop working and every node ends
their connections; `connections` ends the connections only, and the user may connect
again with the same session.

`/api/v1/admin/relays` lists the dial-out relay connections of every node (from the
registry all nodes share in the ephemeral store): which node holds which connection."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from portcullis.audit import AuditTrail
from portcullis.errors import AuthError
from portcullis.gateway.connections import ConnectionRegistry
from portcullis.gateway.node_connections import END_WAIT, WORKER, NodeConnections
from portcullis.gateway.relays import relay_connections
from portcullis.identity.endings import Ending, SessionEnded, announce, notice
from portcullis.identity.names import canonical_username
from portcullis.identity.sessions import Session, SessionManager
from portcullis.store import EphemeralStore, EventBus

SCOPES = ("session", "connections")


def admin_routes(registry: ConnectionRegistry, sessions: SessionManager,
                 admin_groups: Sequence[str], audit: AuditTrail,
                 events: EventBus, store: EphemeralStore,
                 node: NodeConnections) -> list[Route]:
    async def administrator(request: Request) -> Session | None:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return None
        session = await sessions.validate(header[7:].strip())
        if session is None or not set(admin_groups) & set(session.claims.groups):
            return None
        return session

    def scope_of(request: Request) -> str | None:
        scope = request.query_params.get("scope", "session")
        return scope if scope in SCOPES else None

    async def list_sessions(request: Request) -> JSONResponse:
        if await administrator(request) is None:
            return JSONResponse({"error": "denied"}, 403)
        described = await node.described()
        for connection in described:
            del connection["session_handle"]
        return JSONResponse({"sessions": described})

    async def end_session(request: Request) -> JSONResponse:
        admin = await administrator(request)
        if admin is None:
            return JSONResponse({"error": "denied"}, 403)
        scope = scope_of(request)
        if scope is None:
            return JSONResponse({"error": "scope must be session or connections"}, 400)
        connection = next((c for c in registry.list() if c.id == request.path_params["id"]),
                          None)
        if connection is None:
            return await end_elsewhere(request.path_params["id"], scope, admin)
        handle = connection.session_handle
        if scope == "connections" or handle is None:
            ended = [connection]
            told = notice(Ending.ADMIN_CONNECTIONS)
        else:
            ended = registry.of_session(handle)
            told = notice(Ending.ADMIN_REVOKED)
        for each in ended:
            each.session.close(told.reason, told.message)
        revoked = scope == "session" and handle is not None
        if revoked and handle is not None:
            await sessions.revoke(handle, Ending.ADMIN_REVOKED)   # and on every other node
        audit.record("admin.session_ended", admin=admin.username, user=connection.user,
                     session=connection.id, kind=connection.kind, scope=scope,
                     revoked=handle if revoked else None)
        return JSONResponse({"ended": [c.id for c in ended], "revoked": int(revoked)})

    async def end_elsewhere(connection_id: str, scope: str, admin: Session) -> JSONResponse:
        """End a connection another worker of this node holds."""
        described = await node.described()
        held = next((c for c in described if c["id"] == connection_id), None)
        if held is None:
            return JSONResponse({"error": "no such session on this gateway"}, 404)
        handle = held["session_handle"]
        revoked = scope == "session" and isinstance(handle, str)
        if revoked and isinstance(handle, str):
            # Every worker (and node) ends the session's connections when it hears of it.
            await sessions.revoke(handle, Ending.ADMIN_REVOKED)
            ended = [str(c["id"]) for c in described if c["session_handle"] == handle]
        else:
            if not await node.end_elsewhere(connection_id, str(held[WORKER])):
                audit.record("admin.session_end_unconfirmed", admin=admin.username,
                             user=held["user"], session=connection_id, kind=held["kind"],
                             worker=held[WORKER])
                return JSONResponse({"error": (
                    f"worker {held[WORKER]}, which carries this connection, did not confirm "
                    f"ending it within {END_WAIT:g} s; list the sessions to see whether it "
                    "is still open")}, 504)
            ended = [connection_id]
        audit.record("admin.session_ended", admin=admin.username, user=held["user"],
                     session=connection_id, kind=held["kind"], scope=scope,
                     revoked=handle if revoked else None, worker=held[WORKER])
        return JSONResponse({"ended": ended, "revoked": int(revoked)})

    async def end_user_sessions(request: Request) -> JSONResponse:
        admin = await administrator(request)
        if admin is None:
            return JSONResponse({"error": "denied"}, 403)
        try:
            user = canonical_username(request.query_params.get("user", ""))
        except AuthError:
            return JSONResponse({"error": "give ?user=NAME"}, 400)
        scope = scope_of(request)
        if scope is None:
            return JSONResponse({"error": "scope must be session or connections"}, 400)
        ending = Ending.ADMIN_REVOKED if scope == "session" else Ending.ADMIN_CONNECTIONS
        ended = registry.of_user(user)
        told = notice(ending)
        for each in ended:
            each.session.close(told.reason, told.message)
        # Every other node ends the user's connections when it hears of it.
        if scope == "session":
            revoked = await sessions.revoke_user(user, ending)
        else:
            revoked = 0
            await announce(events, SessionEnded(ending, user=user))
        audit.record("admin.sessions_ended", admin=admin.username, user=user,
                     sessions=[c.id for c in ended], scope=scope, revoked=revoked)
        return JSONResponse({"ended": [c.id for c in ended], "revoked": revoked})

    async def list_relays(request: Request) -> JSONResponse:
        if await administrator(request) is None:
            return JSONResponse({"error": "denied"}, 403)
        return JSONResponse({"relays": await relay_connections(store)})

    return [
        Route("/api/v1/admin/relays", list_relays, methods=["GET"]),
        Route("/api/v1/admin/sessions", list_sessions, methods=["GET"]),
        Route("/api/v1/admin/sessions", end_user_sessions, methods=["DELETE"]),
        Route("/api/v1/admin/sessions/{id}", end_session, methods=["DELETE"]),
    ]
