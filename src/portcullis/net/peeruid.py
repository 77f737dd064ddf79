"""Which local user owns the other end of a loopback TCP connection (Linux).

A listener on 127.0.0.1 is reachable by every user of the machine; a service meant for
one user (the console proxy's viewer port) must tell its own user's connections from
another's. Linux lists every TCP socket with its owner's uid in /proc/net/tcp and
/proc/net/tcp6: the peer's socket is the line whose local address is the peer's
address and whose remote address is ours.

Reads files only; never raises for a missing or odd line (None means "not known").
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path

PROC_NET_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))

Address = tuple[str, int]


def proc_net_tcp_available() -> bool:
    """Whether this system lists its sockets where `socket_owner_uid` looks."""
    return any(path.exists() for path in PROC_NET_TCP)


def socket_owner_uid(local: Address, remote: Address,
                     tables: tuple[Path, ...] = PROC_NET_TCP) -> int | None:
    """The uid owning the TCP socket bound to `local` and connected to `remote`, or None
    when no such socket is listed (gone already, or not Linux)."""
    wanted = (_normal(local[0]), local[1]), (_normal(remote[0]), remote[1])
    for path in tables:
        try:
            text = path.read_text("ascii", errors="replace")
        except OSError:
            continue
        for line_local, line_remote, uid in parse_proc_net_tcp(text):
            if (line_local, line_remote) == wanted:
                return uid
    return None


def parse_proc_net_tcp(text: str) -> Iterator[tuple[Address, Address, int]]:
    """(local, remote, uid) of each socket line of a /proc/net/tcp{,6} table; addresses
    as Python prints them (IPv4-mapped IPv6 addresses as IPv4), lines that do not parse
    skipped."""
    for line in text.splitlines()[1:]:   # the first line names the columns
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            local, remote = _address(fields[1]), _address(fields[2])
            uid = int(fields[7])
        except ValueError:
            continue
        yield local, remote, uid


def _address(field: str) -> Address:
    """"0100007F:1F90" -> ("127.0.0.1", 8080). The kernel prints each 32-bit word of the
    address (network byte order in memory) as a number in the host's byte order."""
    host_hex, _, port_hex = field.partition(":")
    if len(host_hex) not in (8, 32) or not port_hex:
        raise ValueError(f"not an address: {field!r}")
    raw = b"".join(int(host_hex[i:i + 8], 16).to_bytes(4, sys.byteorder)
                   for i in range(0, len(host_hex), 8))
    return _normal(str(ipaddress.ip_address(raw))), int(port_hex, 16)


def _normal(host: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 as IPv4, scope ids dropped."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
