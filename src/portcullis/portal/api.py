"""The JSON API's conventions, shared by the portal's route groups: what a request body
must be (a JSON object under exactly `application/json`) and how an error reads."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


def is_json(request: Request) -> bool:
    """The media type exactly: 'text/plain; x=application/json' is not JSON."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0]
    return media_type.strip().lower() == "application/json"


async def json_object(request: Request) -> dict[str, Any] | None:
    """The body as a JSON object, or None (another media type, not JSON, not an object)."""
    if not is_json(request):
        return None
    try:
        value = json.loads(await request.body() or b"{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def api_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)
