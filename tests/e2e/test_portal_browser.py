"""The portal in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright):
sign in, see the resources, launch one and download its launch file. Screenshots are kept in
test-artifacts/ for people to look at."""

from __future__ import annotations

import pytest

from conftest import ARTIFACTS, Deployment, Process, require_program
from peers.totp import oathtool_code
from portcullis.proto.launchfile import parse_launch_file

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@pytest.fixture
def browser_page():  # type: ignore[no-untyped-def]
    chromium = require_program("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=CHROMIUM_ARGS)
        # The deployment CA is private; the TLS checks themselves are tested elsewhere.
        context = browser.new_context(ignore_https_errors=True, accept_downloads=True)
        yield context.new_page()
        browser.close()


def test_portal_signs_in_lists_resources_and_downloads_a_launch_file(
        deployment: Deployment, gateway: Process, browser_page, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser_page
    page.goto(f"https://localhost:{deployment.port}/")
    assert page.url.endswith("/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", deployment.admin_password)
    page.screenshot(path=str(ARTIFACTS / "portal-sign-in.png"))
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your resources")
    assert page.locator("ul.resources li").count() == 2
    page.screenshot(path=str(ARTIFACTS / "portal-resources.png"))

    page.click("button[data-resource=intranet]")
    page.wait_for_selector("text=Open in Portcullis client")
    page.screenshot(path=str(ARTIFACTS / "portal-launch.png"), full_page=True)
    with page.expect_download() as download_info:   # the fallback: the launch file
        page.click("a#launch-file")
    download = download_info.value
    assert download.suggested_filename == "intranet.portcullis"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    launch = parse_launch_file(saved.read_bytes())
    assert launch.resource == "intranet"
    assert "127.0.0.1:8080" not in saved.read_text()  # never the server's address

    page.click("text=Back to your resources")
    page.click("text=Sign out")
    page.wait_for_url("**/login?signed_out=1")
    assert page.locator("[role=status]").inner_text() == "You are signed out."
    page.goto(f"https://localhost:{deployment.port}/")
    assert page.url.endswith("/login")


def test_portal_says_sign_in_failed_for_a_wrong_password(
        deployment: Deployment, gateway: Process, browser_page) -> None:  # type: ignore[no-untyped-def]
    page = browser_page
    page.goto(f"https://localhost:{deployment.port}/login")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("text=Sign-in failed.")
    page.screenshot(path=str(ARTIFACTS / "portal-sign-in-failed.png"))


def test_portal_multi_step_sign_in_with_totp_enrolment(
        deployment: Deployment, start_process, browser_page) -> None:  # type: ignore[no-untyped-def]
    """Password, then TOTP for admins: the first time the portal shows the QR code and the
    recovery codes, and the code oathtool computes from the shown key finishes it; the
    next sign-in asks for a code."""
    with deployment.config.open("a") as handle:
        handle.write('\n[auth]\nflow = "mfa"\n[[auth.flows]]\nname = "mfa"\n'
                     '[[auth.flows.steps]]\nprovider = "local"\n'
                     '[[auth.flows.steps]]\nprovider = "totp"\n'
                     'when = { groups = ["admins"] }\n')
    process = start_process("up", "--dir", str(deployment.directory), name="up")
    process.wait_for(r"Portal: https://")
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser_page

    page.goto(f"https://localhost:{deployment.port}/")
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", deployment.admin_password)
    page.click("button[type=submit]")
    page.wait_for_selector("form[data-step=totp-enrol]")
    assert page.locator("img.qr").evaluate("img => img.naturalWidth") > 0   # the QR renders
    assert page.locator("ul.recovery-codes li").count() == 10
    secret = page.locator("code.secret").inner_text()
    recovery = page.locator("ul.recovery-codes li").first.inner_text()
    page.screenshot(path=str(ARTIFACTS / "portal-totp-enrolment.png"), full_page=True)
    page.fill("input[name=code]", "000000" if oathtool_code(secret) != "000000" else "111111")
    page.click("button[type=submit]")
    # A wrong code during enrolment: the same enrolment again, not a restart.
    page.wait_for_selector("text=That code did not match")
    assert page.locator("code.secret").inner_text() == secret
    page.fill("input[name=code]", oathtool_code(secret))
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your resources")
    page.click("text=Sign out")
    page.wait_for_url("**/login?signed_out=1")

    # Enrolled: the second step asks for a code; a recovery code works as well (once).
    page.fill("input[name=username]", "Admin")
    page.fill("input[name=password]", deployment.admin_password)
    page.click("button[type=submit]")
    page.wait_for_selector("form[data-step=totp]")
    assert "Signing in as admin" in page.content()
    page.screenshot(path=str(ARTIFACTS / "portal-totp-code.png"))
    page.fill("input[name=code]", recovery)
    page.click("button[type=submit]")
    page.wait_for_selector("text=Your resources")

    # A new phone: replace the app from the resources page.
    page.click("text=New authenticator app")
    page.wait_for_selector("form#authenticator[data-step=totp-enrol]")
    new_secret = page.locator("code.secret").inner_text()
    assert new_secret != secret
    page.screenshot(path=str(ARTIFACTS / "portal-new-authenticator.png"), full_page=True)
    page.fill("input[name=code]", oathtool_code(new_secret))
    page.click("button[type=submit]")
    page.wait_for_selector("text=Authenticator app set up")
