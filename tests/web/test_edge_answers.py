"""How the edge refuses a request before any role sees it: a page in the portal's style
for a browser, JSON for the API, plain text for everything else (web/answers.py)."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from portcullis.web.answers import STYLESHEET, answer_for
from portcullis.web.security import SecurityMiddleware

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


APP = SecurityMiddleware(Starlette(routes=[Route("/{path:path}", ok, methods=["POST"])]),
                         max_body=16, max_header_bytes=2048)


@pytest.mark.parametrize(("path", "accept", "kind"), [
    ("/", BROWSER, "page"), ("/login", "TEXT/HTML; q=1", "page"),
    ("/api/v1/login", BROWSER, "json"), ("/", "*/*", "text"), ("/", "", "text"),
    ("/", "application/xhtml+xml-not-html", "text")])
def test_who_gets_a_page_json_or_text(path: str, accept: str, kind: str) -> None:
    assert answer_for(path, accept) == kind


@pytest.mark.parametrize(("headers", "status"), [
    ({"content-length": "99"}, 413), ({"x-big": "y" * 4096}, 431)])
async def test_a_browser_refused_at_the_edge_gets_a_styled_page(
        headers: dict[str, str], status: int) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP),
                                 base_url="https://gateway") as client:
        page = await client.post("/login", content=b"x" * 99, headers={
            "accept": BROWSER, **headers})
        api = await client.post("/api/v1/login", content=b"x" * 99, headers=headers)
        plain = await client.post("/login", content=b"x" * 99, headers=headers)
    assert page.status_code == api.status_code == plain.status_code == status
    assert page.headers["content-type"].startswith("text/html")
    assert f'<link rel="stylesheet" href="{STYLESHEET}">' in page.text
    assert 'role="alert"' in page.text and "<h1>" in page.text
    assert "error" in api.json()
    assert plain.headers["content-type"].startswith("text/plain")
