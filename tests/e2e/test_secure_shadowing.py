"""Secure shadowing end to end with real programs: `portcullis up` (the hub), the device
agent `portcullis shadow-agent` in front of Xvfb + x11vnc (painted a known colour, an
xterm logging keys), and `portcullis shadow DEVICE --exec 'vncdo …'` as the operator's
console with vncdotool as the viewer. Nothing here is a stand-in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Deployment, Process, free_port, require_program, run_cli
from peers.vnc import VncDesktop, vncdo, vncdo_program, wait_for_file_text

BLUE = (0x33, 0x66, 0xCC)
PASSWORD = "correct horse battery"
Start = Callable[..., Process]


@dataclass
class Shadowing:
    deployment: Deployment
    gateway: Process
    desktop: VncDesktop
    agent: Process
    agent_port: int
    agent_dir: Path
    tmp_path: Path

    @property
    def hub_url(self) -> str:
        return f"https://127.0.0.1:{self.deployment.port + 3}"

    def audited(self, event: str) -> list[dict[str, Any]]:
        path = self.deployment.directory / "audit.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines() if line]
        return [record for record in records if record["event"] == event]

    def wait_audited(self, event: str, count: int = 1, timeout: float = 15.0
                     ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.audited(event)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {event} in the audit trail")

    def shadow(self, *viewer: str, device: str = "kiosk-1",
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`portcullis shadow DEVICE --exec 'vncdo -s {host}::{port} VIEWER…'`."""
        command = " ".join([shlex.quote(vncdo_program()), "-s", "{host}::{port}",
                            "--nocursor", "-t", "20", *map(shlex.quote, viewer)])
        return run_cli("shadow", device, "--exec", command, timeout=timeout)


def login(deployment: Deployment, user: str = "admin",
          password: str | None = None) -> None:
    result = run_cli("login", deployment.url, "--user", user, "--password-stdin",
                     "--ca", str(deployment.ca),
                     input=(password or deployment.admin_password) + "\n")
    assert result.returncode == 0, result.stderr


def add_device(deployment: Deployment, name: str) -> str:
    result = run_cli("shadow", "device", "add", name, "--dir", str(deployment.directory))
    assert result.returncode == 0, result.stderr
    code = re.search(r"code \(shown once\):\s*(\S+)", result.stdout)
    assert code, result.stdout
    return code.group(1)


def start_agent(start_process: Start, shadowing_dir: Path, deployment: Deployment,
                vnc_address: str, name: str, *args: str) -> tuple[Process, int]:
    port = free_port()
    agent = start_process(
        "shadow-agent", "--hub", f"https://127.0.0.1:{deployment.port + 3}",
        "--ca", str(deployment.ca), "--name", name, "--vnc", vnc_address,
        "--listen", f"127.0.0.1:{port}", "--dir", str(shadowing_dir), *args,
        name=f"agent-{name}")
    return agent, port


def start_dial_out_agent(start_process: Start, shadowing_dir: Path, deployment: Deployment,
                         vnc_address: str, name: str, *args: str) -> tuple[Process, int]:
    """The agent behind NAT: no --listen (its default is loopback with --dial-out); the
    port its proxy took is read from its output."""
    agent = start_process(
        "shadow-agent", "--hub", f"https://127.0.0.1:{deployment.port + 3}",
        "--ca", str(deployment.ca), "--name", name, "--vnc", vnc_address, "--dial-out",
        "--dir", str(shadowing_dir), *args, name=f"agent-{name}")
    listening = agent.wait_for(r"device proxy listening on 127\.0\.0\.1:(\d+)")
    return agent, int(listening.group(1))


