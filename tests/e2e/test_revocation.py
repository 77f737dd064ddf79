"""Every way a sign-in session ends ends its connections within a second, on every node.

Two nodes share PostgreSQL and Redis (as in test_cluster). Alice's tunnel (`portcullis
connect -L`) and launch (`portcullis launch`) run through node B and carry traffic; the
session ends on node A (sign-out, admin kill) or from the CLI (password change, disable),
which reaches node B only through the shared store. Both local sockets must see the close
within 1 s of the event, both clients say why, a ticket issued before is refused and the
token no longer works.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import PORTCULLIS, Deployment, run_cli
from e2e.test_cluster import database, share_stores, start_two_nodes  # noqa: F401

PASSWORD = "correct horse battery staple"
BOUND = 1.0
POLICY = """
[[policies]]
name = "staff-loopback"
action = "allow"
groups = ["staff"]
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
protocols = ["tcp"]
"""


class Traffic(threading.Thread):
    """Ping-pong 1 KiB through a local socket until the far side closes it; when it did."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection((host, port), timeout=10)
        self.rounds = 0
        self.flowing = threading.Event()
        self.closed_at: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline:
                self.sock.sendall(b"x" * 1024)
                got = 0
                while got < 1024:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        raise EOFError
                    got += len(chunk)
                self.rounds += 1
                if self.rounds >= 5:
                    self.flowing.set()
                time.sleep(0.005)
        except (OSError, EOFError):
            pass
        self.closed_at = time.monotonic()
        self.sock.close()


@dataclass
class Cluster:
    deployment: Deployment
    node_a: str
    node_b: str
    tls: ssl.SSLContext
    echo: str


@pytest.fixture
def cluster(deployment: Deployment, database: str, echo_server, start_process,  # noqa: F811
            tmp_path: Path) -> Cluster:  # type: ignore[no-untyped-def]
    share_stores(deployment, database)
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    with deployment.config.open("a") as handle:
        handle.write(POLICY)
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("root", PASSWORD, ["admins"])
    port_b = start_two_nodes(deployment, start_process, tmp_path)
    return Cluster(deployment, deployment.url, f"https://127.0.0.1:{port_b}",
                   ssl.create_default_context(cafile=str(deployment.ca)), echo_server.address)


def sign_in(cluster: Cluster, node: str, user: str) -> str:
    with httpx.Client(verify=cluster.tls, timeout=30) as client:
        body = client.post(f"{node}/api/v1/login", json={
            "answers": {"username": user, "password": PASSWORD}}).json()
    assert body["status"] == "authenticated", body
    return str(body["token"])


