"""The launch endpoint: a client presents a ticket; the gateway redeems it at the STA
and relays every stream of that connection to the one server the ticket names.

Streams carry no destination of their own (an OPEN with an empty host): they are all
pinned to the ticket's address, and an OPEN naming any other host is refused. The
ticket's address is resolved once per launch and admitted by the same decision as tunnel
streams (`policy.admission.admit`, under the resource's own one-rule policy), and every
stream dials the address admitted. The client never learns the server's address. A
ticket is redeemed only while the sign-in session it was issued under lasts, and the
launch remembers that session: its ending ends the launch. Never logs a full ticket.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog
from websockets.http11 import Request

from portcullis.audit import AuditTrail
from portcullis.config.values import parse_host_port
from portcullis.errors import DialError, TicketError
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.sessions import Session, SessionManager
from portcullis.net.destinations import HostAddresses, resolve
from portcullis.net.dialer import Dialer
from portcullis.net.muxsession import MuxSession, keepalive_fields
from portcullis.net.websocket import WebSocketMux
from portcullis.policy import Subject
from portcullis.policy.admission import Admission, admit, needs_lookup, resource_policy
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason, Timers
from portcullis.sta.authority import TicketGrant
from portcullis.sta.client import TicketIssuer
from portcullis.tokens import mask

log = structlog.get_logger("portcullis.gateway")

PATH = "/api/v1/launch"


# Where a launch's streams go: the admitted address and port, or why none can be dialled.
Pinned = tuple[Admission | DialError, int]


class TicketGate:
    """The one check every ticketed connection passes (a launch, a VNC viewer in the
    browser): the ticket redeemed once at its STA, the account still enabled, the sign-in
    session still alive, and the ticket's address admitted. Refusals are audited as
    `{kind}.refused`, a success as `{kind}.started`; never logs a full ticket."""

    def __init__(self, authorities: TicketIssuer, accounts: AccountStatus, audit: AuditTrail,
                 sessions: SessionManager | None,
                 host_addresses: HostAddresses | None = None) -> None:
        self._authorities = authorities
        self._accounts = accounts
        self._audit = audit
        # None: this gateway cannot see the sign-in sessions (a portal in another process
        # with a memory:// store, as tests run), so tickets are not tied to them.
        self.sessions = sessions
        self._host_addresses = host_addresses or HostAddresses()

    async def redeem(self, ticket: str, client: str, kind: str) -> TicketGrant | None:
        """The ticket's grant, or None (audited) when it does not open a connection."""
        try:
            grant = await self._authorities.redeem(ticket, client)
        except TicketError as exc:
            self._audit.record(f"{kind}.refused", client=client, ticket=mask(ticket),
                               reason=str(exc))
            return None
        # The ticket was issued to a valid session moments ago; only a local account
        # disabled since then stops it here.
        if await self._accounts.is_disabled(grant.user):
            self._audit.record(f"{kind}.refused", client=client, user=grant.user,
                               reason="account disabled")
            return None
        # Tickets issued before their session ended are refused, as its connections end.
        refusal = await self._session_refusal(grant)
        if refusal is not None:
            self._audit.record(f"{kind}.refused", client=client, user=grant.user,
                               ticket=mask(ticket), reason=refusal)
            return None
        self._audit.record(f"{kind}.started", client=client, user=grant.user,
                           resource=grant.resource, ticket=mask(ticket))
        return grant

    async def pin(self, grant: TicketGrant, client: str, kind: str) -> Pinned:
        """Where the grant's connections go: its address, admitted, or why not."""
        return await self._admit(grant, client, kind, *parse_host_port(grant.address))

    async def _admit(self, grant: TicketGrant, client: str, kind: str, host: str,
                     port: int) -> Pinned:
        """Resolve the resource's address once and admit it: a literal IP written in the
        resource is the administrator's choice; a name resolving to the gateway host,
        link-local or the gateway's own addresses is refused (the access rules, which
        the ticket already answered, do not apply)."""
        policy = resource_policy(host)
        subject = Subject(grant.user, frozenset())
        try:
            resolved = (await resolve(host, port)
                        if needs_lookup(policy, subject, host, port, "tcp") else None)
        except DialError as exc:
            return exc, port
        admission = admit(policy, subject, host, port, "tcp", resolved,
                          host_addresses=self._host_addresses.current())
        if not admission.allowed:
            self._audit.record(f"{kind}.refused", client=client, user=grant.user,
                               resource=grant.resource, reason=admission.reason)
        return admission, port

    async def _session_refusal(self, grant: TicketGrant) -> str | None:
        """Why the ticket's sign-in session does not allow the connection (None: it does)."""
        if self.sessions is None:
            return None
        if grant.session is None:
            return "the ticket names no sign-in session"
        standing = await self.sessions.standing(grant.session)
        if isinstance(standing, Session):
            return None
        return f"the sign-in session it was issued under has ended ({standing})"