@contextlib.contextmanager
def shadowing_of(deployment: Deployment, start_process: Start, tmp_path: Path, *,
                 dial_out: bool) -> Iterator[Shadowing]:
    for program in ("Xvfb", "x11vnc", "xterm", "xsetroot"):
        require_program(program)
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    code = add_device(deployment, "kiosk-1")
    with VncDesktop(tmp_path / "desktop", colour="#3366cc",
                    xterm_log=tmp_path / "keys.log") as desktop:
        agent_dir = tmp_path / "agent"
        starting = start_dial_out_agent if dial_out else start_agent
        agent, port = starting(start_process, agent_dir, deployment,
                               f"127.0.0.1:{desktop.port}", "kiosk-1", "--code", code)
        agent.wait_for(r"device proxy listening on")
        if dial_out:
            agent.wait_for(r"hub connection \d: connected")
        login(deployment)
        yield Shadowing(deployment, gateway, desktop, agent, port, agent_dir, tmp_path)


@pytest.fixture
def shadowing(deployment: Deployment, start_process: Start, client_home: Path,
              tmp_path: Path) -> Iterator[Shadowing]:
    with shadowing_of(deployment, start_process, tmp_path, dial_out=False) as shadowing:
        yield shadowing


@pytest.fixture(params=["direct", "dial-out"])
def any_shadowing(request: pytest.FixtureRequest, deployment: Deployment,
                  start_process: Start, client_home: Path,
                  tmp_path: Path) -> Iterator[Shadowing]:
    """The device reachable (its proxy listens for consoles) or behind NAT (its agent
    dials out to the hub, which carries the channel)."""
    with shadowing_of(deployment, start_process, tmp_path,
                      dial_out=request.param == "dial-out") as shadowing:
        yield shadowing


@pytest.fixture
def dialling_out(deployment: Deployment, start_process: Start, client_home: Path,
                 tmp_path: Path) -> Iterator[Shadowing]:
    with shadowing_of(deployment, start_process, tmp_path, dial_out=True) as shadowing:
        yield shadowing


def test_the_viewer_sees_the_device_and_types_on_it(any_shadowing: Shadowing) -> None:
    shadowing = any_shadowing
    shot = shadowing.tmp_path / "shot.png"
    result = shadowing.shadow("capture", str(shot))
    assert result.returncode == 0, result.stdout + result.stderr
    from PIL import Image

    with Image.open(shot) as image:
        point = shadowing.desktop.root_point
        assert image.convert("RGB").getpixel(point) == BLUE
    x, y = shadowing.desktop.xterm_point
    typed = shadowing.shadow("move", str(x), str(y), "type", "shadowed", "key", "enter")
    assert typed.returncode == 0, typed.stdout + typed.stderr
    assert "shadowed" in wait_for_file_text(shadowing.tmp_path / "keys.log", "shadowed")
    verified = shadowing.wait_audited("shadow.request_verified", 2)
    assert {record["operator"] for record in verified} == {"admin"}
    ended = shadowing.wait_audited("shadow.channel_ended", 2)
    assert all(record["bytes_to_console"] > 0 for record in ended)


def test_the_certificate_is_a_real_x509_file(shadowing: Shadowing) -> None:
    cert = next(shadowing.agent_dir.glob("*.crt"))
    text = subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(cert)],
                          capture_output=True, text=True, check=True).stdout
    assert "prime256v1" in text and "CN=kiosk-1" in text.replace(" = ", "=")
    info = subprocess.run(["x11vnc", "-sslCertInfo", str(cert)], capture_output=True,
                          text=True, timeout=30)
    assert "kiosk-1" in info.stdout + info.stderr
    ours = run_cli("shadow-agent", "cert-info", "--dir", str(shadowing.agent_dir))
    assert ours.returncode == 0 and "kiosk-1" in ours.stdout


def test_an_operator_outside_the_policy_is_refused(shadowing: Shadowing) -> None:
    shadowing.deployment.add_user("eve", PASSWORD, ["staff"])
    login(shadowing.deployment, "eve", PASSWORD)
    result = shadowing.shadow("capture", str(shadowing.tmp_path / "x.png"))
    assert result.returncode == 1
    assert "you may not shadow kiosk-1" in result.stderr
    assert shadowing.wait_audited("shadow.request_denied")[0]["operator"] == "eve"


def test_plain_vnc_is_passed_and_audited_as_insecure(shadowing: Shadowing) -> None:
    plain = vncdo(f"127.0.0.1::{shadowing.agent_port}", "capture",
                  str(shadowing.tmp_path / "plain.png"))
    assert plain.returncode == 0, plain.stderr
    assert shadowing.wait_audited("shadow.insecure_session")[0]["device"] == "kiosk-1"


