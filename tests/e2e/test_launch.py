"""Flow A end to end: `portcullis up` in a subprocess, the CLI and the JSON API as
clients, real servers (http.server, a TCP echo server) behind the gateway, curl in front."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import Deployment, Process, require_program, run_cli
from peers.servers import echo_round_trip
from portcullis.proto.launchfile import MIME_TYPE, parse_launch_file

PASSWORD = "correct horse battery staple"


def login(deployment: Deployment, user: str = "alice", password: str = PASSWORD) -> None:
    result = run_cli("login", deployment.url, "--user", user, "--password-stdin",
                     "--ca", str(deployment.ca), input=password + "\n")
    assert result.returncode == 0, result.stderr


def start_launch(start_process, *args: str) -> tuple[Process, str, int]:  # type: ignore[no-untyped-def]
    process = start_process("launch", *args, "--listen", "127.0.0.1:0", name="launch")
    match = process.wait_for(r"listening on ([\d.]+):(\d+)")
    return process, match.group(1), int(match.group(2))


def api(deployment: Deployment) -> httpx.Client:
    tls = ssl.create_default_context(cafile=str(deployment.ca))
    return httpx.Client(base_url=deployment.url, verify=tls, timeout=30)


def api_login(client: httpx.Client, user: str, password: str) -> str:
    first = client.post("/api/v1/login", json={})
    assert first.status_code == 200
    step = first.json()
    assert step["status"] == "continue"
    assert [p["name"] for p in step["step"]["prompts"]] == ["username", "password"]
    answer = client.post("/api/v1/login", json={
        "handle": step["handle"], "answers": {"username": user, "password": password}})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "authenticated"
    return str(body["token"])


def launch_via_api(deployment: Deployment, resource: str) -> httpx.Response:
    """Sign in as alice and ask for a launch file."""
    with api(deployment) as client:
        token = api_login(client, "alice", PASSWORD)
        launched = client.post(f"/api/v1/resources/{resource}/launch",
                               headers={"authorization": f"Bearer {token}"})
    assert launched.status_code == 200, launched.text
    return launched


@pytest.fixture
def staffed(deployment: Deployment, echo_server, http_server) -> Deployment:  # type: ignore[no-untyped-def]
    deployment.add_resource("web", http_server.address, ["staff"], "Team web")
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    deployment.add_resource("finance", echo_server.address, ["finance"], "Ledger")
    # A web application: listed for the client too, but opened in a browser.
    deployment.add_web_resource("docs", "http://127.0.0.1:9", "docs.localhost", ["staff"],
                                "Docs")
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("bob", PASSWORD, ["finance"])
    return deployment


@pytest.fixture
def running(staffed: Deployment, gateway: Process) -> Deployment:
    return staffed


def test_cli_signs_in_lists_resources_and_curl_fetches_a_page_through_the_launch(
        running: Deployment, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    curl = require_program("curl")
    login(running)
    for kept in client_home.iterdir():
        assert kept.stat().st_mode & 0o777 == 0o600, kept
    listed = run_cli("resources")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert list(lines) == ["intranet", "web", "echo", "docs"]
    assert lines["web"].split()[1] == "tcp"
    opened_at = f"in a browser: {running.url}/web/docs"
    assert lines["docs"].split()[1] == "web" and opened_at in lines["docs"]
    refused = run_cli("launch", "docs")
    assert refused.returncode != 0 and f"'docs' opens in a browser, not in the client: " \
        f"{running.url}/web/docs" in refused.stderr
    _, host, port = start_launch(start_process, "web")
    fetched = subprocess.run([curl, "-sS", "--max-time", "20", f"http://{host}:{port}/"],
                             capture_output=True, text=True, timeout=30)
    assert fetched.returncode == 0, fetched.stderr
    assert "intranet home" in fetched.stdout


def test_one_launch_carries_several_connections(
        running: Deployment, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    login(running)
    _, host, port = start_launch(start_process, "echo")
    sockets = [socket.create_connection((host, port), timeout=10) for _ in range(5)]
    for index, sock in enumerate(sockets):
        sock.sendall(f"hello {index}".encode())
    for index, sock in enumerate(sockets):
        assert sock.recv(100) == f"hello {index}".encode()
        sock.close()


def test_echo_resource_carries_100_mib_intact(
        running: Deployment, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    login(running)
    _, host, port = start_launch(start_process, "echo")
    sent, received, count = echo_round_trip(host, port)
    assert count == 100 * 1024 * 1024
    assert received == sent


def test_json_api_signs_in_lists_and_downloads_a_launch_file(running: Deployment) -> None:
    with api(running) as client:
        token = api_login(client, "alice", PASSWORD)
        headers = {"authorization": f"Bearer {token}"}
        listed = client.get("/api/v1/resources", headers=headers)
        assert [r["name"] for r in listed.json()["resources"]] == ["intranet", "web", "echo",
                                                                   "docs"]
        launched = client.post("/api/v1/resources/echo/launch", headers=headers)
        cookie = client.post("/api/v1/login", json={
            "answers": {"username": "alice", "password": PASSWORD}}).headers["set-cookie"]
    assert cookie.startswith("__Host-portcullis-session=")
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= {
        part.strip().lower() for part in cookie.split(";")}
    assert launched.status_code == 200
    assert launched.headers["content-type"].startswith(MIME_TYPE)
    launch = parse_launch_file(launched.content)
    assert launch.resource == "echo" and launch.title == "Echo"
    assert launch.gateway_url.startswith("wss://")
    # The server's address is never shown to the user.
    echo_port = running.config.read_text().split('name = "echo"')[1].split('"')[5]
    assert echo_port not in launched.text


def test_user_outside_the_resource_groups_neither_sees_nor_launches_it(
        running: Deployment) -> None:
    with api(running) as client:
        token = api_login(client, "alice", PASSWORD)
        headers = {"authorization": f"Bearer {token}"}
        listed = client.get("/api/v1/resources", headers=headers).json()["resources"]
        assert "finance" not in [r["name"] for r in listed]
        refused = client.post("/api/v1/resources/finance/launch", headers=headers)
    assert refused.status_code == 403
    assert refused.json() == {"error": "denied"}
    audit = (running.directory / "audit.jsonl").read_text()
    assert '"event":"launch.denied"' in audit


def test_wrong_password_is_denied_without_a_reason(running: Deployment) -> None:
    with api(running) as client:
        wrong = client.post("/api/v1/login", json={
            "answers": {"username": "alice", "password": "nope"}})
        unknown = client.post("/api/v1/login", json={
            "answers": {"username": "mallory", "password": "nope"}})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"status": "denied", "error": "denied"}
    events = [json.loads(line) for line in
              (running.directory / "audit.jsonl").read_text().splitlines()]
    reasons = [e.get("reason") for e in events if e["event"] == "login.failed"]
    assert reasons == ["wrong password", "unknown user"]


def test_a_launch_file_works_once(running: Deployment, client_home: Path,
                                  tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    launched = launch_via_api(running, "echo")
    launch_file = tmp_path / "echo.portcullis"
    launch_file.write_bytes(launched.content)
    _first, host, port = start_launch(start_process, "--file", str(launch_file),
                                     "--ca", str(running.ca))
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
    second = run_cli("launch", "--file", str(launch_file), "--ca", str(running.ca))
    assert second.returncode == 1
    assert "ticket is expired, already used, or not valid" in second.stderr
    assert "Traceback" not in second.stderr


def test_malformed_launch_file_gets_a_clear_cli_error(tmp_path: Path, client_home: Path) -> None:
    bad = tmp_path / "bad.portcullis"
    bad.write_text("[Portcullis Launch]\nVersion=1\nResource=x\n")
    result = run_cli("launch", "--file", str(bad))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "launch file" in result.stderr.lower() or "missing" in result.stderr.lower()


def test_client_that_does_not_trust_the_gateway_ca_is_told_how_to(
        running: Deployment, client_home: Path) -> None:
    result = run_cli("login", running.url, "--user", "alice", "--password-stdin",
                     input=PASSWORD + "\n")
    assert result.returncode == 1
    assert "cannot verify the gateway's certificate" in result.stderr
    assert "--ca" in result.stderr
    assert "Traceback" not in result.stderr


def test_disabling_a_user_ends_their_sessions_and_connections(
        running: Deployment, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    login(running)
    launch, host, port = start_launch(start_process, "echo")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"before")
        assert sock.recv(10) == b"before"
        disabled = run_cli("user", "disable", "alice", "--dir", str(running.directory))
        assert disabled.returncode == 0, disabled.stderr
        # The connection is ended by the gateway: the socket reaches EOF or reset.
        sock.settimeout(15)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""
    assert launch.popen.wait(15) == 1
    assert "account disabled" in launch.output()
    # The session is gone too, within the account-status cache's second.
    for _ in range(50):
        if run_cli("resources").returncode == 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the disabled user's session still works")


def test_roles_in_separate_processes_launch_over_mutual_tls(
        staffed: Deployment, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    # The STA alone in one process; gateway + portal in another reach it over mTLS.
    staffed.set("store", "ephemeral", '"memory://"')
    sta = start_process("serve", "sta", "--dir", str(staffed.directory), name="sta")
    sta.wait_for(r"sta listening on")
    # The front process must not run an STA of its own: give it a different id.
    staffed.set("sta", "id", '"FRONT"')
    front = start_process("serve", "gateway", "portal", "--dir", str(staffed.directory),
                          name="front")
    front.wait_for(r"Portal: https://")
    login(staffed)
    _, host, port = start_launch(start_process, "echo")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"across processes")
        assert sock.recv(100) == b"across processes"
    assert "ticket.issued" in sta.output() and "ticket.redeemed" in sta.output()


def test_launch_streams_reach_only_the_ticket_address(running: Deployment) -> None:
    """A client that names another destination in OPEN is refused; the pinned one works."""
    import asyncio

    from portcullis.net import websocket
    from portcullis.net.muxsession import MuxSession
    from portcullis.proto import mux

    launch = parse_launch_file(launch_via_api(running, "echo").content)

    async def probe() -> tuple[mux.Reason, bool]:
        tls = ssl.create_default_context(cafile=str(running.ca))
        carrier = await websocket.connect(launch.gateway_url, tls)
        codec = mux.MuxConnection("client")
        codec.send_hello({"version": 1, "ticket": launch.ticket})
        session = MuxSession(codec)
        carrier.attach(session)
        await asyncio.wait_for(session.hello, 10)
        elsewhere = codec.open_stream(mux.Protocol.TCP, "127.0.0.1", running.port)
        pinned = codec.open_stream(mux.Protocol.TCP, "", 0)
        session.flush_soon()
        refused: mux.Reason | None = None
        accepted = False
        original = session._dispatch

        def watch(events: list[mux.Event]) -> None:
            nonlocal refused, accepted
            for event in events:
                if isinstance(event, mux.StreamRefused) and event.stream_id == elsewhere:
                    refused = event.reason
                if isinstance(event, mux.StreamAccepted) and event.stream_id == pinned:
                    accepted = True
            original(events)

        session._dispatch = watch  # type: ignore[method-assign]
        for _ in range(100):
            if refused is not None and accepted:
                break
            await asyncio.sleep(0.05)
        session.close(mux.Reason.CANCELLED, "done")
        assert refused is not None
        return refused, accepted

    reason, accepted = asyncio.run(probe())
    assert reason == mux.Reason.DENIED
    assert accepted


def test_launch_says_when_the_resource_server_is_down(
        staffed: Deployment, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]
    staffed.add_resource("dead", f"127.0.0.1:{dead}", ["staff"], "Dead server")
    gateway = start_process("up", "--dir", str(staffed.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    login(staffed)
    process, host, port = start_launch(start_process, "dead")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.settimeout(10)
        assert sock.recv(10) == b""
    process.wait_for(r"a connection to Dead server failed: the resource's server is not "
                     r"available \(refused\)")


def test_launch_exec_starts_the_application_against_the_listener(
        running: Deployment, client_home: Path) -> None:
    curl = require_program("curl")
    login(running)
    result = run_cli("launch", "web", "--exec",
                     f"{curl} -sS --max-time 20 -o - http://{{host}}:{{port}}/", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "intranet home" in result.stdout


def test_audit_trail_records_launch_bytes_and_duration_and_never_a_full_ticket(
        running: Deployment, gateway: Process, client_home: Path, tmp_path: Path,
        start_process) -> None:  # type: ignore[no-untyped-def]
    launched = launch_via_api(running, "echo")
    launch_file = tmp_path / "echo.portcullis"
    launch_file.write_bytes(launched.content)
    secret = parse_launch_file(launched.content).ticket.split(";")[1]
    process, host, port = start_launch(start_process, "--file", str(launch_file),
                                       "--ca", str(running.ca))
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"x" * 1000)
        received = b""
        while len(received) < 1000:
            received += sock.recv(2000)
    process.stop()
    audit_file = running.directory / "audit.jsonl"
    for _ in range(50):
        events = [json.loads(line) for line in audit_file.read_text().splitlines()]
        ended = [e for e in events if e["event"] == "launch.ended"]
        if ended:
            break
        time.sleep(0.1)
    assert ended, "no launch.ended event"
    assert ended[-1]["bytes_to_server"] == 1000 and ended[-1]["bytes_to_client"] == 1000
    assert ended[-1]["duration"] >= 0 and ended[-1]["user"] == "alice"
    assert secret not in audit_file.read_text()
    assert secret not in gateway.output()


def test_roles_each_in_their_own_process_launch_over_mutual_tls(
        staffed: Deployment, client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    """STA, portal and gateway apart: the gateway forwards the portal over mTLS."""
    portal_port = staffed.port + 1
    staffed.set("gateway", "portal_url", f'"https://127.0.0.1:{portal_port}"')
    sta = start_process("serve", "sta", "--dir", str(staffed.directory), name="sta")
    sta.wait_for(r"sta listening on")
    staffed.set("sta", "id", '"EDGE"')   # the other processes run no STA of their own
    portal = start_process("serve", "portal", "--dir", str(staffed.directory), name="portal")
    portal.wait_for(r"portal listening on")
    edge = start_process("serve", "gateway", "--dir", str(staffed.directory), name="edge")
    edge.wait_for(r"gateway listening on")
    login(staffed)
    _, host, port = start_launch(start_process, "echo")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"three processes")
        assert sock.recv(100) == b"three processes"
    # The portal signed the user in; the STA issued and redeemed the ticket.
    assert "login.succeeded" in portal.output()
    assert "ticket.redeemed" in sta.output()


def test_the_sta_and_the_portal_accept_only_deployment_certificates(
        staffed: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    sta = start_process("serve", "sta", "--dir", str(staffed.directory), name="sta")
    sta.wait_for(r"sta listening on")
    url = f"https://127.0.0.1:{staffed.port + 2}/sta/v1/health"
    anonymous = ssl.create_default_context(cafile=str(staffed.ca))
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=anonymous)
    pki = staffed.directory / "pki"

    def as_role(role: str) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(staffed.ca))
        context.load_cert_chain(pki / f"{role}.crt", pki / f"{role}.key")
        return context

    assert httpx.get(url, verify=as_role("gateway")).json() == {"status": "ok", "sta": "STA01"}
    assert httpx.get(url, verify=as_role("portal")).status_code == 200
    # Signed by the deployment CA, but not a role that may ask for tickets.
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=as_role("sta"))
    audit = (staffed.directory / "audit.jsonl").read_text()
    assert '"event":"tls.role_refused"' in audit and '"common_name":"portcullis-sta"' in audit
