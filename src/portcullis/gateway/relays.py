"""Dial-out relays at the edge: the `/api/v1/relay` endpoint, the pool of live relay
connections that the dial-out Dialer (`net.muxdialer`) opens its streams on, and the
record of which edge node holds which relay connection.

A relay in the second DMZ connects out to this port (WebSocket over TLS, presenting its
`relay` role certificate) and keeps K connections to each edge node; nothing connects
into its DMZ. Each connection is one mux session in which this edge is the "gateway"
(it opens the streams) and the relay the "client" (it decides, dials and answers). The
relay opens no streams here: one it tries is refused.

Only a certificate signed by the deployment CA with the relay's common name may use the
endpoint: the listener also trusts auth.client_ca for users' sign-ins, so the issuer is
checked here, not left to the handshake. Every refusal is audited.

The registry lives in the ephemeral store, shared by every edge node: one entry per
relay connection, refreshed every `HEARTBEAT` seconds with a TTL of `REGISTRY_TTL`, so
a node that dies without cleaning up drops out of `portcullis relay status` on its own.
A stopping node sends GOAWAY(SHUTDOWN) to its relays first, so they reconnect elsewhere
(and here, once it is back) before its streams are needed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from cryptography import x509
from websockets.http11 import Request

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.errors import DialError, PKIError, StoreError
from portcullis.net.muxsession import MuxSession, keepalive_fields
from portcullis.net.websocket import WebSocketMux
from portcullis.pki import issued_by, load_ca_certificates, peer_common_name
from portcullis.pki.roles import ROLE_COMMON_NAMES
from portcullis.proto.mux import MuxConnection, Reason, Timers
from portcullis.store import EphemeralStore

PATH = "/api/v1/relay"
HEARTBEAT = 5.0
REGISTRY_TTL = 15.0
REGISTRY_INDEX = "relays"
# How long a new stream waits for a relay connection when none is up (one reconnecting).
RELAY_WAIT = 3.0
log = structlog.get_logger("portcullis.relays")


def node_id() -> str:
    """This edge process, as the registry names it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class RelayConnection:
    id: str
    relay: str            # the relay's address as this edge sees it
    session: MuxSession
    since: float          # time.time() of its arrival

    @property
    def live(self) -> bool:
        return not self.session.closed.is_set() and self.session.goaway is None


class RelayPool:
    """The relay connections this edge holds; a stream goes on the least busy one."""

    def __init__(self, *, wait: float = RELAY_WAIT) -> None:
        self._wait = wait
        self._connections: dict[str, RelayConnection] = {}
        self._arrived = asyncio.Event()

    @property
    def connections(self) -> list[RelayConnection]:
        return list(self._connections.values())

    def add(self, connection: RelayConnection) -> None:
        self._connections[connection.id] = connection
        self._arrived.set()

    def remove(self, connection: RelayConnection) -> None:
        self._connections.pop(connection.id, None)

    def pick(self) -> MuxSession | None:
        live = [connection.session for connection in self._connections.values()
                if connection.live]
        return min(live, key=lambda session: session.open_streams) if live else None

    async def session(self) -> MuxSession:
        """The least busy live relay session; waits a moment when none is up (a relay
        reconnecting), then DialError."""
        deadline = asyncio.get_running_loop().time() + self._wait
        while True:
            self._arrived.clear()   # before looking: an arrival after this wakes us
            session = self.pick()
            if session is not None:
                return session
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise DialError("no relay is connected to this edge", Reason.UNREACHABLE)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    def drain(self, message: str) -> None:
        """Ask every relay to move to another edge node (this one is stopping)."""
        for connection in self.connections:
            connection.session.close(Reason.SHUTDOWN, message)


class RelayRegistry:
    """Which node holds which relay connection, in the store every node shares."""

    def __init__(self, store: EphemeralStore, node: str) -> None:
        self._store = store
        self.node = node

    def _key(self, connection_id: str) -> str:
        return f"relay:{self.node}:{connection_id}"

    async def record(self, connection: RelayConnection) -> None:
        """Write (or refresh) the entry; called at arrival and every heartbeat."""
        key = self._key(connection.id)
        value = {"node": self.node, "connection": connection.id, "relay": connection.relay,
                 "connected_since": connection.since,
                 "streams": connection.session.open_streams}
        await self._store.put(key, json.dumps(value).encode(), REGISTRY_TTL)
        await self._store.add_to_set(REGISTRY_INDEX, key, REGISTRY_TTL)

    async def forget(self, connection: RelayConnection) -> None:
        key = self._key(connection.id)
        await self._store.delete(key)
        await self._store.remove_from_set(REGISTRY_INDEX, key)


