"""The seed login flows end to end: a real `portcullis up`, the JSON API over TLS (with and
without a client certificate from the deployment CA) and the `portcullis login` CLI, with
slapd, FreeRADIUS and oathtool as the real peers (and `portcullis serve relay` for
RADIUS through the relay that `[dialer]` names)."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import PORTCULLIS, Deployment, Process, run_cli
from peers.ldap import PASSWORDS as LDAP_PASSWORDS
from peers.ldap import Slapd
from peers.radius import ALICE_PASSWORD as RADIUS_PASSWORD
from peers.radius import FreeRadius, configure_radius_flow, relay_audit, start_relay_to
from peers.totp import oathtool_code

pytestmark = pytest.mark.peer
PASSWORD = "local-pass-1"


def configure(deployment: Deployment, auth_toml: str) -> None:
    with deployment.config.open("a") as handle:
        handle.write("\n" + auth_toml)


def tls(deployment: Deployment, certificate: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(deployment.ca))
    if certificate is not None:
        context.load_cert_chain(*certificate)
    return context


def client_certificate(deployment: Deployment, name: str) -> tuple[Path, Path]:
    out = deployment.directory / "clients"
    result = run_cli("cert", "issue", name, "--out", str(out), "--dir", str(deployment.directory))
    assert result.returncode == 0, result.stderr
    return out / f"{name}.crt", out / f"{name}.key"


class ApiLogin:
    """Drives POST /api/v1/login step by step, answering from a dict per step kind."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.steps: list[dict[str, Any]] = []

    def run(self, answer: Any) -> dict[str, Any]:
        body = self.client.post("/api/v1/login", json={}).json()
        for _ in range(8):
            if body.get("status") != "continue":
                return dict(body)
            self.steps.append(body["step"])
            answers = {prompt["name"]: answer(body["step"], prompt["name"])
                       for prompt in body["step"]["prompts"]}
            body = self.client.post("/api/v1/login", json={"handle": body["handle"],
                                                           "answers": answers}).json()
        raise AssertionError("too many steps")


def api_client(deployment: Deployment, certificate: tuple[Path, Path] | None = None
               ) -> httpx.Client:
    return httpx.Client(base_url=deployment.url, verify=tls(deployment, certificate),
                        timeout=20)


def audit_events(deployment: Deployment) -> list[dict[str, Any]]:
    path = deployment.directory / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def up(deployment: Deployment, start_process) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    def start() -> Process:
        process = start_process("up", "--dir", str(deployment.directory), name="up")
        process.wait_for(r"Portal: https://")
        return process

    yield start


# -- "a company device with a valid certificate needs only the password; any other
#     device must also pass TOTP (first), then the password" -------------------------------
DEVICE_FLOW = """
[auth]
flow = "device"
client_ca = "pki/ca.crt"

[[auth.flows]]
name = "device"
[[auth.flows.steps]]
provider = "totp"
when = { not = { certificate = "valid" } }
[[auth.flows.steps]]
provider = "local"
"""


