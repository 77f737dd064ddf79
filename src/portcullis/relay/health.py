"""The relay's health, readiness and status endpoints (plain HTTP on `relay.health_listen`,
loopback by default: they name edges and count traffic, so keep them off public networks).

- GET /health: 200 while the process runs;
- GET /ready: 200 when the relay can serve (listening, certificate loaded and within its
  validity, in dial-out mode at least one edge connected), else 503 with the reasons;
- GET /status: the counters of `RelayStatus` as JSON, with `ready` and `reasons`.

Reads counters only; never changes them. `read_status` is the client side, for
`portcullis relay status`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from portcullis.config.values import parse_host_port
from portcullis.errors import PortcullisError
from portcullis.relay.status import RelayStatus


def health_app(status: RelayStatus, not_ready: Callable[[], list[str]]) -> Starlette:
    """`not_ready()` returns why the relay cannot serve now (empty: ready)."""

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def ready(request: Request) -> Response:
        reasons = not_ready()
        if reasons:
            return PlainTextResponse("not ready: " + "; ".join(reasons) + "\n", 503)
        return PlainTextResponse("ready\n")

    async def status_json(request: Request) -> Response:
        reasons = not_ready()
        return JSONResponse({"ready": not reasons, "reasons": reasons, **status.snapshot()})

    return Starlette(routes=[Route("/health", health), Route("/ready", ready),
                             Route("/status", status_json)])


def read_status(health_listen: str, *, timeout: float = 5.0) -> dict[str, Any]:
    """The /status of the relay listening on `health_listen` (a wildcard listen address is
    asked on loopback). PortcullisError when it does not answer."""
    host, port = parse_host_port(health_listen, any_port=True)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://[{host}]:{port}/status" if ":" in host else f"http://{host}:{port}/status"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise PortcullisError(f"the relay does not answer at {url} ({exc}): is it running, "
                              "and is relay.health_listen the address it listens on?"
                              ) from None
    return answer