def launch_file(cluster: Cluster, token: str, path: Path) -> Path:
    with httpx.Client(verify=cluster.tls, timeout=30) as client:
        response = client.post(f"{cluster.node_b}/api/v1/resources/echo/launch",
                               headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    path.write_text(response.text)
    return path


def cli_reports(args: list[str], line: str, stdin: str = "") -> tuple[float, subprocess.Popen[str]]:
    """Run the CLI; the moment it reports `line` (the durable change is made then)."""
    process = subprocess.Popen([PORTCULLIS, *args], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(stdin)
    process.stdin.close()
    output = process.stdout.readline()
    at = time.monotonic()
    assert line in output, (output, process.stderr.read() if process.stderr else "")
    return at, process


ENDINGS = {"sign-out": "signed out", "password change": "password changed",
           "disable": "account disabled", "admin kill": "ended by an administrator"}


@pytest.mark.parametrize("how", list(ENDINGS))
def test_an_ending_on_one_node_ends_the_tunnel_and_launch_on_the_other_within_a_second(
        how: str, cluster: Cluster, start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "alice"
    env = {"PORTCULLIS_HOME": str(home)}
    signed_in = run_cli("login", cluster.node_b, "--user", "alice", "--password-stdin",
                        "--ca", str(cluster.deployment.ca), input=PASSWORD + "\n", env=env)
    assert signed_in.returncode == 0, signed_in.stderr
    token = json.loads((home / "session.json").read_text())["token"]
    connect = start_process("connect", "--socks", "off", "--http", "off", "-L",
                            f"127.0.0.1:0:{cluster.echo}", name="connect", env=env)
    forward = connect.wait_for(r"forward to [^:]+:\d+: listening on ([\d.]+):(\d+)")
    launch = start_process("launch", "--file", str(launch_file(cluster, token,
                                                               tmp_path / "echo.portcullis")),
                           "--ca", str(cluster.deployment.ca), "--listen", "127.0.0.1:0",
                           name="launch", env=env)
    launched = launch.wait_for(r"listening on ([\d.]+):(\d+)")
    unused_ticket = launch_file(cluster, token, tmp_path / "later.portcullis")

    flows = [Traffic(forward.group(1), int(forward.group(2))),
             Traffic(launched.group(1), int(launched.group(2)))]
    for flow in flows:
        flow.start()
    for flow in flows:
        assert flow.flowing.wait(10), "no traffic through the tunnel or the launch"

    directory = str(cluster.deployment.directory)
    if how == "sign-out":
        event_at = time.monotonic()
        answer = httpx.post(f"{cluster.node_a}/api/v1/logout", verify=cluster.tls,
                            headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 200
    elif how == "admin kill":
        admin = sign_in(cluster, cluster.node_a, "root")
        event_at = time.monotonic()
        answer = httpx.delete(f"{cluster.node_a}/api/v1/admin/sessions", verify=cluster.tls,
                              params={"user": "alice"},
                              headers={"authorization": f"Bearer {admin}"})
        assert answer.status_code == 200 and answer.json()["revoked"] >= 1, answer.text
    elif how == "password change":
        event_at, cli = cli_reports(["user", "passwd", "alice", "--dir", directory,
                                     "--password-stdin"], "password changed for alice",
                                    "a new password entirely\n")
        assert cli.wait(30) == 0
    else:
        event_at, cli = cli_reports(["user", "disable", "alice", "--dir", directory],
                                    "disabled alice")
        assert cli.wait(30) == 0

    for flow in flows:
        flow.join(15)
    tunnel_s, launch_s = (flow.closed_at - event_at for flow in flows)  # type: ignore[operator]
    print(f"\n{how}: tunnel closed after {tunnel_s * 1000:.0f} ms, "
          f"launch after {launch_s * 1000:.0f} ms (event on the other node)")
    assert tunnel_s < BOUND and launch_s < BOUND

    why = ENDINGS[how]
    assert connect.popen.wait(15) == 1 and why in connect.output()
    assert launch.popen.wait(15) == 1 and why in launch.output()
    # The ticket issued before the ending is refused on node B, and says so in the audit.
    refused = run_cli("launch", "--file", str(unused_ticket), "--ca",
                      str(cluster.deployment.ca), env=env)
    assert refused.returncode == 1 and "refused the launch" in refused.stderr
    audit_b = (tmp_path / "node-b" / "audit.jsonl").read_text().splitlines()
    # (A disabled account is refused before its session is looked at.)
    assert any('"launch.refused"' in line and ("has ended" in line or "disabled" in line)
               for line in audit_b)
    # The token opens nothing any more, on either node.
    for node in (cluster.node_a, cluster.node_b):
        assert httpx.get(f"{node}/api/v1/resources", verify=cluster.tls,
                         headers={"authorization": f"Bearer {token}"}).status_code == 401


def test_ending_only_the_connections_keeps_the_session_and_its_tickets(
        cluster: Cluster, start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "alice"
    env = {"PORTCULLIS_HOME": str(home)}
    token = sign_in(cluster, cluster.node_b, "alice")
    launch = start_process("launch", "--file", str(launch_file(cluster, token,
                                                               tmp_path / "echo.portcullis")),
                           "--ca", str(cluster.deployment.ca), "--listen", "127.0.0.1:0",
                           name="launch", env=env)
    launched = launch.wait_for(r"listening on ([\d.]+):(\d+)")
    flow = Traffic(launched.group(1), int(launched.group(2)))
    flow.start()
    assert flow.flowing.wait(10)
    admin = sign_in(cluster, cluster.node_a, "root")
    answer = httpx.delete(f"{cluster.node_a}/api/v1/admin/sessions", verify=cluster.tls,
                          params={"user": "alice", "scope": "connections"},
                          headers={"authorization": f"Bearer {admin}"})
    assert answer.status_code == 200 and answer.json()["revoked"] == 0
    flow.join(15)
    assert launch.popen.wait(15) == 1
    assert "your session is still valid" in launch.output()
    # The session goes on: it still lists resources and gets a ticket that works.
    again = start_process("launch", "--file", str(launch_file(cluster, token,
                                                              tmp_path / "again.portcullis")),
                          "--ca", str(cluster.deployment.ca), "--listen", "127.0.0.1:0",
                          name="launch-again", env=env)
    relaunched = again.wait_for(r"listening on ([\d.]+):(\d+)")
    with socket.create_connection((relaunched.group(1), int(relaunched.group(2))),
                                  timeout=10) as sock:
        sock.sendall(b"still signed in")
        assert sock.recv(100) == b"still signed in"


def test_a_launch_through_an_sta_in_its_own_process_remembers_its_session_and_ends_with_it(
        deployment: Deployment, echo_server, start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import secrets

    from peers.stores import REDIS_URL, answering_redis_url

    asyncio.run(answering_redis_url())
    deployment.set("store", "ephemeral",
                   f'"{REDIS_URL}?prefix=pc-revocation-{secrets.token_hex(4)}:"')
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    deployment.add_user("alice", PASSWORD, ["staff"])
    start_process("serve", "sta", "--dir", str(deployment.directory),
                  name="sta").wait_for(r"sta listening on")
    start_process("serve", "gateway", "portal", "--dir", str(deployment.directory),
                  name="edge").wait_for(r"Portal: https://")
    cluster = Cluster(deployment, deployment.url, deployment.url,
                      ssl.create_default_context(cafile=str(deployment.ca)), echo_server.address)
    token = sign_in(cluster, deployment.url, "alice")
    launch = start_process("launch", "--file", str(launch_file(cluster, token,
                                                               tmp_path / "echo.portcullis")),
                           "--ca", str(deployment.ca), "--listen", "127.0.0.1:0",
                           name="launch", env={"PORTCULLIS_HOME": str(tmp_path / "alice")})
    launched = launch.wait_for(r"listening on ([\d.]+):(\d+)")
    flow = Traffic(launched.group(1), int(launched.group(2)))
    flow.start()
    assert flow.flowing.wait(10)
    event_at = time.monotonic()
    httpx.post(f"{deployment.url}/api/v1/logout", verify=cluster.tls,
               headers={"authorization": f"Bearer {token}"})
    flow.join(15)
    assert flow.closed_at is not None and flow.closed_at - event_at < BOUND
    assert launch.popen.wait(15) == 1 and "signed out" in launch.output()
