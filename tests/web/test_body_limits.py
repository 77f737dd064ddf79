"""The request body limits of SecurityMiddleware: one for every request, and a larger one
for POSTs to named paths only (the SAML ACS), counted as the body arrives whether or not
a Content-Length announced it."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from portcullis.web.security import LargerBodies, SecurityMiddleware

LIMIT = 1024
ACS = "/login/callback/corp"


async def echo_length(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(len(await request.body())))


APP = SecurityMiddleware(
    Starlette(routes=[Route("/{path:path}", echo_length, methods=["GET", "POST"])]),
    max_body=LIMIT, max_header_bytes=8192, larger=LargerBodies(frozenset({ACS}), 4 * LIMIT))


async def answer(method: str, path: str, size: int, *, announced: bool) -> tuple[int, bytes]:
    """The status and body of a request of `size` bytes, sent in chunks of 256, with a
    Content-Length or without one (chunked)."""
    chunks = [b"x" * min(256, size - start) for start in range(0, size, 256)] or [b""]
    headers = [(b"content-length", str(size).encode())] if announced else []
    scope: dict[str, Any] = {"type": "http", "method": method, "path": path,
                             "raw_path": path.encode(), "query_string": b"",
                             "headers": headers, "http_version": "1.1", "scheme": "https",
                             "server": ("127.0.0.1", 443), "client": ("127.0.0.1", 5000)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await APP(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], body


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_a_post_to_the_acs_may_be_larger_than_any_other_body(announced: bool) -> None:
    assert await answer("POST", ACS, 3 * LIMIT, announced=announced) == (200, b"3072")
    status, _ = await answer("POST", "/login", 3 * LIMIT, announced=announced)
    assert status == 413


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_a_post_to_the_acs_over_its_own_limit_is_refused(announced: bool) -> None:
    status, _ = await answer("POST", ACS, 4 * LIMIT + 1, announced=announced)
    assert status == 413


async def test_only_posts_to_the_named_paths_get_the_larger_limit() -> None:
    for method, path in (("GET", ACS), ("POST", ACS + "/more"), ("POST", "/login/callback/x")):
        status, _ = await answer(method, path, 2 * LIMIT, announced=True)
        assert status == 413, (method, path)
