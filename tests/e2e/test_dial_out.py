"""Dial-out mode end to end: a relay (`portcullis serve relay`) connects OUT to the edge
(`portcullis up` with `[dialer] via = "relay"`, `mode = "dial-out"`), and every inward
connection of the edge (launches, tunnel TCP, UDP and ICMP echo) travels as a mux
stream over those connections, to destinations that only the relay's allow-list admits.
Survival: a relay killed and restarted, an edge node restarted under load. Refusals: a
certificate that is not a relay's, on the relay endpoint and at sign-in."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as redis

from conftest import Deployment, Process, free_port, require_program, run_cli
from e2e.test_cluster import database, share_stores, start_two_nodes  # noqa: F401
from e2e.test_tunnel import POLICIES
from peers.stores import REDIS_URL
from portcullis.errors import ClientError
from portcullis.gateway.relays import REGISTRY_INDEX
from portcullis.net import websocket
from portcullis.net.muxsession import MuxSession
from portcullis.net.tls import client_context
from portcullis.pki import create_ca, issue_certificate, write_pair
from portcullis.proto.mux import MuxConnection, Reason

pytestmark = pytest.mark.peer
PASSWORD = "correct horse battery staple"

# The edge lets staff reach loopback (test_tunnel's policies); the relay admits less:
# only what each test names.


def dial_out(deployment: Deployment) -> None:
    with deployment.config.open("a") as handle:
        handle.write('\n[dialer]\nvia = "relay"\nmode = "dial-out"\n' + POLICIES)


def start_relay(deployment: Deployment, start_process: Callable[..., Process], tmp_path: Path,
                edges: list[str], allow: list[str]) -> tuple[Path, Callable[[], Process]]:
    """A relay directory (the deployment's CA and relay certificate, its own audit
    trail) dialling out to `edges`; returns it and a function that starts the relay."""
    directory = tmp_path / "relay"
    if not directory.exists():
        shutil.copytree(deployment.directory, directory)
        with (directory / "portcullis.toml").open("a") as handle:
            handle.write(f"\n[relay]\nedges = {json.dumps(edges)}\nallow = {json.dumps(allow)}\n"
                         f'health_listen = "127.0.0.1:{free_port()}"\nconnections = 2\n'
                         "reconnect_min = 0.1\nreconnect_max = 1.0\n")
        (directory / "audit.jsonl").unlink(missing_ok=True)

    def start() -> Process:
        return start_process("serve", "relay", "--dir", str(directory), name="relay")

    return directory, start


def audit(directory: Path) -> list[dict[str, Any]]:
    path = directory / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_event(directory: Path, event: str, count: int = 1,
                   timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in audit(directory) if e["event"] == event]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {count} x {event} in {directory}: {audit(directory)}")


def login(url: str, ca: Path, home: Path) -> None:
    result = run_cli("login", url, "--user", "alice", "--password-stdin", "--ca", str(ca),
                     input=PASSWORD + "\n", env={"PORTCULLIS_HOME": str(home)})
    assert result.returncode == 0, result.stderr


def connect(start_process: Callable[..., Process], home: Path, *, forward: str = "",
            udp: str = "") -> tuple[Process, str, list[tuple[str, str]], list[tuple[str, str]]]:
    args = ["connect", "--no-proxy-auth", "--socks", "127.0.0.1:0", "--http", "127.0.0.1:0"]
    if forward:
        args += ["-L", forward]
    if udp:
        args += ["-U", udp]
    process = start_process(*args, name="connect", env={"PORTCULLIS_HOME": str(home)})
    process.wait_for(r"HTTP CONNECT proxy: listening on")
    if forward or udp:
        process.wait_for(r"forward to .*: listening on")
    text = process.output()
    socks = re.search(r"SOCKS5 proxy: listening on ([\d.]+:\d+)", text)
    assert socks
    forwards = re.findall(r"^forward to [^:]+:\d+: listening on ([\d.]+):(\d+)", text,
                          re.MULTILINE)
    udps = re.findall(r"UDP forward to [^:]+:\d+: listening on ([\d.]+):(\d+)", text)
    return process, socks.group(1), forwards, udps


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_program("curl"), "-sS", "--max-time", "20", *args],
                          capture_output=True, text=True, timeout=30)


def echo_once(host: str, port: int, data: bytes = b"through the relay",
              timeout: float = 5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(data)
            received = b""
            while len(received) < len(data):
                chunk = sock.recv(65536)
                if not chunk:
                    return False
                received += chunk
            return received == data
    except OSError:
        return False


def test_launch_tunnel_tcp_udp_and_ping_go_through_a_relay_that_dialled_out(
        deployment: Deployment, http_server, echo_server, dns_server, test_host,  # type: ignore[no-untyped-def]
        client_home: Path, start_process, tmp_path: Path) -> None:
    dial_out(deployment)
    with deployment.config.open("a") as handle:
        handle.write(f'\n[[policies]]\nname = "lab-ping"\naction = "allow"\n'
                     f'groups = ["staff"]\nnetworks = ["{test_host.address}/32"]\n'
                     f'protocols = ["icmp"]\n')
    deployment.add_resource("web", http_server.address, ["staff"], "Team web")
    deployment.add_user("alice", PASSWORD, ["staff"])
    relay_dir, start = start_relay(
        deployment, start_process, tmp_path, [deployment.url],
        [f"127.0.0.1/32:{http_server.port}", f"127.0.0.1/32:{dns_server.port}",
         f"{test_host.address}/32:1-65535"])
    edge = start_process("up", "--dir", str(deployment.directory), name="up")
    edge.wait_for(r"Portal: https://")
    relay = start()
    relay.wait_for(r"Relay: dialling out to")
    wait_for_event(deployment.directory, "relay.connected", 2)

    # A launch fetches a page intact.
    login(deployment.url, deployment.ca, client_home)
    launch = start_process("launch", "web", "--listen", "127.0.0.1:0", name="launch")
    match = launch.wait_for(r"listening on ([\d.]+):(\d+)")
    page = curl(f"http://{match.group(1)}:{match.group(2)}/")
    assert "intranet home" in page.stdout, page.stderr

    # The tunnel: TCP through SOCKS, UDP (dig), ICMP echo (ping).
    home = tmp_path / "alice"
    login(deployment.url, deployment.ca, home)
    _, socks, _, udps = connect(start_process, home,
                                udp=f"127.0.0.1:0:127.0.0.1:{dns_server.port}")
    via_socks = curl("--socks5-hostname", socks, f"http://127.0.0.1:{http_server.port}/")
    assert "intranet home" in via_socks.stdout, via_socks.stderr
    host, port = udps[0]
    answer = subprocess.run([require_program("dig"), f"@{host}", "-p", port, dns_server.NAME,
                             "+short", "+time=3", "+tries=2"],
                            capture_output=True, text=True, timeout=30)
    assert answer.stdout.strip() == dns_server.ADDRESS, answer.stdout + answer.stderr
    pinged = run_cli("ping", test_host.address, "-c", "3", "-i", "0.2",
                     env={"PORTCULLIS_HOME": str(home)})
    assert pinged.returncode == 0 and "3 sent, 3 answered" in pinged.stdout, (
        pinged.stdout + pinged.stderr)

    # The edge allows the echo server's port; the relay does not: refused there, audited.
    refused = curl("--socks5-hostname", socks, f"http://{echo_server.address}/")
    assert refused.returncode == 97, refused.stderr
    refusal = wait_for_event(relay_dir, "relay.refused")[-1]
    assert refusal["destination"] == f"{echo_server.address}/tcp"
    streams = {e["destination"] for e in wait_for_event(relay_dir, "relay.stream", 2)}
    assert f"127.0.0.1:{http_server.port}/tcp" in streams
    relay.stop()


def test_a_relay_killed_and_restarted_carries_new_streams_within_3_s_of_its_start(
        deployment: Deployment, echo_server, client_home: Path,  # type: ignore[no-untyped-def]
        start_process, tmp_path: Path) -> None:
    dial_out(deployment)
    deployment.add_user("alice", PASSWORD, ["staff"])
    _, start = start_relay(deployment, start_process, tmp_path, [deployment.url],
                           [f"127.0.0.1/32:{echo_server.port}"])
    edge = start_process("up", "--dir", str(deployment.directory), name="up")
    edge.wait_for(r"Portal: https://")
    relay = start()
    wait_for_event(deployment.directory, "relay.connected", 2)
    home = tmp_path / "alice"
    login(deployment.url, deployment.ca, home)
    _, _, forwards, _ = connect(start_process, home, forward=f"127.0.0.1:0:{echo_server.address}")
    host, port = forwards[0][0], int(forwards[0][1])
    assert echo_once(host, port)

    # A stream in flight when the relay dies ends, and the edge says why.
    in_flight = socket.create_connection((host, port), timeout=10)
    in_flight.sendall(b"before")
    assert in_flight.recv(100) == b"before"
    relay.popen.send_signal(signal.SIGKILL)
    relay.popen.wait()
    in_flight.settimeout(10)
    try:
        ended = in_flight.recv(100)
    except ConnectionResetError:
        ended = b""
    assert ended == b""
    in_flight.close()
    gone = wait_for_event(deployment.directory, "relay.disconnected", 2)
    assert all(e["reason"] for e in gone)
    # With no relay, a new stream is refused with the reason (not left hanging).
    assert not echo_once(host, port, timeout=10)
    failed = wait_for_event(deployment.directory, "tunnel.stream_failed")
    assert "no relay is connected" in failed[-1]["reason"]

    started = time.monotonic()
    relay = start()
    relay.wait_for(r"Relay health:")
    ready = time.monotonic()
    while not echo_once(host, port, timeout=2):
        assert time.monotonic() - started < 30, relay.output()
        time.sleep(0.05)
    first_stream = time.monotonic()
    print(f"\nrelay restart: first stream {first_stream - started:.2f} s after its start "
          f"({first_stream - ready:.2f} s after its ready line)")
    assert first_stream - ready < 3.0
    relay.stop()


def test_an_edge_node_restarts_while_2000_streams_go_through_the_relay_of_the_other(
        deployment: Deployment, database: str, echo_server,  # type: ignore[no-untyped-def]  # noqa: F811
        start_process, tmp_path: Path) -> None:
    share_stores(deployment, database)
    dial_out(deployment)
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("root", PASSWORD, ["admins"])
    nodes: list[Process] = []

    def recording_start(*args: str, **kwargs: Any) -> Process:
        process = start_process(*args, **kwargs)
        nodes.append(process)
        return process

    port_b = start_two_nodes(deployment, recording_start, tmp_path)
    node_a, _ = nodes
    url_b = f"https://127.0.0.1:{port_b}"
    relay_dir, start = start_relay(deployment, start_process, tmp_path,
                                   [deployment.url, url_b],
                                   [f"127.0.0.1/32:{echo_server.port}"])
    start()
    wait_for_event(deployment.directory, "relay.connected", 2)
    wait_for_event(tmp_path / "node-b", "relay.connected", 2)

    # The registry in Redis: which node holds which relay connection, with a TTL.
    prefix = re.search(r"prefix=([^\"]+)", deployment.config.read_text())
    assert prefix
    entries = asyncio.run(registry_entries(prefix.group(1)))
    print(f"\nrelay registry: {json.dumps(entries, indent=1)}")
    assert len({e["node"] for e in entries}) == 2 and len(entries) == 4
    assert all(0 < float(e["ttl"]) <= 15 for e in entries)
    # The relay's own view: each edge URL, the node behind it, its connections.
    status = run_cli("relay", "status", "--dir", str(relay_dir))
    assert status.returncode == 0, status.stdout + status.stderr
    for entry in entries:
        assert re.search(rf"\({re.escape(str(entry['node']))}\)\s+2 connections",
                         status.stdout), status.stdout
    # ...which the admin API of either node shows.
    tls = ssl.create_default_context(cafile=str(deployment.ca))
    with httpx.Client(base_url=url_b, verify=tls, timeout=30) as admin:
        token = admin.post("/api/v1/login", json={"answers": {
            "username": "root", "password": PASSWORD}}).json()["token"]
        listed = admin.get("/api/v1/admin/relays",
                           headers={"authorization": f"Bearer {token}"}).json()["relays"]
    assert sorted((e["node"], e["connection"]) for e in listed) == sorted(
        (e["node"], e["connection"]) for e in entries)

    home = tmp_path / "alice"
    login(url_b, deployment.ca, home)
    _, _, forwards, _ = connect(start_process, home, forward=f"127.0.0.1:0:{echo_server.address}")
    host, port = forwards[0][0], int(forwards[0][1])
    results: list[bool] = []
    done = threading.Event()

    def streams() -> None:
        deadline = time.monotonic() + 240
        for index in range(2000):
            if time.monotonic() > deadline:
                break
            results.append(echo_once(host, port, b"stream %d" % index, timeout=10))
        done.set()

    worker = threading.Thread(target=streams)
    worker.start()
    while len(results) < 300 and not done.is_set():
        time.sleep(0.02)
    node_a.stop()   # SIGTERM: it sends its relays GOAWAY before it stops
    node_a = start_process("up", "--dir", str(deployment.directory), name="node-a-again")
    node_a.wait_for("Portal: https://")
    worker.join(300)
    succeeded = sum(results)
    print(f"\n2,000 streams while an edge node restarted: {succeeded} of {len(results)} "
          "succeeded")
    assert len(results) == 2000
    assert succeeded >= 1998
    moved = [e for e in audit(deployment.directory) if e["event"] == "relay.disconnected"]
    assert moved and all("shutdown" in e["reason"] for e in moved[:2])
    # The restarted node gets its relay connections back.
    wait_for_event(deployment.directory, "relay.connected", 4, timeout=30)
    assert audit(relay_dir)


async def registry_entries(prefix: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        found = []
        for key in await client.smembers(prefix + REGISTRY_INDEX):
            name = prefix + key.decode()
            value = await client.get(name)
            if value is not None:
                found.append({**json.loads(value), "ttl": await client.ttl(name)})
        return found
    finally:
        await client.aclose()


def test_a_certificate_that_is_not_a_relay_s_is_refused_on_the_relay_endpoint_and_audited(
        deployment: Deployment, start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Users' certificates come from another CA here, which the listener trusts too.
    users_ca = create_ca("Users CA")
    write_pair(deployment.directory / "pki", "users-ca", users_ca)
    impostor = issue_certificate(users_ca, "portcullis-relay", server=False)
    impostor_files = write_pair(tmp_path, "impostor", impostor)
    with deployment.config.open("a") as handle:
        handle.write('\n[auth]\nclient_ca = "pki/users-ca.crt"\n')
    dial_out(deployment)
    out = tmp_path / "users"
    issued = run_cli("cert", "issue", "alice", "--out", str(out), "--dir",
                     str(deployment.directory))
    assert issued.returncode == 0, issued.stderr
    stranger_ca = create_ca("Elsewhere CA")
    stranger = write_pair(tmp_path, "stranger", issue_certificate(
        stranger_ca, "portcullis-relay", server=False))
    edge = start_process("up", "--dir", str(deployment.directory), name="up")
    edge.wait_for(r"Portal: https://")

    def attempt(cert: tuple[Path, Path]) -> str:
        tls = client_context(deployment.ca, cert_file=cert[0], key_file=cert[1])
        return asyncio.run(relay_handshake(deployment.url, tls))

    refused_impostor = attempt(impostor_files)
    refused_user = attempt((out / "alice.crt", out / "alice.key"))
    refused_stranger = attempt(stranger)
    assert "auth_failed" in refused_impostor and "deployment CA" in refused_impostor
    assert "auth_failed" in refused_user and "not a relay's" in refused_user
    assert "cannot connect" in refused_stranger or "refused" in refused_stranger
    refusals = wait_for_event(deployment.directory, "relay.refused", 2)
    assert "not signed by the deployment CA" in refusals[0]["reason"]
    assert "'alice'" in refusals[1]["reason"]
    # The real relay certificate is accepted.
    relay_cert = (deployment.directory / "pki" / "relay.crt",
                  deployment.directory / "pki" / "relay.key")
    assert attempt(relay_cert) == "accepted"


async def relay_handshake(url: str, tls: ssl.SSLContext) -> str:
    """Connect to /api/v1/relay as a relay would; "accepted" or why not."""
    try:
        carrier = await websocket.connect(websocket.websocket_url(url, "/api/v1/relay"), tls,
                                          timeout=10)
    except ClientError as exc:
        return str(exc)
    codec = MuxConnection("client")
    codec.send_hello({"role": "relay"})
    session = MuxSession(codec)
    carrier.attach(session)
    await session.hello_within(10)
    try:
        await asyncio.wait_for(session.closed.wait(), 1.0)
    except TimeoutError:
        session.close(Reason.CANCELLED, "done")
        return "accepted"
    return session.end_reason()


def test_a_role_certificate_cannot_sign_in_even_where_users_sign_in_with_certificates(
        deployment: Deployment, start_process, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # auth.client_ca is the deployment CA itself, and dial-out makes the listener trust
    # it too: the relay's certificate is verified by TLS, yet must count for nothing.
    with deployment.config.open("a") as handle:
        handle.write('\n[auth]\nflow = "certificate"\nclient_ca = "pki/ca.crt"\n'
                     '[[auth.flows]]\nname = "certificate"\n'
                     '[[auth.flows.steps]]\nprovider = "certificate"\n')
    dial_out(deployment)
    deployment.add_user("portcullis-relay", PASSWORD, ["staff"])
    out = tmp_path / "users"
    issued = run_cli("cert", "issue", "alice", "--out", str(out), "--dir",
                     str(deployment.directory))
    assert issued.returncode == 0, issued.stderr
    deployment.add_user("alice", PASSWORD, ["staff"])
    edge = start_process("up", "--dir", str(deployment.directory), name="up")
    edge.wait_for(r"Portal: https://")

    def sign_in(cert: tuple[Path, Path]) -> dict[str, Any]:
        tls = ssl.create_default_context(cafile=str(deployment.ca))
        tls.load_cert_chain(*cert)
        with httpx.Client(base_url=deployment.url, verify=tls, timeout=30) as client:
            return dict(client.post("/api/v1/login", json={}).json())

    pki = deployment.directory / "pki"
    for role in ("relay", "gateway"):
        refused = sign_in((pki / f"{role}.crt", pki / f"{role}.key"))
        assert refused.get("status") != "authenticated", refused
    assert sign_in((out / "alice.crt", out / "alice.key"))["status"] == "authenticated"


def start_haproxy(start_process: Callable[..., Process], tmp_path: Path, port: int,
                  backend: int) -> Process:
    """HAProxy in TCP mode on `port` in front of the edge: the TLS (and the relay's
    certificate in it) passes through to the edge, as mutual TLS needs."""
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
        f"  timeout server 60s\nfrontend edge\n  bind 127.0.0.1:{port}\n"
        f"  default_backend edges\nbackend edges\n  server edge1 127.0.0.1:{backend}\n")
    process = start_process("-db", "-f", str(config), name="haproxy",
                            program=require_program("haproxy"))
    process.wait_listening(port)
    return process


def test_a_relay_behind_a_load_balancer_reconnects_after_the_balancer_restarts(
        deployment: Deployment, http_server, client_home: Path,  # type: ignore[no-untyped-def]
        start_process, tmp_path: Path) -> None:
    """The relay knows only the balancer's address; its connections pass through
    HAProxy to the edge, and come back when HAProxy is restarted (the reverse tunnels
    Teleport and Boundary users report lost behind load balancers)."""
    dial_out(deployment)
    deployment.add_resource("web", http_server.address, ["staff"], "Team web")
    deployment.add_user("alice", PASSWORD, ["staff"])
    balancer_port = free_port()
    _, start = start_relay(deployment, start_process, tmp_path,
                           [f"https://127.0.0.1:{balancer_port}"],
                           [f"127.0.0.1/32:{http_server.port}"])
    edge = start_process("up", "--dir", str(deployment.directory), name="up")
    edge.wait_for(r"Portal: https://")
    balancer = start_haproxy(start_process, tmp_path, balancer_port, deployment.port)
    start().wait_for(r"Relay: dialling out to")
    wait_for_event(deployment.directory, "relay.connected", 2)
    login(deployment.url, deployment.ca, client_home)

    def fetch() -> str:
        launch = start_process("launch", "web", "--listen", "127.0.0.1:0", name="launch")
        match = launch.wait_for(r"listening on ([\d.]+):(\d+)")
        page = curl(f"http://{match.group(1)}:{match.group(2)}/")
        launch.stop()
        return page.stdout + page.stderr

    assert "intranet home" in fetch()
    balancer.stop()   # every relay connection through it ends
    wait_for_event(deployment.directory, "relay.disconnected", 2)
    start_haproxy(start_process, tmp_path, balancer_port, deployment.port)
    wait_for_event(deployment.directory, "relay.connected", 4)
    assert "intranet home" in fetch()
