"""ICMP echo performed by the gateway for tunnel clients.

An unprivileged ping socket (SOCK_DGRAM, IPPROTO_ICMP: allowed by
net.ipv4.ping_group_range) when the kernel permits it, else a raw socket (root). One
socket per address family serves every flow; replies are matched by (address,
identifier, sequence). Never blocks the event loop: sockets are non-blocking and read
by the loop's reader callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import socket
import struct
import time

from portcullis.errors import DialError
from portcullis.proto.mux import Reason

ECHO_REQUEST = {4: 8, 6: 128}
ECHO_REPLY = {4: 0, 6: 129}
TIMEOUT = 5.0


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


class Pinger:
    """Sends echo requests and resolves each with its reply's data and round trip."""

    def __init__(self) -> None:
        self._sockets: dict[int, tuple[socket.socket, bool]] = {}
        self._waiting: dict[tuple[str, int, int], asyncio.Future[tuple[bytes, float]]] = {}
        self._identifiers = itertools.cycle(range(1, 0x10000))

    def check(self, address: str) -> None:
        """DialError now, rather than silence per echo, if this host may not ping."""
        self._socket(ipaddress.ip_address(address).version)

    def new_identifier(self) -> int:
        return next(self._identifiers)

    async def echo(self, address: str, identifier: int, sequence: int,
                   data: bytes) -> tuple[bytes, float] | None:
        """(reply data, seconds) or None when no reply came in time."""
        version = ipaddress.ip_address(address).version
        sock, raw = self._socket(version)
        header = struct.pack("!BBHHH", ECHO_REQUEST[version], 0, 0, identifier, sequence)
        packet = header + data
        if version == 4:   # the kernel computes ICMPv6 checksums (and ping sockets' too)
            packet = header[:2] + struct.pack("!H", _checksum(packet)) + packet[4:]
        # A ping socket replaces the identifier with its own port: match on what the
        # kernel will hand back, which for ping sockets is the socket's, so key by
        # sequence and address only for those.
        key = (address, identifier if raw else 0, sequence)
        if key in self._waiting:
            return None   # the same echo is already on its way: never hand one reply twice
        future: asyncio.Future[tuple[bytes, float]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        started = time.monotonic()
        try:
            sock.sendto(packet, (address, 0))
            data_back, _ = await asyncio.wait_for(future, TIMEOUT)
        except TimeoutError:
            return None
        except OSError as exc:
            raise DialError(f"cannot ping {address}: {exc.strerror}", Reason.UNREACHABLE) from None
        finally:
            if self._waiting.get(key) is future:
                del self._waiting[key]
        return data_back, time.monotonic() - started

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock, _ in self._sockets.values():
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

    def _socket(self, version: int) -> tuple[socket.socket, bool]:
        if version in self._sockets:
            return self._sockets[version]
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        protocol = socket.IPPROTO_ICMP if version == 4 else socket.IPPROTO_ICMPV6
        try:
            sock, raw = socket.socket(family, socket.SOCK_DGRAM, protocol), False
        except PermissionError:
            try:
                sock, raw = socket.socket(family, socket.SOCK_RAW, protocol), True
            except PermissionError:
                raise DialError("this gateway may not send ICMP: run it as root or add its "
                                "group to net.ipv4.ping_group_range", Reason.REFUSED) from None
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._read, sock, version, raw)
        self._sockets[version] = (sock, raw)
        return sock, raw

    def _read(self, sock: socket.socket, version: int, raw: bool) -> None:
        for _ in range(64):   # drain what is there, but yield to the loop now and then
            try:
                packet, peer = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if raw and version == 4:
                packet = packet[(packet[0] & 0x0F) * 4:]   # raw IPv4 includes the IP header
            if len(packet) < 8 or packet[0] != ECHO_REPLY[version]:
                continue
            _, _, _, identifier, sequence = struct.unpack("!BBHHH", packet[:8])
            key = (peer[0], identifier if raw else 0, sequence)
            future = self._waiting.get(key)
            if future is not None and not future.done():
                with contextlib.suppress(asyncio.InvalidStateError):
                    future.set_result((packet[8:], 0.0))
