"""Signing in through an OpenID provider with a real `portcullis up`: the portal in
headless Chromium, the CLI's loopback redirect (RFC 8252) and its device code (RFC 8628),
against the npm package oidc-provider (tests/peers/oidc.py). The provider's groups decide
which resources the user sees; the provider's answer finishes only the sign-in of the
browser that began it.

oidc-provider's own development login page signs any account in (its password is not
checked): the accounts and their claims are those of tests/peers/oidc.py."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Deployment, Process, free_port, init_deployment, require_program
from e2e.test_portal_browser import CHROMIUM_ARGS
from peers.oidc import (
    CLIENT_SECRET,
    GRANT_TYPES,
    OidcPeer,
    device_sign_in,
    start_oidc_provider,
)

pytestmark = pytest.mark.peer

AUTH_TEST_PORT = free_port()


@dataclass
class Federated:
    deployment: Deployment
    idp: OidcPeer
    directory: Path

    def audit(self, event: str) -> list[dict[str, Any]]:
        lines = (self.deployment.directory / "audit.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == event]


@pytest.fixture(scope="module")
def federated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federated]:
    directory = tmp_path_factory.mktemp("federated")
    deployment = init_deployment(directory / "deployment")
    deployment.set("gateway", "public_url", f'"{deployment.url}"')
    callback = f"{deployment.url}/login/callback/okta"
    # `auth test` takes the provider's answer on a loopback port registered for it.
    test_callback = f"http://127.0.0.1:{AUTH_TEST_PORT}/login/callback/okta"
    idp = start_oidc_provider(directory / "idp", clients=[{
        "client_id": "gateway", "client_secret": CLIENT_SECRET,
        "redirect_uris": [callback, test_callback],
        "token_endpoint_auth_method": "client_secret_basic", "grant_types": GRANT_TYPES}])
    (deployment.directory / "secrets" / "okta").write_text(CLIENT_SECRET + "\n")
    with deployment.config.open("a") as config:
        config.write(f"""
[auth]
flow = "okta"
[[auth.providers]]
type = "oidc"
name = "okta"
issuer = "{idp.issuer}"
client_id = "gateway"
client_secret_file = "secrets/okta"
scopes = ["openid", "profile", "email", "groups", "ad"]
preset = "okta"
[[auth.flows]]
name = "okta"
[[auth.flows.steps]]
provider = "okta"

# VPN access for the provider's Finance group only (group names compare exactly).
[[policies]]
name = "finance-loopback"
action = "allow"
groups = ["Finance"]        # exactly as the provider spells it
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
protocols = ["tcp"]
""")
    gateway = Process(["up", "--dir", str(deployment.directory)], directory / "up.log")
    try:
        gateway.wait_for(r"Portal: https://")
        yield Federated(deployment, idp, directory)
    finally:
        gateway.stop()
        idp.close()


@pytest.fixture
def browser_context():  # type: ignore[no-untyped-def]
    chromium = require_program("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=CHROMIUM_ARGS)
        # The deployment CA is private; the TLS checks themselves are tested elsewhere.
        yield browser.new_context(ignore_https_errors=True)
        browser.close()


def sign_in_at_the_provider(page: Any, account: str) -> None:
    """oidc-provider's development login page, then its consent page."""
    page.wait_for_selector("input[name=login]")
    page.fill("input[name=login]", account)
    page.fill("input[name=password]", "not checked")
    page.click("button[type=submit]")
    page.wait_for_selector("button[autofocus], button[type=submit]")
    if "consent" in page.content().lower() or "authorize" in page.content().lower():
        page.click("button[type=submit]")


def test_the_portal_signs_in_through_the_provider_and_its_groups_pick_the_resources(
        federated: Federated, browser_context: Any) -> None:
    page = browser_context.new_page()
    page.goto(f"{federated.deployment.url}/")
    # Straight to the provider: the flow's first step is a redirect step.
    page.wait_for_url(f"{federated.idp.issuer}/**")
    sign_in_at_the_provider(page, "alice")
    page.wait_for_selector("text=Your resources")
    # alice's token says staff (and Finance): the intranet (staff) is shown, ssh (admins) not.
    titles = page.locator("ul.resources li").all_inner_texts()
    assert any("Intranet" in title for title in titles)
    assert not any("SSH" in title for title in titles)
    succeeded = federated.audit("login.succeeded")[-1]
    assert succeeded["user"] == "alice" and succeeded["factors"] == ["okta"]


def test_the_providers_answer_in_another_browser_signs_nobody_in(
        federated: Federated, browser_context: Any) -> None:
    """A sign-in link passed to someone else: their browser has no login cookie."""
    first = browser_context.new_page()
    sent_to_idp: list[str] = []
    first.on("request", lambda request: sent_to_idp.append(request.url))
    first.goto(f"{federated.deployment.url}/login")
    first.wait_for_url(f"{federated.idp.issuer}/**")
    authorize = next(url for url in sent_to_idp if "/auth?" in url)
    other = browser_context.browser.new_context(ignore_https_errors=True).new_page()
    other.goto(authorize)
    sign_in_at_the_provider(other, "alice")
    other.wait_for_selector("text=Sign-in not possible")
    assert "another browser" in federated.audit("login.failed")[-1]["reason"]


