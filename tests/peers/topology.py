"""Hosts of our own for multi-host tests: network namespaces joined by veth pairs, on
addresses in 198.18.0.0/15 (the benchmarking range), made by the test and removed after
it, even when it fails.

`namespaces()` makes namespaces whose names carry a random tag (parallel runs never
clash) and deletes them afterwards (their veth ends go with them); `Host` runs commands
and processes inside one, `link()` joins two. `double_hop()` builds the four hosts of a
double-hop DMZ (issue 11, SPEC flow C):

    client ─ 198.18.1.0/24 ─ dmz1 (edge) ─ 198.18.2.0/24 ─ dmz2 (relay) ─ 198.19.10.0/24 ─ intranet
    .10                      .1      .1                     .2      .1                       .10

No host forwards packets, and each has routes only to the links it sits on, so the
client reaches dmz1 only, dmz1 reaches dmz2 only (it has no route to the intranet), and
dmz2 reaches the intranet. Every veth pair lives wholly inside the namespaces, so the
addresses are the same in every run and nothing touches the host's own interfaces.
nftables in dmz2 says who may open a connection to it: in classic mode, dmz1 may open
the relay's port and nothing else (the one inbound rule classic needs); in dial-out
mode nobody outside dmz2 may open anything — dmz2 only dials out.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conftest import Process, require_program
from peers.missing import missing_peer

Mode = Literal["classic", "dial-out"]
MODES: tuple[Mode, ...] = ("classic", "dial-out")

CLIENT = "198.18.1.10"
EDGE = "198.18.1.1"            # the edge gateway, as the client sees it
EDGE_DMZ = "198.18.2.1"        # the edge, as the relay sees it (dial-out connects here)
RELAY = "198.18.2.2"           # the relay, as the edge sees it (classic connects here)
RELAY_INSIDE = "198.19.10.1"   # the relay's source address towards the servers
SERVER = "198.19.10.10"        # the intranet host: servers, STA, portal, dnsmasq
INTRANET_NETWORK = "198.19.10.0/24"
RELAY_PORT = 8446              # the relay's classic-mode port in dmz2

CONNECTS = ("import socket, sys\n"
            "socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()")


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)


@dataclass
class Host:
    """One network namespace: a host of the topology."""

    name: str
    namespace: str
    logs: Path
    processes: list[Process] = field(default_factory=list)

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]

    def ip(self, *args: str) -> None:
        _ip("-n", self.namespace, *args)

    def run(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), input=input, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, **(env or {})})

    def start(self, *args: str, name: str, env: dict[str, str] | None = None) -> Process:
        """A process inside this host, stopped (with whatever it forked) by the
        topology after the test."""
        process = Process(["netns", "exec", self.namespace, *args],
                          self.logs / f"{self.name}-{name}.log", env, program="ip",
                          group=True)
        self.processes.append(process)
        return process

    def connects(self, host: str, port: int) -> bool:
        """Whether a TCP connection from this host to host:port is accepted."""
        return self.run(sys.executable, "-c", CONNECTS, host, str(port),
                        timeout=15).returncode == 0

    def wait_listening(self, port: int, process: Process | None = None, *,
                       udp: bool = False, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.run("ss", "-Hlun" if udp else "-Hltn", f"sport = :{port}",
                           timeout=10).stdout.strip():
            if process is not None and process.popen.poll() is not None:
                raise AssertionError(f"exited {process.popen.returncode}:\n{process.output()}")
            assert time.monotonic() < deadline, f"nothing listens on {self.name}:{port}"
            time.sleep(0.05)

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


@contextlib.contextmanager
def namespaces(*names: str, logs: Path) -> Iterator[dict[str, Host]]:
    """A fresh namespace per name (loopback up, forwarding off), and afterwards its
    processes stopped and the namespace deleted."""
    require_program("ip")
    if os.geteuid() != 0:
        message = "network namespaces need root"
        missing_peer(message)
    tag = os.urandom(3).hex()
    hosts: dict[str, Host] = {}
    try:
        for name in names:
            host = Host(name, f"pc-{name}-{tag}", logs)
            _ip("netns", "add", host.namespace)
            hosts[name] = host
            host.ip("link", "set", "lo", "up")
            subprocess.run(host.command("sysctl", "-qw", "net.ipv4.ip_forward=0"),
                           check=True, capture_output=True, timeout=10)
        yield hosts
    finally:
        for host in hosts.values():
            host.stop_processes()
        for host in hosts.values():
            _ip("netns", "del", host.namespace, check=False)


def link(near: Host | None, near_name: str, near_address: str,
         far: Host, far_name: str, far_address: str, prefix: int = 24) -> None:
    """A veth pair from `near` (None: the root namespace, where `near_name` must be
    unique) to `far`, addressed and up. Deleting a namespace deletes its end and so the
    pair."""
    at_near = ["-n", near.namespace] if near else []
    _ip(*at_near, "link", "add", near_name, "type", "veth", "peer", "name", far_name,
        "netns", far.namespace)
    _ip(*at_near, "addr", "add", f"{near_address}/{prefix}", "dev", near_name)
    _ip(*at_near, "link", "set", near_name, "up")
    far.ip("addr", "add", f"{far_address}/{prefix}", "dev", far_name)
    far.ip("link", "set", far_name, "up")


def dmz2_firewall(mode: Mode) -> str:
    """The nftables rules of dmz2: which connections may be opened to it from its link
    to dmz1 (whatever their source: dmz1's, or the client's if a route ever let it)."""
    classic = (f'        iifname "dmz" tcp dport {RELAY_PORT} ct state new accept\n'
               if mode == "classic" else "")
    return ("table inet double_hop {\n"
            "    chain input {\n"
            "        type filter hook input priority filter; policy accept;\n"
            "        ct state established,related accept\n"
            f"{classic}"
            '        iifname "dmz" ct state new drop\n'
            "    }\n"
            "}\n")


@dataclass
class DoubleHopHosts:
    mode: Mode
    client: Host
    dmz1: Host
    dmz2: Host
    intranet: Host

    @property
    def hosts(self) -> tuple[Host, ...]:
        return (self.client, self.dmz1, self.dmz2, self.intranet)


@contextlib.contextmanager
def double_hop(mode: Mode, logs: Path) -> Iterator[DoubleHopHosts]:
    """The four hosts, linked, with dmz2's firewall for `mode`."""
    nft = require_program("nft")
    with namespaces("client", "dmz1", "dmz2", "intranet", logs=logs) as hosts:
        topology = DoubleHopHosts(mode, hosts["client"], hosts["dmz1"], hosts["dmz2"],
                                  hosts["intranet"])
        link(topology.client, "outside", CLIENT, topology.dmz1, "outside", EDGE)
        link(topology.dmz1, "dmz", EDGE_DMZ, topology.dmz2, "dmz", RELAY)
        link(topology.dmz2, "inside", RELAY_INSIDE, topology.intranet, "inside", SERVER)
        subprocess.run(topology.dmz2.command(nft, "-f", "-"), input=dmz2_firewall(mode),
                       check=True, capture_output=True, text=True, timeout=10)
        yield topology
