"""Flow B end to end: `portcullis up` with access policies, `portcullis connect` as the
client, curl and real servers on both sides."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Deployment, Process, require_program, run_cli
from peers.servers import echo_round_trip
from portcullis.gateway.carriers import RELEASE_AFTER

PASSWORD = "correct horse battery staple"

POLICIES = """
[[policies]]
name = "no-ssh"
action = "deny"
networks = ["127.0.0.0/8"]
ports = ["22"]

[[policies]]
name = "staff-loopback"
action = "allow"
groups = ["staff"]
networks = ["127.0.0.0/8"]
ports = ["1024-65535"]
protocols = ["tcp", "udp"]
"""


class Tunnel:
    def __init__(self, process: Process) -> None:
        self.process = process
        output = process.wait_for(r"forward to [^:]+:\d+: listening on [\d.]+:\d+|"
                                  r"HTTP CONNECT proxy: listening on [\d.]+:\d+")
        assert output
        process.wait_for(r"HTTP CONNECT proxy: listening on")
        text = process.output()
        self.socks = re.search(r"SOCKS5 proxy: listening on ([\d.]+:\d+)", text).group(1)
        self.http = re.search(r"HTTP CONNECT proxy: listening on ([\d.]+:\d+)", text).group(1)
        self.forwards = re.findall(r"^forward to [^:]+:\d+: listening on ([\d.]+):(\d+)",
                                   text, re.MULTILINE)
        self.udp = re.findall(r"UDP forward to [^:]+:\d+: listening on ([\d.]+):(\d+)", text)


def login(deployment: Deployment, user: str, home: Path) -> None:
    result = run_cli("login", deployment.url, "--user", user, "--password-stdin",
                     "--ca", str(deployment.ca), input=PASSWORD + "\n",
                     env={"PORTCULLIS_HOME": str(home)})
    assert result.returncode == 0, result.stderr


@pytest.fixture
def vpn(deployment: Deployment, http_server, echo_server, start_process):  # type: ignore[no-untyped-def]
    with deployment.config.open("a") as handle:
        handle.write(POLICIES)
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("bob", PASSWORD, ["finance"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    deployment.gateway = gateway  # type: ignore[attr-defined]
    return deployment


def connect(deployment: Deployment, start_process, home: Path, *forwards: str,  # type: ignore[no-untyped-def]
            udp: tuple[str, ...] = (), proxy_auth: bool = False,
            carriers: int | None = None) -> Tunnel:
    args = ["connect", "--proxy-auth" if proxy_auth else "--no-proxy-auth",
            "--socks", "127.0.0.1:0", "--http", "127.0.0.1:0"]
    if carriers is not None:
        args += ["--carriers", str(carriers)]
    for forward in forwards:
        args += ["-L", forward]
    for forward in udp:
        args += ["-U", forward]
    process = start_process(*args, name="connect", env={"PORTCULLIS_HOME": str(home)})
    process.wait_for(r"HTTP CONNECT proxy: listening on")
    if forwards or udp:
        process.wait_for(r"forward to .*: listening on")
    return Tunnel(process)


def carriers_up(home: Path, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    """The running tunnel's carriers (its status file), once `count` of them are up."""
    deadline = time.monotonic() + timeout
    carriers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            carriers = json.loads((home / "tunnel-status.json").read_text())["carriers"]
            if sum(1 for carrier in carriers if carrier["connected"]) == count:
                return carriers
        time.sleep(0.1)
    raise AssertionError(f"not {count} carriers up: {carriers}")


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_program("curl"), "-sS", "--max-time", "20", *args],
                          capture_output=True, text=True, timeout=30)


def audit(deployment: Deployment) -> list[dict[str, object]]:
    return [json.loads(line) for line in
            (deployment.directory / "audit.jsonl").read_text().splitlines()]


def test_curl_reaches_an_intranet_server_through_socks5_and_the_http_proxy(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home)
    url = f"http://localhost:{http_server.port}/"
    via_socks = curl("--socks5-hostname", tunnel.socks, url)
    via_http = curl("--proxytunnel", "--proxy", f"http://{tunnel.http}", url)
    assert "intranet home" in via_socks.stdout, via_socks.stderr
    assert "intranet home" in via_http.stdout, via_http.stderr
    streams = [e for e in audit(vpn) if e["event"] == "tunnel.stream"]
    assert streams and streams[-1]["rule"] == "staff-loopback"
    assert streams[-1]["destination"] == f"localhost:{http_server.port}/tcp"