def test_certificate_flow_over_the_api_with_and_without_a_certificate(
        deployment: Deployment, up: Any) -> None:
    configure(deployment, DEVICE_FLOW)
    deployment.add_user("alice", PASSWORD, ["staff"])
    device = client_certificate(deployment, "laptop-0042")
    up()
    enrolled: dict[str, str] = {}

    def answer(step: dict[str, Any], name: str) -> str:
        if name == "username":
            return "alice"
        if name == "password":
            return PASSWORD
        if step["kind"] == "totp-enrol":
            enrolled["secret"] = step["enrolment"]["secret"]
            assert step["enrolment"]["otpauth_uri"].startswith("otpauth://totp/")
            assert step["enrolment"]["qr_svg"].startswith("data:image/svg+xml")
            return oathtool_code(enrolled["secret"])
        return oathtool_code(enrolled["secret"]) if enrolled else "000000"

    # No certificate, not yet enrolled: TOTP step, then password, then enrolment.
    with api_client(deployment) as client:
        login = ApiLogin(client)
        result = login.run(answer)
    assert result["status"] == "authenticated", result
    assert [step["kind"] for step in login.steps] == ["totp", "password", "totp-enrol"]
    # With the company device's certificate: the password only.
    with api_client(deployment, device) as client:
        login = ApiLogin(client)
        result = login.run(answer)
        bearer = {"authorization": f"Bearer {result['token']}"}
        claims = client.get("/api/v1/session", headers=bearer).json()["claims"]
        # Signed in without the app: it may not be replaced from this session.
        replace = client.post("/api/v1/account/authenticator", json={}, headers=bearer)
    assert result["status"] == "authenticated"
    assert [step["kind"] for step in login.steps] == ["password"]
    assert claims["amr"] == ["local"]
    assert replace.status_code == 403 and "authenticator app first" in replace.json()["error"]
    # Without it again: a code is needed now (enrolled), and a wrong one fails at the end.
    with api_client(deployment) as client:
        login = ApiLogin(client)
        wrong = login.run(lambda step, name: {"username": "alice", "password": PASSWORD}.get(
            name, "123456"))
    assert wrong == {"status": "denied", "error": "denied"}
    assert [step["kind"] for step in login.steps] == ["totp", "password"]
    failures = [e for e in audit_events(deployment) if e["event"] == "login.failed"]
    assert failures and failures[-1]["reason"].startswith("totp: wrong code")


def test_certificate_flow_with_the_cli(deployment: Deployment, up: Any, tmp_path: Path) -> None:
    configure(deployment, DEVICE_FLOW)
    deployment.add_user("alice", PASSWORD, ["staff"])
    device = client_certificate(deployment, "laptop-0042")
    up()
    env = {**os.environ, "PORTCULLIS_HOME": str(tmp_path / "home")}
    base = [PORTCULLIS, "login", deployment.url, "--user", "alice", "--ca", str(deployment.ca),
            "--password-stdin"]
    # First sign-in without the certificate: the CLI shows the enrolment and asks for the
    # code the app (oathtool) shows; stdin answers the TOTP code, the password, the code.
    process = subprocess.Popen(base, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    assert process.stdin and process.stderr
    process.stdin.write("000000\n" + PASSWORD + "\n")
    process.stdin.flush()
    seen = ""
    while "URI: " not in seen:
        line = process.stderr.readline()
        assert line, f"no enrolment shown: {seen}"
        seen += line
    secret = re.search(r"Key: (\S+)", seen)
    assert secret
    assert "URI: otpauth://totp/Portcullis:alice?secret=" in seen
    process.stdin.write(oathtool_code(secret.group(1)) + "\n")
    process.stdin.close()
    assert process.wait(30) == 0, process.stderr.read()
    assert process.stdout and "signed in as alice" in process.stdout.read()
    # With the certificate: the password alone.
    with_cert = subprocess.run([*base, "--cert", str(device[0]), "--key", str(device[1])],
                               input=PASSWORD + "\n", capture_output=True, text=True, env=env,
                               timeout=30)
    assert with_cert.returncode == 0, with_cert.stderr
    assert "signed in as alice" in with_cert.stdout
    # Without it and without a code: denied, with a message that gives nothing away.
    denied = subprocess.run(base, input="999999\n" + PASSWORD + "\n", capture_output=True,
                            text=True, env=env, timeout=30)
    assert denied.returncode == 1 and "sign-in failed" in denied.stderr


def test_a_certificate_from_another_ca_is_refused_at_the_handshake(
        deployment: Deployment, up: Any, tmp_path: Path) -> None:
    from portcullis.pki import create_ca, issue_certificate, write_pair

    configure(deployment, DEVICE_FLOW)
    up()
    stranger = issue_certificate(create_ca("Elsewhere CA"), "alice", server=False)
    pair = write_pair(tmp_path / "stranger", "alice", stranger)
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)), \
            api_client(deployment, pair) as client:
        client.post("/api/v1/login", json={})


