"""The portal: sign-in pages, the resource list, launches, and the JSON API behind them,
assembled from route groups, one per concern (signin, resources, account, health).

Authorisation is checked by each endpoint's guard (portal/guard.py), stated where the
route is made, never by matching path prefixes. Attackers are told "denied"; the reason
goes to the audit trail.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from portcullis.errors import StoreError
from portcullis.portal.account import account_routes
from portcullis.portal.deps import PortalDeps
from portcullis.portal.guard import Guard
from portcullis.portal.health import health_routes
from portcullis.portal.launching import download_routes
from portcullis.portal.resources import resource_routes
from portcullis.portal.signin import sign_in_routes

__all__ = ["PortalDeps", "create_portal_app"]

log = structlog.get_logger("portcullis.portal")

HERE = Path(__file__).parent


def create_portal_app(deps: PortalDeps) -> Starlette:
    guard = Guard(deps.sessions, deps.hasher, deps.audit)

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        log.error("store unavailable", path=request.url.path, error=str(exc))
        return JSONResponse({"error": "temporarily unavailable; try again shortly"}, 503)

    return Starlette(exception_handlers={StoreError: store_unavailable}, routes=[
        *sign_in_routes(deps, guard),
        *resource_routes(deps, guard),
        *account_routes(deps, guard),
        *health_routes(deps),
        *download_routes(),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ])
