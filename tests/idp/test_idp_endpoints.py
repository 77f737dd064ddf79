"""The provider's endpoints in process (Starlette over httpx's ASGI transport), for what
the end-to-end tests with openid-client do not reach: error pages, browsers arriving
from another site, prompt=none, RFC 7009 revocation, an administrator's session kill."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from starlette.applications import Starlette

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.endings import Ending
from portcullis.identity.sessions import SESSION_COOKIE, SessionManager
from portcullis.idp.decisions import s256
from portcullis.idp.endpoints import IdpDeps, routes
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

ISSUER = "https://gw.test"
CALLBACK = "https://app.test/cb"
SECRET = "app-secret-0123456789abcdef"
VERIFIER = "verifier-" + "v" * 40


def authorize_url(**extra: str) -> str:
    return "/oauth2/authorize?" + urlencode({
        "response_type": "code", "client_id": "app", "redirect_uri": CALLBACK,
        "scope": "openid groups", "state": "st", "nonce": "nn",
        "code_challenge": s256(VERIFIER), "code_challenge_method": "S256", **extra})


@dataclass
class Op:
    client: httpx.AsyncClient
    sessions: SessionManager
    audit_path: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == name]

    async def sign_in(self, groups: tuple[str, ...] = ("staff",)) -> str:
        token, _ = await self.sessions.create(Claims(
            sub="corp:alice", username="alice", groups=groups, idp="corp", amr=("corp",)),
            "127.0.0.1")
        self.client.cookies.set(SESSION_COOKIE, token, domain="gw.test")
        return token

    async def code(self, headers: dict[str, str] | None = None,
                   **extra: str) -> httpx.Response:
        return await self.client.get(authorize_url(**extra), headers=headers)

    async def tokens(self) -> dict[str, Any]:
        answer = dict(parse_qsl(urlsplit((await self.code()).headers["location"]).query))
        response = await self.client.post("/oauth2/token", data={
            "grant_type": "authorization_code", "code": answer["code"],
            "redirect_uri": CALLBACK, "code_verifier": VERIFIER, "client_id": "app",
            "client_secret": SECRET})
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def post(self, path: str, **form: str) -> httpx.Response:
        return await self.client.post(path, data={**form, "client_id": "app",
                                                  "client_secret": SECRET})


@pytest.fixture
async def op(durable: DurableStore, tmp_path: Path) -> AsyncIterator[Op]:
    (tmp_path / "app.secret").write_text(SECRET)
    settings = Settings.model_validate({
        "gateway": {"public_url": ISSUER},
        "oidc": {"enabled": True, "clients": [{
            "id": "app", "secret_file": "app.secret", "redirect_uris": [CALLBACK],
            "groups": ["staff"]}]}}).model_copy(update={"base_dir": tmp_path})
    ephemeral = MemoryStore()
    hasher = TokenHasher(b"k" * 32)
    sessions = SessionManager(ephemeral, AccountStatus(durable, ttl=0), hasher,
                              settings.session)
    audit = AuditTrail(tmp_path / "audit.jsonl")
    app = Starlette(routes=routes(IdpDeps(settings, sessions, durable, ephemeral, hasher,
                                          audit)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=ISSUER) as client:
        yield Op(client, sessions, tmp_path / "audit.jsonl")
    audit.close()


async def test_discovery_names_this_issuer_and_only_s256(op: Op) -> None:
    document = (await op.client.get("/.well-known/openid-configuration")).json()
    assert document["issuer"] == ISSUER
    assert document["token_endpoint"] == ISSUER + "/oauth2/token"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert document["id_token_signing_alg_values_supported"] == ["ES256"]


async def test_an_unknown_client_gets_an_error_page_and_no_redirect(op: Op) -> None:
    await op.sign_in()
    response = await op.code(client_id="stranger")
    assert response.status_code == 400 and "location" not in response.headers
    assert "not valid" in response.text
    assert [e["reason"] for e in op.events("oidc.authorize_refused")] == [
        "unknown client 'stranger'"]


async def test_a_browser_from_another_site_is_asked_again_from_this_one(op: Op) -> None:
    # SameSite=Strict: a browser sends no session cookie on a cross-site navigation.
    again = await op.code({"sec-fetch-site": "cross-site"})
    assert again.status_code == 200
    assert 'http-equiv="refresh"' in again.text and "/oauth2/authorize?" in again.text
    await op.sign_in()
    same_site = await op.code({"sec-fetch-site": "same-origin"})
    assert same_site.headers["location"].startswith(CALLBACK + "?code=")


async def test_prompt_none_without_a_session_returns_login_required(op: Op) -> None:
    response = await op.code(prompt="none")
    answer = dict(parse_qsl(urlsplit(response.headers["location"]).query))
    assert answer == {"error": "login_required", "iss": ISSUER, "state": "st"}


async def test_prompt_login_sends_a_signed_in_user_to_sign_in_again_once(op: Op) -> None:
    """prompt=login: the portal's sign-in even with a session, then the request goes on
    with a max_age the new sign-in meets (no loop)."""
    await op.sign_in()
    again = await op.code(prompt="login consent")
    location = urlsplit(again.headers["location"])
    assert again.status_code == 303 and location.path == "/login"
    query = dict(parse_qsl(location.query))
    assert query["fresh"] == "1"
    onward = dict(parse_qsl(urlsplit(query["next"]).query))
    assert onward["prompt"] == "consent" and onward["max_age"] == "120"
    assert op.events("oidc.sign_in_again")[-1]["reason"] == (
        "the application asked for a fresh sign-in (prompt=login)")
    # Signed in just now: the onward request gets its code.
    await op.sign_in()
    fresh = await op.client.get(query["next"])
    assert fresh.headers["location"].startswith(CALLBACK + "?code=")


async def test_a_session_older_than_max_age_signs_in_again(op: Op) -> None:
    await op.sign_in()
    # auth_time is now: a max_age of an hour is met, and 0 (or nonsense) is not.
    assert (await op.code(max_age="3600")).headers["location"].startswith(CALLBACK + "?code=")
    for max_age in ("0", "-1", "soon"):
        stale = await op.code(max_age=max_age)
        assert urlsplit(stale.headers["location"]).path == "/login", max_age
    answer = dict(parse_qsl(urlsplit(
        (await op.code(max_age="0", prompt="none")).headers["location"]).query))
    assert answer["error"] == "login_required"


async def test_a_revoked_access_token_reads_no_userinfo(op: Op) -> None:
    await op.sign_in()
    tokens = await op.tokens()
    bearer = {"authorization": f"Bearer {tokens['access_token']}"}
    assert (await op.client.get("/oauth2/userinfo", headers=bearer)).json()["groups"] == [
        "staff"]

    assert (await op.post("/oauth2/revoke", token=tokens["access_token"])).status_code == 200

    refused = await op.client.get("/oauth2/userinfo", headers=bearer)
    assert refused.status_code == 401 and "invalid_token" in refused.headers["www-authenticate"]


async def test_a_revoked_refresh_token_ends_its_grant(op: Op) -> None:
    await op.sign_in()
    tokens = await op.tokens()
    await op.post("/oauth2/revoke", token=tokens["refresh_token"])
    refresh = await op.post("/oauth2/token", grant_type="refresh_token",
                            refresh_token=tokens["refresh_token"])
    assert refresh.json() == {"error": "invalid_grant"}
    userinfo = await op.client.get("/oauth2/userinfo", headers={
        "authorization": f"Bearer {tokens['access_token']}"})
    assert userinfo.status_code == 401


async def test_an_administrator_ending_the_session_stops_refresh(op: Op) -> None:
    token = await op.sign_in()
    tokens = await op.tokens()
    session = await op.sessions.validate(token)
    assert session is not None
    await op.sessions.revoke(session.handle, Ending.ADMIN_REVOKED)

    refresh = await op.post("/oauth2/token", grant_type="refresh_token",
                            refresh_token=tokens["refresh_token"])
    assert refresh.json() == {"error": "invalid_grant"}
    assert op.events("oidc.token_refused")[-1]["reason"] == "the gateway session has ended"
