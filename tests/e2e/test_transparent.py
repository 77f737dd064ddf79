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
from peers.servers import DnsServer
from peers.topology import link, namespaces

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
def lab(tmp_path: Path) -> Iterator[Lab]:
    for program in ("ip", "nft", "curl", "dig", "dnsmasq"):
        require_program(program)
    with namespaces("client", "server", logs=tmp_path) as hosts:
        client, server_host = hosts["client"], hosts["server"]
        tag = client.namespace.rsplit("-", 1)[1]
        a = int(tag[:2], 16) % 120 * 2 + 1
        # The gateway's ends are in the root namespace: named with the tag, and removed
        # even if a process left behind keeps a namespace alive.
        near = (f"pc{tag}c0", f"pc{tag}s0")
        try:
            link(None, near[0], f"198.18.{a}.1", client, "eth0", f"198.18.{a}.2", prefix=30)
            link(None, near[1], f"198.18.{a + 1}.1", server_host, "eth0",
                 f"198.18.{a + 1}.2", prefix=30)
            server_network = f"198.18.{a + 1}.0/30"
            # The client has a route to the server's network, but into a veth pair that
            # goes nowhere: only the tunnel's rules can take its packets there.
            client.ip("link", "add", "void0", "type", "veth", "peer", "name", "void1")
            client.ip("link", "set", "void0", "up")
            client.ip("link", "set", "void1", "up")
            client.ip("route", "add", server_network, "dev", "void0")
            # Where the client's usual resolver would be (192.0.2.53, documentation range).
            client.ip("route", "add", "192.0.2.0/24", "dev", "void0")
            server = f"198.18.{a + 1}.2"
            server_host.start(sys.executable, "-c", WHOAMI.format(address=server),
                              name="whoami")
            server_host.start(sys.executable, "-c", UDP_ECHO.format(address=server),
                              name="udp-echo")
            server_host.start("dnsmasq", *DnsServer.arguments(server, 53), name="dnsmasq")
            yield Lab(client.namespace, server_host.namespace, f"198.18.{a}.1",
                      f"198.18.{a + 1}.1", server, server_network)
        finally:
            for name in near:
                subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)


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