def test_mandatory_refuses_plain_vnc_with_the_reason(shadowing: Shadowing) -> None:
    shadowing.deployment.set("shadow", "mandatory", "true")
    shadowing.gateway.popen.send_signal(signal.SIGHUP)
    shadowing.agent.wait_for(r"secure shadowing is now", timeout=60)
    refused = vncdo(f"127.0.0.1::{shadowing.agent_port}", "capture",
                    str(shadowing.tmp_path / "plain.png"))
    assert refused.returncode != 0
    assert refused.refusal_reason is not None
    assert "secure shadowing is required" in refused.refusal_reason
    # The secure channel still works.
    result = shadowing.shadow("capture", str(shadowing.tmp_path / "secure.png"))
    assert result.returncode == 0, result.stderr


def test_an_administrator_ends_a_running_session(any_shadowing: Shadowing) -> None:
    shadowing = any_shadowing
    viewer = subprocess.Popen(
        [sys.executable, "-m", "portcullis.cli.main", "shadow", "kiosk-1", "--listen",
         "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        up = shadowing.wait_audited("shadow.channel_up")[0]
        listed = run_cli("shadow", "sessions")
        assert up["session"] in listed.stdout, listed.stdout + listed.stderr
        ended = run_cli("shadow", "sessions", "end", up["session"])
        assert ended.returncode == 0, ended.stderr
        viewer.wait(10)
        channel = shadowing.wait_audited("shadow.channel_ended")[0]
        assert channel["session"] == up["session"]
    finally:
        viewer.kill()
        viewer.wait()


def test_a_removed_device_is_refused(shadowing: Shadowing) -> None:
    removed = run_cli("shadow", "device", "remove", "kiosk-1", "--dir",
                      str(shadowing.deployment.directory))
    assert removed.returncode == 0, removed.stderr
    result = shadowing.shadow("capture", str(shadowing.tmp_path / "x.png"))
    assert result.returncode == 1 and "no device named 'kiosk-1'" in result.stderr


def test_garbage_and_a_huge_request_leave_the_agent_serving(shadowing: Shadowing) -> None:
    port = shadowing.agent_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as garbage:
        garbage.sendall(b"\x00GARBAGE" * 100)
        # Closed with nothing said (or reset: unread garbage was left).
        with contextlib.suppress(ConnectionResetError):
            assert garbage.recv(100) == b""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:   # no console certificate: refused
                tls.sendall(b"PSH1" + b"\x01\xff\xff" + b"x" * (1 << 20))
                tls.recv(100)
        except (ssl.SSLError, OSError):
            pass
    result = shadowing.shadow("capture", str(shadowing.tmp_path / "after.png"))
    assert result.returncode == 0, result.stderr


def test_the_portal_lists_the_devices_with_their_command(shadowing: Shadowing,
                                                         client_home: Path) -> None:
    token = json.loads((client_home / "session.json").read_text())["token"]
    deployment = shadowing.deployment
    with httpx.Client(base_url=deployment.url, verify=ssl.create_default_context(
            cafile=str(deployment.ca))) as client:
        anonymous = client.get("/devices")
        assert anonymous.status_code == 303 and "/login" in anonymous.headers["location"]
        client.cookies.set("__Host-portcullis-session", token)
        resources = client.get("/")
        assert 'href="/devices"' in resources.text
        page = client.get("/devices")
    assert page.status_code == 200
    assert "portcullis shadow kiosk-1 --exec" in page.text
    explained = run_cli("policy", "explain", "--user", "admin", "--shadow", "kiosk-1",
                        "--dir", str(deployment.directory))
    assert explained.returncode == 0, explained.stderr
    assert "ALLOWED" in explained.stdout and "administrators" in explained.stdout


def test_consent_is_asked_of_the_devices_user(shadowing: Shadowing,
                                              start_process: Start) -> None:
    deployment = shadowing.deployment
    with deployment.config.open("a") as config:
        config.write('\n[[shadow.device_groups]]\nname = "kiosks"\ndevices = ["kiosk-*"]\n'
                     'consent = "ask"\nconsent_timeout = 20\n')
    shadowing.gateway.popen.send_signal(signal.SIGHUP)
    shadowing.gateway.wait_for(r"configuration reloaded")
    # kiosk-1's agent has no way to ask its user: refused, and the operator told why.
    refused = shadowing.shadow("capture", str(shadowing.tmp_path / "x.png"))
    assert refused.returncode == 1
    assert "no --consent-command" in refused.stderr
    # kiosk-2 asks with a command that records who asks and says yes.
    asked = shadowing.tmp_path / "asked.txt"
    code = add_device(deployment, "kiosk-2")
    agent, _ = start_agent(
        start_process, shadowing.tmp_path / "agent-2", deployment,
        f"127.0.0.1:{shadowing.desktop.port}", "kiosk-2", "--code", code,
        "--consent-command", f"sh -c 'echo $PORTCULLIS_OPERATOR $PORTCULLIS_CONSENT > {asked}'")
    agent.wait_for(r"device proxy listening on")
    allowed = shadowing.shadow("capture", str(shadowing.tmp_path / "y.png"), device="kiosk-2")
    assert allowed.returncode == 0, allowed.stderr
    assert asked.read_text().split() == ["admin", "ask"]


def test_random_bytes_from_the_server_arrive_exactly_and_the_agent_serves_on(
        shadowing: Shadowing, start_process: Start, tmp_path: Path) -> None:
    """A 'VNC server' that sends 4 MiB of random bytes after its greeting: the viewer
    gets every byte, in order, through both proxies; then the agent still serves."""
    payload = os.urandom(4 << 20)
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(b"RFB 003.008\n" + payload)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    code = add_device(shadowing.deployment, "noisy-1")
    agent, _ = start_agent(start_process, tmp_path / "agent-noisy", shadowing.deployment,
                           f"127.0.0.1:{port}", "noisy-1", "--code", code)
    agent.wait_for(r"device proxy listening on")
    digest = tmp_path / "digest.txt"
    reader = (f"{sys.executable} -c \"import hashlib,socket;"
              f"s=socket.create_connection(('{{host}}',{{port}}));h=hashlib.sha256();n=0\n"
              f"while n<{len(payload) + 12}:\n d=s.recv(65536)\n if not d: break\n"
              f" h.update(d);n+=len(d)\n"
              f"open('{digest}','w').write(h.hexdigest())\"")
    result = run_cli("shadow", "noisy-1", "--exec", reader, timeout=60)
    assert result.returncode == 0, result.stderr
    thread.join(10)
    server.close()
    assert digest.read_text() == hashlib.sha256(b"RFB 003.008\n" + payload).hexdigest()
    after = shadowing.shadow("capture", str(tmp_path / "after.png"))
    assert after.returncode == 0, after.stderr


def test_the_agent_renews_its_certificate_signed_in_with_the_old(
        shadowing: Shadowing, start_process: Start, tmp_path: Path) -> None:
    from portcullis.shadow.certificates import create_device_files

    deployment = shadowing.deployment
    deployment.set("shadow", "heartbeat", "1")
    shadowing.gateway.popen.send_signal(signal.SIGHUP)
    shadowing.gateway.wait_for(r"configuration reloaded")
    agent_dir = tmp_path / "agent-old"
    old = create_device_files(agent_dir, "kiosk-2", days=10)   # due: 30 days before
    code = add_device(deployment, "kiosk-2")
    agent, _ = start_agent(start_process, agent_dir, deployment,
                           f"127.0.0.1:{shadowing.desktop.port}", "kiosk-2", "--code", code)
    renewed = agent.wait_for(r"renewed (?:the )?device certificate: fingerprint (\S+)", 60)
    new_fingerprint = renewed.group(1)
    renewal = shadowing.wait_audited("shadow.certificate_renewed")[0]
    assert renewal["new"] == new_fingerprint and renewal["old"] != new_fingerprint
    assert old.cert_path.read_bytes() != old.pair.cert_pem   # replaced on disk
    result = shadowing.shadow("capture", str(tmp_path / "renewed.png"), device="kiosk-2")
    assert result.returncode == 0, result.stderr
    issued = shadowing.wait_audited("shadow.request_issued")[-1]
    assert issued["device"] == "kiosk-2"
    listed = run_cli("shadow", "device", "list", "--dir", str(deployment.directory))
    assert new_fingerprint in listed.stdout


# -- devices behind NAT (the agent dials out) -------------------------------------------------
def test_a_dial_out_device_is_reachable_only_through_the_hub(dialling_out: Shadowing) -> None:
    import psutil

    listening = [connection.laddr for connection in
                 psutil.Process(dialling_out.agent.popen.pid).net_connections("inet")
                 if connection.status == psutil.CONN_LISTEN]
    assert listening and all(address.ip in ("127.0.0.1", "::1") for address in listening)
    listed = run_cli("shadow", "device", "list", "--dir",
                     str(dialling_out.deployment.directory))
    assert "dial-out" in listed.stdout, listed.stdout + listed.stderr
    connected = dialling_out.wait_audited("shadow.dialout_connected", 2)
    assert {record["device"] for record in connected} == {"kiosk-1"}
    result = dialling_out.shadow("capture", str(dialling_out.tmp_path / "shot.png"))
    assert result.returncode == 0, result.stdout + result.stderr
    carried = dialling_out.wait_audited("shadow.dialout_channel")[0]
    assert carried["device"] == "kiosk-1" and carried["operator"] == "admin"


def test_after_a_hub_restart_the_agent_reconnects_and_shadowing_works(
        dialling_out: Shadowing, start_process: Start) -> None:
    deployment = dialling_out.deployment
    dialling_out.gateway.stop()
    dialling_out.agent.wait_for(r"hub connection \d: lost")
    restarted = start_process("up", "--dir", str(deployment.directory), name="up-again")
    restarted.wait_for(r"Portal: https://")
    # The agent comes back by itself (backoff with jitter); the sign-in was in memory.
    deadline = time.monotonic() + 60
    while len(dialling_out.audited("shadow.dialout_connected")) < 3:
        assert time.monotonic() < deadline, dialling_out.agent.output()
        time.sleep(0.1)
    login(deployment)
    shot = dialling_out.tmp_path / "again.png"
    result = dialling_out.shadow("capture", str(shot))
    assert result.returncode == 0, result.stdout + result.stderr
    from PIL import Image

    with Image.open(shot) as image:
        assert image.convert("RGB").getpixel(dialling_out.desktop.root_point) == BLUE


def test_a_device_presenting_another_certificate_is_refused(
        shadowing: Shadowing, start_process: Start, tmp_path: Path) -> None:
    """The address the hub knows answers with another certificate (openssl s_server
    stands in the device's place): the console says so and the hub audits it."""
    openssl = require_program("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=kiosk-2",
                    "-days", "2", "-keyout", str(tmp_path / "i.key"),
                    "-out", str(tmp_path / "i.crt")], check=True, capture_output=True)
    impostor_port = free_port()
    impostor = start_process("s_server", "-accept", f"127.0.0.1:{impostor_port}",
                             "-cert", str(tmp_path / "i.crt"), "-key", str(tmp_path / "i.key"),
                             "-quiet", "-naccept", "5", program=openssl, name="impostor")
    impostor.wait_listening(impostor_port)
    code = add_device(shadowing.deployment, "kiosk-2")
    agent, _ = start_agent(start_process, tmp_path / "agent-2", shadowing.deployment,
                           f"127.0.0.1:{shadowing.desktop.port}", "kiosk-2", "--code", code,
                           "--advertise", f"127.0.0.1:{impostor_port}")
    agent.wait_for(r"device proxy listening on")
    result = shadowing.shadow("capture", str(tmp_path / "x.png"), device="kiosk-2")
    assert result.returncode == 1
    assert "certificate" in result.stderr and "kiosk-2" in result.stderr
    problem = shadowing.wait_audited("shadow.console_problem")[0]
    assert problem["problem"] == "device-certificate" and problem["operator"] == "admin"