# -- "RADIUS, then LDAP" -------------------------------------------------------------------
def directory_providers(deployment: Deployment, slapd: Slapd, radius: FreeRadius) -> str:
    secrets = deployment.directory / "secrets"
    (secrets / "ldap-bind").write_text(slapd.bind_password + "\n")
    (secrets / "radius").write_text(radius.secret.decode() + "\n")
    return "\n".join(["", slapd.provider_toml("corp", "secrets/ldap-bind",
                                              required_attributes=["mail"]),
                      radius.provider_toml("otp-radius", "secrets/radius", timeout=2)])


def test_radius_then_ldap_over_the_api_and_the_cli(
        deployment: Deployment, up: Any, slapd: Slapd, freeradius: FreeRadius,
        tmp_path: Path) -> None:
    configure(deployment, """
[auth]
flow = "radius-ldap"
""" + directory_providers(deployment, slapd, freeradius) + """
[[auth.flows]]
name = "radius-ldap"
realm = "corp"
[[auth.flows.steps]]
provider = "otp-radius"
[[auth.flows.steps]]
provider = "corp"
""")
    up()
    passwords = iter([RADIUS_PASSWORD, LDAP_PASSWORDS["alice"]])
    with api_client(deployment) as client:
        login = ApiLogin(client)
        result = login.run(lambda step, name: "alice" if name == "username" else next(passwords))
        assert result["status"] == "authenticated", result
        claims = client.get("/api/v1/session", headers={
            "authorization": f"Bearer {result['token']}"}).json()["claims"]
    # The LDAP step knew the user and asked only for the password.
    assert [[p["name"] for p in s["prompts"]] for s in login.steps] == [
        ["username", "password"], ["password"]]
    assert claims["sub"] == "corp:alice" and claims["amr"] == ["otp-radius", "corp"]
    assert claims["email"] == "alice@corp.example" and "finance" in claims["groups"]
    cli = subprocess.run(
        [PORTCULLIS, "login", deployment.url, "--user", "alice", "--ca", str(deployment.ca),
         "--password-stdin"], input=f"{RADIUS_PASSWORD}\n{LDAP_PASSWORDS['alice']}\n",
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "PORTCULLIS_HOME": str(tmp_path / "home")})
    assert cli.returncode == 0, cli.stderr
    assert "signed in as alice" in cli.stdout and "finance" in cli.stdout
    # The LDAP password at the RADIUS step: refused by RADIUS; no LDAP step follows.
    with api_client(deployment) as client:
        login = ApiLogin(client)
        denied = login.run(lambda step, name: "alice" if name == "username"
                           else LDAP_PASSWORDS["alice"])
    assert denied["status"] == "denied" and len(login.steps) == 1


# -- "members of Finance must also pass TOTP" ------------------------------------------------
def test_the_gateway_asks_radius_through_the_relay_its_dialer_names(
        deployment: Deployment, up: Any, freeradius: FreeRadius, start_process) -> None:  # type: ignore[no-untyped-def]
    relay = start_relay_to(freeradius, deployment, start_process)
    configure_radius_flow(deployment, freeradius, f'via = "relay"\nrelay = "{relay}"\n')
    up()
    with api_client(deployment) as client:
        result = ApiLogin(client).run(
            lambda step, name: "alice" if name == "username" else RADIUS_PASSWORD)
    assert result["status"] == "authenticated", result
    # The packets left from the relay: it audits the UDP flow to FreeRADIUS.
    relay_audit(deployment, "relay.stream", f"{freeradius.endpoint}/udp")


