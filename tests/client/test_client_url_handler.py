"""The portal's "Open in Portcullis client" link end to end under a test desktop session:
the single-file client run by a Python with nothing installed, `register` (the real
xdg-utils record the handler), then the real `xdg-open` with the portcullis:// URL of the
portal's launch page starts the client in a terminal (xterm on Xvfb), and the client
carries bytes through the real gateway to a loopback echo server."""

from __future__ import annotations

import contextlib
import html
import os
import re
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import Deployment, Process, require_program
from peers.client_install import single_file_client
from peers.servers import EchoServer, echo_round_trip
from peers.vnc import VncDesktop

PASSWORD = "correct horse battery staple"


def portal_launch_link(deployment: Deployment, resource: str) -> str:
    """Sign in as alice, press Launch in the portal, and take the page's portcullis:// link."""
    tls = ssl.create_default_context(cafile=str(deployment.ca))
    with httpx.Client(base_url=deployment.url, verify=tls, timeout=30) as web:
        begun = web.post("/api/v1/login", json={}).json()
        token = web.post("/api/v1/login", json={
            "handle": begun["handle"],
            "answers": {"username": "alice", "password": PASSWORD}}).json()["token"]
        web.cookies.set("__Host-portcullis-session", token)
        csrf = re.search(r'name="csrf" value="([^"]+)"', web.get("/").text)
        assert csrf is not None
        page = web.post(f"/launch/{resource}", data={"csrf": csrf.group(1)})
    assert page.status_code == 200, page.text
    link = re.search(r'href="(portcullis://[^"]+)"', page.text)
    assert link is not None, page.text
    return html.unescape(link.group(1))


def listening_port(url: str, timeout: float = 30) -> tuple[psutil.Process, int]:
    """The client process xdg-open started for `url` (the ticket makes it unique), and
    the loopback port it listens on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["cmdline"]):
            if url not in (process.info["cmdline"] or []) or "open" not in process.info["cmdline"]:
                continue
            with contextlib.suppress(psutil.Error):
                for connection in process.net_connections("tcp"):
                    if connection.status == psutil.CONN_LISTEN:
                        return process, connection.laddr.port
        time.sleep(0.1)
    raise AssertionError(f"no client listening for the launch after {timeout} s")


@pytest.fixture
def desktop(tmp_path: Path) -> Iterator[VncDesktop]:
    with VncDesktop(tmp_path / "desktop") as running:
        yield running


def test_xdg_open_of_the_portals_link_launches_the_client_through_the_gateway(
        deployment: Deployment, echo_server: EchoServer, start_process, desktop: VncDesktop,
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[no-untyped-def]
    require_program("xdg-open")
    terminal = require_program("xterm")
    client = [str(path) for path in single_file_client(tmp_path_factory)]
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway: Process = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")

    home = tmp_path / "home"
    session = {  # a desktop session of its own: no desktop environment, a terminal
        "PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8",
        "DISPLAY": desktop.display, "XAUTHORITY": "/dev/null", "TERMINAL": terminal,
        "XDG_DATA_HOME": str(home / "data"), "XDG_CONFIG_HOME": str(home / "config"),
        "PORTCULLIS_HOME": str(home / "portcullis")}
    home.mkdir()
    signed_in = subprocess.run(
        [*client, "login", deployment.url, "--user", "alice", "--password-stdin",
         "--ca", str(deployment.ca)], input=PASSWORD + "\n", env=session,
        capture_output=True, text=True, timeout=60)
    assert signed_in.returncode == 0, signed_in.stderr
    registered = subprocess.run([*client, "register"], env=session, capture_output=True,
                                text=True, timeout=60)
    assert registered.returncode == 0, registered.stderr
    entry = (home / "data/applications/portcullis-client.desktop").read_text()
    assert f"Exec={client[0]} {client[1]} open --hold %u\n" in entry   # the same .pyz
    default = subprocess.run(["xdg-mime", "query", "default", "x-scheme-handler/portcullis"],
                             env=session, capture_output=True, text=True, timeout=30)
    assert default.stdout.strip() == "portcullis-client.desktop"

    url = portal_launch_link(deployment, "echo")
    opener = subprocess.Popen(["xdg-open", url], env=session, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        launched, port = listening_port(url)
        sent, received, count = echo_round_trip("127.0.0.1", port, size=1 << 20)
        assert (received, count) == (sent, 1 << 20)
        assert launched.parent().name() == "xterm"   # the handler's terminal window
        launched.terminate()
        launched.wait(10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(opener.pid, signal.SIGTERM)
        opener.wait(10)
    assert list(home.rglob("*.portcullis")) == []   # nothing went to Downloads

    # The link's ticket was used: opening it again is refused, and says so.
    again = subprocess.run([*client, "open", url], env=session, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1
    assert "ticket is expired, already used" in again.stderr
    assert url.split("ticket=")[1].split("&")[0] not in again.stderr + again.stdout
