"""How portals and gateways reach STAs: in-process, or over HTTPS with mutual TLS.

`TicketAuthorities` routes each redemption to the STA the ticket names, so several
STAs can serve one deployment. The remote client's connections are made by the node's
Dialer (directly, or through the relay); it maps every transport failure into
TicketError; what the STA said stays out of the answer to the end user.
"""

from __future__ import annotations

import ssl
from dataclasses import asdict
from typing import Any, Protocol

import httpx

from portcullis.errors import TicketError
from portcullis.net.dialer import Dialer
from portcullis.net.httpdial import DialerTransport
from portcullis.sta.authority import IssuedTicket, TicketGrant, TicketRequest, sta_id_of


class TicketIssuer(Protocol):
    async def issue(self, request: TicketRequest) -> IssuedTicket: ...

    async def redeem(self, ticket: str, client_address: str | None) -> TicketGrant: ...


class RemoteTicketAuthority:
    """An STA reached over the network; the client certificate is the credential."""

    def __init__(self, base_url: str, tls: ssl.SSLContext, dialer: Dialer, *,
                 timeout: float = 5.0) -> None:
        self._base_url = base_url
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                       transport=DialerTransport(dialer, tls))

    async def issue(self, request: TicketRequest) -> IssuedTicket:
        body = await self._post("/sta/v1/tickets", asdict(request))
        try:
            return IssuedTicket(ticket=str(body["ticket"]), expires_at=float(body["expires_at"]))
        except (KeyError, TypeError, ValueError):
            raise TicketError(f"the STA at {self._base_url} answered an unknown form") from None

    async def redeem(self, ticket: str, client_address: str | None) -> TicketGrant:
        body = await self._post("/sta/v1/redemptions",
                                {"ticket": ticket, "client_address": client_address})
        session = body.get("session")
        try:
            return TicketGrant(user=str(body["user"]), resource=str(body["resource"]),
                               address=str(body["address"]),
                               expires_at=float(body["expires_at"]),
                               session=session if isinstance(session, str) else None)
        except (KeyError, TypeError, ValueError):
            raise TicketError(f"the STA at {self._base_url} answered an unknown form") from None

    async def close(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise TicketError(f"cannot reach the STA at {self._base_url}: {exc!r}") from None
        if response.status_code == 403:
            raise TicketError("the STA refused the ticket")
        if response.status_code not in (200, 201):
            raise TicketError(f"the STA at {self._base_url} answered {response.status_code}")
        try:
            result = response.json()
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise TicketError(f"the STA at {self._base_url} answered something not JSON")
        return result


class TicketAuthorities:
    """Issues at this deployment's chosen STA; redeems at the STA a ticket names."""

    def __init__(self, issuing_id: str, authorities: dict[str, TicketIssuer]) -> None:
        if issuing_id not in authorities:
            raise TicketError(f"STA {issuing_id} is not among the configured authorities")
        self._issuing = authorities[issuing_id]
        self._authorities = authorities

    async def issue(self, request: TicketRequest) -> IssuedTicket:
        return await self._issuing.issue(request)

    async def redeem(self, ticket: str, client_address: str | None) -> TicketGrant:
        authority = self._authorities.get(sta_id_of(ticket))
        if authority is None:
            raise TicketError("ticket names an STA this gateway does not know")
        return await authority.redeem(ticket, client_address)
