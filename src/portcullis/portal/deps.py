"""What the portal's route groups are built from (one value, made once by the node)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.identity.login import LoginService
from portcullis.identity.sessions import Session, SessionManager
from portcullis.identity.totp import SelfEnrolment
from portcullis.sta.client import TicketIssuer
from portcullis.store import DurableStore, EphemeralStore
from portcullis.tokens import TokenHasher


@dataclass(frozen=True)
class PortalDeps:
    settings: Settings
    sessions: SessionManager
    login: LoginService
    authorities: TicketIssuer
    hasher: TokenHasher
    durable: DurableStore
    ephemeral: EphemeralStore
    audit: AuditTrail
    # Replacing one's authenticator app (a new phone).
    self_enrolment: SelfEnrolment
    # The portal runs apart and learns the user's certificate from the gateway's header.
    forwarded_certificates: bool = False
    # After a sign-out: the page that signs out at the identity provider too, if any.
    sign_out_at_idp: Callable[[Request, Session], Awaitable[Response | None]] | None = None
    # The shadow hub runs here: the resource page links to its device list.
    shadowing: bool = False
