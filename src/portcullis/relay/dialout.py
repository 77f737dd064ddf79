"""Dial-out mode, the relay's side: it connects OUT to each edge node, so its DMZ accepts
no inbound connection at all.

For each URL in `relay.edges` the connector keeps `relay.connections` (K) WebSocket
connections to `/api/v1/relay` (TLS: the relay's role certificate presented, the edge
verified against the deployment CA and its role: only a `gateway` certificate may open
streams here, as only one may in classic mode). Each is one mux session in which the relay is the
"client": the edge opens the streams, and each OPEN is answered through `RelayCore`
(decide with the allow-list, dial, audit), TCP as a bridged stream, UDP and ICMP echo
as DATAGRAM flows exactly as the tunnel's gateway answers them.

A connection that cannot be made, dies, or is asked to move (GOAWAY) is replaced after
a delay drawn uniformly from [0, min(reconnect_max, reconnect_min * 2^attempt)]
("full jitter": after an edge restart, K x relays do not all arrive at once), and never
given up. Each slot logs its state once per change, not once per attempt.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from portcullis.config.model import RelaySettings
from portcullis.errors import ClientError, DialError
from portcullis.net import websocket
from portcullis.net.backoff import backoff_delay, greeted_session, keep_slots
from portcullis.net.dialer import EchoChannel
from portcullis.net.muxsession import PROTOCOL_NAMES, DatagramFlow, MuxSession, StreamBridge
from portcullis.pki import transport_common_name
from portcullis.pki.roles import ROLE_COMMON_NAMES
from portcullis.proto import mux
from portcullis.proto.mux import Reason
from portcullis.relay.core import RelayCore, RelayedStream

PATH = "/api/v1/relay"
GATEWAY_COMMON_NAME = ROLE_COMMON_NAMES["gateway"]
log = structlog.get_logger("portcullis.relay.dialout")

P = TypeVar("P", bound=asyncio.BaseProtocol)
D = TypeVar("D", bound=asyncio.DatagramProtocol)


@dataclass(frozen=True)
class DialOutSettings:
    edges: tuple[str, ...]
    connections: int = 2
    handshake_timeout: float = 10.0
    reconnect_min: float = 0.2
    reconnect_max: float = 10.0
    # Datagram flows the edge opens idle out after this long (the edge's own timer
    # usually ends them first).
    datagram_idle_timeout: float = 60.0

    @classmethod
    def from_settings(cls, relay: RelaySettings) -> DialOutSettings:
        return cls(tuple(relay.edges), relay.connections, relay.handshake_timeout,
                   relay.reconnect_min, relay.reconnect_max)


@dataclass
class Slot:
    """One of the K connections to one edge: what `relay status` shows of it."""

    edge: str
    index: int
    state: str = "starting"
    session: MuxSession | None = None
    connected_since: float | None = None
    node: str = ""        # the edge node holding it (its HELLO says), when connected

    @property
    def label(self) -> str:
        """How `relay status` names the edge: URL, and the node behind it (several
        nodes may share a URL behind a load balancer)."""
        return f"{self.edge} ({self.node})" if self.node else self.edge


class _AdmittedDialer:
    """The Dialer for one stream RelayCore admitted: it dials that stream's address only,
    so the session's `connect_*` methods serve the relay as they serve the tunnel."""

    def __init__(self, core: RelayCore, stream: RelayedStream) -> None:
        self._core = core
        self._stream = stream

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]:
        return await self._core.connect(self._stream, protocol_factory)

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D], *,
                          source: str | None = None) -> tuple[asyncio.DatagramTransport, D]:
        return await self._core.connect_udp(self._stream, protocol_factory)

    async def open_echo(self, address: str, *, source: str | None = None) -> EchoChannel:
        return await self._core.open_echo(self._stream)


class DialOutConnector:
    def __init__(self, core: RelayCore, settings: DialOutSettings,
                 tls: ssl.SSLContext) -> None:
        self._core = core
        self._settings = settings
        self._tls = tls
        self.slots = [Slot(edge, index) for edge in settings.edges
                      for index in range(settings.connections)]

    async def run(self) -> None:
        """Keep every slot connected until cancelled."""
        await keep_slots(self.slots, self._keep, "the relay is stopping")

    async def _keep(self, slot: Slot) -> None:
        settings = self._settings
        attempt = 0
        while True:
            session = await self._connect(slot)
            if session is not None:
                attempt = 0
                label = slot.label
                self._core.status.edge_connected(label)
                try:
                    await session.closed.wait()
                finally:
                    self._core.status.edge_disconnected(label)
                slot.session = None
                slot.connected_since = None
                slot.node = ""
                moved = session.goaway is not None and session.goaway[0] == Reason.SHUTDOWN
                self._state(slot, ("asked to move: " if moved else "lost: ")
                            + session.end_reason())
            await asyncio.sleep(backoff_delay(attempt, settings.reconnect_min,
                                              settings.reconnect_max))
            attempt += 1

    async def _connect(self, slot: Slot) -> MuxSession | None:
        settings = self._settings
        try:
            carrier = await websocket.connect(websocket.websocket_url(slot.edge, PATH),
                                              self._tls, timeout=settings.handshake_timeout)
        except ClientError as exc:
            self._state(slot, f"cannot connect: {exc}")
            return None
        # Every role's certificate may carry the edge's host names: only the gateway's
        # may send this relay anywhere.
        name = (transport_common_name(carrier.transport) if carrier.transport is not None
                else None)
        if name != GATEWAY_COMMON_NAME:
            carrier.close(1008, "not an edge gateway")   # 1008: policy violation
            why = (f"the server at {slot.edge} presented the certificate of {name!r}, not "
                   f"an edge gateway's ({GATEWAY_COMMON_NAME!r})")
            self._core.refuse_edge(slot.edge, "certificate", why)
            self._state(slot, f"refused: {why}")
            return None

        async def open_stream(session: MuxSession, event: mux.StreamOpened) -> None:
            await self._open(session, event, slot.edge)

        session, hello = await greeted_session(carrier, {"role": "relay"}, open_stream,
                                               settings.handshake_timeout)
        if hello is None:
            self._state(slot, f"refused by the edge: {session.end_reason()}")
            return None
        slot.node = str(hello.get("node", ""))
        slot.session = session
        slot.connected_since = asyncio.get_running_loop().time()
        self._state(slot, "connected")
        return session

    async def _open(self, session: MuxSession, event: mux.StreamOpened, edge: str) -> None:
        try:
            stream = await self._core.admit(edge, event.host, event.port,
                                            PROTOCOL_NAMES[event.protocol])
        except DialError as exc:
            session.refuse(event.stream_id, exc.reason, exc.told)
            return
        dialer = _AdmittedDialer(self._core, stream)

        def finished(ended: StreamBridge | DatagramFlow) -> None:
            stream.finished(ended.counters.sent, ended.counters.received)

        if event.protocol == mux.Protocol.UDP:
            await session.connect_flow(event.stream_id, dialer, stream.address, stream.port,
                                       idle_timeout=self._settings.datagram_idle_timeout,
                                       on_closed=finished)
        elif event.protocol == mux.Protocol.ICMP:
            await session.connect_echo(event.stream_id, dialer, stream.address,
                                       idle_timeout=self._settings.datagram_idle_timeout,
                                       on_closed=finished)
        else:
            await session.connect_stream(event.stream_id, dialer, stream.address,
                                         stream.port, on_closed=finished)

    def _state(self, slot: Slot, state: str) -> None:
        if state != slot.state:
            slot.state = state
            log.info("edge connection", edge=slot.label, slot=slot.index, state=state)
