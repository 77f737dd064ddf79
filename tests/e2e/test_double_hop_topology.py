"""The double-hop topology itself (peers/topology.py), proved with real connections
before anything of Portcullis runs on it: who reaches whom, in each mode; and that an
edge in dmz1 without a relay reaches nothing inside."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers.doublehop import GATEWAY_PORT, PORTAL_PORT, RELAY_HEALTH_PORT, WEB_PORT, deploy
from peers.servers import SCRIPT as SERVERS_SCRIPT
from peers.topology import (
    EDGE,
    EDGE_DMZ,
    MODES,
    RELAY,
    RELAY_INSIDE,
    RELAY_PORT,
    SERVER,
    DoubleHopHosts,
    Host,
    Mode,
    double_hop,
)


@pytest.fixture(params=MODES)
def hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DoubleHopHosts]:
    mode: Mode = request.param
    with double_hop(mode, tmp_path) as made:
        yield made


def listen(host: Host, address: str, port: int) -> None:
    """A real server (TCP echo) on address:port of `host`, once it listens."""
    host.wait_listening(port, host.start(sys.executable, str(SERVERS_SCRIPT), address,
                                         str(port), name=f"listen-{port}"))


def test_each_host_reaches_only_its_neighbours_and_none_forwards(
        hosts: DoubleHopHosts) -> None:
    listen(hosts.dmz1, "0.0.0.0", GATEWAY_PORT)
    listen(hosts.dmz2, "0.0.0.0", RELAY_PORT)
    listen(hosts.intranet, SERVER, WEB_PORT)
    assert hosts.client.connects(EDGE, GATEWAY_PORT)
    assert not hosts.client.connects(RELAY, RELAY_PORT)
    assert not hosts.client.connects(SERVER, WEB_PORT)
    assert hosts.dmz2.connects(SERVER, WEB_PORT)
    for host in hosts.hosts:
        forwarding = host.run("sysctl", "-n", "net.ipv4.ip_forward", timeout=10)
        assert forwarding.stdout.strip() == "0", host.name


def test_dmz1_has_no_route_to_the_intranet(hosts: DoubleHopHosts) -> None:
    listen(hosts.intranet, SERVER, WEB_PORT)
    for address in (SERVER, RELAY_INSIDE):
        route = hosts.dmz1.run("ip", "route", "get", address, timeout=10)
        assert route.returncode != 0 and "unreachable" in route.stderr, route.stdout
    assert not hosts.dmz1.connects(SERVER, WEB_PORT)
    # The same server, from the relay's host: it is there.
    assert hosts.dmz2.connects(SERVER, WEB_PORT)


def test_dmz2_lets_dmz1_open_only_the_relay_port_in_classic_mode_and_nothing_in_dial_out(
        hosts: DoubleHopHosts) -> None:
    listen(hosts.dmz2, "0.0.0.0", RELAY_PORT)
    listen(hosts.dmz2, "0.0.0.0", RELAY_HEALTH_PORT)
    listen(hosts.dmz1, "0.0.0.0", GATEWAY_PORT)
    # Servers listen on both ports of dmz2: what refuses is the firewall.
    assert hosts.dmz2.connects(RELAY, RELAY_PORT) and hosts.dmz2.connects(RELAY,
                                                                         RELAY_HEALTH_PORT)
    assert hosts.dmz1.connects(RELAY, RELAY_PORT) is (hosts.mode == "classic")
    assert not hosts.dmz1.connects(RELAY, RELAY_HEALTH_PORT)
    assert not hosts.client.connects(RELAY, RELAY_PORT)
    # dmz2's own connections out to dmz1 (how the relay dials out) go through.
    assert hosts.dmz2.connects(EDGE_DMZ, GATEWAY_PORT)
    ruleset = hosts.dmz2.run("nft", "list", "ruleset", timeout=10).stdout
    assert "ct state new drop" in ruleset


def test_the_hosts_and_their_processes_are_gone_after_a_test_that_fails(
        tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), double_hop("dial-out", tmp_path) as hosts:
        namespaces = [host.namespace for host in hosts.hosts]
        server = hosts.intranet.start(sys.executable, str(SERVERS_SCRIPT), SERVER,
                                      str(WEB_PORT), name="left-running")
        hosts.intranet.wait_listening(WEB_PORT, server)
        raise RuntimeError("the test failed")
    assert server.popen.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=10).stdout
    assert not [name for name in namespaces if name in listed]


def test_without_a_relay_the_edge_in_dmz1_cannot_reach_the_portal(tmp_path: Path) -> None:
    with double_hop("classic", tmp_path) as hosts, \
            deploy(hosts, tmp_path, via="direct") as deployment:
        assert deployment.portal_status() == "502"
        signed_in = deployment.login(tmp_path / "alice")
        assert signed_in.returncode != 0
        assert "Traceback" not in signed_in.stderr
        # The portal itself is up: from its own host it answers.
        health = hosts.intranet.run(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
            "--cacert", str(deployment.deployment.ca),
            "--cert", str(deployment.deployment.directory / "pki" / "gateway.crt"),
            "--key", str(deployment.deployment.directory / "pki" / "gateway.key"),
            f"https://{SERVER}:{PORTAL_PORT}/api/v1/health", timeout=20)
        assert health.stdout == "200", health.stderr
