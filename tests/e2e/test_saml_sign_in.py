"""Signing in through a SAML 2.0 IdP with a real `portcullis up`, in headless Chromium,
against pysaml2's IdP side (tests/peers/saml_idp.py). The IdP trusts what the running
gateway publishes at /saml/corp/metadata, as an administrator would configure it.

Each refusal is checked end to end, by its audit line; the other attacks on the SAML
response (signature wrapping, a comment in the NameID, entities) are refused at the
factor, tests/federation/test_saml_sp.py and test_saml_gate.py."""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Deployment, Process, init_deployment, require_program
from e2e import test_federated_sign_in
from peers.saml import IdpFiles, prepare_idp, start_idp

pytestmark = pytest.mark.peer

# Headless Chromium, as the OIDC sign-in tests start it.
browser_context = test_federated_sign_in.browser_context
PROVIDER = "corp"
GATEWAY_BODY_LIMIT = 64 * 1024        # limits.max_request_body, as `portcullis init` sets it


@dataclass
class SamlGateway:
    deployment: Deployment
    idp: IdpFiles
    directory: Path
    process: Process

    @property
    def acs(self) -> str:
        return f"{self.deployment.url}/login/callback/{PROVIDER}"

    @property
    def entity_id(self) -> str:
        return f"{self.deployment.url}/saml/{PROVIDER}"

    def audit(self, event: str) -> list[dict[str, Any]]:
        lines = (self.deployment.directory / "audit.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == event]

    def start(self) -> None:
        self.process = Process(["up", "--dir", str(self.deployment.directory)],
                               self.directory / "up.log")
        self.process.wait_for(r"Portal: https://")

    def restart(self, *, allow_idp_initiated: bool) -> None:
        """As an administrator: change the provider's setting, restart the gateway."""
        config = self.deployment.config.read_text()
        self.deployment.config.write_text(config.replace(
            f"allow_idp_initiated = {str(not allow_idp_initiated).lower()}",
            f"allow_idp_initiated = {str(allow_idp_initiated).lower()}"))
        self.process.stop()
        self.start()


def trusting(deployment: Deployment) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(deployment.ca))


@pytest.fixture(scope="module")
def saml(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SamlGateway]:
    directory = tmp_path_factory.mktemp("saml")
    deployment = init_deployment(directory / "deployment")
    deployment.set("gateway", "public_url", f'"{deployment.url}"')
    (directory / "idp").mkdir()
    idp = prepare_idp(directory / "idp")
    with deployment.config.open("a") as config:
        config.write(f"""
[auth]
flow = "corp"
[[auth.providers]]
type = "saml"
name = "{PROVIDER}"
idp_metadata_file = "{idp.metadata_file}"
allow_idp_initiated = false
[[auth.flows]]
name = "corp"
[[auth.flows.steps]]
provider = "{PROVIDER}"
""")
    gateway = SamlGateway(deployment, idp, directory, None)  # type: ignore[arg-type]
    gateway.start()
    try:
        # What the gateway publishes is what the IdP trusts.
        published = httpx.get(f"{deployment.url}/saml/{PROVIDER}/metadata",
                              verify=trusting(deployment), timeout=20)
        assert published.status_code == 200, published.text
        assert published.headers["content-type"] == "application/samlmetadata+xml"
        idp_process = start_idp(idp, published.content)
        try:
            yield gateway
        finally:
            idp_process.stop()
    finally:
        gateway.process.stop()


def sign_in_at_the_idp(page: Any, user: str, **answer: str) -> None:
    """The IdP's sign-in form; `answer`: how the IdP is to misbehave (saml_idp.py)."""
    page.wait_for_selector("input[name=username]")
    page.eval_on_selector("form", """(form, extra) => {
        for (const [name, value] of Object.entries(extra)) {
            const input = document.createElement("input");
            input.type = "hidden"; input.name = name; input.value = value;
            form.appendChild(input);
        }}""", answer)
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", f"{user}-pass")
    page.click("button")


def posted_responses(page: Any, saml: SamlGateway) -> list[dict[str, str]]:
    """The forms the browser POSTs to the ACS, as they go."""
    posted: list[dict[str, str]] = []
    page.on("request", lambda request: posted.append(
        dict(urllib.parse.parse_qsl(request.post_data or "")))
        if request.url == saml.acs and request.method == "POST" else None)
    return posted


