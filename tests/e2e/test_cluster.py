"""Two gateway nodes sharing PostgreSQL (durable) and Redis (ephemeral), as a deployment
grows past one machine: a session made on one node works on the other, a ticket issued
by one node is redeemed by the other, once; a TOTP code is used once across nodes and
lockouts hold on every node."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from conftest import Deployment, free_port_run, run_cli
from peers.stores import POSTGRES_URL, REDIS_URL, answering_redis_url, unavailable
from peers.totp import oathtool_code
from portcullis.proto.launchfile import parse_launch_file

PASSWORD = "correct horse battery staple"


@pytest.fixture
def database() -> Iterator[str]:
    dsn = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    name = f"pc_{secrets.token_hex(6)}"

    async def run(statement: str) -> None:
        connection = await asyncpg.connect(dsn, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    try:
        asyncio.run(run(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    yield dsn.rsplit("/", 1)[0] + "/" + name
    asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def share_stores(deployment: Deployment, database: str) -> None:
    asyncio.run(answering_redis_url())
    prefix = f"pc-cluster-{secrets.token_hex(4)}:"
    deployment.set("store", "durable", f'"{database}"')
    deployment.set("store", "ephemeral", f'"{REDIS_URL}?prefix={prefix}"')


def start_two_nodes(deployment: Deployment, start_process, tmp_path: Path) -> int:  # type: ignore[no-untyped-def]
    """`portcullis up` on the deployment and on a copy of it (same CA, token key and
    stores) on other ports; the copy's gateway port."""
    node_b = tmp_path / "node-b"
    shutil.copytree(deployment.directory, node_b)
    port_b = free_port_run(4)
    config = (node_b / "portcullis.toml").read_text()
    for old, new in ((deployment.port, port_b), (deployment.port + 1, port_b + 1),
                     (deployment.port + 2, port_b + 2), (deployment.port + 3, port_b + 3)):
        config = re.sub(rf"(?<=[:]){old}\b", str(new), config)
    (node_b / "portcullis.toml").write_text(config)
    first = start_process("up", "--dir", str(deployment.directory), name="node-a")
    second = start_process("up", "--dir", str(node_b), name="node-b")
    first.wait_for("Portal: https://")
    second.wait_for("Portal: https://")
    return port_b


def test_two_nodes_share_sessions_and_tickets(
        deployment: Deployment, database: str, echo_server, client_home: Path,
        start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    share_stores(deployment, database)
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    deployment.add_user("alice", PASSWORD, ["staff"])
    port_b = start_two_nodes(deployment, start_process, tmp_path)

    tls = ssl.create_default_context(cafile=str(deployment.ca))
    with httpx.Client(verify=tls, timeout=30) as client:
        signed_in = client.post(f"{deployment.url}/api/v1/login", json={
            "answers": {"username": "alice", "password": PASSWORD}})
        token = signed_in.json()["token"]
        headers = {"authorization": f"Bearer {token}"}
        # The session made on A is valid on B (shared Redis).
        assert client.get(f"https://127.0.0.1:{port_b}/api/v1/resources",
                          headers=headers).status_code == 200
        launched = client.post(f"{deployment.url}/api/v1/resources/echo/launch",
                               headers=headers)
    # The ticket issued on A is redeemed on B.
    launch = parse_launch_file(launched.content)
    text = launched.text.replace(f":{deployment.port}/", f":{port_b}/")
    launch_file = tmp_path / "echo.portcullis"
    launch_file.write_text(text)
    assert launch.ticket in text
    process = start_process("launch", "--file", str(launch_file), "--ca", str(deployment.ca),
                            "--listen", "127.0.0.1:0", name="launch")
    match = process.wait_for(r"listening on ([\d.]+):(\d+)")
    with socket.create_connection((match.group(1), int(match.group(2))), timeout=10) as sock:
        sock.sendall(b"across nodes")
        assert sock.recv(100) == b"across nodes"
    # ...once: the same file is refused by A.
    again = tmp_path / "again.portcullis"
    again.write_text(launched.text)
    refused = run_cli("launch", "--file", str(again), "--ca", str(deployment.ca))
    assert refused.returncode == 1
    assert "already used" in refused.stderr


def test_two_nodes_share_totp_replay_lockout_and_the_admin_tools(
        deployment: Deployment, database: str, start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A TOTP code used on one node is refused on the other; failures on one node lock
    the account on both; `user show` and `user unlock` see the same counters."""
    share_stores(deployment, database)
    deployment.add_user("alice", PASSWORD, ["staff"])
    with deployment.config.open("a") as handle:
        handle.write('\n[auth]\nflow = "mfa"\n[[auth.flows]]\nname = "mfa"\n'
                     '[[auth.flows.steps]]\nprovider = "local"\n'
                     '[[auth.flows.steps]]\nprovider = "totp"\n'
                     '[auth.throttle]\naccount_failures = 3\n')
    port_b = start_two_nodes(deployment, start_process, tmp_path)
    node_a, node_b = deployment.url, f"https://127.0.0.1:{port_b}"
    tls = ssl.create_default_context(cafile=str(deployment.ca))

    def password(client: httpx.Client, node: str, secret: str = PASSWORD) -> dict[str, Any]:
        body: dict[str, Any] = client.post(f"{node}/api/v1/login", json={
            "answers": {"username": "alice", "password": secret}}).json()
        return body

    def answer(client: httpx.Client, node: str, handle: str, code: str) -> str:
        return str(client.post(f"{node}/api/v1/login", json={
            "handle": handle, "answers": {"code": code}}).json()["status"])

    with httpx.Client(verify=tls, timeout=30) as client:
        enrol = password(client, node_a)
        secret = enrol["step"]["enrolment"]["secret"]
        assert answer(client, node_a, enrol["handle"], oathtool_code(secret)) == "authenticated"
        # The next step's code: signed in on A, then refused on B as a replay.
        code = oathtool_code(secret, time.time() + 30)
        first = password(client, node_a)
        assert answer(client, node_a, first["handle"], code) == "authenticated"
        second = password(client, node_b)
        assert answer(client, node_b, second["handle"], code) == "denied"
        # Three wrong passwords on B lock alice on A too.
        for _ in range(3):
            assert password(client, node_b, "wrong")["status"] == "denied"
        assert password(client, node_a)["status"] == "denied"
        shown = run_cli("user", "show", "alice", "--dir", str(deployment.directory))
        assert "LOCKED, 3 recent failure(s)" in shown.stdout
        assert "enrolled" in shown.stdout and "10 recovery codes left" in shown.stdout
        unlocked = run_cli("user", "unlock", "alice", "--dir", str(deployment.directory))
        assert unlocked.returncode == 0, unlocked.stderr
        assert password(client, node_b)["status"] == "continue"   # on to the TOTP step
