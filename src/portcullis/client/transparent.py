"""Transparent mode (Linux, root): nftables rules send the pushed networks' TCP to a
local listener (redirect), and their UDP to a transparent socket (TPROXY: the packets
are marked on the way out, routed back in through `lo` by a policy rule, and handed to
our socket with their original destination). Each is carried through the tunnel. DNS
questions are answered through the tunnel for the pushed suffixes and by the usual
resolver otherwise. Applications need no proxy settings.

The rules live in one nftables table per client process, `inet portcullis_<pid>`, with
a policy-routing rule for its mark: removed on exit and on SIGTERM, and those of a
process that no longer exists (a crash, SIGKILL) are removed by the next client that
starts, like sshuttle does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from portcullis.client.proxies import FlowTable, Inbound
from portcullis.client.tunnel import TunnelClient
from portcullis.errors import ClientError

TABLE_PREFIX = "portcullis_"
# Packets of our own sockets carry this mark and are never redirected (the DNS
# forwarder's questions to the usual resolver).
OWN_MARK = 0x70C
SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
# UDP for the tunnel is marked with this (plus the table's number) and routed to `lo`.
UDP_MARK_BASE = 0x71000000
MAX_REPLIERS = 256   # sockets answering from UDP destinations, kept at once


@dataclass(frozen=True)
class Capture:
    """What the rules capture, from the configuration the gateway pushed."""

    split_tunnel: str                       # on | off | reverse
    networks: tuple[str, ...]
    exclude: tuple[str, ...]                # the gateway's addresses: never captured
    tcp_port: int
    dns_port: int | None = None
    udp_port: int | None = None
    udp_mark: int = UDP_MARK_BASE
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
    if capture.dns_port is not None:   # the forwarder listens on 127.0.0.1
        lines.append(f"    meta nfproto ipv4 udp dport 53 redirect to :{capture.dns_port}")
    for family in capture.families:
        version = 6 if family == "ip6" else 4
        nets = [n for n in capture.networks if ipaddress.ip_network(n).version == version]
        target = f"tcp dport 1-65535 redirect to :{capture.tcp_port}"
        if capture.split_tunnel == "off" or (capture.split_tunnel == "reverse" and not nets):
            lines.append(f"    meta nfproto {'ipv6' if version == 6 else 'ipv4'} {target}")
        elif nets:
            negate = "!= " if capture.split_tunnel == "reverse" else ""
            lines.append(f"    {family} daddr {negate}{{ {', '.join(nets)} }} {target}")
    lines += ["  }"]
    if capture.split_tunnel in ("off", "reverse") and "ip6" not in capture.families:
        # Everything (or all but some networks) must go through the tunnel, and IPv6 is
        # not captured yet: block it rather than let it leave beside the tunnel.
        lines += ["  chain block_ipv6 {",
                  "    type filter hook output priority 0; policy accept;",
                  f"    meta mark {OWN_MARK:#x} return", "    ip6 daddr ::1 return"]
        lines += [f"    ip6 daddr {a} return" for a in capture.exclude if ":" in a]
        lines += ["    meta nfproto ipv6 meta l4proto { tcp, udp } reject", "  }"]
    if capture.udp_port is not None:
        nets4 = [n for n in capture.networks if ipaddress.ip_network(n).version == 4]
        if nets4 and capture.split_tunnel == "on":
            mark = f"{capture.udp_mark:#x}"
            lines += [
                "  chain mark_udp {", "    type route hook output priority mangle; "
                "policy accept;", f"    meta mark {OWN_MARK:#x} return",
                "    udp dport 53 return",
                f"    ip daddr {{ {', '.join(nets4)} }} meta l4proto udp meta mark set {mark}",
                "  }",
                "  chain tproxy_udp {", "    type filter hook prerouting priority mangle; "
                "policy accept;",
                f"    meta mark {mark} meta l4proto udp tproxy ip to "
                f"127.0.0.1:{capture.udp_port}",
                "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def udp_mark(pid: int) -> int:
    """Each client's own mark (and routing table number), so several can coexist:
    process ids are below 2**22, so no two live clients share one."""
    return UDP_MARK_BASE + pid


class Rules:
    """This process's table and policy route: installed, removed; those of dead
    processes removed."""

    def __init__(self, nft: str = "nft", ip: str = "ip") -> None:
        self._nft = nft
        self._ip = ip
        self.table = f"{TABLE_PREFIX}{os.getpid()}"
        self.udp_mark = udp_mark(os.getpid())
        self._installed = False

    def remove_leftovers(self) -> list[str]:
        removed = []
        listed = self._run(self._nft, "list", "tables")
        for table, pid in re.findall(rf"table inet ({TABLE_PREFIX}(\d+))", listed):
            if not _alive(int(pid)):
                self._run(self._nft, "delete", "table", "inet", table)
                self._unroute(udp_mark(int(pid)))
                removed.append(table)
        return removed

    def install(self, capture: Capture) -> None:
        self._run(self._nft, "-f", "-", script=ruleset(self.table, capture))
        self._installed = True
        if capture.udp_port is not None:
            mark = str(capture.udp_mark)
            self._run(self._ip, "rule", "add", "fwmark", mark, "lookup", mark)
            self._run(self._ip, "route", "add", "local", "0.0.0.0/0", "dev", "lo",
                      "table", mark)

    def remove(self) -> None:
        if self._installed:
            self._installed = False
            self._run(self._nft, "delete", "table", "inet", self.table)
            self._unroute(self.udp_mark)

    def _unroute(self, mark: int) -> None:
        for args in (("rule", "del", "fwmark", str(mark), "lookup", str(mark)),
                     ("route", "flush", "table", str(mark))):
            subprocess.run([self._ip, *args], capture_output=True, timeout=10)

    def _run(self, *argv: str, script: str | None = None) -> str:
        try:
            done = subprocess.run(list(argv), input=script, capture_output=True,
                                  text=True, timeout=10)
        except FileNotFoundError:
            raise ClientError(f"transparent mode needs {argv[0]} (nftables, iproute2)"
                              ) from None
        if done.returncode != 0:
            raise ClientError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()} "
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


class TransparentUdp:
    """The TPROXY socket: each datagram arrives with its original destination; each
    (sender, destination) pair is one flow; replies leave from a socket bound to that
    destination, so the application sees the server answer."""

    def __init__(self, tunnel: TunnelClient) -> None:
        self._flows = FlowTable(tunnel)
        self._repliers: dict[tuple[str, int], socket.socket] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        self.sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._read)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        self._flows.close_all("transparent mode ended")
        for replier in self._repliers.values():
            replier.close()

    def _read(self) -> None:
        for _ in range(64):
            try:
                data, ancillary, _, sender = self.sock.recvmsg(65535, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            destination = next(
                ((socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
                 for level, kind, raw in ancillary
                 if level == socket.SOL_IP and kind == IP_ORIGDSTADDR), None)
            if destination is None:
                continue
            self._flows.send((sender, destination), *destination, data,
                             self._answerer(destination, sender))

    def _answerer(self, destination: tuple[str, int],
                  sender: tuple[str, int]) -> Callable[[bytes], None]:
        replier = self._replier(destination)

        def answer(reply: bytes) -> None:
            with contextlib.suppress(OSError):
                replier.sendto(reply, sender)

        return answer

    def _replier(self, destination: tuple[str, int]) -> socket.socket:
        replier = self._repliers.get(destination)
        if replier is None:
            if len(self._repliers) >= MAX_REPLIERS:   # the oldest destination goes
                oldest = next(iter(self._repliers))
                self._repliers.pop(oldest).close()
            replier = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            replier.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            replier.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            replier.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, OWN_MARK)
            replier.bind(destination)
            replier.setblocking(False)
            self._repliers[destination] = replier
        return replier


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
