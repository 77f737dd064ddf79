"""The portal for people who use a keyboard, a screen reader, or no JavaScript, in headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright):
- axe-core (pinned in tests/peers/node) finds no violation of the WCAG 2 A and AA rules on
  the sign-in page, a failed sign-in, a TOTP step, the resource list, a launch page, the
  authenticator set-up and an error page;
- the keyboard alone signs in and reaches every control of the resource list, and the
  control it is on is outlined;
- with JavaScript off, sign-in (password, then a TOTP code) and the resource list work;
- a stale sign-in page starts the sign-in again, never "Sign-in failed".

One deployment for the module: admins sign in with a password and a TOTP code. The app is
enrolled once through the JSON API; each browser sign-in spends one of its recovery codes
(a TOTP code cannot be used twice within its period)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ARTIFACTS, Deployment, Process, init_deployment, require_program
from peers.missing import missing_peer
from peers.totp import oathtool_code

AXE = Path(__file__).parents[1] / "peers" / "node" / "node_modules" / "axe-core" / "axe.min.js"
WCAG_A_AA = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
MORE = """
[[resources]]
name = "wiki"
title = "Team wiki"
description = "The team's wiki, in the browser."
kind = "web"
upstream = "http://127.0.0.1:9"
host = "wiki.localhost"
groups = ["admins"]

[[resources]]
name = "desk"
title = "Build desktop"
kind = "vnc"
address = "127.0.0.1:5900"
groups = ["admins"]

[auth]
flow = "mfa"
[[auth.flows]]
name = "mfa"
[[auth.flows.steps]]
provider = "local"
[[auth.flows.steps]]
provider = "totp"
when = { groups = ["admins"] }
"""


@dataclass
class Portal:
    deployment: Deployment
    recovery_codes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.deployment.port}"


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    directory = tmp_path_factory.mktemp("accessibility")
    deployment = init_deployment(directory / "deployment")
    with deployment.config.open("a") as config:
        config.write(MORE)
    process = Process(["up", "--dir", str(deployment.directory)], directory / "up.log")
    try:
        process.wait_for(r"Portal: https://")
        with httpx.Client(base_url=deployment.url,
                          verify=ssl.create_default_context(cafile=deployment.ca)) as client:
            first = client.post("/api/v1/login", json={"answers": {
                "username": "admin", "password": deployment.admin_password}}).json()
            enrolment = first["step"]["enrolment"]
            done = client.post("/api/v1/login", json={
                "handle": first["handle"],
                "answers": {"code": oathtool_code(enrolment["secret"])}}).json()
            assert done["status"] == "authenticated", done
        yield Portal(deployment, list(enrolment["recovery_codes"]))
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_program("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True,
                                              args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def new_page(browser: Any, **options: Any) -> Any:
    # The deployment CA is private; the TLS checks themselves are tested elsewhere.
    context = browser.new_context(ignore_https_errors=True, **options)
    return context.new_page()


def sign_in(portal: Portal, page: Any) -> None:
    """Password, then a recovery code at the TOTP step, by filling and clicking."""
    page.goto(f"{portal.url}/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", portal.deployment.admin_password)
    page.click("button[type=submit]")
    page.wait_for_selector("form[data-step=totp]")
    page.fill("input[name=code]", portal.recovery_codes.pop())
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your resources")


def axe_violations(page: Any) -> list[str]:
    """What axe-core finds on the page against the WCAG 2.0/2.1 A and AA rules, one line
    per rule and element."""
    if not AXE.is_file():
        missing_peer("axe-core is not installed (scripts/install-peers, or cd "
                     "tests/peers/node && npm ci)")
    page.add_script_tag(content=AXE.read_text())
    result = page.evaluate("options => axe.run(document, options)",
                           {"runOnly": {"type": "tag", "values": WCAG_A_AA}})
    return [f"{violation['id']} ({violation['impact']}): {node['target']} "
            f"{node['failureSummary']}"
            for violation in result["violations"] for node in violation["nodes"]]


def test_axe_finds_no_wcag_a_or_aa_violation_on_the_portal_pages(
        portal: Portal, browser: Any) -> None:
    # The portal's CSP admits no inline script: axe is injected past it, as a tool would.
    page = new_page(browser, bypass_csp=True)
    ARTIFACTS.mkdir(exist_ok=True)
    found: dict[str, list[str]] = {}

    page.goto(f"{portal.url}/login")
    found["sign-in"] = axe_violations(page)
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("text=Sign-in failed.")
    found["failed sign-in"] = axe_violations(page)
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", portal.deployment.admin_password)
    page.click("button[type=submit]")
    page.wait_for_selector("form[data-step=totp]")
    found["TOTP step"] = axe_violations(page)
    page.fill("input[name=code]", portal.recovery_codes.pop())
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your resources")
    found["resource list"] = axe_violations(page)
    page.screenshot(path=str(ARTIFACTS / "portal-resources-by-kind.png"), full_page=True)
    page.click("button[data-resource=intranet]")
    page.wait_for_selector("text=Open in Portcullis client")
    found["launch page"] = axe_violations(page)
    page.goto(f"{portal.url}/account/authenticator")
    page.wait_for_selector("form#authenticator[data-step=totp-enrol]")
    found["authenticator set-up"] = axe_violations(page)
    page.goto(f"{portal.url}/no/such/page")
    page.wait_for_selector("text=Page not found")
    found["error page"] = axe_violations(page)
    page.screenshot(path=str(ARTIFACTS / "portal-error-page.png"))

    assert {name: lines for name, lines in found.items() if lines} == {}


def test_the_keyboard_alone_signs_in_and_reaches_every_control_with_a_visible_focus(
        portal: Portal, browser: Any) -> None:
    page = new_page(browser)
    page.goto(f"{portal.url}/login")
    assert focus_lands_on(page, "username")   # each step's first input has the focus
    page.keyboard.type("admin")
    page.keyboard.press("Tab")
    assert focused(page)["name"] == "password" and focused(page)["outlined"]
    page.keyboard.type(portal.deployment.admin_password)
    page.keyboard.press("Enter")
    page.wait_for_selector("form[data-step=totp]")
    assert focus_lands_on(page, "code")
    page.keyboard.type(portal.recovery_codes.pop())
    page.keyboard.press("Enter")
    page.wait_for_selector("text=Your resources")
    # The first Tab lands on the skip link, shown while it has the focus; it skips the
    # header's controls.
    page.keyboard.press("Tab")
    assert focused(page)["text"] == "Skip to content" and focused(page)["visible"]
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert "data-resource" in focused(page)["html"]

    controls = page.evaluate("""() => [...document.querySelectorAll(
        'a[href], button, input:not([type=hidden])')].map(e => e.outerHTML)""")
    reached: list[str] = []
    for _ in range(3 * len(controls) + 5):   # a bounded walk through the tab order
        page.keyboard.press("Tab")
        now = focused(page)
        if now["html"] in reached:
            break
        if now["html"] in controls:
            assert now["outlined"], f"no visible focus on {now['html']}"
            reached.append(now["html"])
    assert sorted(reached) == sorted(controls)


def focus_lands_on(page: Any, name: str) -> bool:
    """Whether the focus reaches the input called `name` without a key pressed. Chromium
    applies `autofocus` at a rendering update after the load event, so a loaded machine can
    look at the page before it lands: wait for it, boundedly (a missing autofocus still
    fails)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("name => document.activeElement?.getAttribute('name') === name",
                               arg=name, timeout=5_000)
    except PlaywrightTimeout:
        return False
    return True


