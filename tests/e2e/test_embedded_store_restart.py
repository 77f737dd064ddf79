"""The default ephemeral store, end to end: `portcullis up` on a fresh deployment keeps
sessions, lockouts and tickets in sqlite:///ephemeral.db, so a restart keeps them, and the
CLI (another process) reads and clears a lockout of the running gateway."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx

from conftest import Deployment, Process, run_cli
from e2e.test_launch import PASSWORD, api, api_login, launch_via_api, login, start_launch
from peers.servers import EchoServer
from portcullis.config.loader import config_path, load_settings

StartProcess = Callable[..., Process]   # the conftest fixture: start_process("up", ...)

LOCK_AFTER = 2


def start_up(deployment: Deployment, start_process: StartProcess) -> Process:
    process = start_process("up", "--dir", str(deployment.directory), name="up")
    process.wait_for(r"Portal: https://")
    return process


def sign_in_status(client: httpx.Client, user: str, password: str) -> int:
    return client.post("/api/v1/login", json={
        "answers": {"username": user, "password": password}}).status_code


def failure_reasons(deployment: Deployment) -> list[str]:
    events = [json.loads(line) for line in
              (deployment.directory / "audit.jsonl").read_text().splitlines()]
    return [e.get("reason") for e in events if e["event"] == "login.failed"]


def test_a_session_a_lockout_and_a_ticket_survive_a_restart_and_the_cli_unlocks(
        deployment: Deployment, echo_server: EchoServer, client_home: Path, tmp_path: Path,
        start_process: StartProcess) -> None:
    settings = load_settings(config_path(deployment.directory))
    assert settings.store.ephemeral == "sqlite:///ephemeral.db"   # what `init` writes
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("bob", PASSWORD, ["staff"])
    with deployment.config.open("a") as handle:
        handle.write(f"\n[auth.throttle]\naccount_failures = {LOCK_AFTER}\n"
                     "failure_floor = 0\n")
    first = start_up(deployment, start_process)
    with api(deployment) as client:
        token = api_login(client, "alice", PASSWORD)
        for _ in range(LOCK_AFTER):
            assert sign_in_status(client, "bob", "wrong") == 401
    launch_file = tmp_path / "echo.portcullis"
    launch_file.write_bytes(launch_via_api(deployment, "echo").content)   # not redeemed yet
    assert (deployment.directory / "ephemeral.db").exists()
    assert first.stop() == 0

    start_up(deployment, start_process)
    with api(deployment) as client:
        # The session signed in before the restart still works.
        listed = client.get("/api/v1/resources", headers={"authorization": f"Bearer {token}"})
        assert listed.status_code == 200, listed.text
        assert "echo" in [r["name"] for r in listed.json()["resources"]]
        # The lockout still holds: the right password is refused as a locked account.
        assert sign_in_status(client, "bob", PASSWORD) == 401
        assert failure_reasons(deployment)[-1] == "account locked"
    # The ticket issued before the restart is still redeemable (once).
    _launch, host, port = start_launch(start_process, "--file", str(launch_file),
                                       "--ca", str(deployment.ca))
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"

    # The CLI sees the running gateway's lockout, and clears it.
    shown = run_cli("user", "show", "bob", "--dir", str(deployment.directory))
    assert "lockout: LOCKED" in shown.stdout, shown.stdout + shown.stderr
    unlocked = run_cli("user", "unlock", "bob", "--dir", str(deployment.directory))
    assert unlocked.returncode == 0, unlocked.stderr
    assert "unlocked local:bob" in unlocked.stdout
    with api(deployment) as client:
        assert sign_in_status(client, "bob", PASSWORD) == 200


def test_the_cli_disabling_a_user_publishes_the_ending_beside_the_running_gateway(
        deployment: Deployment, echo_server: EchoServer, client_home: Path,
        start_process: StartProcess) -> None:
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    deployment.add_user("alice", PASSWORD, ["staff"])
    start_up(deployment, start_process)
    login(deployment)
    launch, host, port = start_launch(start_process, "echo")
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"before")
        assert sock.recv(10) == b"before"
        disabled = run_cli("user", "disable", "alice", "--dir", str(deployment.directory))
        assert disabled.returncode == 0, disabled.stderr
        assert "warning" not in disabled.stderr
        sock.settimeout(15)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""
    assert launch.popen.wait(15) == 1
    assert "account disabled" in launch.output()
    # The ending went through the file the gateway's processes listen on (the gateway
    # also sees a disabled account within the account-status cache's second).
    db = sqlite3.connect(deployment.directory / "ephemeral.db")
    try:
        published = [json.loads(message) for channel, message
                     in db.execute("SELECT channel, message FROM events")
                     if channel == "session-ended"]
    finally:
        db.close()
    assert [(event["ending"], event["user"]) for event in published] == [
        ("account disabled", "alice")]
