"""The gateway as the OpenID provider of another application, end to end: a real
`portcullis up` with `[oidc]` clients, the npm package openid-client as the application
(discovery, PKCE S256, state, nonce, ID token checks, userinfo, refresh), and httpx as
the user's browser, signed in through the portal's JSON API."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

import httpx
import pytest

from conftest import Deployment, Process, init_deployment
from peers.openid_client import RelyingParty
from portcullis.identity.sessions import SESSION_COOKIE

pytestmark = pytest.mark.peer

SECRET = "wiki-secret-0123456789abcdef"
CALLBACK = "https://wiki.test/oidc/callback"
SIGNED_OUT = "https://wiki.test/signed-out"
SPA_CALLBACK = "http://127.0.0.1:9/callback"
PASSWORD = "local-pass-1"


@dataclass
class Provider:
    deployment: Deployment
    # Audit lines before the test began: each test reads only its own events.
    audit_from: int = 0

    @property
    def url(self) -> str:
        return self.deployment.url

    def relying_party(self, client_id: str = "wiki", secret: str | None = SECRET,
                      redirect_uri: str = CALLBACK) -> RelyingParty:
        return RelyingParty(self.url, self.deployment.ca, client_id, redirect_uri, secret)

    def browser(self, user: str | None = None) -> httpx.Client:
        context = ssl.create_default_context(cafile=str(self.deployment.ca))
        browser = httpx.Client(base_url=self.url, verify=context, timeout=20)
        if user is not None:
            answer = browser.post("/api/v1/login", json={}).json()
            answer = browser.post("/api/v1/login", json={"handle": answer["handle"], "answers": {
                "username": user, "password": PASSWORD}}).json()
            assert answer["status"] == "authenticated", answer
        return browser

    def audit_lines(self) -> list[str]:
        return (self.deployment.directory / "audit.jsonl").read_text().splitlines()

    def audit(self, event: str) -> list[dict[str, Any]]:
        lines = self.audit_lines()[self.audit_from:]
        return [entry for entry in map(json.loads, lines) if entry["event"] == event]


@pytest.fixture(scope="module")
def gateway_with_clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    """One `portcullis up` for the module (each test signs in users of its own)."""
    directory = tmp_path_factory.mktemp("op")
    deployment = init_deployment(directory / "deployment")
    (deployment.directory / "secrets" / "wiki.secret").write_text(SECRET + "\n")
    # The issuer is the public URL, which the application's requests must reach.
    deployment.set("gateway", "public_url", f'"{deployment.url}"')
    with deployment.config.open("a") as config:
        config.write(f"""
[oidc]
enabled = true

[[oidc.clients]]
id = "wiki"
secret_file = "secrets/wiki.secret"
redirect_uris = ["{CALLBACK}"]
post_logout_redirect_uris = ["{SIGNED_OUT}"]
groups = ["staff"]

