"""Hostile and broken input at the edge: every answer is a 4xx without a traceback,
and a broken configuration stops the program with status 2 and the key's name."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import httpx
import pytest

from conftest import Deployment, Process, run_cli


def raw_request(deployment: Deployment, request: bytes) -> bytes:
    context = ssl.create_default_context(cafile=str(deployment.ca))
    with socket.create_connection(("127.0.0.1", deployment.port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="localhost") as tls:
        tls.sendall(request)
        chunks = []
        while True:
            try:
                data = tls.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.fixture
def client(deployment: Deployment, gateway: Process) -> httpx.Client:
    tls = ssl.create_default_context(cafile=str(deployment.ca))
    with httpx.Client(base_url=deployment.url, verify=tls, timeout=10) as client:
        yield client


def test_oversized_headers_are_refused(deployment: Deployment, gateway: Process) -> None:
    response = raw_request(deployment, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: "
                           + b"a" * 64 * 1024 + b"\r\n\r\n")
    assert 400 <= status_of(response) < 500
    assert b"Traceback" not in response


@pytest.mark.parametrize("path", [b"/static/../portcullis.toml", b"/static/%2e%2e/x",
                                  b"/api/v1/../v1/resources", b"/static/..%2fsecrets"])
def test_dot_segments_in_paths_are_refused(deployment: Deployment, gateway: Process,
                                           path: bytes) -> None:
    response = raw_request(deployment, b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
                           b"Connection: close\r\n\r\n")
    assert status_of(response) == 400
    assert b"token.key" not in response and b"[gateway]" not in response


def test_bad_json_is_a_400(client: httpx.Client) -> None:
    for body in (b"{not json", b"[1, 2]", b'"a string"'):
        response = client.post("/api/v1/login", content=body,
                               headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert "Traceback" not in response.text


def test_wrong_answer_types_are_a_400(client: httpx.Client) -> None:
    response = client.post("/api/v1/login", json={"answers": {"username": ["a"]}})
    assert response.status_code == 400


@pytest.mark.parametrize(("method", "path"), [("DELETE", "/api/v1/login"),
                                              ("PUT", "/api/v1/resources"),
                                              ("GET", "/api/v1/resources/x/launch")])
def test_wrong_methods_are_a_405(client: httpx.Client, method: str, path: str) -> None:
    assert client.request(method, path).status_code == 405


def test_oversized_body_is_a_413(client: httpx.Client) -> None:
    response = client.post("/api/v1/login", content=b"{" + b" " * 200_000 + b"}",
                           headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_api_without_a_session_is_a_401(client: httpx.Client) -> None:
    assert client.get("/api/v1/resources").status_code == 401
    assert client.get("/api/v1/resources",
                      headers={"authorization": "Bearer forged"}).status_code == 401
    assert client.post("/api/v1/resources/intranet/launch").status_code == 401


def test_security_headers_are_on_every_answer(client: httpx.Client) -> None:
    for response in (client.get("/login"), client.get("/api/v1/health"),
                     client.get("/nowhere")):
        assert "max-age=" in response.headers["strict-transport-security"]
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        # Pages may show secrets (a TOTP enrolment): never kept by a browser or proxy.
        assert response.headers["cache-control"] == "no-store"
    assert "no-store" not in client.get("/static/portal.css").headers.get("cache-control", "")


def test_health_reports_the_stores(client: httpx.Client) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"durable": "ok", "ephemeral": "ok"}}


def test_garbage_on_the_launch_websocket_ends_only_that_connection(
        deployment: Deployment, gateway: Process, client: httpx.Client) -> None:
    import asyncio

    import websockets

    async def send_garbage() -> None:
        context = ssl.create_default_context(cafile=str(deployment.ca))
        async with websockets.connect(f"wss://localhost:{deployment.port}/api/v1/launch",
                                      ssl=context) as ws:
            await ws.send(b"\xff" * 64)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(send_garbage())
    assert client.get("/api/v1/health").status_code == 200


def test_broken_config_exits_2_naming_the_key(deployment: Deployment) -> None:
    deployment.set("sta", "ticket_lifetime", '"soon"')
    result = run_cli("up", "--dir", str(deployment.directory))
    assert result.returncode == 2
    assert "sta.ticket_lifetime" in result.stderr
    assert "portcullis.toml:" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_exits_2_naming_it(deployment: Deployment) -> None:
    deployment.set("gateway", "lisen", '"127.0.0.1:1"')
    result = run_cli("up", "--dir", str(deployment.directory))
    assert result.returncode == 2
    assert "gateway.lisen" in result.stderr and "unknown setting" in result.stderr


def test_missing_config_exits_2_and_says_how_to_create_one(tmp_path: Path) -> None:
    result = run_cli("up", "--dir", str(tmp_path / "nothing"))
    assert result.returncode == 2
    assert "portcullis init" in result.stderr


def test_init_refuses_to_overwrite_a_deployment(deployment: Deployment) -> None:
    result = run_cli("init", "--dir", str(deployment.directory))
    assert result.returncode == 2
    assert "already exists" in result.stderr


def test_form_posts_without_the_csrf_token_are_refused(deployment: Deployment,
                                                      client: httpx.Client) -> None:
    token = client.post("/api/v1/login", json={
        "answers": {"username": "admin", "password": deployment.admin_password}}).json()["token"]
    client.cookies.set("__Host-portcullis-session", token)
    forged = client.post("/launch/intranet", data={"csrf": "guess"})
    missing = client.post("/launch/intranet", data={})
    assert forged.status_code == missing.status_code == 403
    page = client.get("/")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    genuine = client.post("/launch/intranet", data={"csrf": csrf})
    assert genuine.status_code == 200
    assert 'href="portcullis://launch/?' in genuine.text   # the launch page
    audit = (deployment.directory / "audit.jsonl").read_text()
    assert audit.count('"event":"csrf.rejected"') == 2


def test_unknown_and_forbidden_resources_look_the_same(deployment: Deployment,
                                                       client: httpx.Client) -> None:
    token = client.post("/api/v1/login", json={
        "answers": {"username": "admin", "password": deployment.admin_password}}).json()["token"]
    headers = {"authorization": f"Bearer {token}"}
    unknown = client.post("/api/v1/resources/no-such-thing/launch", headers=headers)
    assert unknown.status_code == 403 and unknown.json() == {"error": "denied"}


def test_api_posts_signed_in_by_cookie_need_a_json_content_type(
        deployment: Deployment, client: httpx.Client) -> None:
    token = client.post("/api/v1/login", json={
        "answers": {"username": "admin", "password": deployment.admin_password}}).json()["token"]
    client.cookies.set("__Host-portcullis-session", token)
    # What a cross-site form could send: refused.
    assert client.post("/api/v1/resources/intranet/launch",
                       data={"x": "1"}).status_code == 403
    assert client.post("/api/v1/logout", data={}).status_code == 403
    # What the portal's own scripts send: accepted.
    assert client.post("/api/v1/resources/intranet/launch", json={}).status_code == 200


def test_sign_out_form_without_the_csrf_token_keeps_the_session(
        deployment: Deployment, client: httpx.Client) -> None:
    token = client.post("/api/v1/login", json={
        "answers": {"username": "admin", "password": deployment.admin_password}}).json()["token"]
    client.cookies.set("__Host-portcullis-session", token)
    assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert client.get("/api/v1/session").status_code == 200


def test_a_taken_port_exits_2_naming_the_listener(deployment: Deployment) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", deployment.port + 2))
        taken.listen()
        result = run_cli("up", "--dir", str(deployment.directory))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{deployment.port + 2} for the sta role" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_redis_stops_startup_with_the_address(deployment: Deployment) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    deployment.set("store", "ephemeral", f'"redis://127.0.0.1:{port}/0"')
    result = run_cli("up", "--dir", str(deployment.directory))
    assert result.returncode == 1
    assert f"cannot reach Redis at 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_oversized_chunked_body_is_a_413(deployment: Deployment, gateway: Process) -> None:
    chunk = b"a" * 100_000
    request = (b"POST /api/v1/login HTTP/1.1\r\nHost: localhost\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n"
               + b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n")
    response = raw_request(deployment, request)
    assert status_of(response) == 413
    assert b"Traceback" not in response


def test_a_json_lookalike_content_type_does_not_pass_the_api_csrf_rule(
        deployment: Deployment, client: httpx.Client) -> None:
    token = client.post("/api/v1/login", json={
        "answers": {"username": "admin", "password": deployment.admin_password}}).json()["token"]
    client.cookies.set("__Host-portcullis-session", token)
    sneaky = client.post("/api/v1/resources/intranet/launch", content=b"{}",
                         headers={"content-type": "text/plain; x=application/json"})
    assert sneaky.status_code == 403