def focused(page: Any) -> dict[str, Any]:
    return dict(page.evaluate("""() => {
        const e = document.activeElement, box = e.getBoundingClientRect();
        const style = getComputedStyle(e);
        return {name: e.getAttribute('name'), text: e.innerText, html: e.outerHTML,
                visible: box.left >= 0 && box.top >= 0 && box.width > 1,
                outlined: style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) >= 2};
    }"""))


def test_without_javascript_sign_in_and_the_resource_list_work(
        portal: Portal, browser: Any) -> None:
    page = new_page(browser, java_script_enabled=False, accept_downloads=True)
    sign_in(portal, page)
    assert page.locator("ul.resources li").count() == 4
    wiki = page.locator("a[data-resource=wiki]")
    assert wiki.get_attribute("href") == "/web/wiki" and wiki.get_attribute("target") == "_blank"
    assert page.locator("a[data-resource=desk]").get_attribute("href") == "/vnc/desk"
    page.click("button[data-resource=intranet]")
    page.wait_for_selector("text=Open in Portcullis client")
    with page.expect_download() as download:   # the launch page's fallback file
        page.click("a#launch-file")
    assert download.value.suggested_filename == "intranet.portcullis"
    page.click("text=Back to your resources")
    page.click("text=Sign out")
    page.wait_for_url("**/login?signed_out=1")


def test_a_stale_sign_in_page_starts_again_and_never_says_sign_in_failed(
        portal: Portal, browser: Any) -> None:
    failures_before = len(failures(portal))
    page = new_page(browser)
    page.goto(f"{portal.url}/login")
    # The page's sign-in is gone (expired, or finished in another tab).
    page.evaluate("document.querySelector('input[name=handle]').value = 'long-gone'")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", portal.deployment.admin_password)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your sign-in page had expired; please sign in again.")
    assert "Sign-in failed" not in page.content()
    # A browser restarted since: the page's CSRF cookie is gone.
    page.context.clear_cookies()
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", portal.deployment.admin_password)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your sign-in page had expired; please sign in again.")
    assert "Sign-in failed" not in page.content()
    # Audited as what they are, neither as a wrong password.
    assert failures(portal)[failures_before:] == ["unknown or expired login handle"]
    assert "csrf.rejected" in [entry["event"] for entry in audit(portal)]


def audit(portal: Portal) -> list[dict[str, Any]]:
    lines = (portal.deployment.directory / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def failures(portal: Portal) -> list[str]:
    return [entry["reason"] for entry in audit(portal) if entry["event"] == "login.failed"]
