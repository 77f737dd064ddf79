"""VNC in the browser, with real programs: `portcullis up`, Xvfb + x11vnc painted a known
colour (one without a password, one with), headless Chromium running the portal's noVNC
page. The colour shows on noVNC's canvas, typed keys reach an xterm on the desktop, the
password and the server's address appear nowhere the browser can see, and the gateway's
WebSocket refuses a used or expired ticket and closes when the session ends."""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from conftest import ARTIFACTS, Deployment, Process, init_deployment, require_program
from peers.vnc import VncDesktop, parse_colour, wait_for_file_text
from portcullis.proto.launchfile import parse_launch_file

pytestmark = pytest.mark.peer

PASSWORD = "vnc-14-pw"
COLOUR = "#1e90ff"
PASSWORD_COLOUR = "#c81e28"
TICKET_LIFETIME = 4.0
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


@dataclass
class Setup:
    deployment: Deployment
    gateway: Process
    plain: VncDesktop
    guarded: VncDesktop
    keys: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("webvnc")
    keys = base / "keys.log"
    with VncDesktop(base / "plain", colour=COLOUR, xterm_log=keys) as plain, \
            VncDesktop(base / "guarded", colour=PASSWORD_COLOUR, password=PASSWORD) as guarded:
        deployment = init_deployment(base / "deployment")
        deployment.set("sta", "ticket_lifetime", str(TICKET_LIFETIME))
        (deployment.directory / "vnc-password").write_text(PASSWORD + "\n")
        (deployment.directory / "wrong-password").write_text("not-it\n")
        with deployment.config.open("a") as handle:
            for name, port, password_file in (("desk", plain.port, None),
                                              ("guarded", guarded.port, "vnc-password"),
                                              ("wrong", guarded.port, "wrong-password")):
                handle.write(f'\n[[resources]]\nname = "{name}"\ntitle = "Desk {name}"\n'
                             f'kind = "vnc"\naddress = "127.0.0.1:{port}"\n'
                             'groups = ["admins"]\n')
                if password_file:
                    handle.write(f'password_file = "{password_file}"\n')
        gateway = Process(["up", "--dir", str(deployment.directory)], base / "up.log")
        try:
            gateway.wait_for(r"Portal: https://")
            yield Setup(deployment, gateway, plain, guarded, keys)
        finally:
            gateway.stop()


@dataclass
class Browser:
    page: Any
    context: Any
    frames: list[bytes] = field(default_factory=list)   # every WebSocket message, both ways
    bodies: list[bytes] = field(default_factory=list)   # every HTTP response body
    console: list[str] = field(default_factory=list)    # the page's console messages

    def seen(self) -> bytes:
        return b"\n".join([self.page.content().encode(), *self.bodies, *self.frames])


@pytest.fixture
def browser(setup: Setup) -> Iterator[Browser]:
    chromium = require_program("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True,
                                              args=CHROMIUM_ARGS)
        # The deployment CA is private; the TLS checks themselves are tested elsewhere.
        context = launched.new_context(ignore_https_errors=True)
        page = context.new_page()
        seen = Browser(page, context)

        def record_socket(socket: Any) -> None:
            for event in ("framesent", "framereceived"):
                socket.on(event, lambda payload: seen.frames.append(
                    payload if isinstance(payload, bytes) else payload.encode()))

        def record_body(response: Any) -> None:
            # A redirect or an aborted request has no body.
            with contextlib.suppress(Exception):
                seen.bodies.append(response.body())

        page.on("websocket", record_socket)
        page.on("console", lambda message: seen.console.append(message.text))
        page.on("response", record_body)
        sign_in(page, setup.deployment)
        yield seen
        launched.close()


def sign_in(page: Any, deployment: Deployment) -> None:
    page.goto(f"https://localhost:{deployment.port}/")
    sign_in_form(page, deployment)
    page.wait_for_selector("text=Your resources")


def open_desktop(browser: Browser, setup: Setup, name: str) -> None:
    browser.page.goto(f"https://localhost:{setup.deployment.port}/vnc/{name}")
    browser.page.wait_for_selector("#vnc[data-state=connected]", timeout=20_000)
    assert browser.page.locator("#vnc-ctrl-alt-del").is_enabled()


