"""A shadowed device in the browser, with real programs: `portcullis up` (gateway and
shadow hub), the agent `portcullis shadow-agent` in front of Xvfb + x11vnc, and headless
Chromium: from the /devices page, "Open in the browser" shows the device's screen through
the gateway acting as the console proxy of secure shadowing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_secure_shadowing import add_device, start_agent
from test_webvnc_browser import CHROMIUM_ARGS, canvas_pixel, sign_in

from conftest import ARTIFACTS, Deployment, Process, require_program
from peers.vnc import VncDesktop, parse_colour, wait_for_file_text

pytestmark = pytest.mark.peer

COLOUR = "#2e8b57"


@pytest.fixture
def page(deployment: Deployment) -> Iterator[Any]:
    chromium = require_program("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=CHROMIUM_ARGS)
        context = browser.new_context(ignore_https_errors=True)
        opened = context.new_page()
        frames: list[bytes] = []
        opened.on("websocket", lambda socket: [socket.on(event, lambda payload: frames.append(
            payload if isinstance(payload, bytes) else payload.encode()))
            for event in ("framesent", "framereceived")])
        opened.frames_seen = frames
        yield opened
        browser.close()


def test_an_operator_shadows_a_device_in_the_browser(
        deployment: Deployment, start_process: Any, page: Any, tmp_path: Path) -> None:
    gateway: Process = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    code = add_device(deployment, "kiosk-1")
    keys = tmp_path / "keys.log"
    with VncDesktop(tmp_path / "desktop", colour=COLOUR, xterm_log=keys) as desktop:
        agent, agent_port = start_agent(start_process, tmp_path / "agent", deployment,
                                        f"127.0.0.1:{desktop.port}", "kiosk-1", "--code", code)
        agent.wait_for(r"device proxy listening on")
        sign_in(page, deployment)
        page.goto(f"https://localhost:{deployment.port}/devices")
        page.click("a.open-in-browser")
        page.wait_for_selector("#vnc[data-state=connected]", timeout=30_000)
        expected = parse_colour(COLOUR)
        deadline = time.monotonic() + 10
        while canvas_pixel(page, *desktop.root_point) != expected and \
                time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert canvas_pixel(page, *desktop.root_point) == expected
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "webvnc-shadowed-device.png"))

        box = page.locator("#vnc-screen canvas").bounding_box()
        scale = box["width"] / desktop.width
        page.mouse.click(box["x"] + desktop.xterm_point[0] * scale,
                         box["y"] + desktop.xterm_point[1] * scale)
        page.keyboard.type("shadow 14")
        assert wait_for_file_text(keys, "shadow 14").endswith("shadow 14")

        seen = b"\n".join([page.content().encode(), *page.frames_seen])
        for address in (f"127.0.0.1:{agent_port}", f"127.0.0.1:{desktop.port}"):
            assert address.encode() not in seen
        audit = (deployment.directory / "audit.jsonl").read_text()
        assert '"shadow.request_verified"' in audit
        assert '"resource":"device:kiosk-1"' in audit.replace('": "', '":"')
