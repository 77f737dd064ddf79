"""The portal's VNC pages in process (a real session manager, a real STA over the memory
store): who gets the viewer, what the ticket holds, and what a gateway without noVNC
says."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from portcullis.audit import AuditTrail
from portcullis.config.model import Resource, SessionSettings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.passwords import hash_password
from portcullis.identity.sessions import SESSION_COOKIE, SessionManager
from portcullis.sta.authority import TicketAuthority
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher
from portcullis.webvnc import pages
from portcullis.webvnc.pages import VncPageDeps, vnc_pages

RESOURCES = [
    Resource(name="desk", title="Desk", kind="vnc", address="10.9.8.7:5900",
             groups=["staff"]),
    Resource(name="ssh", title="SSH", address="10.9.8.7:22", groups=["staff"]),
]


class Portal:
    def __init__(self, client: httpx.AsyncClient, sta: TicketAuthority, audit: Path,
                 cookie: str) -> None:
        self.client = client
        self.sta = sta
        self.audit = audit
        self.cookie = cookie

    async def get(self, path: str, *, signed_in: bool = True) -> httpx.Response:
        return await self.client.get(path, headers=self._cookie(signed_in))

    async def post_json(self, path: str) -> httpx.Response:
        return await self.client.post(path, content=b"{}", headers={
            **self._cookie(True), "content-type": "application/json"})

    def _cookie(self, signed_in: bool) -> dict[str, str]:
        return {"cookie": f"{SESSION_COOKIE}={self.cookie}"} if signed_in else {}


@pytest.fixture
async def portal(durable: DurableStore, tmp_path: Path) -> AsyncIterator[Portal]:
    store = MemoryStore()
    hasher = TokenHasher(b"v" * 32)
    audit = AuditTrail(tmp_path / "audit.jsonl")
    sessions = SessionManager(store, AccountStatus(durable, ttl=0), hasher, SessionSettings())
    sta = TicketAuthority("STA01", store, hasher, audit, lifetime=30,
                          bind_client_address=False)
    await durable.add_user("alice", hash_password("not used"), ["staff"])
    token, _ = await sessions.create(Claims("local:alice", "alice", ("staff",)), "127.0.0.1")
    app = Starlette(routes=vnc_pages(VncPageDeps(RESOURCES, sessions, sta, hasher, audit)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="https://portal.test") as client:
        yield Portal(client, sta, tmp_path / "audit.jsonl", token)
    audit.close()
    await store.close()


async def test_the_viewer_page_names_neither_a_ticket_nor_the_address(portal: Portal) -> None:
    page = await portal.get("/vnc/desk")
    assert page.status_code == 200
    assert 'data-ticket-url="/vnc/desk/ticket"' in page.text
    assert "10.9.8.7" not in page.text and "STA01;" not in page.text
    assert page.headers["cache-control"] == "no-store"


async def test_a_ticket_is_for_the_resource_and_redeems_once_at_the_sta(portal: Portal) -> None:
    answer = await portal.post_json("/vnc/desk/ticket")
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"ticket", "websocket"} and "10.9.8.7" not in answer.text
    grant = await portal.sta.redeem(body["ticket"], "127.0.0.1")
    assert (grant.user, grant.resource, grant.address) == ("alice", "desk", "10.9.8.7:5900")


@pytest.mark.parametrize("path", ["/vnc/ssh", "/vnc/nonexistent"])
async def test_anything_but_an_allowed_vnc_resource_is_the_same_refusal(
        portal: Portal, path: str) -> None:
    page = await portal.get(path)
    assert page.status_code == 403 and "Not allowed" in page.text
    assert (await portal.post_json(path + "/ticket")).status_code == 403
    assert '"vnc.denied"' in portal.audit.read_text()


async def test_a_signed_out_browser_is_sent_to_sign_in_and_back(portal: Portal) -> None:
    page = await portal.get("/vnc/desk", signed_in=False)
    assert (page.status_code, page.headers["location"]) == (303, "/login?next=/vnc/desk")
    assert (await portal.client.post("/vnc/desk/ticket")).status_code == 401


async def test_without_novnc_the_page_says_how_to_install_it(
        portal: Portal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages, "NOVNC", tmp_path / "not-installed")
    page = await portal.get("/vnc/desk")
    assert page.status_code == 503
    assert "Viewer not installed" in page.text and "make novnc" in page.text


async def test_the_vendored_novnc_ships_with_its_licence(portal: Portal) -> None:
    licence = await portal.get("/vnc/-/novnc/LICENSE.txt", signed_in=False)
    assert licence.status_code == 200 and "MPL 2.0" in licence.text
    module = await portal.get("/vnc/-/novnc/core/rfb.js", signed_in=False)
    assert module.headers["content-type"].startswith("text/javascript")
