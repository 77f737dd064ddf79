"""The tunnel endpoint: the SSL VPN. A signed-in client opens one WebSocket (and may
join more to the same tunnel, its carriers: `gateway.carriers`); every connection it
captures becomes a stream naming its destination; the gateway resolves
the name on the inside, asks the admission decision (`policy.admission.admit`: the access
policy and the never-reachable set), dials the one address it admitted through the Dialer
and relays (reverse NAT: servers see the gateway, or the relay when the Dialer goes
through one).

Admission is asked here, for every stream, never trusted to the client; every denial
is audited with its reason. The policy is read at each stream, so a reload
applies to new streams without dropping tunnels. Never logs a session token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import structlog
from websockets.http11 import Request

from portcullis.audit import AuditTrail
from portcullis.config.model import VpnSettings
from portcullis.errors import DialError, StoreError
from portcullis.gateway.carriers import (
    JOIN_CHECK,
    KIND,
    RELEASE_AFTER,
    CarrierJoins,
    JoinRecord,
    joined,
)
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.gateway.pool import AddressPool
from portcullis.identity.claims import Claims
from portcullis.identity.endings import Ending, notice
from portcullis.identity.sessions import Session, SessionManager
from portcullis.net.destinations import HostAddresses, resolve
from portcullis.net.dialer import Dialer
from portcullis.net.muxsession import (
    PROTOCOL_NAMES,
    DatagramFlow,
    MuxSession,
    StreamBridge,
    keepalive_fields,
)
from portcullis.net.websocket import WebSocketMux
from portcullis.policy import AccessPolicy, Subject
from portcullis.policy.admission import admit, needs_lookup
from portcullis.proto import mux
from portcullis.proto.mux import Limits, MuxConnection, Reason, Timers

PATH = "/api/v1/tunnel"
MAX_CARRIERS = 16   # per tunnel, carrier 0 included
log = structlog.get_logger("portcullis.tunnel")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Admitted:
    """What a tunnel's streams need once its client is signed in."""

    claims: Claims
    source: str | None       # the tunnel's intranet address, when a pool gave one
    tunnel_id: str


@dataclass(frozen=True)
class TunnelSettings:
    hello_wait: float = 10.0