async def relay_connections(store: EphemeralStore) -> list[dict[str, object]]:
    """Every relay connection any edge node holds now (entries whose node stopped
    refreshing them have expired and are left out)."""
    found: list[dict[str, object]] = []
    for key in sorted(await store.set_members(REGISTRY_INDEX)):
        value = await store.get(key)
        if value is None:
            await store.remove_from_set(REGISTRY_INDEX, key)
            continue
        found.append(json.loads(value))
    return found


class RelayEndpoint:
    def __init__(self, pool: RelayPool, registry: RelayRegistry, audit: AuditTrail,
                 deployment_cas: Sequence[x509.Certificate], timers: Timers, *,
                 hello_wait: float = 10.0) -> None:
        self.pool = pool
        self._registry = registry
        self._audit = audit
        self._cas = tuple(deployment_cas)
        self._timers = timers
        self._hello_wait = hello_wait
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    def opened(self, carrier: WebSocketMux, request: Request) -> None:
        transport = carrier.transport
        peer = transport.get_extra_info("peername") if transport else None
        relay = f"{peer[0]}:{peer[1]}" if peer else "unknown"
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        session = MuxSession(MuxConnection("gateway", timers=self._timers))
        carrier.attach(session)
        refusal = self._refusal(certificate)
        if refusal is not None:   # turned away without a greeting: GOAWAY comes first
            self._audit.record("relay.refused", relay=relay, reason=refusal)
            session.close(Reason.AUTH_FAILED, refusal)
            return
        session.mux.send_hello({"node": self._registry.node,
                                "keepalive": keepalive_fields(self._timers)})
        session.flush_soon()
        connection = RelayConnection(f"{os.getpid()}-{next(self._ids)}", relay, session,
                                     time.time())
        task = asyncio.ensure_future(self._serve(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _refusal(self, certificate: bytes | None) -> str | None:
        """Why this peer may not be a relay, or None."""
        if certificate is None:
            return "no client certificate: a relay presents its role certificate"
        if not issued_by(certificate, self._cas):
            return "the certificate is not signed by the deployment CA"
        try:
            name = peer_common_name(certificate)
        except PKIError:
            name = None
        if name != ROLE_COMMON_NAMES["relay"]:
            return f"the certificate is {name!r}'s, not a relay's"
        return None

    async def _serve(self, connection: RelayConnection) -> None:
        session = connection.session
        hello = await session.hello_within(self._hello_wait)
        if hello is None:
            self._audit.record("relay.refused", relay=connection.relay,
                               reason="no HELLO in time")
            session.close(Reason.TIMED_OUT, "no HELLO in time")
            return
        self.pool.add(connection)
        self._audit.record("relay.connected", relay=connection.relay,
                           connection=connection.id, node=self._registry.node)
        log.info("relay connected", relay=connection.relay, connection=connection.id)
        heartbeat = asyncio.ensure_future(self._heartbeat(connection))
        try:
            await session.closed.wait()
        finally:
            self.pool.remove(connection)
            heartbeat.cancel()
            sent, received = session.byte_counts()
            self._audit.record("relay.disconnected", relay=connection.relay,
                               connection=connection.id, bytes_to_relay=sent,
                               bytes_from_relay=received, reason=session.end_reason())
            log.info("relay disconnected", relay=connection.relay,
                     connection=connection.id, reason=session.end_reason())
            try:
                await self._registry.forget(connection)
            except StoreError as exc:
                log.warning("relay connection not removed from the registry",
                            error=str(exc))

    async def _heartbeat(self, connection: RelayConnection) -> None:
        while True:
            try:
                await self._registry.record(connection)
            except StoreError as exc:
                log.warning("relay registry not refreshed", error=str(exc))
            await asyncio.sleep(HEARTBEAT)


def dial_out_endpoint(settings: Settings, store: EphemeralStore, audit: AuditTrail,
                      timers: Timers) -> RelayEndpoint | None:
    """The relay endpoint when `[dialer]` says the relays dial out to this edge."""
    dialer = settings.dialer
    if dialer.via != "relay" or dialer.mode != "dial-out":
        return None
    return RelayEndpoint(RelayPool(), RelayRegistry(store, node_id()), audit,
                         load_ca_certificates(settings.ca_cert_path), timers)