def canvas_pixel(page: Any, x: int, y: int) -> tuple[int, int, int]:
    red, green, blue = page.evaluate(
        """([x, y]) => Array.from(document.querySelector('#vnc-screen canvas')
               .getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3))""", [x, y])
    return (red, green, blue)


def wait_for_colour(page: Any, point: tuple[int, int], colour: str) -> tuple[int, int, int]:
    """The canvas pixel once it shows `colour` (the first update may take a moment)."""
    expected = parse_colour(colour)
    seen = canvas_pixel(page, *point)
    deadline = time.monotonic() + 10
    while seen != expected and time.monotonic() < deadline:
        page.wait_for_timeout(100)
        seen = canvas_pixel(page, *point)
    return seen


def test_the_portal_shows_the_desktop_and_typed_keys_reach_it(
        setup: Setup, browser: Browser) -> None:
    page = browser.page
    open_desktop(browser, setup, "desk")
    desktop = setup.plain
    assert wait_for_colour(page, desktop.root_point, COLOUR) == parse_colour(COLOUR)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webvnc-desktop.png"))

    # noVNC scales the desktop into the page: put the pointer over the xterm (the X
    # server's focus follows it), click, and type.
    box = page.locator("#vnc-screen canvas").bounding_box()
    scale = box["width"] / desktop.width
    x, y = desktop.xterm_point
    page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
    page.keyboard.type("webvnc 14")
    page.keyboard.press("Enter")
    assert wait_for_file_text(setup.keys, "webvnc 14\n").endswith("webvnc 14\n")

    # The portal's Content Security Policy (no inline script) held: nothing was blocked.
    assert not [line for line in browser.console if "Content Security Policy" in line]
    address = f"127.0.0.1:{desktop.port}".encode()
    assert browser.frames, "the page's WebSocket traffic was not recorded"
    assert address not in browser.seen()


def test_the_gateway_answers_the_password_and_the_page_never_sees_it(
        setup: Setup, browser: Browser) -> None:
    page = browser.page
    open_desktop(browser, setup, "guarded")
    colour = wait_for_colour(page, setup.guarded.root_point, PASSWORD_COLOUR)
    assert colour == parse_colour(PASSWORD_COLOUR)
    seen = browser.seen()
    assert PASSWORD.encode() not in seen
    assert f"127.0.0.1:{setup.guarded.port}".encode() not in seen


def test_a_refusing_server_is_explained_in_the_page(setup: Setup, browser: Browser) -> None:
    page = browser.page
    page.goto(f"https://localhost:{setup.deployment.port}/vnc/wrong")
    page.wait_for_selector("#vnc[data-state=ended]", timeout=20_000)
    problem = page.locator("#vnc-problem").inner_text()
    assert "The desktop refused the connection" in problem
    # x11vnc's own reason, relayed by the gateway as an RFB security failure.
    assert "password check failed" in problem.lower()
    page.screenshot(path=str(ARTIFACTS / "webvnc-refused.png"))


def test_a_user_outside_the_resource_gets_the_not_allowed_page(
        setup: Setup, browser: Browser) -> None:
    page = browser.page
    response = page.goto(f"https://localhost:{setup.deployment.port}/vnc/nonexistent")
    assert response is not None and response.status == 403
    assert "Not allowed" in page.content()


# -- the gateway's WebSocket, driven from Python with tickets the portal issued ----------


def fresh_ticket(browser: Browser, setup: Setup, name: str = "desk") -> str:
    """A ticket as the page's script asks for it (the browser's cookie, a JSON POST)."""
    answer = browser.context.request.post(
        f"https://localhost:{setup.deployment.port}/vnc/{name}/ticket",
        headers={"content-type": "application/json"}, data="{}")
    assert answer.status == 200
    ticket = answer.json()["ticket"]
    assert isinstance(ticket, str)
    return ticket


def gateway_socket(setup: Setup) -> ClientConnection:
    tls = ssl.create_default_context(cafile=str(setup.deployment.ca))
    return connect(f"wss://127.0.0.1:{setup.deployment.port}/api/v1/vnc", ssl=tls,
                   server_hostname="localhost", open_timeout=10)


def redeem(socket: ClientConnection, ticket: str) -> bytes | None:
    """Send the ticket; the server's first message, or None when the gateway closed."""
    socket.send(ticket.encode())
    try:
        first = socket.recv(timeout=10)
    except ConnectionClosed:
        return None
    return first if isinstance(first, bytes) else first.encode()