def signed_in(page: Any, saml: SamlGateway, user: str = "alice") -> None:
    page.goto(f"{saml.deployment.url}/")
    page.wait_for_url(f"{saml.idp.url}/sso/**")
    sign_in_at_the_idp(page, user)
    page.wait_for_selector("text=Your resources")


def test_a_user_signs_in_through_the_idp_and_its_groups_pick_the_resources(
        saml: SamlGateway, browser_context: Any) -> None:
    page = browser_context.new_page()
    signed_in(page, saml)
    # alice's assertion says staff: the intranet (staff) is shown, ssh (admins) not.
    titles = page.locator("ul.resources li").all_inner_texts()
    assert any("Intranet" in title for title in titles)
    assert not any("SSH" in title for title in titles)
    succeeded = saml.audit("login.succeeded")[-1]
    assert succeeded["user"] == "alice" and succeeded["factors"] == [PROVIDER]


def test_without_javascript_signing_in_through_the_idp_works(saml: SamlGateway) -> None:
    """The portal's part of a redirect step needs no script: the way to the IdP is a plain
    redirect, and the page after its answer has a Continue link."""
    chromium = require_program("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=test_federated_sign_in.CHROMIUM_ARGS)
        try:
            context = browser.new_context(ignore_https_errors=True, java_script_enabled=False)
            page = context.new_page()
            page.goto(f"{saml.deployment.url}/")
            page.wait_for_url(f"{saml.idp.url}/sso/**")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "alice-pass")
            page.click("button")
            page.click("text=Continue to the service")   # the IdP's, without scripts
            page.wait_for_selector("[data-step=continue]")
            page.click("#continue")
            page.wait_for_selector("text=Your resources")
        finally:
            browser.close()


def test_a_response_larger_than_any_other_request_body_is_accepted_at_the_acs(
        saml: SamlGateway, browser_context: Any) -> None:
    page = browser_context.new_page()
    posted = posted_responses(page, saml)
    signed_in(page, saml, "carol")
    assert len(urllib.parse.urlencode(posted[0])) > GATEWAY_BODY_LIMIT
    assert saml.audit("login.succeeded")[-1]["user"] == "carol"


def test_a_body_larger_than_the_largest_response_is_still_refused(saml: SamlGateway) -> None:
    with httpx.Client(verify=trusting(saml.deployment), timeout=20) as http:
        # 256 KiB of response (max_response_bytes) is at most about 1 MiB as a form.
        huge = http.post(saml.acs, data={"SAMLResponse": "A" * (1100 * 1024)})
        # Elsewhere the usual limit holds.
        elsewhere = http.post(f"{saml.deployment.url}/login",
                              data={"csrf": "x", "password": "A" * (GATEWAY_BODY_LIMIT + 1)})
    assert huge.status_code == 413
    assert elsewhere.status_code == 413


@pytest.mark.parametrize(("answer", "reason"), [
    ({"sign": "none"}, "signature"),
    ({"audience": "https://another-sp.example/saml"}, "audience"),
    ({"expired": "1"}, "expired"),
], ids=["unsigned", "another audience", "expired"])
def test_a_bad_assertion_is_refused_and_audited(
        saml: SamlGateway, browser_context: Any, answer: dict[str, str], reason: str) -> None:
    page = browser_context.new_page()
    page.goto(f"{saml.deployment.url}/")
    page.wait_for_url(f"{saml.idp.url}/sso/**")
    sign_in_at_the_idp(page, "alice", **answer)
    page.wait_for_selector("text=Sign-in not possible")
    failed = saml.audit("login.failed")[-1]
    assert failed["factor"] == PROVIDER
    assert reason in failed["reason"].lower(), failed


def test_a_replayed_response_is_refused_and_audited(
        saml: SamlGateway, browser_context: Any) -> None:
    page = browser_context.new_page()
    posted = posted_responses(page, saml)
    signed_in(page, saml)
    # The same SAMLResponse and RelayState again, from the same browser.
    replayed = browser_context.request.post(saml.acs, form=posted[0])
    assert replayed.status == 401
    assert saml.audit("login.failed")[-1]["reason"].startswith(
        "unknown, used or expired callback state")


def idp_initiated(page: Any, saml: SamlGateway) -> None:
    """The IdP's own start page for the gateway, then its sign-in form."""
    query = urllib.parse.urlencode({"sp": saml.entity_id, "acs": saml.acs})
    page.goto(f"{saml.idp.url}/initiate?{query}")
    sign_in_at_the_idp(page, "alice")


