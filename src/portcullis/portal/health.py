"""`GET /api/v1/health`: whether this node's stores answer. The detail of a failure goes
to our log; the answer says only which store is unavailable."""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from portcullis.errors import StoreError
from portcullis.portal.deps import PortalDeps

log = structlog.get_logger("portcullis.portal")


def health_routes(deps: PortalDeps) -> list[BaseRoute]:
    async def api_health(request: Request) -> JSONResponse:
        checks: dict[str, str] = {}
        for name, probe in (("durable", deps.durable.ping), ("ephemeral", deps.ephemeral.ping)):
            try:
                await probe()
                checks[name] = "ok"
            except StoreError as exc:
                checks[name] = str(exc)
        healthy = all(value == "ok" for value in checks.values())
        if not healthy:
            log.warning("health check failed", **checks)
        public = {name: "ok" if value == "ok" else "unavailable"
                  for name, value in checks.items()}
        return JSONResponse({"status": "ok" if healthy else "degraded", "checks": public},
                            200 if healthy else 503)

    return [Route("/api/v1/health", api_health, methods=["GET"])]
