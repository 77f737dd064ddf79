"""A web application that signs its users in with OpenID Connect, published through the
gateway and signing in at the gateway's own OpenID provider: in headless Chromium the user
signs in once, in the portal, opens the application from the resource list, and the
application's sign-in (a code flow through the gateway's /oauth2/authorize) completes
without a second password prompt.

The application's OpenID side is the npm package openid-client (tests/peers/
openid_client_rp.mjs, which we did not write), behind a few lines of Starlette that play
its web pages: `/` starts the code flow, `/callback` finishes it and shows the claims.
"""

from __future__ import annotations

import html
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from conftest import Deployment, Process, init_deployment
from e2e.test_portal_browser import browser_page  # noqa: F401  (the Chromium fixture)
from peers.openid_client import RelyingParty
from peers.webapp import serve_asgi

HOST = "notes.localhost"
PASSWORD = "correct horse battery"


def relying_party_app(party: RelyingParty) -> Starlette:
    """The application's sign-in, as a web application drives openid-client."""
    flows: dict[str, dict[str, Any]] = {}   # by state: the verifier and nonce to check

    def start(request: Request) -> Response:
        started = party.run("start")
        assert "url" in started, started
        flows[started["state"]] = started
        return RedirectResponse(started["url"], 303)

    def callback(request: Request) -> Response:
        started = flows.pop(request.query_params.get("state", ""), None)
        if started is None:
            return HTMLResponse("unknown sign-in", 400)
        # The URL the browser was sent to, at the application's public origin.
        answer = party.run("callback", callback_url=f"{party.redirect_uri}?{request.url.query}",
                           **{key: started[key] for key in ("code_verifier", "state", "nonce")})
        if "error" in answer:
            return HTMLResponse(f"sign-in failed: {html.escape(str(answer))}", 400)
        claims = answer["id_token_claims"]
        return HTMLResponse(f'<p id="user">{html.escape(claims["preferred_username"])}</p>'
                            f'<p id="groups">{html.escape(" ".join(claims["groups"]))}</p>')

    # Sync endpoints: Starlette runs them in its thread pool (the RP is a node process).
    return Starlette(routes=[Route("/", start), Route("/callback", callback)])


@pytest.fixture
def gateway(tmp_path: Path, start_process) -> Iterator[Deployment]:  # type: ignore[no-untyped-def]
    deployment = init_deployment(tmp_path / "deployment")
    origin = f"https://{HOST}:{deployment.port}"
    secret = secrets.token_urlsafe(24)
    (deployment.directory / "secrets" / "notes.secret").write_text(secret + "\n")
    with deployment.config.open("a") as config:
        config.write(f"""
[oidc]
enabled = true

[[oidc.clients]]
id = "notes"
secret_file = "secrets/notes.secret"
redirect_uris = ["{origin}/callback"]
groups = ["staff"]
""")
    # The issuer is the gateway's public URL (https://localhost:PORT, under which the
    # application's host name is).
    party = RelyingParty(f"https://localhost:{deployment.port}", deployment.ca, "notes",
                         f"{origin}/callback", secret)
    sock = socket.create_server(("127.0.0.1", 0))
    with serve_asgi(relying_party_app(party), sock):
        deployment.add_web_resource("notes", f"http://127.0.0.1:{sock.getsockname()[1]}",
                                    HOST, ["staff"], title="Team notes")
        deployment.add_user("alice", PASSWORD, ["staff"])
        up: Process = start_process("up", "--dir", str(deployment.directory), name="up")
        up.wait_for(r"Portal: https://")
        yield deployment


def test_an_oidc_application_behind_the_gateway_signs_in_without_a_second_password(
        gateway: Deployment, browser_page) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    page = browser_page
    page.goto(f"https://localhost:{gateway.port}/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your resources")
    visited: list[str] = []
    page.context.on("request", lambda request: visited.append(request.url)
                    if request.is_navigation_request() else None)

    link = page.locator("ul.resources li", has_text="Team notes").locator("a[href^='/web/']")
    with page.expect_popup() as opened:
        link.click()
    app = opened.value
    app.wait_for_selector("#user", timeout=20_000)
    assert app.locator("#user").inner_text() == "alice"
    assert "staff" in app.locator("#groups").inner_text().split()
    # The application's sign-in went through the gateway's provider and never showed a
    # sign-in page: the portal's session was enough.
    assert any("/oauth2/authorize" in url for url in visited), visited
    assert not any("/login" in url for url in visited), visited
    assert app.url.startswith(f"https://{HOST}:{gateway.port}/callback?")