def test_an_idp_initiated_sign_in_is_refused_by_default(
        saml: SamlGateway, browser_context: Any) -> None:
    page = browser_context.new_page()
    idp_initiated(page, saml)
    page.wait_for_selector("text=Sign-in not possible")
    failed = saml.audit("login.failed")[-1]
    assert failed["factor"] == PROVIDER and "may not begin a sign-in" in failed["reason"]


@contextlib.contextmanager
def idp_initiated_allowed(saml: SamlGateway) -> Iterator[None]:
    saml.restart(allow_idp_initiated=True)
    try:
        yield
    finally:
        saml.restart(allow_idp_initiated=False)


def test_an_idp_initiated_sign_in_is_accepted_once_allowed_and_only_once(
        saml: SamlGateway, browser_context: Any) -> None:
    with idp_initiated_allowed(saml):
        page = browser_context.new_page()
        posted = posted_responses(page, saml)
        idp_initiated(page, saml)
        page.wait_for_selector("text=Your resources")
        assert saml.audit("login.unsolicited")[-1]["factor"] == PROVIDER
        assert saml.audit("login.succeeded")[-1]["user"] == "alice"
        assert not posted[0].get("RelayState")
        # Nothing ties an unsolicited response to a request: its assertion id does.
        replayed = browser_context.request.post(saml.acs, form=posted[0])
        assert replayed.status == 401
        assert "replayed" in saml.audit("login.failed")[-1]["reason"]


def test_the_idp_ends_the_gateway_session_by_single_logout(
        saml: SamlGateway, browser_context: Any) -> None:
    page = browser_context.new_page()
    signed_in(page, saml)
    query = urllib.parse.urlencode({"sp": saml.entity_id, "name_id": "alice"})
    # At the IdP: its LogoutRequest goes through the gateway, which answers back to it.
    page.goto(f"{saml.idp.url}/logout-user?{query}")
    page.wait_for_selector("text=logged out:")
    logout = saml.audit("saml.logout")[-1]
    assert logout["initiated_by"] == "idp" and logout["user"] == "alice"
    assert logout["sessions"] >= 1
    # The portal's session is over: it asks to sign in again.
    page.goto(f"{saml.deployment.url}/")
    page.wait_for_url(f"{saml.idp.url}/sso/**")
    page.wait_for_selector("input[name=username]")


def test_signing_out_of_the_portal_signs_out_at_the_idp(
        saml: SamlGateway, browser_context: Any) -> None:
    page = browser_context.new_page()
    at_idp: list[str] = []
    back: list[str] = []
    slo = f"{saml.deployment.url}/saml/{PROVIDER}/slo"
    page.on("request", lambda request: at_idp.append(request.url)
            if request.url.startswith(f"{saml.idp.url}/slo") else
            back.append(request.url) if request.url.startswith(slo) else None)
    signed_in(page, saml)
    page.click("text=Sign out")
    page.wait_for_selector("text=You are signed out here and at your identity provider")
    assert at_idp and "SAMLRequest=" in at_idp[0] and "Signature=" in at_idp[0]
    assert saml.audit("saml.logout_requested")[-1]["user"] == "alice"
    logout = saml.audit("saml.logout")[-1]
    assert logout["initiated_by"] == "gateway" and logout["user"] == "alice"
    # Signed out here too.
    page.goto(f"{saml.deployment.url}/")
    page.wait_for_url(f"{saml.idp.url}/sso/**")
    # The IdP's LogoutResponse answers its request once.
    page.goto(back[0])
    page.wait_for_selector("text=your identity provider did not confirm")
    assert saml.audit("saml.logout_failed")[-1]["reason"] == \
        "unknown, used or expired logout state"


def test_a_logout_request_without_the_idps_signature_ends_nothing(
        saml: SamlGateway, browser_context: Any) -> None:
    page = browser_context.new_page()
    signed_in(page, saml)
    valid = httpx.get(f"{saml.idp.url}/logout-user", params={
        "sp": saml.entity_id, "name_id": "alice"})
    assert valid.status_code == 303
    unsigned = "&".join(part for part in urllib.parse.urlsplit(
        valid.headers["location"]).query.split("&")
        if not part.startswith(("Signature=", "SigAlg=")))
    answer = browser_context.request.get(f"{saml.deployment.url}/saml/{PROVIDER}/slo?{unsigned}")
    assert answer.status == 400
    assert "no signed SAMLRequest" in saml.audit("saml.logout_failed")[-1]["reason"]
    page.goto(f"{saml.deployment.url}/")
    page.wait_for_selector("text=Your resources")
