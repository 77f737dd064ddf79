"""The portal's error handlers, on an application whose endpoints fail: a bug is a
generic page (the detail in our log, never in the answer), a store that does not answer
is a 503 page; the API gets JSON for both."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from portcullis.errors import StoreError
from portcullis.portal.error_pages import error_handlers

PAGE = {"accept": "text/html"}


async def bug(request: Request) -> Response:
    raise RuntimeError("secret detail /srv/portcullis/db.sqlite")


async def store_down(request: Request) -> Response:
    raise StoreError("redis at 10.0.0.9:6379 refused the connection")


APP = Starlette(exception_handlers=error_handlers(), routes=[
    Route("/bug", bug), Route("/api/v1/bug", bug),
    Route("/store", store_down), Route("/api/v1/store", store_down)])


@pytest.fixture
async def client() -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=APP, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="https://portal")


async def test_a_bug_is_a_generic_page_and_its_detail_only_in_the_log(
        client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]) -> None:
    page = await client.get("/bug", headers=PAGE)
    api = await client.get("/api/v1/bug", headers=PAGE)
    assert page.status_code == api.status_code == 500
    assert "Something went wrong" in page.text and "secret detail" not in page.text
    assert "Traceback" not in page.text
    assert api.json() == {"error": "internal error"}
    assert "secret detail" in capsys.readouterr().out


async def test_a_store_that_does_not_answer_is_a_503_page(client: httpx.AsyncClient) -> None:
    page = await client.get("/store", headers=PAGE)
    api = await client.get("/api/v1/store")
    assert page.status_code == api.status_code == 503
    assert "Temporarily unavailable" in page.text and "10.0.0.9" not in page.text
    assert api.json() == {"error": "temporarily unavailable; try again shortly"}
