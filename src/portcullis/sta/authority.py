"""Issues and redeems one-time tickets.

A ticket is "<STA id>;<192 random bits, base64url>": opaque to clients, and naming its
STA so that gateways can redeem it where it was issued when several STAs coexist. The
store holds only the keyed hash of the ticket, mapped to what the gateway needs
(server address, user, resource, expiry, the handle of the sign-in session it was
issued under, optionally the client address it is bound to). Redemption is an atomic
take: under any concurrency it succeeds exactly once.
Never logs or stores a full ticket.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from portcullis.audit import AuditTrail
from portcullis.errors import TicketError
from portcullis.store import EphemeralStore, SealedRecords
from portcullis.tokens import TokenHasher, mask

NAMESPACE = "ticket"
TICKET_RANDOM_BYTES = 24
MAX_TICKET_LENGTH = 64


@dataclass(frozen=True)
class TicketRequest:
    user: str
    resource: str
    address: str                  # host:port of the server; never leaves the STA/gateway
    client_address: str | None    # bound client, when the deployment binds tickets
    session: str | None = None    # the sign-in session's handle (never its token)


@dataclass(frozen=True)
class IssuedTicket:
    ticket: str
    expires_at: float             # seconds since the epoch


@dataclass(frozen=True)
class TicketGrant:
    user: str
    resource: str
    address: str
    expires_at: float
    session: str | None = None    # the gateway refuses it once that session has ended


def sta_id_of(ticket: str) -> str:
    """The issuing STA named by a ticket; TicketError if the ticket is not shaped like one."""
    sta_id, sep, secret = ticket.partition(";")
    if not sep or not sta_id.isalnum() or not secret or len(ticket) > MAX_TICKET_LENGTH:
        raise TicketError("malformed ticket")
    return sta_id


class TicketAuthority:
    def __init__(self, sta_id: str, store: EphemeralStore, hasher: TokenHasher, audit: AuditTrail,
                 *, lifetime: float, bind_client_address: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.sta_id = sta_id
        self._audit = audit
        # Sealed: a record edited in the store or copied from another ticket's is refused.
        self._records = SealedRecords(store, hasher, NAMESPACE, audit)
        self._hasher = hasher
        self._lifetime = lifetime
        self._bind = bind_client_address
        self._clock = clock

    async def issue(self, request: TicketRequest) -> IssuedTicket:
        ticket = f"{self.sta_id};{secrets.token_urlsafe(TICKET_RANDOM_BYTES)}"
        expires_at = self._clock() + self._lifetime
        record = {**asdict(request), "expires_at": expires_at}
        if not self._bind:
            record["client_address"] = None
        await self._records.put(self._key(ticket), json.dumps(record).encode(), self._lifetime)
        self._audit.record("ticket.issued", ticket=mask(ticket), user=request.user,
                           resource=request.resource, client=request.client_address)
        return IssuedTicket(ticket, expires_at)

    async def redeem(self, ticket: str, client_address: str | None) -> TicketGrant:
        """Consume the ticket. Every failure is TicketError with an audit-only reason."""
        try:
            grant = await self._redeem(ticket, client_address)
        except TicketError as exc:
            self._audit.record("ticket.refused", ticket=mask(ticket), reason=str(exc),
                               client=client_address)
            raise
        self._audit.record("ticket.redeemed", ticket=mask(ticket), user=grant.user,
                           resource=grant.resource, client=client_address)
        return grant

    async def _redeem(self, ticket: str, client_address: str | None) -> TicketGrant:
        if sta_id_of(ticket) != self.sta_id:
            raise TicketError(f"ticket names another STA ({sta_id_of(ticket)})")
        raw = await self._records.take(self._key(ticket))
        if raw is None:
            raise TicketError("unknown, expired or already redeemed ticket")
        record = json.loads(raw)
        # The store's TTL already expires it; the timestamp guards against clock-less stores.
        if record["expires_at"] <= self._clock():
            raise TicketError("expired ticket")
        if record["client_address"] is not None and record["client_address"] != client_address:
            raise TicketError(
                f"ticket bound to {record['client_address']} presented from {client_address}")
        return TicketGrant(user=record["user"], resource=record["resource"],
                           address=record["address"], expires_at=record["expires_at"],
                           session=record.get("session"))

    def _key(self, ticket: str) -> str:
        return f"ticket:{self._hasher.digest(NAMESPACE, ticket)}"
