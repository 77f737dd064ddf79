"""The few HTTP exchanges an OpenID provider is asked for, with bounded answers.

Every answer is read at most `limit` bytes far (a provider, or whoever sits in its place,
cannot make the gateway hold an endless body), redirects are not followed (an endpoint
is where discovery says it is), and transport failures become `FederationError` with
`unavailable` set: the provider could not be asked, which is not the user's fault.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from portcullis.errors import FederationError

# Discovery documents and key sets of real providers are a few KiB; token answers carry
# an ID token with the user's groups (Azure stops at 200 groups, Okta at 100).
MAX_DOCUMENT = 256 * 1024


@dataclass(frozen=True)
class JsonAnswer:
    status: int
    body: dict[str, Any]


async def get_json(http: httpx.AsyncClient, url: str, *, what: str,
                   headers: Mapping[str, str] | None = None,
                   limit: int = MAX_DOCUMENT) -> JsonAnswer:
    return await _exchange(http, http.build_request("GET", url, headers=headers), what, limit)


async def post_form(http: httpx.AsyncClient, url: str, form: Mapping[str, str], *, what: str,
                    headers: Mapping[str, str] | None = None,
                    limit: int = MAX_DOCUMENT) -> JsonAnswer:
    request = http.build_request("POST", url, data=dict(form), headers=headers)
    return await _exchange(http, request, what, limit)


async def _exchange(http: httpx.AsyncClient, request: httpx.Request, what: str,
                    limit: int) -> JsonAnswer:
    request.headers["Accept"] = "application/json"
    try:
        response = await http.send(request, stream=True, follow_redirects=False)
        try:
            body = bytearray()
            # Decoded chunks: the limit holds for what a compressed answer expands to.
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise FederationError(f"the {what} at {request.url} answered more than "
                                          f"{limit} bytes", unavailable=True)
        finally:
            await response.aclose()
    except httpx.HTTPError as exc:
        raise FederationError(f"cannot reach the {what} at {request.url}: "
                              f"{exc or type(exc).__name__}", unavailable=True) from None
    if response.status_code >= 500:
        raise FederationError(f"the {what} at {request.url} failed with HTTP "
                              f"{response.status_code}", unavailable=True)
    try:
        return JsonAnswer(response.status_code, parse_json(bytes(body), what))
    except FederationError:
        if response.status_code == 200:
            raise
        # An error page: its status says more than "not JSON".
        raise FederationError(f"the {what} at {request.url} answered HTTP "
                              f"{response.status_code}", unavailable=True) from None


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object, or a FederationError naming what sent something else."""
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise FederationError(f"the {what} answered something that is not JSON",
                              unavailable=True) from None
    if not isinstance(value, dict):
        raise FederationError(f"the {what} answered JSON that is not an object",
                              unavailable=True)
    return value
