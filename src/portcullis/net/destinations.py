"""What the admission decision needs from the outside world: names resolved on the inside
(the gateway's resolver), and the addresses of the gateway host's own interfaces.

The decision itself is `portcullis.policy.admission.admit()`, which is pure; this module
does its I/O and nothing else. Interfaces change (DHCP, a VPN, a container's veth), so
their addresses are re-read when older than `max_age` seconds.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import psutil

from portcullis.errors import DialError
from portcullis.policy.admission import Address, parse_address, plain
from portcullis.proto.mux import Reason


async def resolve(host: str, port: int) -> list[Address]:
    """The addresses of `host` in the resolver's order, without repeats, unmapped.
    DialError(Reason.NAME_NOT_FOUND) when it does not resolve."""
    literal = parse_address(host)
    if literal is not None:
        return [literal]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port or None,
                                                             type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else "not a valid name"
        raise DialError(f"cannot resolve {host}: {why}", Reason.NAME_NOT_FOUND) from None
    found: list[Address] = []
    for info in infos:
        address = parse_address(str(info[4][0]))
        if address is not None and address not in found:
            found.append(address)
    if not found:
        raise DialError(f"cannot resolve {host}: no address", Reason.NAME_NOT_FOUND)
    return found


def read_interface_addresses() -> frozenset[Address]:
    """Every IPv4 and IPv6 address configured on this host's interfaces, in plain form."""
    found: set[Address] = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                address = parse_address(entry.address)
                if address is not None:
                    found.add(plain(address))
    return frozenset(found)


class HostAddresses:
    """The gateway host's own addresses, re-read when older than `max_age` seconds (a read
    costs about 0.3 ms, so it happens at a stream's opening, not on a timer)."""

    def __init__(self, max_age: float = 2.0, *,
                 read: Callable[[], frozenset[Address]] = read_interface_addresses,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age = max_age
        self._read = read
        self._clock = clock
        self._addresses: frozenset[Address] = frozenset()
        self._read_at: float | None = None

    def current(self) -> frozenset[Address]:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self._max_age:
            self._addresses = self._read()
            self._read_at = now
        return self._addresses
