"""The portal: sign-in pages, the resource list, launches, and the JSON API behind them,
assembled from route groups, one per concern (signin, resources, account, health).

Authorisation is checked by each endpoint's guard (portal/guard.py), stated where the
route is made, never by matching path prefixes. Attackers are told "denied"; the reason
goes to the audit trail. Errors no endpoint answers are drawn by portal/error_pages.py.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from portcullis.portal.account import account_routes
from portcullis.portal.deps import PortalDeps
from portcullis.portal.error_pages import error_handlers
from portcullis.portal.guard import Guard
from portcullis.portal.health import health_routes
from portcullis.portal.launching import download_routes
from portcullis.portal.pages import stylesheet
from portcullis.portal.resources import resource_routes
from portcullis.portal.signin import sign_in_routes
from portcullis.web.answers import STYLESHEET

__all__ = ["PortalDeps", "create_portal_app"]

HERE = Path(__file__).parent


def create_portal_app(deps: PortalDeps) -> Starlette:
    guard = Guard(deps.sessions, deps.hasher, deps.audit)
    return Starlette(exception_handlers=error_handlers(), routes=[
        *sign_in_routes(deps, guard),
        *resource_routes(deps, guard),
        *account_routes(deps, guard),
        *health_routes(deps),
        *download_routes(),
        Route(STYLESHEET, stylesheet, methods=["GET"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ])
