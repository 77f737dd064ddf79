"""Web applications through the gateway, in headless Chromium, with real applications:
DokuWiki from Debian (nginx + php-fpm, tests/peers/dokuwiki.py) at wiki.localhost, and a
small application at whoami.localhost that believes only an `X-Portcullis-Assertion` it
verified with PyJWT against the gateway's published JWKS (tests/peers/webapp.py, whose
/whoami shows the verified claims and the headers it received).

A user signs in once, in the portal, and uses both; a user outside the wiki's groups gets
the portal's "not allowed" page and the wiki never hears of it; the wiki's cookie stays
on the wiki's host; a page's WebSocket echoes and ends within a second of signing out.
Chromium resolves every *.localhost name to loopback by itself.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ARTIFACTS, Deployment, Process, init_deployment
from e2e.test_portal_browser import browser_page  # noqa: F401  (the Chromium fixture)
from peers.dokuwiki import DokuWiki
from peers.webapp import WebApp, serve_webapp
from portcullis.identity.sessions import SESSION_COOKIE

WIKI_HOST = "wiki.localhost"
WHOAMI_HOST = "whoami.localhost"
EDITOR = ("alice", "correct horse battery", ["staff", "wiki-editors"])
OUTSIDER = ("bob", "another horse battery", ["visitors"])


@dataclass
class Published:
    deployment: Deployment
    wiki: DokuWiki
    whoami: WebApp

    def origin(self, host: str = "localhost") -> str:
        return f"https://{host}:{self.deployment.port}"


@pytest.fixture
def published(tmp_path: Path, start_process) -> Iterator[Published]:  # type: ignore[no-untyped-def]
    """A gateway publishing DokuWiki (for wiki-editors) and the who-am-I application (for
    staff), with an editor and an outsider."""
    deployment = init_deployment(tmp_path / "deployment")
    gateway = f"https://localhost:{deployment.port}"
    # DokuWiki behind a reverse proxy is told its public address (its documented
    # `baseurl`): it writes absolute URLs in its redirects.
    with DokuWiki(tmp_path / "dokuwiki",
                  baseurl=f"https://{WIKI_HOST}:{deployment.port}") as wiki:
        serving = contextlib.contextmanager(serve_webapp)(
            f"{gateway}/.well-known/jwks.json", f"https://{WHOAMI_HOST}:{deployment.port}",
            deployment.ca)
        with serving as whoami:
            deployment.add_web_resource("wiki", wiki.origin, WIKI_HOST, ["wiki-editors"],
                                        title="Team wiki")
            deployment.add_web_resource("whoami", whoami.url, WHOAMI_HOST, ["staff"],
                                        title="Who am I")
            for name, password, groups in (EDITOR, OUTSIDER):
                deployment.add_user(name, password, groups)
            up: Process = start_process("up", "--dir", str(deployment.directory), name="up")
            up.wait_for(r"Portal: https://")
            yield Published(deployment, wiki, whoami)


def sign_in(page, published: Published, user: tuple[str, str, list[str]]) -> None:  # type: ignore[no-untyped-def]
    name, password, _ = user
    page.goto(published.origin() + "/")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your resources")


def open_from_list(page, published: Published, name: str, title: str):  # type: ignore[no-untyped-def]
    """Open a web resource from the portal's resource list, as a user clicks it; the
    page (tab) the application opened in."""
    entry = page.locator("ul.resources li", has_text=title)
    assert entry.count() == 1, page.content()
    link = entry.locator(f"a[href^='/web/{name}']")
    if not link.count():
        # The list drew every resource as a launch until web resources had links (the
        # portal's part of issue 14); then the portal's entry for it is where it leads.
        page.goto(f"{published.origin()}/web/{name}?next=/")
        return page
    if link.get_attribute("target") == "_blank":
        with page.expect_popup() as opened:
            link.click()
        return opened.value
    link.click()
    return page


def test_a_user_signs_in_once_edits_the_wiki_and_is_known_to_another_application(
        published: Published, browser_page) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    page = browser_page
    ARTIFACTS.mkdir(exist_ok=True)
    sign_in(page, published, EDITOR)

    # The wiki from the resource list: no second sign-in.
    page = open_from_list(page, published, "wiki", "Team wiki")
    page.wait_for_url(f"{published.origin(WIKI_HOST)}/**")
    page.wait_for_selector("text=Portcullis test wiki")

    # Edit and save a page: DokuWiki's form (its security token tied to its session
    # cookie), a POST, and its redirect back to the page.
    words = f"Edited through the gateway {secrets.token_hex(4)}"
    page.goto(f"{published.origin(WIKI_HOST)}/doku.php?id=proxied&do=edit")
    page.fill("#wiki__text", f"====== Proxied ======\n\n**{words}**\n")
    page.click("#edbtn__save")
    page.wait_for_url("**/doku.php?id=proxied")
    page.wait_for_selector(f"strong:has-text('{words}')")
    page.screenshot(path=str(ARTIFACTS / "web-wiki-saved.png"))
    assert words in published.wiki.page_text("proxied")
    assert any(line.startswith("POST /doku.php?id=proxied")
               for line in published.wiki.requests_received())

    # The second application knows who this is from the assertion it verified.
    page.goto(published.origin() + "/")
    page = open_from_list(page, published, "whoami", "Who am I")
    page.wait_for_url(f"{published.origin(WHOAMI_HOST)}/**")
    page.goto(f"{published.origin(WHOAMI_HOST)}/whoami")
    seen = json.loads(page.locator("body").inner_text())
    page.screenshot(path=str(ARTIFACTS / "web-whoami.png"))
    assert seen["error"] is None
    assert seen["claims"]["username"] == "alice"
    assert seen["claims"]["groups"] == ["staff", "wiki-editors"]

    # The wiki's cookie is the wiki host's alone, and the portal's stays on the portal.
    wiki_cookies = [cookie for cookie in page.context.cookies() if cookie["name"] == "DokuWiki"]
    assert [cookie["domain"] for cookie in wiki_cookies] == [WIKI_HOST]
    cookie = dict(seen["headers"]).get("cookie", "")
    assert "DokuWiki=" not in cookie and SESSION_COOKIE not in cookie


def test_a_user_outside_the_groups_is_not_allowed_and_nothing_reaches_the_wiki(
        published: Published, browser_page) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    page = browser_page
    before = published.wiki.requests_received()
    sign_in(page, published, OUTSIDER)
    assert page.locator("ul.resources li", has_text="Team wiki").count() == 0

    # By the portal's entry, and straight at the wiki's host: the portal's page, each time.
    response = page.goto(published.origin() + "/web/wiki")
    assert response is not None and response.status == 403
    page.wait_for_selector("text=Not allowed")
    page.screenshot(path=str(ARTIFACTS / "web-not-allowed.png"))
    page.goto(f"{published.origin(WIKI_HOST)}/doku.php?id=start&do=edit")
    page.wait_for_selector("text=Not allowed")
    assert page.url.startswith(published.origin() + "/")

    assert published.wiki.requests_received() == before


# The page's WebSocket to its own host: echoes once, then records when it is closed.
OPEN_WEBSOCKET = """() => new Promise((resolve, reject) => {
  const socket = new WebSocket(`wss://${location.host}/ws`);
  window.closedAt = null;
  socket.onopen = () => socket.send("hello through the gateway");
  socket.onmessage = (event) => resolve(event.data);
  socket.onclose = () => { window.closedAt = Date.now(); };
  socket.onerror = () => reject(new Error("the WebSocket failed"));
  window.openSocket = socket;
})"""


def test_a_websocket_in_the_page_echoes_and_ends_within_a_second_of_sign_out(
        published: Published, browser_page) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    page = browser_page
    sign_in(page, published, EDITOR)
    page = open_from_list(page, published, "whoami", "Who am I")
    page.wait_for_url(f"{published.origin(WHOAMI_HOST)}/**")
    assert page.evaluate(OPEN_WEBSOCKET) == "hello through the gateway"
    assert page.evaluate("window.closedAt") is None

    # Sign out in another tab of the same browser: the open WebSocket ends with it.
    portal = page.context.new_page()
    portal.goto(published.origin() + "/")
    portal.click("text=Sign out")
    portal.wait_for_url("**/login?signed_out=1")
    page.wait_for_function("() => window.closedAt !== null", timeout=1000)

    # And the application's host sends the browser to sign in again.
    page.goto(f"{published.origin(WHOAMI_HOST)}/whoami")
    page.wait_for_url(f"{published.origin()}/login**")
