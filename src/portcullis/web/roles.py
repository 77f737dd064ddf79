"""Listeners that only other roles may use check which role is calling.

Mutual TLS proves that a client certificate was signed by the deployment CA; this
checks its common name too, so that, say, only gateways (and not an STA's or a
device's certificate) may call the portal, and only gateways and portals the STA.
uvicorn does not expose the peer certificate to the app, so the check runs where the
connection starts: in the HTTP protocol class it is configured with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Set

from portcullis.audit import AuditTrail
from portcullis.pki import transport_common_name
from portcullis.pki.roles import ROLE_COMMON_NAMES
from portcullis.web.edge import HeadTimedHttp


def role_checked_http(allowed_roles: Set[str], listener: str,
                      audit: AuditTrail) -> type[HeadTimedHttp]:
    allowed = {ROLE_COMMON_NAMES[role] for role in allowed_roles}

    class RoleCheckedHttp(HeadTimedHttp):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            name = transport_common_name(transport)
            if name not in allowed:
                peer = transport.get_extra_info("peername")
                audit.record("tls.role_refused", listener=listener, common_name=name,
                             client=str(peer[0]) if peer else "unknown")
                transport.abort()

    return RoleCheckedHttp
