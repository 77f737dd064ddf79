"""Devices behind NAT, the hub's side: agents that dial out to the hub, and the
consoles' channels carried over their connections.

An agent started with `--dial-out` accepts no connection from outside: its device proxy
listens on loopback only, and it keeps K WebSocket connections to
`/api/v1/shadow/agent/connect` on the hub's listener (TLS, presenting its device
certificate, which the listener trusts as it does for every agent call). Each is one mux
session in which the hub is the "gateway" (it opens the streams) and the agent the
"client" (it answers each OPEN by connecting to its own device proxy on loopback). So
the console's TLS, the request check, consent and the end of a session are the very
code of a reachable device: the hub only carries bytes it cannot read.

A console whose grant says the device's address is "dial-out" opens a WebSocket to
`/api/v1/shadow/channel` on the gateway's port: one mux session whose HELLO carries its
sign-in session token and the request id. The hub checks that the session is valid and
that the request (still unused: it is not spent here, the device spends it at verify)
was issued to that sign-in session, then opens a stream on one of the device's
connections for the console's one stream, and relays them with the mux's credit (the
dial-out Dialer, `net/muxdialer.py`, as the edge does for relays).

Which node holds which device is in the ephemeral store (`shadow-dialout:DEVICE` ->
node, refreshed every `HEARTBEAT` s, TTL `REGISTRY_TTL`). A console that reaches
another node's gateway is refused with that node's name: carrying a channel between
hub nodes is not done (put the gateway and the hub in the same node, or send the
agents to the node the consoles use).

Never logs a session token; every connection and refusal is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from websockets.http11 import Request

from portcullis.audit import AuditTrail
from portcullis.errors import DialError, StoreError
from portcullis.identity.sessions import Session, SessionManager
from portcullis.net.muxdialer import MuxDialer
from portcullis.net.muxsession import MuxSession, keepalive_fields
from portcullis.net.websocket import Opened, WebSocketMux
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason, Timers
from portcullis.shadow.hub import DIAL_OUT_PREFIX, HubRefusal, ShadowHub
from portcullis.shadow.hublink import CONNECT_PATH
from portcullis.store import EphemeralStore

CHANNEL_PATH = "/api/v1/shadow/channel"
HEARTBEAT = 5.0
REGISTRY_TTL = 15.0
# How long a console's channel waits for the device's agent when none of its connections
# is up here (an agent reconnecting after a hub restart).
AGENT_WAIT = 3.0
HELLO_WAIT = 10.0
STREAM_TIMEOUT = 15.0   # the agent answers an OPEN once its own proxy accepted on loopback
# The port a console's stream names: the hub ignores it (the agent dials its own proxy).
CHANNEL_PORT = 5900
log = structlog.get_logger("portcullis.shadow.dialout")


def _peer(carrier: WebSocketMux) -> str:
    transport = carrier.transport
    peer = transport.get_extra_info("peername") if transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "unknown"


class AgentConnections:
    """The dial-out connections this hub node holds, by device: a channel goes on the
    least busy live one."""

    def __init__(self, *, wait: float = AGENT_WAIT) -> None:
        self._wait = wait
        self._by_device: dict[str, list[MuxSession]] = {}
        self._arrived = asyncio.Event()

    def add(self, device: str, session: MuxSession) -> None:
        self._by_device.setdefault(device, []).append(session)
        self._arrived.set()

    def remove(self, device: str, session: MuxSession) -> None:
        held = self._by_device.get(device, [])
        if session in held:
            held.remove(session)
        if not held:
            self._by_device.pop(device, None)

    def count(self, device: str) -> int:
        return len(self._by_device.get(device, []))

    def pick(self, device: str) -> MuxSession | None:
        live = [session for session in self._by_device.get(device, [])
                if not session.closed.is_set() and session.goaway is None]
        return min(live, key=lambda session: session.open_streams) if live else None

    async def session(self, device: str) -> MuxSession | None:
        """A live connection of `device`; waits a moment when none is up, then None."""
        deadline = asyncio.get_running_loop().time() + self._wait
        while True:
            self._arrived.clear()   # before looking: an arrival after this wakes us
            session = self.pick(device)
            if session is not None:
                return session
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()

    def drain(self, message: str) -> None:
        """Ask every agent to reconnect (this node is stopping)."""
        for sessions in list(self._by_device.values()):
            for session in list(sessions):
                session.close(Reason.SHUTDOWN, message)


class DialOutRegistry:
    """Which hub node holds which device's connections, in the store every node shares."""

    def __init__(self, store: EphemeralStore, node: str) -> None:
        self._store = store
        self.node = node

    async def record(self, device: str, connections: int) -> None:
        """Write (or refresh) the entry; at arrival and every heartbeat."""
        value = {"node": self.node, "connections": connections, "at": time.time()}
        await self._store.put(DIAL_OUT_PREFIX + device, json.dumps(value).encode(),
                              REGISTRY_TTL)

    async def holder(self, device: str) -> str | None:
        raw = await self._store.get(DIAL_OUT_PREFIX + device)
        return None if raw is None else str(json.loads(raw).get("node", "")) or None

    async def forget(self, device: str) -> None:
        """Drop the entry, unless another node holds the device by now."""
        if await self.holder(device) == self.node:
            await self._store.delete(DIAL_OUT_PREFIX + device)