def test_finance_needs_totp_over_the_api_and_the_cli(
        deployment: Deployment, up: Any, slapd: Slapd, freeradius: FreeRadius,
        tmp_path: Path) -> None:
    configure(deployment, """
[auth]
flow = "finance"
""" + directory_providers(deployment, slapd, freeradius) + """
[[auth.flows]]
name = "finance"
[[auth.flows.steps]]
provider = "corp"
[[auth.flows.steps]]
provider = "totp"
when = { groups = ["Finance"] }
""")
    up()
    enrolment: dict[str, str] = {}

    def answer(step: dict[str, Any], name: str) -> str:
        if name == "username":
            return "alice@corp.example"           # signs in by mail; the name is "alice"
        if name == "password":
            return LDAP_PASSWORDS["alice"]
        if step["kind"] == "totp-enrol":
            enrolment["secret"] = step["enrolment"]["secret"]
            enrolment["recovery_codes"] = " ".join(step["enrolment"]["recovery_codes"])
        return oathtool_code(enrolment["secret"])

    with api_client(deployment) as client:
        login = ApiLogin(client)
        assert login.run(answer)["status"] == "authenticated"
    assert [step["kind"] for step in login.steps] == ["password", "totp-enrol"]
    # bob is not in Finance: the password only.
    with api_client(deployment) as client:
        login = ApiLogin(client)
        result = login.run(lambda step, name: "bob" if name == "username"
                           else LDAP_PASSWORDS["bob"])
    assert result["status"] == "authenticated" and len(login.steps) == 1
    # alice with the CLI: enrolled now, so the password and then a code; a recovery code
    # from the enrolment stands in for the app (a fresh TOTP code could fall in the step
    # just used, which is refused as a replay).
    env = {**os.environ, "PORTCULLIS_HOME": str(tmp_path / "home")}
    recovery = enrolment["recovery_codes"].split()[0]
    command = [PORTCULLIS, "login", deployment.url, "--user", "ALICE", "--ca",
               str(deployment.ca), "--password-stdin", "--answer", f"code={recovery}"]
    cli = subprocess.run(command, input=LDAP_PASSWORDS["alice"] + "\n", capture_output=True,
                         text=True, timeout=30, env=env)
    assert cli.returncode == 0, cli.stderr
    assert "signed in as alice" in cli.stdout
    again = subprocess.run(command, input=LDAP_PASSWORDS["alice"] + "\n", capture_output=True,
                           text=True, timeout=30, env=env)
    assert again.returncode == 1                  # each recovery code works once


# -- brute force ---------------------------------------------------------------------------
def test_fifty_wrong_passwords_lock_the_account_and_are_audited(
        deployment: Deployment, up: Any) -> None:
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("bob", PASSWORD, ["staff"])
    configure(deployment, """
[auth.throttle]
account_failures = 5
lockout_seconds = 600
address_failures = 1000
""")
    up()
    with api_client(deployment) as client:
        def attempt(user: str, password: str) -> str:
            body = client.post("/api/v1/login", json={
                "answers": {"username": user, "password": password}}).json()
            return str(body["status"])

        answers = {attempt("Alice" if i % 2 else "alice", f"guess-{i}") for i in range(50)}
        assert answers == {"denied"}
        # Locked: the right password is refused too, and the answer looks the same.
        assert attempt("alice", PASSWORD) == "denied"
        # Other users are not affected.
        assert attempt("bob", PASSWORD) == "authenticated"
    events = [e for e in audit_events(deployment) if e["event"] == "login.failed"
              and e.get("user") == "alice"]
    assert len(events) == 51
    assert [e["reason"] for e in events[:5]] == ["wrong password"] * 5
    assert events[4]["locked"] is True
    assert {e["reason"] for e in events[5:]} == {"account locked"}
    assert all(e["factor"] == "local" for e in events)


