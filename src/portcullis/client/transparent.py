"""Transparent mode (Linux, root): nftables rules send the pushed networks' TCP to a
local listener, which learns each connection's original destination and carries it
through the tunnel; DNS questions are answered through the tunnel for the pushed
suffixes and by the usual resolver otherwise. Applications need no proxy settings.

The rules live in one nftables table per client process, `inet portcullis_<pid>`:
removed on exit and on SIGTERM, and a table whose process no longer exists (a crash,
SIGKILL) is removed by the next client that starts, like sshuttle does.

Not yet: UDP other than DNS (TPROXY).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

from portcullis.client.proxies import FlowTable, Inbound
from portcullis.client.tunnel import TunnelClient
from portcullis.errors import ClientError

TABLE_PREFIX = "portcullis_"
# Packets of our own sockets carry this mark and are never redirected (the DNS
# forwarder's questions to the usual resolver).
OWN_MARK = 0x70C
SO_ORIGINAL_DST = 80


@dataclass(frozen=True)
class Capture:
    """What the rules capture, from the configuration the gateway pushed."""

    split_tunnel: str                       # on | off | reverse
    networks: tuple[str, ...]
    exclude: tuple[str, ...]                # the gateway's addresses: never captured
    tcp_port: int
    dns_port: int | None = None
    families: tuple[str, ...] = field(default=("ip", "ip6"))


def ruleset(table: str, capture: Capture) -> str:
    """The nftables script that installs the rules (pure: tested as text)."""
    lines = [f"table inet {table} {{", "  chain output {",
             "    type nat hook output priority -100; policy accept;",
             f"    meta mark {OWN_MARK:#x} return",
             "    ip daddr 127.0.0.0/8 return", "    ip6 daddr ::1 return"]
    for address in capture.exclude:
        family = "ip6" if ":" in address else "ip"
        lines.append(f"    {family} daddr {address} return")
    if capture.dns_port is not None:
        lines.append(f"    udp dport 53 redirect to :{capture.dns_port}")
    for family in capture.families:
        version = 6 if family == "ip6" else 4
        nets = [n for n in capture.networks if ipaddress.ip_network(n).version == version]
        target = f"tcp dport 1-65535 redirect to :{capture.tcp_port}"
        if capture.split_tunnel == "off":
            lines.append(f"    meta nfproto {'ipv6' if version == 6 else 'ipv4'} {target}")
        elif nets:
            negate = "!= " if capture.split_tunnel == "reverse" else ""
            lines.append(f"    {family} daddr {negate}{{ {', '.join(nets)} }} {target}")
        elif capture.split_tunnel == "reverse":
            lines.append(f"    meta nfproto {'ipv6' if version == 6 else 'ipv4'} {target}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


class Rules:
    """This process's table: installed, removed; leftovers of dead processes removed."""

    def __init__(self, nft: str = "nft") -> None:
        self._nft = nft
        self.table = f"{TABLE_PREFIX}{os.getpid()}"
        self._installed = False

    def remove_leftovers(self) -> list[str]:
        removed = []
        for name in re.findall(rf"table inet ({TABLE_PREFIX}(\d+))", self._run("list", "tables")):
            table, pid = name if isinstance(name, tuple) else (name, "0")
            if not _alive(int(pid)):
                self._run("delete", "table", "inet", table)
                removed.append(table)
        return removed

    def install(self, capture: Capture) -> None:
        self._run("-f", "-", script=ruleset(self.table, capture))
        self._installed = True

    def remove(self) -> None:
        if self._installed:
            self._installed = False
            self._run("delete", "table", "inet", self.table)

    def _run(self, *args: str, script: str | None = None) -> str:
        try:
            done = subprocess.run([self._nft, *args], input=script, capture_output=True,
                                  text=True, timeout=10)
        except FileNotFoundError:
            raise ClientError("transparent mode needs nftables ('nft'): install it") from None
        if done.returncode != 0:
            raise ClientError(f"nft {' '.join(args)} failed: {done.stderr.strip()} "
                              "(transparent mode needs root)")
        return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TransparentInbound(Inbound):
    """A redirected connection: its original destination says where it goes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock: socket.socket = transport.get_extra_info("socket")
        try:
            original = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        except OSError:
            transport.close()
            return
        port = int.from_bytes(original[2:4], "big")
        address = socket.inet_ntoa(original[4:8])
        self.carry(address, port, answer=None)


def question_name(query: bytes) -> str | None:
    """The name a DNS query asks about (the first question), lower-case, or None."""
    labels: list[str] = []
    offset = 12
    try:
        while True:
            length = query[offset]
            if length == 0:
                break
            if length > 63:
                return None
            labels.append(query[offset + 1:offset + 1 + length].decode("ascii").lower())
            offset += 1 + length
    except (IndexError, UnicodeDecodeError):
        return None
    return ".".join(labels) if labels else None


def system_resolver(path: str = "/etc/resolv.conf") -> str | None:
    try:
        with open(path) as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        return None
    return None


class DnsForwarder(asyncio.DatagramProtocol):
    """Questions about the pushed suffixes go through the tunnel to the pushed DNS
    servers; all others to the usual resolver, from a socket the rules let pass."""

    def __init__(self, tunnel: TunnelClient, servers: Sequence[str],
                 suffixes: Sequence[str], upstream: str | None) -> None:
        self._servers = list(servers)
        self._suffixes = [s.lower().strip(".") for s in suffixes]
        self._upstream = upstream
        self._transport: asyncio.DatagramTransport | None = None
        self._flows = FlowTable(tunnel)
        self._asking: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        transport = self._transport
        if transport is None:
            return
        name = question_name(data)
        if name is not None and self._servers and any(
                name == suffix or name.endswith("." + suffix) for suffix in self._suffixes):
            self._flows.send(addr, self._servers[0], 53, data,
                             lambda reply: transport.sendto(reply, addr))
        elif self._upstream is not None:
            task = asyncio.ensure_future(self._directly(data, addr))
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)

    async def _directly(self, data: bytes, addr: tuple[str | object, int]) -> None:
        assert self._upstream is not None and self._transport is not None
        family = socket.AF_INET6 if ":" in self._upstream else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, OWN_MARK)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            try:
                await loop.sock_connect(sock, (self._upstream, 53))
                await loop.sock_sendall(sock, data)
                reply = await asyncio.wait_for(loop.sock_recv(sock, 65535), 5)
            except (OSError, TimeoutError):
                return
        self._transport.sendto(reply, addr)