class DeviceSessions:
    """The `RelaySessions` of one device, for the dial-out Dialer."""

    def __init__(self, connections: AgentConnections, device: str) -> None:
        self._connections = connections
        self._device = device

    async def session(self) -> MuxSession:
        session = await self._connections.session(self._device)
        if session is None:
            raise DialError(f"device {self._device} is not connected to this hub node",
                            Reason.UNREACHABLE)
        return session


class AgentEndpoint:
    """`/api/v1/shadow/agent/connect` on the hub's listener."""

    def __init__(self, hub: ShadowHub, connections: AgentConnections,
                 registry: DialOutRegistry, audit: AuditTrail, timers: Timers, *,
                 hello_wait: float = HELLO_WAIT, heartbeat: float = HEARTBEAT) -> None:
        self._hub = hub
        self.connections = connections
        self._registry = registry
        self._audit = audit
        self._timers = timers
        self._hello_wait = hello_wait
        self._heartbeat_every = heartbeat
        self._tasks: set[asyncio.Task[None]] = set()

    def opened(self, carrier: WebSocketMux, request: Request) -> None:
        transport = carrier.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        session = MuxSession(MuxConnection("gateway", timers=self._timers))
        carrier.attach(session)
        task = asyncio.ensure_future(self._serve(session, certificate, _peer(carrier)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, session: MuxSession, certificate: bytes | None,
                     agent: str) -> None:
        try:
            device = (await self._hub.device_of(certificate)).name
        except HubRefusal as exc:   # turned away without a greeting: GOAWAY comes first
            self._audit.record("shadow.dialout_refused", client=agent, reason=str(exc))
            session.close(Reason.AUTH_FAILED, str(exc))
            return
        hello = await session.hello_within(self._hello_wait)
        if hello is None:
            self._audit.record("shadow.dialout_refused", device=device, client=agent,
                               reason="no HELLO in time")
            session.close(Reason.TIMED_OUT, "no HELLO in time")
            return
        session.mux.send_hello({"node": self._registry.node, "device": device,
                                "keepalive": keepalive_fields(self._timers)})
        session.flush_soon()
        self.connections.add(device, session)
        node = self._registry.node
        self._audit.record("shadow.dialout_connected", device=device, node=node, client=agent)
        log.info("shadow agent connected", device=device, client=agent)
        heartbeat = asyncio.ensure_future(self._heartbeat(device, session))
        try:
            await session.closed.wait()
        finally:
            heartbeat.cancel()
            self.connections.remove(device, session)
            sent, received = session.byte_counts()
            self._audit.record("shadow.dialout_disconnected", device=device, node=node,
                               client=agent, bytes_to_agent=sent, bytes_from_agent=received,
                               reason=session.end_reason())
            log.info("shadow agent disconnected", device=device, reason=session.end_reason())
            if not self.connections.count(device):
                try:
                    await self._registry.forget(device)
                except StoreError as exc:
                    log.warning("dial-out device not removed from the registry",
                                error=str(exc))

    async def _heartbeat(self, device: str, session: MuxSession) -> None:
        """Refresh the registry; end the connection of a device removed meanwhile."""
        while True:
            try:
                record = await self._hub.durable.shadow_device(device)
                if record is None or record.status != "approved":
                    session.close(Reason.AUTH_FAILED, "this device was removed from the hub")
                    return
                await self._registry.record(device, self.connections.count(device))
            except StoreError as exc:
                log.warning("dial-out registry not refreshed", error=str(exc))
            await asyncio.sleep(self._heartbeat_every)


@dataclass(frozen=True)
class _Channel:
    """A console admitted to the channel of one shadow request."""

    device: str
    request: str
    operator: str


class ChannelEndpoint:
    """`/api/v1/shadow/channel` on the gateway's port: a console's channel to a
    dial-out device, carried over the device's connection to this node."""

    def __init__(self, hub: ShadowHub, sessions: SessionManager,
                 connections: AgentConnections, registry: DialOutRegistry,
                 audit: AuditTrail, timers: Timers, *, hello_wait: float = HELLO_WAIT,
                 stream_timeout: float = STREAM_TIMEOUT) -> None:
        self._hub = hub
        self._sessions = sessions
        self._connections = connections
        self._registry = registry
        self._audit = audit
        self._timers = timers
        self._hello_wait = hello_wait
        self._stream_timeout = stream_timeout
        self._tasks: set[asyncio.Task[None]] = set()

    def opened(self, carrier: WebSocketMux, request: Request) -> None:
        client = _peer(carrier)
        admitted: asyncio.Future[_Channel] = asyncio.get_running_loop().create_future()
        streams = 0

        async def open_stream(session: MuxSession, event: mux.StreamOpened) -> None:
            nonlocal streams
            channel = await admitted
            streams += 1
            if streams > 1 or event.protocol != mux.Protocol.TCP:
                session.refuse(event.stream_id, Reason.DENIED,
                               "one shadow channel per connection")
                return
            await self._carry(session, event, channel, client)

        session = MuxSession(MuxConnection("gateway", timers=self._timers),
                             on_open=open_stream)
        carrier.attach(session)
        task = asyncio.ensure_future(self._serve(session, client, admitted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, session: MuxSession, client: str,
                     admitted: asyncio.Future[_Channel]) -> None:
        try:
            channel = await self._admit(session, client)
        except HubRefusal as exc:
            admitted.cancel()
            session.close(Reason.AUTH_FAILED if exc.status in (401, 403) else
                          Reason.UNREACHABLE, str(exc))
            return
        except StoreError as exc:
            admitted.cancel()
            log.warning("shadow channel refused: store unavailable", error=str(exc))
            session.close(Reason.INTERNAL_ERROR, "the hub cannot carry this channel now")
            return
        admitted.set_result(channel)
        session.mux.send_hello({"node": self._registry.node, "device": channel.device,
                                "keepalive": keepalive_fields(self._timers)})
        session.flush_soon()
        await session.closed.wait()

    async def _admit(self, session: MuxSession, client: str) -> _Channel:
        """The console's sign-in and request, checked; HubRefusal says why not."""
        def refused(status: int, why: str, **fields: str) -> HubRefusal:
            self._audit.record("shadow.dialout_channel_refused", client=client, reason=why,
                               **fields)
            return HubRefusal(status, why)

        hello = await session.hello_within(self._hello_wait)
        token = hello.get("session") if hello else None
        request_id = hello.get("request") if hello else None
        if not isinstance(token, str) or not isinstance(request_id, str):
            raise refused(401, "present your session and the shadow request id")
        standing = await self._sessions.standing_of(token)
        if not isinstance(standing, Session):
            raise refused(401, "your session has ended: sign in again with 'portcullis login'")
        fields = {"request": request_id[:64], "operator": standing.username}
        issued = await self._hub.issued(request_id)
        if issued is None or issued.get("handle") != standing.handle:
            raise refused(403, "no unused shadow request of yours has this id (it expired, "
                               "was used, or was issued to another sign-in)", **fields)
        device = str(issued.get("device", ""))
        fields["device"] = device
        if self._connections.pick(device) is None:
            holder = await self._registry.holder(device)
            if holder is not None and holder != self._registry.node:
                raise refused(409, f"device {device} is connected to hub node {holder}, not "
                                   f"to this one ({self._registry.node}); channels are not "
                                   "carried between hub nodes: use that node's gateway",
                              **fields)
            if await self._connections.session(device) is None:
                raise refused(404, f"device {device} is not connected to the hub (its agent "
                                   "dials out: is it running, and can it reach the hub?)",
                              **fields)
        return _Channel(device, request_id, standing.username)

    async def _carry(self, session: MuxSession, event: mux.StreamOpened, channel: _Channel,
                     client: str) -> None:
        dialer = MuxDialer(DeviceSessions(self._connections, channel.device),
                           timeout=self._stream_timeout)
        node = self._registry.node
        fields = {"request": channel.request, "device": channel.device,
                  "operator": channel.operator, "node": node, "client": client}

        def finished(ended: object) -> None:
            sent, received = session.byte_counts()
            self._audit.record("shadow.dialout_channel_ended", bytes_to_console=sent,
                               bytes_to_device=received, **fields)

        failure = await session.connect_stream(
            event.stream_id, dialer, channel.device, CHANNEL_PORT, on_closed=finished,
            refusal=f"the hub cannot reach device {channel.device} now")
        if failure is not None:
            self._audit.record("shadow.dialout_channel_refused", reason=str(failure),
                               **fields)
            return
        self._audit.record("shadow.dialout_channel", **fields)


@dataclass
class DialOut:
    """The dial-out part of a hub node: its WebSocket endpoints, by listener."""

    connections: AgentConnections
    agents: dict[str, Opened]      # on the hub's listener
    consoles: dict[str, Opened]    # on the gateway's port (or the hub's, without one)

    @classmethod
    def build(cls, hub: ShadowHub, sessions: SessionManager, store: EphemeralStore,
              audit: AuditTrail, node: str,
              timers: Callable[[], Timers] = Timers) -> DialOut:
        connections = AgentConnections()
        registry = DialOutRegistry(store, node)
        agents = AgentEndpoint(hub, connections, registry, audit, timers())
        consoles = ChannelEndpoint(hub, sessions, connections, registry, audit, timers())
        return cls(connections, {CONNECT_PATH: agents.opened},
                   {CHANNEL_PATH: consoles.opened})