[[oidc.clients]]
id = "spa"
redirect_uris = ["{SPA_CALLBACK}"]
groups = ["staff"]
""")
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("bob", PASSWORD, ["contractors"])
    gateway = Process(["up", "--dir", str(deployment.directory)], directory / "up.log")
    try:
        gateway.wait_for(r"Portal: https://")
        yield Provider(deployment)
    finally:
        gateway.stop()


@pytest.fixture
def provider(gateway_with_clients: Provider) -> Provider:
    return Provider(gateway_with_clients.deployment, len(gateway_with_clients.audit_lines()))


def authorize(browser: httpx.Client, url: str) -> httpx.Response:
    """GET the authorization URL as a browser would, following the gateway's own
    redirects (the portal's sign-in and back) but not the one to the application."""
    response = browser.get(url)
    for _ in range(4):
        location = response.headers.get("location", "")
        if response.status_code != 303 or not location.startswith("/"):
            return response
        response = browser.get(location)
    raise AssertionError("the gateway redirected too often")


def sign_in(provider: Provider, rp: RelyingParty, user: str = "alice"
            ) -> tuple[dict[str, Any], httpx.Client]:
    """The whole code flow; the RP's `callback` answer and the browser."""
    started = rp.run("start")
    browser = provider.browser(user)
    response = authorize(browser, started["url"])
    assert response.status_code == 303, response.text
    result = rp.run("callback", callback_url=response.headers["location"], **{
        key: started[key] for key in ("code_verifier", "state", "nonce")})
    return result, browser


def test_an_application_signs_a_user_in_through_the_portal_and_gets_the_brokers_claims(
        provider: Provider) -> None:
    rp = provider.relying_party()
    started = rp.run("start")
    browser = provider.browser()
    # Not signed in yet: the portal's sign-in, with the way back to this request.
    assert "url" in started, started
    first = browser.get(started["url"])
    assert first.status_code == 303
    login = urlsplit(first.headers["location"])
    assert login.path == "/login"
    back = unquote(parse_qs(login.query)["next"][0])
    assert back.startswith("/oauth2/authorize?")
    assert dict(parse_qsl(urlsplit(back).query)) == dict(
        parse_qsl(urlsplit(started["url"]).query))
    answer = browser.post("/api/v1/login", json={}).json()
    assert browser.post("/api/v1/login", json={"handle": answer["handle"], "answers": {
        "username": "alice", "password": PASSWORD}}).json()["status"] == "authenticated"
    response = authorize(browser, first.headers["location"])
    assert response.headers["location"].startswith(CALLBACK + "?")

    result = rp.run("callback", callback_url=response.headers["location"], **{
        key: started[key] for key in ("code_verifier", "state", "nonce")})

    claims = result["id_token_claims"]
    assert "error" not in result, result
    assert claims["iss"] == provider.url and claims["aud"] == "wiki"
    assert claims["sub"] == "local:alice" and claims["preferred_username"] == "alice"
    assert claims["groups"] == ["staff"] and claims["amr"] == ["local"]
    assert claims["nonce"] == started["nonce"]
    assert result["userinfo"]["sub"] == "local:alice"
    assert result["userinfo"]["groups"] == ["staff"]
    assert result["refreshed"]["userinfo"]["preferred_username"] == "alice"
    assert result["refresh_token"] != result["old_refresh_token"]
    assert [e["user"] for e in provider.audit("oidc.authorized")] == ["alice"]
    assert [e["grant_type"] for e in provider.audit("oidc.token_issued")] == [
        "authorization_code", "refresh_token"]


def test_a_public_client_signs_in_with_pkce_alone(provider: Provider) -> None:
    result, _ = sign_in(provider, provider.relying_party("spa", None, SPA_CALLBACK))
    assert "error" not in result, result
    assert result["id_token_claims"]["aud"] == "spa"


def test_a_redirect_uri_sharing_only_a_prefix_gets_an_error_page_and_no_redirect(
        provider: Provider) -> None:
    started = provider.relying_party().run("start")
    browser = provider.browser("alice")
    for other in (CALLBACK + "x", CALLBACK + "/../evil", "https://wiki.test.evil/oidc/callback"):
        parts = urlsplit(started["url"])
        query = dict(parse_qsl(parts.query)) | {"redirect_uri": other}
        response = browser.get(f"{parts.path}?{urlencode(query)}")
        assert response.status_code == 400
        assert "location" not in response.headers
    assert len(provider.audit("oidc.authorize_refused")) == 3


def test_a_reused_code_is_refused_and_revokes_the_tokens_issued_for_it(
        provider: Provider) -> None:
    rp = provider.relying_party()
    started = rp.run("start")
    response = authorize(provider.browser("alice"), started["url"])
    checks = {key: started[key] for key in ("code_verifier", "state", "nonce")}
    first = rp.run("callback", callback_url=response.headers["location"], **checks)
    assert "error" not in first, first

    again = rp.run("callback", callback_url=response.headers["location"], **checks)

    assert again["error"] == "invalid_grant"
    assert rp.run("refresh", refresh_token=first["refresh_token"])["error"] == "invalid_grant"
    assert rp.run("userinfo", access_token=first["refreshed"]["access_token"],
                  sub="local:alice")["status"] == 401
    assert any("used twice" in e["reason"] for e in provider.audit("oidc.token_refused"))


def test_a_spent_refresh_token_used_again_revokes_its_grant(provider: Provider) -> None:
    rp = provider.relying_party()
    result, _ = sign_in(provider, rp)

    reused = rp.run("refresh", refresh_token=result["old_refresh_token"])

    assert reused["error"] == "invalid_grant"
    assert rp.run("refresh", refresh_token=result["refresh_token"])["error"] == "invalid_grant"


def test_pkce_plain_and_no_pkce_are_sent_back_as_invalid_request(provider: Provider) -> None:
    browser = provider.browser("alice")
    for client_id, redirect_uri, pkce in (
            ("wiki", CALLBACK, {"code_challenge": "x" * 43, "code_challenge_method": "plain"}),
            ("spa", SPA_CALLBACK, {})):
        response = browser.get("/oauth2/authorize?" + urlencode({
            "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
            "scope": "openid", "state": "s1", **pkce}))
        location = urlsplit(response.headers["location"])
        answer = dict(parse_qsl(location.query))
        assert location._replace(query="").geturl() == redirect_uri
        assert answer["error"] == "invalid_request" and answer["state"] == "s1"
        assert "code" not in answer
    reasons = [e["reason"] for e in provider.audit("oidc.authorize_refused")]
    assert any("only S256" in r for r in reasons) and any("no PKCE" in r for r in reasons)


def test_a_user_outside_the_clients_groups_is_refused_with_access_denied(
        provider: Provider) -> None:
    rp = provider.relying_party()
    result, _ = sign_in(provider, rp, user="bob")

    assert result["error"] == "access_denied"
    denied = provider.audit("oidc.access_denied")
    assert [(e["user"], e["client_id"]) for e in denied] == [("bob", "wiki")]
    assert provider.audit("oidc.authorized") == []


def test_a_wrong_client_secret_is_refused(provider: Provider) -> None:
    rp = provider.relying_party(secret="not-the-secret-0123456789")
    result, _ = sign_in(provider, rp)

    assert result["error"] == "invalid_client" and result["status"] == 401
    assert [e["reason"] for e in provider.audit("oidc.client_refused")] == [
        "wrong or missing client secret"]


def test_signing_out_of_the_gateway_stops_refresh_and_userinfo(provider: Provider) -> None:
    rp = provider.relying_party()
    result, browser = sign_in(provider, rp)

    browser.post("/api/v1/logout", json={})

    assert rp.run("refresh", refresh_token=result["refresh_token"])["error"] == "invalid_grant"
    assert rp.run("userinfo", access_token=result["refreshed"]["access_token"],
                  sub="local:alice")["status"] == 401


def test_logout_with_an_id_token_hint_ends_the_gateway_session_and_returns_exactly(
        provider: Provider) -> None:
    rp = provider.relying_party()
    result, browser = sign_in(provider, rp)

    unregistered = browser.get("/oauth2/logout?" + urlencode({
        "id_token_hint": result["id_token"], "post_logout_redirect_uri": SIGNED_OUT + "/x"}))
    assert unregistered.status_code == 400 and "location" not in unregistered.headers
    assert browser.get("/api/v1/session").status_code == 200
    token = browser.cookies[SESSION_COOKIE]
    response = browser.get("/oauth2/logout?" + urlencode({
        "id_token_hint": result["id_token"], "post_logout_redirect_uri": SIGNED_OUT,
        "state": "bye"}))

    assert response.status_code == 303
    assert response.headers["location"] == SIGNED_OUT + "?state=bye"
    assert provider.browser().get("/api/v1/session", headers={
        "authorization": f"Bearer {token}"}).status_code == 401
    assert rp.run("refresh", refresh_token=result["refresh_token"])["error"] == "invalid_grant"


def test_in_chromium_the_application_signs_in_through_the_portals_sign_in_page(
        provider: Provider) -> None:
    """A real browser: it arrives from the application's site with no gateway cookie,
    signs in on the portal's page and is sent back to the application with a code."""
    from playwright.sync_api import Route, sync_playwright

    from conftest import require_program
    from e2e.test_portal_browser import CHROMIUM_ARGS

    chromium = require_program("chromium")
    rp = provider.relying_party()
    started = rp.run("start")
    arrived: list[str] = []

    def application(route: Route) -> None:
        route.fulfill(status=200, body="the wiki", content_type="text/plain")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.route("https://wiki.test/**", application)
            page.goto(started["url"])
            page.wait_for_selector("input[name=username]")
            assert urlsplit(page.url).path == "/login"
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", PASSWORD)
            with page.expect_request("https://wiki.test/**") as request:
                page.click("button[type=submit]")
            arrived.append(request.value.url)
            # The application's page, served by the route above (no name is looked up).
            page.wait_for_selector("text=the wiki")
        finally:
            browser.close()
    assert len(arrived) == 1 and arrived[0].startswith(CALLBACK + "?")
    result = rp.run("callback", callback_url=arrived[0], **{
        key: started[key] for key in ("code_verifier", "state", "nonce")})
    assert "error" not in result, result
    assert result["id_token_claims"]["preferred_username"] == "alice"