class TunnelEndpoint:
    def __init__(self, sessions: SessionManager, policy: Callable[[], AccessPolicy],
                 vpn: Callable[[], VpnSettings], dialer: Dialer,
                 registry: ConnectionRegistry, audit: AuditTrail,
                 settings: TunnelSettings = TunnelSettings(),
                 pool: AddressPool | None = None,
                 host_addresses: HostAddresses | None = None,
                 processes: Callable[[], int] = lambda: 1) -> None:
        self._pool = pool
        # Which of the node's worker processes serves a carrier, as the client is told:
        # a tag per tunnel (this process's secret over the tunnel id), not the pid, so a
        # client can spread one tunnel's carriers over the processes and learn nothing
        # that would steer other connections to one of them.
        self._process_secret = secrets.token_bytes(16)
        self._processes = processes
        self._sessions = sessions
        self._policy = policy
        self._vpn = vpn
        self._dialer = dialer
        self._registry = registry
        self._audit = audit
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._host_addresses = host_addresses or HostAddresses()
        self._joins = CarrierJoins(sessions.bound_records(KIND))

    def _serving(self, tunnel: str) -> dict[str, object]:
        """HELLO's fields naming the process that serves this carrier of `tunnel`, and
        how many the node has (only for tunnels of several carriers)."""
        tag = hmac.new(self._process_secret, tunnel.encode(), "sha256").hexdigest()[:16]
        return {"process": tag, "processes": self._processes()}

    def opened(self, carrier: WebSocketMux, request: Request) -> None:
        client = carrier.peer_host()
        claims_ready: asyncio.Future[Admitted] = asyncio.get_running_loop().create_future()

        async def open_stream(session: MuxSession, event: mux.StreamOpened) -> None:
            await self._open(session, event, await claims_ready, client)

        session = MuxSession(MuxConnection("gateway", timers=mux_timers(self._vpn())),
                             on_open=open_stream)
        carrier.attach(session)
        self._later(self._serve(session, client, claims_ready))

    async def _serve(self, session: MuxSession, client: str,
                     claims_ready: asyncio.Future[Admitted]) -> None:
        try:
            await self._run(session, client, claims_ready)
        except Exception as exc:   # a store failure: end this tunnel, never leave it hanging
            log.exception("tunnel failed")
            self._audit.record("tunnel.refused", client=client, reason=f"internal: {exc!r}")
            session.close(Reason.INTERNAL_ERROR, "the gateway cannot serve this tunnel now")
        finally:
            if not claims_ready.done():
                claims_ready.cancel()

    async def _run(self, session: MuxSession, client: str,
                   claims_ready: asyncio.Future[Admitted]) -> None:
        hello, signed_in = await self._authenticate(session, client)
        if not isinstance(signed_in, Session):
            told = notice(signed_in) if signed_in is not None else None
            session.close(Reason.AUTH_FAILED, told.message if told else "sign in again")
            return
        if "join" in hello:
            await self._carry(session, client, signed_in, hello, claims_ready)
            return
        claims = signed_in.claims
        connection = Connection("tunnel", claims.username, client, session,
                                session_handle=signed_in.handle)
        intranet_ip = None
        if self._pool is not None:
            intranet_ip = await self._pool.allocate(connection.id)
            if intranet_ip is None and self._vpn().pool_full == "refuse":
                self._audit.record("tunnel.refused", user=claims.username, client=client,
                                   reason="address pool full")
                session.close(Reason.LIMIT_EXCEEDED,
                              "no intranet address is free; try again later")
                return
        started = time.monotonic()
        join: str | None = None
        try:
            if session.closed.is_set():   # gone while we looked it up
                return
            source = str(intranet_ip) if intranet_ip is not None else None
            answer: dict[str, object] = {"version": 1, "user": claims.username,
                                         "id": connection.id}
            wanted = hello.get("carriers")
            if isinstance(wanted, int) and wanted > 1:
                answer.update(self._serving(connection.id))
                record = JoinRecord(signed_in.handle, connection.id, source)
                join = answer["join"] = await self._joins.issue(record)
                session.spawn(self._keep_join(join, record))
            claims_ready.set_result(Admitted(claims, source, connection.id))
            connection.detail = source or ""
            session.mux.send_hello(answer)
            session.mux.send_config(self.client_config(claims, source))
            session.flush_soon()
            self._registry.add(connection)
            self._audit.record("tunnel.started", user=claims.username, client=client,
                               tunnel=connection.id, carrier=0, intranet_ip=source)
            if intranet_ip is not None:
                session.spawn(self._renew(session, connection.id, intranet_ip))
            await session.closed.wait()
        finally:
            join_ended = True
            if join is not None:
                try:
                    await self._joins.end(join)
                except StoreError as exc:   # it expires on its own, after JOIN_TTL
                    join_ended = False
                    log.warning("cannot end a tunnel's carrier join", error=str(exc))
            if self._pool is not None and intranet_ip is not None:
                if join is None:
                    await self._pool.release(intranet_ip, connection.id)
                elif join_ended:   # extra carriers source from it until they see it gone
                    self._later(self._release_after(intranet_ip, connection.id,
                                                    RELEASE_AFTER))
                # else: extra carriers may live until the join expires; so does the lease,
                # which is not renewed any more: nobody else gets the address meanwhile.
            self._registry.remove(connection)
            self._record_ended(session, claims.username, client, connection.id, 0, started)

    async def _carry(self, session: MuxSession, client: str, signed_in: Session,
                     hello: dict[str, object], claims_ready: asyncio.Future[Admitted]) -> None:
        """Serve an extra carrier of a tunnel that carrier 0 opened (`gateway.carriers`):
        the same claims, tunnel id and intranet address, nothing allocated."""
        claims = signed_in.claims
        secret, index = hello["join"], hello.get("carrier")
        record = joined(await self._joins.find(secret), signed_in.handle)
        if record is None or not isinstance(index, int) or not 0 < index < MAX_CARRIERS:
            self._audit.record("tunnel.refused", user=claims.username, client=client,
                               reason="unknown or expired carrier join secret"
                               if record is None else "no valid carrier index")
            # Not AUTH_FAILED: the session is fine, the client may open the tunnel anew.
            session.close(Reason.REFUSED, "this tunnel takes no more carriers")
            return
        assert isinstance(secret, str)   # find() found a record under it
        if not await self._joins.claim_slot(record.tunnel, index):
            self._audit.record("tunnel.refused", user=claims.username, client=client,
                               tunnel=record.tunnel, reason=f"carrier {index} is taken")
            session.close(Reason.REFUSED, "this tunnel takes no more carriers")
            return
        connection = Connection("tunnel", claims.username, client, session,
                                session_handle=signed_in.handle,
                                detail=f"{record.source or ''} carrier {index} of "
                                       f"{record.tunnel}".lstrip())
        started = time.monotonic()
        try:
            if session.closed.is_set():
                return
            claims_ready.set_result(Admitted(claims, record.source, record.tunnel))
            session.mux.send_hello({"version": 1, "user": claims.username,
                                    "id": record.tunnel, "carrier": index,
                                    **self._serving(record.tunnel)})
            session.mux.send_config(self.client_config(claims, record.source))
            session.flush_soon()
            self._registry.add(connection)
            self._audit.record("tunnel.started", user=claims.username, client=client,
                               tunnel=record.tunnel, carrier=index,
                               connection=connection.id, intranet_ip=record.source)
            session.spawn(self._watch_join(session, secret, record, index))
            await session.closed.wait()
        finally:
            self._registry.remove(connection)
            try:
                await self._joins.free_slot(record.tunnel, index)
            except StoreError as exc:   # it expires on its own, after JOIN_TTL
                log.warning("cannot free a carrier's slot", error=str(exc))
            self._record_ended(session, claims.username, client, record.tunnel, index,
                               started)

    def _record_ended(self, session: MuxSession, user: str, client: str, tunnel: str,
                      carrier: int, started: float) -> None:
        sent, received = session.byte_counts()
        self._audit.record("tunnel.ended", user=user, client=client, tunnel=tunnel,
                           carrier=carrier, bytes_to_client=sent, bytes_from_client=received,
                           duration=round(time.monotonic() - started, 3),
                           reason=session.end_reason())

    async def _authenticate(self, session: MuxSession, client: str
                            ) -> tuple[dict[str, object], Session | Ending | None]:
        """The client's HELLO, and the session it presents or why that ended (None: it
        presented none). Its ending ends the tunnel (the gateway's `SessionWatch` hears
        of it, and re-checks every tunnel's session)."""
        hello = await session.hello_within(self._settings.hello_wait) or {}
        token = hello.get("session")
        if not isinstance(token, str):
            self._audit.record("tunnel.refused", client=client, reason="no session presented")
            return hello, None
        signed_in = await self._sessions.standing_of(token)
        if not isinstance(signed_in, Session):
            self._audit.record("tunnel.refused", client=client,
                               reason=f"no valid session presented ({signed_in})")
        return hello, signed_in

    async def _keep_join(self, secret: str, record: JoinRecord) -> None:
        """Renew carrier 0's join record while it lives (extra carriers end without it)."""
        while True:
            await asyncio.sleep(self._joins.ttl / 3)
            try:
                await self._joins.renew(secret, record)
            except StoreError as exc:
                log.warning("cannot renew a tunnel's carrier join", error=str(exc))

    async def _watch_join(self, session: MuxSession, secret: str, record: JoinRecord,
                          index: int) -> None:
        """End an extra carrier soon after its tunnel's carrier 0 ended, wherever that
        ran: its join record is then gone. Fails closed: a carrier whose tunnel could
        not be confirmed for as long as a join record lives ends too. Keeps its slot."""
        confirmed = time.monotonic()
        while True:
            await asyncio.sleep(JOIN_CHECK)
            try:
                current = await self._joins.find(secret)
                if current == record:
                    await self._joins.keep_slot(record.tunnel, index)
            except StoreError as exc:
                if time.monotonic() - confirmed < self._joins.ttl:
                    log.warning("cannot check a carrier's tunnel", error=str(exc))
                    continue
                session.close(Reason.INTERNAL_ERROR, "cannot confirm that this carrier's "
                                                     "tunnel still lives")
                return
            if current != record:
                session.close(Reason.CANCELLED, "the tunnel this carrier joined has ended")
                return
            confirmed = time.monotonic()

    async def _release_after(self, address: Address, holder: str, delay: float) -> None:
        await asyncio.sleep(delay)
        assert self._pool is not None
        try:
            await self._pool.release(address, holder)
        except StoreError as exc:   # the lease then expires on its own
            log.warning("cannot release an intranet address", error=str(exc))

    def _later(self, coroutine: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew(self, session: MuxSession, holder: str, address: Address) -> None:
        """Keep the tunnel's pool lease while it lives; a tunnel that lost its address
        (the store forgot it) ends rather than share it with another."""
        assert self._pool is not None
        while True:
            await asyncio.sleep(self._pool.lease_seconds / 3)
            try:
                kept = await self._pool.renew(address, holder)
            except StoreError as exc:
                log.warning("cannot renew an intranet address", error=str(exc))
                continue
            if not kept:
                session.close(Reason.INTERNAL_ERROR, "the tunnel lost its intranet address")
                return

    def client_config(self, claims: Claims, intranet_ip: str | None) -> dict[str, object]:
        """What the client is told: which traffic to send, where names resolve, limits."""
        vpn = self._vpn()
        networks = vpn.networks
        if vpn.split_tunnel == "on" and not networks:
            # Nothing configured: what the user's allow rules can reach.
            networks = [str(network) for network in self._policy().networks_for(
                Subject(claims.username, frozenset(claims.groups)))]
        limits = Limits()
        return {
            "split_tunnel": vpn.split_tunnel,
            "networks": networks,
            "dns": {"servers": vpn.dns_servers, "suffixes": vpn.dns_suffixes},
            "intranet_ip": intranet_ip,
            "limits": {"max_streams": limits.max_streams,
                       "max_frame_payload": limits.max_frame_payload,
                       "initial_window": limits.initial_window},
            "keepalive": keepalive_fields(mux_timers(vpn)),
        }

    async def _open(self, session: MuxSession, event: mux.StreamOpened, admitted: Admitted,
                    client: str) -> None:
        claims, source = admitted.claims, admitted.source
        protocol = PROTOCOL_NAMES[event.protocol]
        where = f"{event.host}:{event.port}/{protocol}"
        subject = Subject(claims.username, frozenset(claims.groups))
        policy = self._policy()
        resolved: list[Address] | None = None
        if needs_lookup(policy, subject, event.host, event.port, protocol):
            try:
                resolved = await resolve(event.host, event.port)
            except DialError as exc:
                session.refuse(event.stream_id, exc.reason, exc.told)
                return
        admission = admit(policy, subject, event.host, event.port, protocol, resolved,
                          pool_family=ipaddress.ip_address(source).version if source else None,
                          host_addresses=self._host_addresses.current())
        audit = {"user": claims.username, "client": client, "destination": where,
                 "tunnel": admitted.tunnel_id}
        address = admission.address
        if not admission.allowed or address is None:
            self._audit.record("tunnel.denied", **audit, rule=admission.rule,
                               reason=admission.reason)
            session.refuse(event.stream_id, Reason.DENIED, admission.refusal)
            return
        started = time.monotonic()

        def audit_stream(stream: StreamBridge | DatagramFlow) -> None:
            self._audit.record("tunnel.stream", **audit, address=str(address),
                               rule=admission.rule, bytes_to_client=stream.counters.sent,
                               bytes_from_client=stream.counters.received,
                               duration=round(time.monotonic() - started, 3))

        # Dial exactly the address admitted: never the name again (no second lookup).
        idle_timeout = self._vpn().udp_idle_timeout
        if event.protocol == mux.Protocol.UDP:
            failed = await session.connect_flow(event.stream_id, self._dialer, str(address),
                                                event.port, idle_timeout=idle_timeout,
                                                on_closed=audit_stream, source=source)
        elif event.protocol == mux.Protocol.ICMP:
            failed = await session.connect_echo(event.stream_id, self._dialer, str(address),
                                                idle_timeout=idle_timeout,
                                                on_closed=audit_stream, source=source)
        else:
            failed = await session.connect_stream(event.stream_id, self._dialer, str(address),
                                                  event.port, on_closed=audit_stream,
                                                  source=source)
        if failed is not None:
            self._audit.record("tunnel.stream_failed", **audit, reason=str(failed))


def mux_timers(vpn: VpnSettings) -> Timers:
    """The keep-alive and idle timers of the gateway's mux connections."""
    return Timers(vpn.keepalive_interval, vpn.dead_peer_timeout, vpn.udp_idle_timeout)