def test_a_ticket_opens_the_desktop_once(setup: Setup, browser: Browser) -> None:
    ticket = fresh_ticket(browser, setup)
    with gateway_socket(setup) as first:
        assert redeem(first, ticket) == b"RFB 003.008\n"
    with gateway_socket(setup) as again:
        assert redeem(again, ticket) is None
        assert (again.close_code, again.close_reason) == (1008, "denied")


def test_an_expired_ticket_is_refused(setup: Setup, browser: Browser) -> None:
    ticket = fresh_ticket(browser, setup)
    time.sleep(TICKET_LIFETIME + 0.5)
    with gateway_socket(setup) as socket:
        assert redeem(socket, ticket) is None
        assert socket.close_code == 1008


def test_signing_out_ends_the_viewer_and_the_server_connection_within_a_second(
        setup: Setup, browser: Browser) -> None:
    viewer = browser.page
    open_desktop(browser, setup, "desk")
    gone_before = setup.plain.x11vnc_output().count("Client 127.0.0.1 gone")
    other = browser.context.new_page()   # the same browser, another tab
    other.goto(f"https://localhost:{setup.deployment.port}/")
    other.click("text=Sign out")
    other.wait_for_url("**/login?signed_out=1")
    signed_out = time.monotonic()
    viewer.wait_for_selector("#vnc[data-state=ended]", timeout=1000)
    assert "signed out" in viewer.locator("#vnc-problem").inner_text()
    for control in ("#vnc-fullscreen", "#vnc-ctrl-alt-del", "#vnc-clipboard-send"):
        assert viewer.locator(control).is_disabled(), control   # nothing left to act on
    viewer.screenshot(path=str(ARTIFACTS / "webvnc-signed-out.png"))
    while (setup.plain.x11vnc_output().count("Client 127.0.0.1 gone") == gone_before
           and time.monotonic() - signed_out < 1.0):
        time.sleep(0.02)
    assert setup.plain.x11vnc_output().count("Client 127.0.0.1 gone") > gone_before
    audit = (setup.deployment.directory / "audit.jsonl").read_text()
    assert "ended: your session ended: signed out" in audit


def test_a_cross_site_form_cannot_get_a_ticket(setup: Setup, browser: Browser) -> None:
    """What a form on another site could send with the user's cookie is refused."""
    url = f"https://localhost:{setup.deployment.port}/vnc/desk/ticket"
    for content_type in ("application/x-www-form-urlencoded", "text/plain"):
        answer = browser.context.request.post(url, headers={"content-type": content_type},
                                              data="{}")
        assert answer.status == 403
        assert "ticket" not in answer.text()
    assert '"csrf.rejected"' in (setup.deployment.directory / "audit.jsonl").read_text()


def test_the_viewer_page_asks_for_sign_in_and_comes_back(setup: Setup, browser: Browser) -> None:
    context = browser.page.context.browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.goto(f"https://localhost:{setup.deployment.port}/vnc/desk")
        assert page.url.endswith("/login?next=/vnc/desk")
        sign_in_form(page, setup.deployment)
        page.wait_for_selector("#vnc[data-state=connected]", timeout=20_000)
    finally:
        context.close()


def sign_in_form(page: Any, deployment: Deployment) -> None:
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", deployment.admin_password)
    page.click("button[type=submit]")


def test_a_launch_ticket_does_not_open_the_vnc_endpoint(setup: Setup, browser: Browser) -> None:
    """A tcp resource (the template's ssh) has no viewer page, and its launch ticket
    carries no RFB."""
    base = f"https://localhost:{setup.deployment.port}"
    page = browser.page
    assert page.goto(f"{base}/vnc/ssh").status == 403
    answer = browser.context.request.post(f"{base}/api/v1/resources/ssh/launch",
                                          headers={"content-type": "application/json"},
                                          data="{}")
    assert answer.status == 200
    ticket = parse_launch_file(answer.body()).ticket
    with gateway_socket(setup) as socket:
        assert redeem(socket, ticket) is None
        assert socket.close_code == 1008
    assert '"not a vnc resource"' in (setup.deployment.directory / "audit.jsonl").read_text()