@dataclass(frozen=True)
class LaunchSettings:
    ticket_wait: float
    timers: Timers = field(default_factory=Timers)   # told to the client in HELLO


class LaunchEndpoint:
    def __init__(self, authorities: TicketIssuer, dialer: Dialer, accounts: AccountStatus,
                 registry: ConnectionRegistry, audit: AuditTrail,
                 settings: LaunchSettings, sessions: SessionManager | None,
                 host_addresses: HostAddresses | None = None) -> None:
        self.gate = TicketGate(authorities, accounts, audit, sessions, host_addresses)
        self._dialer = dialer
        self._registry = registry
        self._audit = audit
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()

    def opened(self, carrier: WebSocketMux, request: Request) -> None:
        """A WebSocket to the launch path is open: serve it as one launch."""
        client = carrier.peer_host()
        grant_ready: asyncio.Future[tuple[TicketGrant, Pinned]] = (
            asyncio.get_running_loop().create_future())

        async def open_stream(session: MuxSession, event: mux.StreamOpened) -> None:
            grant, pinned = await grant_ready
            await self._open_pinned(session, event, grant, pinned)

        session = MuxSession(MuxConnection("gateway", timers=self._settings.timers),
                             on_open=open_stream)
        carrier.attach(session)
        task = asyncio.ensure_future(self._serve(session, client, grant_ready))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, session: MuxSession, client: str,
                     grant_ready: asyncio.Future[tuple[TicketGrant, Pinned]]) -> None:
        try:
            grant = await self._redeem(session, client)
            pinned = await self.gate.pin(grant, client, "launch") if grant else None
        except Exception as exc:   # a store or STA failure: refuse, never hang
            log.exception("launch failed")
            self._audit.record("launch.refused", client=client, reason=f"internal: {exc!r}")
            grant_ready.cancel()
            session.close(Reason.INTERNAL_ERROR, "the gateway cannot serve this launch now")
            return
        if grant is None or pinned is None:
            grant_ready.cancel()
            session.close(Reason.AUTH_FAILED, "denied")
            return
        grant_ready.set_result((grant, pinned))
        session.mux.send_hello({"version": 1, "resource": grant.resource,
                                "keepalive": keepalive_fields(self._settings.timers)})
        session.flush_soon()
        started = time.monotonic()
        connection = Connection("launch", grant.user, client, session, grant.resource,
                                session_handle=grant.session if self.gate.sessions else None)
        self._registry.add(connection)
        try:
            await session.closed.wait()
        finally:
            self._registry.remove(connection)
            self._audit.record("launch.ended", user=grant.user, resource=grant.resource,
                               client=client, bytes_to_server=session.totals.received,
                               bytes_to_client=session.totals.sent,
                               duration=round(time.monotonic() - started, 3),
                               reason=session.end_reason())

    async def _redeem(self, session: MuxSession, client: str) -> TicketGrant | None:
        hello = await session.hello_within(self._settings.ticket_wait)
        if hello is None:
            self._audit.record("launch.refused", client=client, reason="no ticket presented")
            return None
        ticket = hello.get("ticket")
        if not isinstance(ticket, str):
            self._audit.record("launch.refused", client=client, reason="hello without a ticket")
            return None
        return await self.gate.redeem(ticket, client, "launch")

    async def _open_pinned(self, session: MuxSession, event: mux.StreamOpened,
                           grant: TicketGrant, pinned: Pinned) -> None:
        if event.protocol != mux.Protocol.TCP or event.host:
            session.refuse(event.stream_id, Reason.DENIED,
                           "a launched resource carries only its own TCP streams")
            return
        admission, port = pinned
        if isinstance(admission, DialError):
            session.refuse(event.stream_id, admission.reason,
                           "the resource's server is not available")
            self._audit.record("launch.stream_failed", user=grant.user,
                               resource=grant.resource, reason=str(admission))
            return
        if admission.address is None:
            session.refuse(event.stream_id, Reason.DENIED, admission.refusal)
            return
        failed = await session.connect_stream(event.stream_id, self._dialer,
                                              str(admission.address), port,
                                              refusal="the resource's server is not available")
        if failed is not None:
            self._audit.record("launch.stream_failed", user=grant.user, resource=grant.resource,
                               reason=str(failed))