# -- a new phone: replacing the authenticator app ---------------------------------------------
def test_a_signed_in_user_replaces_their_authenticator_app(
        deployment: Deployment, up: Any) -> None:
    configure(deployment, """
[auth]
flow = "mfa"
recent_sign_in = 2
[[auth.flows]]
name = "mfa"
[[auth.flows.steps]]
provider = "local"
[[auth.flows.steps]]
provider = "totp"
""")
    deployment.add_user("alice", PASSWORD, ["staff"])
    up()
    secrets: list[str] = []

    def answer(step: dict[str, Any], name: str) -> str:
        if name in ("username", "password"):
            return {"username": "alice", "password": PASSWORD}[name]
        if step["kind"] == "totp-enrol":
            secrets.append(step["enrolment"]["secret"])
        return oathtool_code(secrets[-1])

    with api_client(deployment) as client:
        token = ApiLogin(client).run(answer)["token"]
        bearer = {"authorization": f"Bearer {token}"}
        begun = client.post("/api/v1/account/authenticator", json={}, headers=bearer).json()
        assert begun["status"] == "continue" and begun["step"]["kind"] == "totp-enrol"
        new_secret = begun["step"]["enrolment"]["secret"]
        assert new_secret != secrets[0]
        # A code from the old app does not confirm the new one.
        wrong = client.post("/api/v1/account/authenticator", headers=bearer, json={
            "handle": begun["handle"], "answers": {"code": oathtool_code(secrets[0])}}).json()
        assert wrong["status"] == "continue"
        assert wrong["step"]["message"].startswith("That code did not match")
        done = client.post("/api/v1/account/authenticator", headers=bearer, json={
            "handle": begun["handle"], "answers": {"code": oathtool_code(new_secret)}}).json()
        assert done == {"status": "enrolled"}
        # The handle is spent.
        spent = client.post("/api/v1/account/authenticator", headers=bearer, json={
            "handle": begun["handle"], "answers": {"code": "123456"}})
        assert spent.status_code == 410
        # Two seconds after signing in (recent_sign_in = 2), a new set-up is refused.
        time.sleep(2.1)
        stale = client.post("/api/v1/account/authenticator", json={}, headers=bearer)
        assert stale.status_code == 403 and "recent sign-in" in stale.json()["error"]
    events = [e for e in audit_events(deployment) if e["event"].startswith("totp.")]
    assert [e["event"] for e in events] == ["totp.enrolment_failed", "totp.enrolled"]
    # The old app no longer signs in.
    with api_client(deployment) as client:
        login = ApiLogin(client)
        old = login.run(lambda step, name: {"username": "alice", "password": PASSWORD}.get(
            name) or oathtool_code(secrets[0]))
    assert old["status"] == "denied"
    assert audit_events(deployment)[-1]["reason"] == "wrong code"


def test_certificate_flow_with_the_portal_in_its_own_process(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    """The gateway passes the verified certificate to a portal elsewhere; a client that
    forges the header it uses gains nothing."""
    import base64

    configure(deployment, DEVICE_FLOW)
    deployment.add_user("alice", PASSWORD, ["staff"])
    device = client_certificate(deployment, "laptop-0042")
    portal_port = deployment.port + 1
    deployment.set("gateway", "portal_url", f'"https://127.0.0.1:{portal_port}"')
    start_process("serve", "sta", "--dir", str(deployment.directory),
                  name="sta").wait_for(r"sta listening on")
    deployment.set("sta", "id", '"EDGE"')
    start_process("serve", "portal", "--dir", str(deployment.directory),
                  name="portal").wait_for(r"portal listening on")
    start_process("serve", "gateway", "--dir", str(deployment.directory),
                  name="edge").wait_for(r"gateway listening on")

    def password_only(step: dict[str, Any], name: str) -> str:
        return {"username": "alice", "password": PASSWORD}.get(name, "000000")

    with api_client(deployment, device) as client:
        login = ApiLogin(client)
        assert login.run(password_only)["status"] == "authenticated"
    assert [step["kind"] for step in login.steps] == ["password"]
    forged = base64.b64encode(ssl.PEM_cert_to_DER_cert(device[0].read_text())).decode()
    with api_client(deployment) as client:
        first = client.post("/api/v1/login", json={}, headers={
            "x-portcullis-client-certificate": forged}).json()
    assert first["step"]["kind"] == "totp"      # no certificate seen: TOTP first
