"""The portal's route groups in process (real stores, the real login service and STA),
driven over ASGI as a browser and as the CLI would: who gets in (the session guard), what
a stale or forged form gets (the CSRF guard, a fresh sign-in page), what each kind of
resource offers, and how errors read for a browser and for the API."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from peers.login import HASHER_KEY, build_login_service
from portcullis.identity.passwords import hash_password
from portcullis.identity.totp import SelfEnrolment
from portcullis.portal.app import PortalDeps, create_portal_app
from portcullis.sta.authority import TicketAuthority
from portcullis.store import DurableStore
from portcullis.tokens import TokenHasher

PAGE = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
RESOURCES = [
    {"name": "intranet", "title": "Intranet", "address": "10.0.0.5:80", "groups": ["staff"]},
    {"name": "wiki", "title": "Wiki", "kind": "web", "upstream": "http://10.0.0.6",
     "host": "wiki.localhost", "groups": ["staff"]},
    {"name": "desk", "title": "Desk", "kind": "vnc", "address": "10.0.0.7:5900",
     "groups": ["staff"]},
    {"name": "vault", "title": "Vault", "address": "10.0.0.8:22", "groups": ["admins"]},
]


@dataclass
class Portal:
    client: httpx.AsyncClient
    audit_path: Path

    def events(self, name: str) -> list[dict[str, object]]:
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        return [entry for entry in map(json.loads, lines) if entry["event"] == name]

    async def sign_in(self) -> None:
        shown = await self.client.get("/login", headers=PAGE)
        answer = await self.client.post("/login", headers=PAGE, data={
            "csrf": form_field(shown.text, "csrf"), "handle": form_field(shown.text, "handle"),
            "next": "/", "username": "alice", "password": "pw"})
        assert answer.status_code == 303 and answer.headers["location"] == "/"


def form_field(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, f"no {name} field"
    return found.group(1)


@pytest.fixture
async def durable(durable: DurableStore) -> DurableStore:
    await durable.add_user("alice", hash_password("pw"), ["staff"])
    return durable


@pytest.fixture
async def portal(durable: DurableStore, tmp_path: Path) -> AsyncIterator[Portal]:
    audit_path = tmp_path / "audit.jsonl"
    login, trail = build_login_service(
        {"flows": [{"name": "default", "steps": [{"provider": "local"}]}]}, durable,
        tmp_path, audit_path, resources=RESOURCES,
        gateway={"public_url": "https://localhost:8443"})
    settings = login.providers.settings
    hasher = TokenHasher(HASHER_KEY)
    app = create_portal_app(PortalDeps(
        settings=settings, sessions=login.service._sessions, login=login.service,
        authorities=TicketAuthority("STA01", login.ephemeral, hasher, trail, lifetime=30,
                                    bind_client_address=False),
        hasher=hasher, durable=durable, ephemeral=login.ephemeral, audit=trail,
        self_enrolment=SelfEnrolment(login.providers.flow_totp(), login.ephemeral, hasher,
                                     30)))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver") as client:
        yield Portal(client, audit_path)
    trail.close()


async def test_a_signed_out_browser_is_sent_to_sign_in_and_back_to_the_page(
        portal: Portal) -> None:
    home = await portal.client.get("/", headers=PAGE)
    account = await portal.client.get("/account/authenticator", headers=PAGE)
    assert (home.status_code, home.headers["location"]) == (303, "/login")
    assert account.headers["location"] == "/login?next=/account/authenticator"


async def test_a_form_sent_after_the_session_ended_is_a_sign_in_again_page(
        portal: Portal) -> None:
    answer = await portal.client.post("/launch/intranet", headers=PAGE, data={"csrf": "x"})
    assert answer.status_code == 401
    assert "Your session has ended" in answer.text and 'href="/login"' in answer.text
    assert 'role="alert"' in answer.text


async def test_the_api_without_a_session_is_a_json_401(portal: Portal) -> None:
    for answer in (await portal.client.get("/api/v1/resources"),
                   await portal.client.get("/api/v1/session")):
        assert (answer.status_code, answer.json()) == (401, {"error": "not signed in"})


async def test_a_form_without_its_csrf_token_is_refused_with_a_page_and_audited(
        portal: Portal) -> None:
    await portal.sign_in()
    answer = await portal.client.post("/launch/intranet", headers=PAGE, data={"csrf": "guess"})
    assert answer.status_code == 403 and "This page was out of date" in answer.text
    assert answer.headers["content-type"].startswith("text/html")
    [refused] = portal.events("csrf.rejected")
    assert refused["path"] == "/launch/intranet" and refused["user"] == "alice"


async def test_the_resource_list_offers_each_kind_its_own_way_in(portal: Portal) -> None:
    await portal.sign_in()
    page = (await portal.client.get("/", headers=PAGE)).text
    assert 'action="/launch/intranet"' in page
    assert re.search(r'href="/web/wiki"[^>]*target="_blank"', page)
    assert 'href="/vnc/desk"' in page
    assert "Vault" not in page   # the broker's decision, for every kind alike
    listed = (await portal.client.get("/api/v1/resources")).json()["resources"]
    assert {(r["name"], r["kind"], r["open"]) for r in listed} == {
        ("intranet", "tcp", "/api/v1/resources/intranet/launch"),
        ("wiki", "web", "/web/wiki"), ("desk", "vnc", "/vnc/desk")}


async def test_web_and_vnc_resources_are_not_launched_as_files(portal: Portal) -> None:
    await portal.sign_in()
    for name in ("wiki", "desk"):
        refused = await portal.client.post(f"/api/v1/resources/{name}/launch", json={})
        assert (refused.status_code, refused.json()) == (403, {"error": "denied"})
    launched = await portal.client.post("/api/v1/resources/intranet/launch", json={})
    assert launched.status_code == 200
    assert [e["resource"] for e in portal.events("launch.denied")] == ["wiki", "desk"]


async def test_a_forbidden_launch_from_the_page_is_a_page_like_an_unknown_one(
        portal: Portal) -> None:
    await portal.sign_in()
    csrf = form_field((await portal.client.get("/", headers=PAGE)).text, "csrf")
    forbidden = await portal.client.post("/launch/vault", headers=PAGE, data={"csrf": csrf})
    unknown = await portal.client.post("/launch/nothing", headers=PAGE, data={"csrf": csrf})
    assert forbidden.status_code == unknown.status_code == 403
    assert forbidden.text.replace("vault", "") == unknown.text.replace("nothing", "")
    assert "Launch refused" in forbidden.text


async def test_a_correct_password_on_an_expired_sign_in_page_starts_again(
        portal: Portal) -> None:
    shown = await portal.client.get("/login?next=/account/authenticator", headers=PAGE)
    answer = await portal.client.post("/login", headers=PAGE, data={
        "csrf": form_field(shown.text, "csrf"), "handle": "gone-since-long",
        "next": "/account/authenticator", "username": "alice", "password": "pw"})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/login?expired=1&next=%2Faccount%2Fauthenticator"
    again = await portal.client.get(answer.headers["location"], headers=PAGE)
    assert "Your sign-in page had expired; please sign in again." in again.text
    assert "Sign-in failed" not in again.text
    assert form_field(again.text, "next") == "/account/authenticator"
    # Audited as what it is, not as a wrong password.
    assert [e["reason"] for e in portal.events("login.failed")] == [
        "unknown or expired login handle"]


async def test_a_sign_in_page_whose_csrf_cookie_is_gone_starts_again(portal: Portal) -> None:
    shown = await portal.client.get("/login", headers=PAGE)
    portal.client.cookies.clear()
    answer = await portal.client.post("/login", headers=PAGE, data={
        "csrf": form_field(shown.text, "csrf"), "handle": form_field(shown.text, "handle"),
        "username": "alice", "password": "pw"})
    assert (answer.status_code, answer.headers["location"]) == (303, "/login?expired=1")
    assert portal.events("csrf.rejected") and not portal.events("login.failed")


async def test_a_wrong_password_still_says_sign_in_failed(portal: Portal) -> None:
    shown = await portal.client.get("/login", headers=PAGE)
    answer = await portal.client.post("/login", headers=PAGE, data={
        "csrf": form_field(shown.text, "csrf"), "handle": form_field(shown.text, "handle"),
        "username": "alice", "password": "wrong"})
    assert answer.status_code == 401 and "Sign-in failed." in answer.text


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/no/such/page", 404), ("DELETE", "/login", 405)])
async def test_errors_are_pages_for_a_browser_json_for_the_api_text_otherwise(
        portal: Portal, method: str, path: str, status: int) -> None:
    page = await portal.client.request(method, path, headers=PAGE)
    assert page.status_code == status and page.headers["content-type"].startswith("text/html")
    assert 'class="card"' in page.text and 'href="/"' in page.text
    api = await portal.client.request(method, "/api/v1" + path, headers=PAGE)
    assert api.status_code in (404, 405) and "error" in api.json()
    plain = await portal.client.request(method, path)
    assert plain.status_code == status and plain.headers["content-type"].startswith("text/plain")
