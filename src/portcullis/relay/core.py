"""What the relay does with one destination an edge asks for, whichever wire it came on
(the classic server's SOCKS5 in TLS, or a dial-out mux stream): decide with
`policy/relay_allow.py`, dial through the DirectDialer, and audit it at the relay.

    stream = await core.admit(edge, host, port, "tcp")   # DialError when refused
    transport, protocol = await core.connect(stream, factory)
    ...
    stream.finished(bytes_to_edge, bytes_from_edge)      # one audit line, counters

Every refusal (allow-list, resolution, dial) is audited here with its precise reason and
counted in `RelayStatus`; the DialError raised carries the mux `Reason` the edge is told
and a message without the relay's internals. Never logs payload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TypeVar

from portcullis.audit import AuditTrail
from portcullis.errors import DialError
from portcullis.net.destinations import HostAddresses, resolve
from portcullis.net.dialer import DirectDialer, EchoChannel
from portcullis.policy.admission import Address, Protocol
from portcullis.policy.relay_allow import AllowList, decide, needs_lookup
from portcullis.proto.mux import Reason
from portcullis.relay.status import RelayStatus

P = TypeVar("P", bound=asyncio.BaseProtocol)
D = TypeVar("D", bound=asyncio.DatagramProtocol)
T = TypeVar("T")


@dataclass
class RelayedStream:
    """One admitted destination, from its admission to its end. `address` is the address
    `allow.decide` admitted: the only one dialled (a name is never resolved twice)."""

    core: RelayCore
    edge: str
    destination: str           # as the edge asked: "HOST:PORT/PROTOCOL"
    address: str
    port: int
    entry: str | None          # the relay.allow entry that allowed it, as written
    # The relay's own address:port the connection left from (the destination sees it);
    # unknown for echoes.
    source: tuple[str, int] | None = None
    started: float = field(default_factory=time.monotonic)
    opened: bool = False       # dialled: counted in RelayStatus.streams
    done: bool = False

    def finished(self, bytes_to_edge: int, bytes_from_edge: int) -> None:
        """Audit the stream ("relay.stream": edge, destination, address dialled, bytes
        both ways, duration) and update the counters. Only the first call counts."""
        if self.done or not self.opened:
            return
        self.done = True
        self.core.status.stream_closed(bytes_to_edge, bytes_from_edge)
        self.core.audit.record(
            "relay.stream", edge=self.edge, destination=self.destination,
            address=self.address, entry=self.entry,
            source=f"{self.source[0]}:{self.source[1]}" if self.source else None,
            bytes_to_edge=bytes_to_edge,
            bytes_from_edge=bytes_from_edge,
            duration=round(time.monotonic() - self.started, 3))


class RelayCore:
    """Decides, dials and audits for the relay; one per relay process, shared by the
    classic server and the dial-out connector. `reload()` swaps the allow-list (SIGHUP):
    streams already open keep going, new ones are decided by the new list."""

    def __init__(self, allow: AllowList, audit: AuditTrail, status: RelayStatus, *,
                 dialer: DirectDialer, host_addresses: HostAddresses | None = None,
                 resolve_timeout: float = 10.0,
                 resolver: Callable[[str, int], Awaitable[list[Address]]] = resolve) -> None:
        self.allow = allow
        self.audit = audit
        self.status = status
        self.dialer = dialer
        self._resolve_timeout = resolve_timeout
        self._resolve = resolver   # the system's; a test gives one that never answers
        self._host_addresses = host_addresses or HostAddresses()

    def reload(self, allow: AllowList) -> None:
        self.allow = allow

    async def admit(self, edge: str, host: str, port: int,
                    protocol: Protocol) -> RelayedStream:
        """Decide `host:port/protocol` as `edge` asked for it (a name is resolved here,
        at the relay, only when a NAME entry allows it). Refused: audited
        ("relay.refused"), counted, and DialError raised with the Reason for the edge."""
        allow = self.allow
        where = f"{host}:{port}/{protocol}"
        resolved = None
        if needs_lookup(allow, host, port, protocol):
            try:
                async with asyncio.timeout(self._resolve_timeout):
                    resolved = await self._resolve(host, port)
            except TimeoutError:
                self._refuse(edge, where, f"no answer for {host} within "
                             f"{self._resolve_timeout:g} s", Reason.TIMED_OUT)
                raise DialError(f"the relay cannot resolve {host} in time",
                                Reason.TIMED_OUT) from None
            except DialError as exc:
                self._refuse(edge, where, str(exc), exc.reason)
                raise DialError(f"the relay cannot resolve {host}", exc.reason) from None
        decision = decide(allow, host, port, protocol, resolved,
                          self._host_addresses.current())
        if not decision.allowed or decision.address is None:
            self._refuse(edge, where, decision.reason, decision.refusal)
            told = (f"the relay cannot resolve {host}"
                    if decision.refusal == Reason.NAME_NOT_FOUND
                    else f"the relay does not allow {where}")
            raise DialError(told, decision.refusal)
        return RelayedStream(self, edge, where, str(decision.address), port, decision.entry)

    async def connect(self, stream: RelayedStream,
                      protocol_factory: Callable[[], P]) -> tuple[asyncio.Transport, P]:
        """A TCP connection to the admitted address; DialError (audited) when it fails."""
        async def dial() -> tuple[asyncio.Transport, P]:
            return await self.dialer.connect(stream.address, stream.port, protocol_factory)
        transport, protocol = await self._dialled(stream, dial())
        stream.source = dialled_from(transport)
        return transport, protocol

    async def connect_udp(self, stream: RelayedStream, protocol_factory: Callable[[], D]
                          ) -> tuple[asyncio.DatagramTransport, D]:
        """A UDP socket connected to the admitted address (see `Dialer.connect_udp`)."""
        async def dial() -> tuple[asyncio.DatagramTransport, D]:
            return await self.dialer.connect_udp(stream.address, stream.port,
                                                 protocol_factory)
        transport, protocol = await self._dialled(stream, dial())
        stream.source = dialled_from(transport)
        return transport, protocol

    async def open_echo(self, stream: RelayedStream) -> EchoChannel:
        """An ICMP echo channel to the admitted address (see `Dialer.open_echo`)."""
        return await self._dialled(stream, self.dialer.open_echo(stream.address))

    def refuse_edge(self, edge: str, reason: str, why: str) -> None:
        """Audit an edge connection refused before any destination was asked (its
        certificate, a handshake timeout, bytes that are not SOCKS5): "relay.edge_refused"
        with `reason` (a short key, counted in RelayStatus.refusals) and `why`."""
        self.status.refused(reason)
        self.audit.record("relay.edge_refused", edge=edge, reason=reason, detail=why)

    async def _dialled(self, stream: RelayedStream, dial: Coroutine[object, object, T]) -> T:
        """Await the dial; count the stream open, or audit why the dial failed."""
        try:
            dialled = await dial
        except DialError as exc:
            self.status.refused(exc.reason.name.lower())
            self.audit.record("relay.dial_failed", edge=stream.edge,
                              destination=stream.destination, address=stream.address,
                              refusal=exc.reason.name.lower(), reason=str(exc))
            raise
        stream.opened = True
        self.status.stream_opened()
        return dialled

    def _refuse(self, edge: str, where: str, why: str, reason: Reason) -> None:
        self.status.refused(reason.name.lower())
        self.audit.record("relay.refused", edge=edge, destination=where,
                          refusal=reason.name.lower(), reason=why)


def dialled_from(transport: asyncio.BaseTransport) -> tuple[str, int]:
    """The relay's own address and port a dialled connection left from (the audit's
    `source`, and SOCKS BND.ADDR/BND.PORT); ("0.0.0.0", 0) when the socket cannot say."""
    sockname = transport.get_extra_info("sockname")
    if not sockname:
        return "0.0.0.0", 0
    return str(sockname[0]).split("%", 1)[0], int(sockname[1])