def sign_in_from_the_terminal(command: Process, browser_context: Any) -> str:
    """Open the loopback URL `command` printed, sign in at the provider as alice, and
    wait for the command to finish; its output."""
    try:
        opened = command.wait_for(r"(http://127\.0\.0\.1:\d+/start/\S+)")
        page = browser_context.new_page()
        page.goto(opened.group(1))
        sign_in_at_the_provider(page, "alice")
        page.wait_for_selector("text=return to the terminal")
        assert command.popen.wait(timeout=30) == 0, command.output()
    finally:
        command.stop()
    return command.output()


def test_the_cli_signs_in_through_the_provider_on_a_loopback_redirect(
        federated: Federated, browser_context: Any, tmp_path: Path,
        http_server: Any) -> None:
    """The CLI's sign-in, its session listing alice's resources, and a VPN stream the
    provider's groups allow."""
    home = {"PORTCULLIS_HOME": str(tmp_path / "cli-home")}
    output = sign_in_from_the_terminal(Process(
        ["login", federated.deployment.url, "--no-browser", "--ca",
         str(federated.deployment.ca)], tmp_path / "login.log", env=home), browser_context)
    assert re.search(r"signed in as alice \(groups: .*staff", output)
    # The session the CLI kept works: the resources of alice's groups.
    listed = Process(["resources"], tmp_path / "resources.log", env=home)
    assert listed.popen.wait(timeout=30) == 0, listed.output()
    assert "intranet" in listed.output() and "ssh" not in listed.output()
    # And the VPN: the provider's Finance group is what the policy allows.
    tunnel = Process(["connect", "--no-proxy-auth", "--socks", "127.0.0.1:0", "--http",
                      "127.0.0.1:0"], tmp_path / "connect.log", env=home)
    try:
        socks = tunnel.wait_for(r"SOCKS5 proxy: listening on ([\d.]+:\d+)").group(1)
        fetched = subprocess.run(
            [require_program("curl"), "-sS", "--max-time", "20", "--socks5-hostname", socks,
             f"http://127.0.0.1:{http_server.port}/"], capture_output=True, text=True,
            timeout=30)
    finally:
        tunnel.stop()
    assert "intranet home" in fetched.stdout, fetched.stderr
    stream = federated.audit("tunnel.stream")[-1]
    assert (stream["user"], stream["rule"]) == ("alice", "finance-loopback")


def test_auth_test_prints_the_providers_url_waits_and_shows_the_claims(
        federated: Federated, browser_context: Any, tmp_path: Path) -> None:
    output = sign_in_from_the_terminal(Process(
        ["auth", "test", "--user", "alice", "--callback-port", str(AUTH_TEST_PORT),
         "--dir", str(federated.deployment.directory)], tmp_path / "auth-test.log"),
        browser_context)
    assert "step okta: Sign in with okta (redirect)" in output
    assert "passed  okta as alice" in output
    assert re.search(r"sid +S-1-5-21-", output) and re.search(r"groups +staff, Finance", output)


def test_the_cli_in_an_ssh_session_signs_in_with_a_device_code(
        federated: Federated, tmp_path: Path) -> None:
    """`login --device`: the CLI prints the provider's URL and a code; the user signs in
    with them on another device (here httpx, on the provider's device pages) while the
    CLI polls; then its session works."""
    malformed = httpx.post(f"{federated.deployment.url}/api/v1/login", json={"device": "yes"},
                           verify=ssl.create_default_context(cafile=federated.deployment.ca),
                           timeout=10)
    assert (malformed.status_code, malformed.json()) == (
        400, {"error": "device must be true or false"})
    home = {"PORTCULLIS_HOME": str(tmp_path / "cli-home")}
    command = Process(["login", federated.deployment.url, "--device", "--ca",
                       str(federated.deployment.ca)], tmp_path / "login.log", env=home)
    try:
        shown = command.wait_for(r"on any device:\s+(http://\S+)\s+and enter the code: (\S+)")
        page = asyncio.run(device_sign_in(shown.group(1), shown.group(2), "alice"))
        assert "Sign-in Success" in page
        assert command.popen.wait(timeout=60) == 0, command.output()
    finally:
        command.stop()
    assert re.search(r"signed in as alice \(groups: .*staff", command.output())
    listed = Process(["resources"], tmp_path / "resources.log", env=home)
    assert listed.popen.wait(timeout=30) == 0, listed.output()
    assert "intranet" in listed.output() and "ssh" not in listed.output()
    assert federated.audit("login.succeeded")[-1]["user"] == "alice"


def test_auth_test_with_a_device_code_reports_it_and_polls_until_the_user_signs_in(
        federated: Federated, tmp_path: Path) -> None:
    command = Process(["auth", "test", "--user", "alice", "--device",
                       "--dir", str(federated.deployment.directory)], tmp_path / "auth-test.log")
    try:
        shown = command.wait_for(r"open (http://\S+) on any device and enter the code (\S+)")
        asyncio.run(device_sign_in(shown.group(1), shown.group(2), "alice"))
        assert command.popen.wait(timeout=60) == 0, command.output()
    finally:
        command.stop()
    assert "step okta: Sign in with okta on any device (device)" in command.output()
    assert "passed  okta as alice" in command.output()
