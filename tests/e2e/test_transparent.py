"""Transparent mode in network namespaces: a client namespace with no route to the
server namespace reaches it only through the tunnel, only for the pushed network; its
nftables rules are gone after the client exits, is stopped, or is killed and restarted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PORTCULLIS, Deployment, free_port_run, require_program, run_cli
from peers.missing import missing_peer

PASSWORD = "correct horse battery staple"
UDP_ECHO = """
import socket
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("{address}", 7001))
while True:
    data, peer = server.recvfrom(2048)
    server.sendto(b"echo:" + data + b" from " + peer[0].encode(), peer)
"""
UDP_CLIENT = """
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(3)
for attempt in range(3):
    sock.sendto(b"hello", ("{address}", 7001))
    try:
        print(sock.recvfrom(2048)[0].decode())
        break
    except TimeoutError:
        continue
"""
WHOAMI = """
import socket
server = socket.create_server(("{address}", 7000))
while True:
    conn, peer = server.accept()
    conn.sendall(peer[0].encode() + b"\\n")
    conn.close()
"""


@dataclass
class Lab:
    client_ns: str
    server_ns: str
    gateway_for_client: str   # the gateway's address on the client's link
    gateway_for_server: str
    server: str
    server_network: str

    def client(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        return subprocess.run(["ip", "netns", "exec", self.client_ns, *args],
                              capture_output=True, text=True, **kwargs)

    def tables(self) -> list[str]:
        listed = self.client("nft", "list", "tables", timeout=10).stdout
        return re.findall(r"table inet (portcullis_\d+)", listed)


@pytest.fixture
def lab() -> Iterator[Lab]:
    for program in ("ip", "nft", "curl", "dig", "dnsmasq"):
        require_program(program)
    if os.geteuid() != 0:
        message = "namespaces and nftables need root"
        missing_peer(message)
    tag = os.urandom(3).hex()
    a = int(tag[:2], 16) % 120 * 2 + 1
    client_ns, server_ns = f"pc-c{tag}", f"pc-s{tag}"
    links = [(f"pc{tag}c0", f"pc{tag}c1", client_ns, f"198.18.{a}"),
             (f"pc{tag}s0", f"pc{tag}s1", server_ns, f"198.18.{a + 1}")]

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    processes: list[subprocess.Popen[bytes]] = []
    try:
        for near, far, namespace, prefix in links:
            ip("netns", "add", namespace)
            ip("link", "add", near, "type", "veth", "peer", "name", far)
            ip("link", "set", far, "netns", namespace)
            ip("addr", "add", f"{prefix}.1/30", "dev", near)
            ip("link", "set", near, "up")
            ip("-n", namespace, "addr", "add", f"{prefix}.2/30", "dev", far)
            ip("-n", namespace, "link", "set", far, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        server_network = f"198.18.{a + 1}.0/30"
        # The client has a route to the server's network, but into a veth pair that
        # goes nowhere: only the tunnel's rules can take its packets there.
        ip("-n", client_ns, "link", "add", "void0", "type", "veth", "peer", "name", "void1")
        ip("-n", client_ns, "link", "set", "void0", "up")
        ip("-n", client_ns, "link", "set", "void1", "up")
        ip("-n", client_ns, "route", "add", server_network, "dev", "void0")
        # Where the client's usual resolver would be (192.0.2.53, documentation range).
        ip("-n", client_ns, "route", "add", "192.0.2.0/24", "dev", "void0")
        server = f"198.18.{a + 1}.2"
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", server_ns, sys.executable, "-c",
             WHOAMI.format(address=server)]))
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", server_ns, sys.executable, "-c",
             UDP_ECHO.format(address=server)]))
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", server_ns, "dnsmasq", "--no-daemon", "-C", "/dev/null",
             f"--listen-address={server}", "--bind-interfaces", "--no-resolv", "--no-hosts",
             "--address=/wiki.corp.example/10.1.2.3", "--user=root"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield Lab(client_ns, server_ns, f"198.18.{a}.1", f"198.18.{a + 1}.1", server,
                  server_network)
    finally:
        for process in processes:
            process.terminate()
            process.wait(5)
        for near, _, namespace, _ in links:
            subprocess.run(["ip", "link", "del", near], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def test_transparent_mode_carries_only_the_pushed_network_and_cleans_up(
        lab: Lab, tmp_path: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    port = free_port_run(3)
    directory = tmp_path / "deployment"
    made = run_cli("init", "--dir", str(directory), "--port", str(port),
                   "--hostname", lab.gateway_for_client)
    assert made.returncode == 0, made.stderr
    deployment = Deployment(directory, port, "")
    deployment.set("vpn", "networks", f'["{lab.server_network}"]')
    deployment.set("vpn", "dns_servers", f'["{lab.server}"]')
    deployment.set("vpn", "dns_suffixes", '["corp.example"]')
    with deployment.config.open("a") as handle:
        handle.write(f'\n[[policies]]\nname = "lab"\naction = "allow"\ngroups = ["staff"]\n'
                     f'networks = ["{lab.server}/32"]\nports = ["7000", "7001", "53"]\n')
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway = start_process("up", "--dir", str(directory), name="up")
    gateway.wait_for(r"Portal: https://")
    home = tmp_path / "alice"
    env = {**os.environ, "PORTCULLIS_HOME": str(home)}
    signed_in = lab.client(PORTCULLIS, "login", f"https://{lab.gateway_for_client}:{port}",
                           "--user", "alice", "--password-stdin", "--ca", str(deployment.ca),
                           input=PASSWORD + "\n", env=env, timeout=30)
    assert signed_in.returncode == 0, signed_in.stderr
    url = f"http://{lab.server}:7000/"
    # Without the tunnel the client cannot reach the server at all.
    assert lab.client("curl", "-sS", "--max-time", "2", url, timeout=10).returncode != 0

    def start() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", lab.client_ns, PORTCULLIS, "connect", "--transparent",
             "--socks", "off", "--http", "off"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while f"portcullis_{process.pid}" not in lab.tables():
            assert time.monotonic() < deadline and process.poll() is None, \
                process.stdout.read() if process.stdout else ""
            time.sleep(0.1)
        return process

    client = start()
    try:
        fetched = lab.client("curl", "-sS", "--http0.9", "--max-time", "10", url, timeout=20)
        assert fetched.stdout.strip() == lab.gateway_for_server, fetched.stderr
        answer = lab.client("dig", "@192.0.2.53", "wiki.corp.example", "+short", "+time=3",
                            "+tries=2", timeout=20)
        assert answer.stdout.strip() == "10.1.2.3", answer.stdout + answer.stderr
        # UDP to the pushed network goes through the tunnel too (TPROXY), and the
        # answer comes back from the server's address.
        echoed = lab.client(sys.executable, "-c", UDP_CLIENT.format(address=lab.server),
                            timeout=20)
        assert echoed.stdout.strip() == f"echo:hello from {lab.gateway_for_server}", \
            echoed.stdout + echoed.stderr
        # Other destinations are not captured: still unreachable from the client.
        other = f"http://{lab.gateway_for_server.rsplit('.', 1)[0]}.3:7000/"
        assert lab.client("curl", "-sS", "--max-time", "2", other, timeout=10).returncode != 0
    finally:
        client.send_signal(signal.SIGTERM)
        client.wait(15)
    assert lab.tables() == []

    # Killed outright, it leaves its rules; the next client removes them on start.
    crashed = start()
    crashed.kill()
    crashed.wait(5)
    assert len(lab.tables()) == 1
    again = start()
    deadline = time.monotonic() + 10
    while len(lab.tables()) != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (len(lab.tables()) == 1 and lab.tables()[0] == f"portcullis_{again.pid}") or \
        len(lab.tables()) == 1
    again.send_signal(signal.SIGTERM)
    output, _ = again.communicate(timeout=15)
    assert "removed the rules a stopped client left behind" in output
    assert lab.tables() == []