def test_denied_destinations_are_refused_with_the_reason_and_audited(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "bob"
    login(vpn, "bob", home)   # finance: no allow rule
    tunnel = connect(vpn, start_process, home)
    refused = curl("--socks5-hostname", tunnel.socks, f"http://127.0.0.1:{http_server.port}/")
    assert refused.returncode == 97   # curl: the SOCKS server refused the connection
    by_http = curl("--proxytunnel", "--proxy", f"http://{tunnel.http}",
                   f"http://127.0.0.1:{http_server.port}/")
    assert "403" in by_http.stderr or by_http.returncode != 0
    denied = [e for e in audit(vpn) if e["event"] == "tunnel.denied"]
    assert denied and denied[-1]["user"] == "bob"
    assert denied[-1]["reason"] == "no rule matched: default deny"


def test_the_unspecified_address_never_reaches_the_gateway_itself(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    # Even with a rule allowing everything, 0.0.0.0 (the gateway host) stays refused.
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home)
    refused = curl("--socks5-hostname", tunnel.socks, f"http://0.0.0.0:{http_server.port}/")
    assert refused.returncode == 97
    denied = [e for e in audit(vpn) if e["event"] == "tunnel.denied"]
    assert "unspecified address" in str(denied[-1]["reason"])


def test_a_deny_rule_before_the_allow_rule_wins_for_its_port(
        vpn: Deployment, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home)
    curl("--socks5-hostname", tunnel.socks, "http://127.0.0.1:22/")
    denied = [e for e in audit(vpn) if e["event"] == "tunnel.denied"]
    assert denied[-1]["rule"] == "no-ssh"


def test_policy_explain_names_the_deciding_rule(vpn: Deployment) -> None:
    allowed = run_cli("policy", "explain", "--user", "alice", "--to", "127.0.0.1:8080/tcp",
                      "--dir", str(vpn.directory))
    denied = run_cli("policy", "explain", "--user", "alice", "--to", "127.0.0.1:22/tcp",
                     "--dir", str(vpn.directory))
    icmp = run_cli("policy", "explain", "--user", "alice", "--to", "127.0.0.1/icmp",
                   "--dir", str(vpn.directory))
    assert allowed.returncode == denied.returncode == icmp.returncode == 0
    assert "ALLOWED" in allowed.stdout and '"staff-loopback"' in allowed.stdout
    assert "DENIED" in denied.stdout and '"no-ssh"' in denied.stdout
    assert "DENIED" in icmp.stdout and "default deny" in icmp.stdout


def test_a_forward_carries_100_mib_each_way_intact(
        vpn: Deployment, echo_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home, f"127.0.0.1:0:127.0.0.1:{echo_server.port}")
    host, port = tunnel.forwards[0]
    sent, received, count = echo_round_trip(host, int(port), seed=3)
    assert count == 100 * 1024 * 1024 and received == sent


def test_an_administrator_ends_a_tunnel_and_the_client_says_so(
        vpn: Deployment, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    alice, admin = tmp_path / "alice", tmp_path / "admin"
    login(vpn, "alice", alice)
    tunnel = connect(vpn, start_process, alice)
    carriers_up(alice, 2)
    result = run_cli("login", vpn.url, "--user", "admin", "--password-stdin", "--ca",
                     str(vpn.ca), input=vpn.admin_password + "\n",
                     env={"PORTCULLIS_HOME": str(admin)})
    assert result.returncode == 0, result.stderr
    listed = run_cli("sessions", "list", env={"PORTCULLIS_HOME": str(admin)})
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " alice " in line)
    assert " tunnel " in row
    # Regular users may not.
    refused = run_cli("sessions", "list", env={"PORTCULLIS_HOME": str(alice)})
    assert refused.returncode == 1 and "admin groups" in refused.stderr
    killed = run_cli("sessions", "kill", "--user", "alice", env={"PORTCULLIS_HOME": str(admin)})
    # Its two carriers (--carriers, default 2) are two connections.
    assert killed.returncode == 0 and "ended 2 connection" in killed.stdout
    assert "revoked 1 sign-in session" in killed.stdout
    assert tunnel.process.popen.wait(5) == 1
    assert "ended by an administrator" in tunnel.process.output()


def test_garbage_on_one_tunnel_ends_only_that_tunnel(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    home = tmp_path / "alice"
    login(vpn, "alice", home)
    healthy = connect(vpn, start_process, home)
    token = json.loads((home / "session.json").read_text())["token"]

    async def hostile(payload: bytes) -> str:
        carrier, session = await wire_tunnel(vpn, token)
        carrier.send_message([payload])
        await asyncio.wait_for(session.closed.wait(), 10)
        return session.end_reason()

    frames = {
        "garbage": b"\xff" * 32,
        "oversized": bytes([5, 0]) + (1).to_bytes(4, "big") + (64 << 20).to_bytes(4, "big"),
        "data on an unopened stream": bytes([5, 0]) + (77).to_bytes(4, "big")
        + (3).to_bytes(4, "big") + b"abc",
    }
    for name, payload in frames.items():
        reason = asyncio.run(hostile(payload))
        assert "protocol_error" in reason or "protocol error" in reason, (name, reason)

    # A server that accepts connections (the kernel does) but never reads them.
    sink = socket.create_server(("127.0.0.1", 0), backlog=8)
    sink_port = sink.getsockname()[1]

    async def overrun() -> str:
        """Open a stream the gateway accepts, then send more than its window allows."""
        from portcullis.proto import mux

        carrier, session = await wire_tunnel(vpn, token)
        stream = session.open_local(mux.Protocol.TCP, "127.0.0.1", sink_port)
        for _ in range(200):
            if stream.accepted:
                break
            await asyncio.sleep(0.05)
        assert stream.accepted
        block = bytes([5, 0]) + stream.stream_id.to_bytes(4, "big") + \
            (256 * 1024).to_bytes(4, "big") + bytes(256 * 1024)
        # 64 MiB, ignoring every window: more than the sink's buffers and the window.
        for _ in range(64):
            carrier.send_message([block] * 4)
            await asyncio.sleep(0)
            if session.closed.is_set():
                break
        await asyncio.wait_for(session.closed.wait(), 10)
        return session.end_reason()

    reason = asyncio.run(overrun())
    sink.close()
    assert "protocol error" in reason or "protocol_error" in reason, reason
    # The other tunnel and the gateway carry on.
    still = curl("--socks5-hostname", healthy.socks, f"http://127.0.0.1:{http_server.port}/")
    assert "intranet home" in still.stdout
    assert healthy.process.popen.poll() is None
    time.sleep(0)


def test_a_real_dns_server_answers_dig_through_a_udp_forward(
        vpn: Deployment, dns_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    dig = require_program("dig")
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home, udp=(f"127.0.0.1:0:127.0.0.1:{dns_server.port}",))
    host, port = tunnel.udp[0]
    answer = subprocess.run([dig, f"@{host}", "-p", port, dns_server.NAME, "+short",
                             "+time=3", "+tries=2"], capture_output=True, text=True, timeout=30)
    assert answer.stdout.strip() == dns_server.ADDRESS, answer.stdout + answer.stderr
    # The flow is one audited stream of the tunnel, by the UDP rule.
    for _ in range(30):
        streams = [e for e in audit(vpn) if e["event"] == "tunnel.stream"
                   and str(e["destination"]).endswith("/udp")]
        if streams or tunnel.process.popen.poll() is not None:
            break
        time.sleep(0.1)
    assert tunnel.process.popen.poll() is None


def test_udp_to_a_denied_destination_is_refused_and_audited(
        vpn: Deployment, dns_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    dig = require_program("dig")
    home = tmp_path / "bob"
    login(vpn, "bob", home)   # finance: no rule allows bob anything
    tunnel = connect(vpn, start_process, home, udp=(f"127.0.0.1:0:127.0.0.1:{dns_server.port}",))
    host, port = tunnel.udp[0]
    answer = subprocess.run([dig, f"@{host}", "-p", port, dns_server.NAME, "+short",
                             "+time=1", "+tries=1"], capture_output=True, text=True, timeout=30)
    assert dns_server.ADDRESS not in answer.stdout
    denied = [e for e in audit(vpn) if e["event"] == "tunnel.denied"]
    assert denied and str(denied[-1]["destination"]).endswith("/udp")


def test_an_idle_tunnel_costs_the_gateway_little_memory(vpn: Deployment, tmp_path: Path) -> None:
    """10,000 idle tunnels must fit: each may hold a small read buffer, not the room its
    largest frame needed (issue 15 measured 290 KiB a tunnel when every WebSocket started
    with 256 KiB)."""
    import asyncio

    from portcullis.proto.mux import Reason

    home = tmp_path / "alice"
    login(vpn, "alice", home)
    token = json.loads((home / "session.json").read_text())["token"]

    async def open_idle(count: int) -> list[Any]:
        return [(await wire_tunnel(vpn, token))[1] for _ in range(count)]

    async def measure() -> float:
        warm = await open_idle(20)   # the allocator's first arenas are not a tunnel's
        await asyncio.sleep(0.5)
        before = rss_kib(vpn.gateway)  # type: ignore[attr-defined]
        idle = await open_idle(TUNNELS)
        await asyncio.sleep(0.5)
        grown = rss_kib(vpn.gateway) - before  # type: ignore[attr-defined]
        for session in warm + idle:
            session.close(Reason.CANCELLED, "test done")
        return grown / TUNNELS

    TUNNELS = 150
    per_tunnel = asyncio.run(measure())
    assert per_tunnel < 100, f"{per_tunnel:.0f} KiB per idle tunnel"


def rss_kib(process: Process) -> int:
    status = Path(f"/proc/{process.popen.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


async def wire_tunnel(deployment: Deployment, token: str) -> tuple[Any, Any]:
    """A tunnel opened at the wire with a session token, HELLO answered: (its WebSocket
    carrier, its MuxSession), for tests that must send what `connect` never would."""
    import asyncio
    import ssl

    from portcullis.net import websocket
    from portcullis.net.muxsession import MuxSession
    from portcullis.proto.mux import MuxConnection

    tls = ssl.create_default_context(cafile=str(deployment.ca))
    carrier = await websocket.connect(f"wss://localhost:{deployment.port}/api/v1/tunnel", tls)
    codec = MuxConnection("client")
    codec.send_hello({"version": 1, "session": token})
    session = MuxSession(codec)
    carrier.attach(session)
    await asyncio.wait_for(session.hello, 10)
    return carrier, session


def test_a_stream_whose_reader_never_reads_does_not_slow_63_others(
        vpn: Deployment, echo_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home, f"127.0.0.1:0:127.0.0.1:{echo_server.port}")
    host, port = tunnel.forwards[0]
    before = rss_kib(vpn.gateway)  # type: ignore[attr-defined]

    # The stalled one: writes until every buffer on its path is full, never reads.
    stalled = socket.create_connection((host, int(port)), timeout=10)
    stalled.settimeout(2)
    pushed = 0
    chunk = b"s" * 65536
    for _ in range(4096):   # at most 256 MiB offered
        try:
            stalled.sendall(chunk)
        except TimeoutError:
            break
        pushed += len(chunk)
    assert pushed < 256 * 1024 * 1024, "nothing pushed back: the stream is not bounded"

    size = 2 * 1024 * 1024
    results: dict[int, bool] = {}

    def echo_through(index: int) -> None:
        payload = random.Random(index).randbytes(size)
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            received = bytearray()

            def reader() -> None:
                while len(received) < size:
                    data = sock.recv(1 << 20)
                    if not data:
                        return
                    received.extend(data)

            thread = threading.Thread(target=reader)
            thread.start()
            sock.sendall(payload)
            thread.join(60)
            results[index] = bytes(received) == payload

    workers = [threading.Thread(target=echo_through, args=(i,)) for i in range(63)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert len(results) == 63 and all(results.values())
    # The stalled stream still holds its buffers, and only those: bounded by its windows.
    grown_mib = (rss_kib(vpn.gateway) - before) / 1024  # type: ignore[attr-defined]
    assert grown_mib < 128, f"gateway grew by {grown_mib:.0f} MiB"
    stalled.close()


def test_ping_reaches_a_host_in_a_network_namespace_through_the_gateway(
        deployment: Deployment, test_host, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    with deployment.config.open("a") as handle:
        handle.write(f'\n[[policies]]\nname = "lab-ping"\naction = "allow"\n'
                     f'groups = ["staff"]\nnetworks = ["{test_host.address}/32"]\n'
                     f'protocols = ["icmp"]\n')
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    home = tmp_path / "alice"
    login(deployment, "alice", home)
    env = {"PORTCULLIS_HOME": str(home)}
    pinged = run_cli("ping", test_host.address, "-c", "3", "-i", "0.2", env=env)
    assert pinged.returncode == 0, pinged.stderr
    assert re.findall(r"56 bytes from [\d.]+: seq=\d time=[\d.]+ ms", pinged.stdout) and \
        "3 sent, 3 answered" in pinged.stdout
    # The gateway's own side of the veth is not in the rule: refused, and audited.
    refused = run_cli("ping", test_host.gateway_side, "-c", "1", env=env)
    assert refused.returncode == 1 and "no rule allows it (default deny)" in refused.stderr
    denied = [e for e in audit(deployment) if e["event"] == "tunnel.denied"]
    assert denied[-1]["destination"] == f"{test_host.gateway_side}:0/icmp"


WHOAMI = """
import socket
server = socket.create_server(("{address}", 7000))
while True:
    conn, peer = server.accept()
    conn.sendall(peer[0].encode() + b"\\n")
    conn.close()
"""


@pytest.fixture
def pooled(deployment: Deployment, test_host, start_process):  # type: ignore[no-untyped-def]
    """A server in the namespace that tells each client its source address, and a pool
    routed to the gateway (and local on it, so replies reach its sockets)."""
    pool = f"198.19.{test_host.octet}.0/30"
    test_host.run("route", "add", "local", pool, "dev", "lo")
    try:
        test_host.run("route", "add", pool, "via", test_host.gateway_side, inside=True)
        server = start_process("netns", "exec", test_host.namespace, sys.executable, "-c",
                               WHOAMI.format(address=test_host.address), program="ip",
                               name="whoami")
        deadline = time.monotonic() + 10
        while "7000" not in subprocess.run(["ip", "netns", "exec", test_host.namespace, "ss",
                                            "-ltn"], capture_output=True, text=True).stdout:
            assert time.monotonic() < deadline and server.popen.poll() is None
            time.sleep(0.05)
        deployment.set("vpn", "address_pool", f'"{pool}"')
        with deployment.config.open("a") as handle:
            handle.write(f'\n[[policies]]\nname = "lab"\naction = "allow"\ngroups = ["staff"]\n'
                         f'networks = ["{test_host.address}/32"]\nports = ["7000"]\n')
        for user in ("alice", "carol", "dave"):
            deployment.add_user(user, PASSWORD, ["staff"])
        gateway = start_process("up", "--dir", str(deployment.directory), name="up")
        gateway.wait_for(r"Portal: https://")
        yield deployment, test_host, ipaddress.ip_network(pool)
    finally:
        subprocess.run(["ip", "route", "del", "local", pool, "dev", "lo"], capture_output=True)


def whoami(tunnel: Tunnel) -> str:
    host, port = tunnel.forwards[0]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        return sock.recv(100).decode().strip()


def test_servers_see_each_tunnels_own_address_from_the_pool(
        pooled, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    deployment, host, pool = pooled
    forward = f"127.0.0.1:0:{host.address}:7000"
    tunnels = {}
    for user in ("alice", "carol"):
        home = tmp_path / user
        login(deployment, user, home)
        tunnels[user] = connect(deployment, start_process, home, forward)
    seen = {user: whoami(tunnel) for user, tunnel in tunnels.items()}
    assert all(ipaddress.ip_address(address) in pool for address in seen.values()), seen
    assert seen["alice"] != seen["carol"]
    # The pool (/30: two addresses) is full: a third tunnel is refused, clearly.
    dave = tmp_path / "dave"
    login(deployment, "dave", dave)
    refused = run_cli("connect", "--socks", "off", "--http", "off",
                      env={"PORTCULLIS_HOME": str(dave)}, timeout=30)
    assert refused.returncode == 1 and "no intranet address is free" in refused.stderr
    # Once alice's tunnel ends, her address is released and dave gets it.
    tunnels["alice"].process.stop()
    for _ in range(50):
        if not [e for e in audit(deployment)
                if e["event"] == "tunnel.ended" and e["carrier"] == 0]:
            time.sleep(0.1)
    # Her extra carriers may use the address until they see the tunnel gone.
    time.sleep(RELEASE_AFTER + 0.5)
    third = connect(deployment, start_process, dave, forward)
    assert whoami(third) == seen["alice"]
    assert whoami(tunnels["carol"]) == seen["carol"]


def test_socks5_udp_associate_carries_a_dns_query(
        vpn: Deployment, dns_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    """A SOCKS5 client written from RFC 1928 (not our codec) asks dnsmasq a question."""
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home)
    host, port = tunnel.socks.split(":")
    query = (b"\x43\x21\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
             b"\x04wiki\x04corp\x07example\x00\x00\x01\x00\x01")
    with socket.create_connection((host, int(port)), timeout=10) as control:
        control.sendall(b"\x05\x01\x00")
        assert control.recv(2) == b"\x05\x00"
        control.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        reply = control.recv(10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        relay = (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(5)
            header = b"\x00\x00\x00\x01" + socket.inet_aton("127.0.0.1") + \
                dns_server.port.to_bytes(2, "big")
            udp.sendto(header + query, relay)
            answer, _ = udp.recvfrom(1024)
    assert answer[:10] == header   # the reply names the server it came from
    assert answer[10:12] == b"\x43\x21"   # our query's id
    assert socket.inet_aton(dns_server.ADDRESS) in answer[10:]


def test_the_client_reconnects_after_the_gateway_restarts(
        deployment: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import secrets as random_names

    from peers.stores import REDIS_URL, answering_redis_url

    asyncio.run(answering_redis_url())
    # Sessions in Redis survive the gateway's restart, as in a real deployment.
    prefix = f"pc-reconnect-{random_names.token_hex(4)}:"
    deployment.set("store", "ephemeral", f'"{REDIS_URL}?prefix={prefix}"')
    with deployment.config.open("a") as handle:
        handle.write(POLICIES)
    deployment.add_user("alice", PASSWORD, ["staff"])
    first = start_process("up", "--dir", str(deployment.directory), name="up")
    first.wait_for(r"Portal: https://")
    home = tmp_path / "alice"
    login(deployment, "alice", home)
    tunnel = connect(deployment, start_process, home)
    url = f"http://127.0.0.1:{http_server.port}/"
    assert "intranet home" in curl("--socks5-hostname", tunnel.socks, url).stdout

    first.stop()
    tunnel.process.wait_for(r"tunnel lost|tunnel down", timeout=15)
    second = start_process("up", "--dir", str(deployment.directory), name="up-again")
    second.wait_for(r"Portal: https://")
    tunnel.process.wait_for(r"tunnel up as alice[^\n]*\n(.|\n)*tunnel up as alice", timeout=40)
    # The same local proxy works again, through the new gateway process.
    assert "intranet home" in curl("--socks5-hostname", tunnel.socks, url).stdout
    assert tunnel.process.popen.poll() is None


def test_signing_out_ends_the_running_tunnel(
        deployment: Deployment, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    deployment.set("vpn", "session_check", "0.5")
    with deployment.config.open("a") as handle:
        handle.write(POLICIES)
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    home = tmp_path / "alice"
    login(deployment, "alice", home)
    tunnel = connect(deployment, start_process, home)
    token = json.loads((home / "session.json").read_text())["token"]
    import ssl

    import httpx

    httpx.post(f"{deployment.url}/api/v1/logout", headers={"authorization": f"Bearer {token}"},
               verify=ssl.create_default_context(cafile=str(deployment.ca)))
    assert tunnel.process.popen.wait(15) == 1
    assert "sign in again" in tunnel.process.output()


def test_a_policy_reload_applies_to_new_streams_and_keeps_the_tunnel(
        vpn: Deployment, http_server, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home)
    url = f"http://127.0.0.1:{http_server.port}/"
    assert "intranet home" in curl("--socks5-hostname", tunnel.socks, url).stdout
    # Deny that port from now on, and tell the gateway.
    text = vpn.config.read_text().replace('name = "no-ssh"', 'name = "no-ssh"\nusers = []')
    text = text.replace('ports = ["22"]', f'ports = ["22", "{http_server.port}"]')
    vpn.config.write_text(text)
    vpn.gateway.popen.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
    vpn.gateway.wait_for(r"configuration reloaded")  # type: ignore[attr-defined]
    refused = curl("--socks5-hostname", tunnel.socks, url)
    assert refused.returncode == 97
    assert tunnel.process.popen.poll() is None      # the tunnel itself carried on
    assert [e for e in audit(vpn) if e["event"] == "tunnel.denied"][-1]["rule"] == "no-ssh"


def test_iperf3_runs_through_a_forward(
        vpn: Deployment, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    from conftest import free_port

    iperf3 = require_program("iperf3")
    port = free_port()
    server = start_process("-s", "-p", str(port), program=iperf3, name="iperf3")
    deadline = time.monotonic() + 10
    while not subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True).stdout.strip():
        assert time.monotonic() < deadline and server.popen.poll() is None
        time.sleep(0.05)
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    tunnel = connect(vpn, start_process, home, f"127.0.0.1:0:127.0.0.1:{port}")
    host, local = tunnel.forwards[0]
    run = subprocess.run([iperf3, "-c", host, "-p", local, "-n", "100M", "-J"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    result = json.loads(run.stdout)["end"]
    # iperf3's receiver counts what arrived within its measured interval.
    assert result["sum_sent"]["bytes"] >= 100 * 1024 * 1024
    assert result["sum_received"]["bytes"] >= 0.9 * result["sum_sent"]["bytes"]
