"""The web proxy as a node wires it: the portal's entry routes, the gateway listener's
dispatch by Host, its certificates per name, and its WebSocket relays."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.gateway.connections import ConnectionRegistry
from portcullis.identity.sessions import SessionManager
from portcullis.idp.keys import KeyRing
from portcullis.net.dialer import Dialer
from portcullis.net.tls import choose_by_server_name
from portcullis.pki.maintenance import LoadedCertificates
from portcullis.store import DurableStore, EphemeralStore
from portcullis.tokens import TokenHasher
from portcullis.webproxy.assertion import Asserter
from portcullis.webproxy.certificates import host_certificates
from portcullis.webproxy.dispatch import HostDispatch
from portcullis.webproxy.entry import web_routes
from portcullis.webproxy.handoff import Handoff
from portcullis.webproxy.proxy import WebProxy
from portcullis.webproxy.sites import Sites
from portcullis.webproxy.websocket import WebSocketRelays

# Makes the server context of one host name from its certificate and key files.
ContextFor = Callable[[Path, Path, str], ssl.SSLContext]


class WebApplications:
    def __init__(self, settings: Settings, sessions: SessionManager, durable: DurableStore,
                 ephemeral: EphemeralStore, hasher: TokenHasher, audit: AuditTrail) -> None:
        self.settings = settings
        self.sites = Sites(settings.resources, settings.gateway.public_url)
        self.sessions = sessions
        self.handoff = Handoff(ephemeral, hasher, audit)
        # The OpenID provider's key ring (the same keys, in the durable store): it exists
        # whether or not the provider is enabled.
        self.asserter = Asserter(KeyRing(durable, hasher,
                                         settings.oidc.signing_key_rotation_days),
                                 settings.gateway.public_url)
        self.audit = audit
        self.proxy: WebProxy | None = None
        self.relays: WebSocketRelays | None = None

    def portal_routes(self) -> list[BaseRoute]:
        """`/web/{name}` and the assertion keys, beside the portal."""
        return web_routes(self.sites, self.sessions, self.handoff, self.asserter, self.audit)

    def gateway_app(self, gateway: ASGIApp, secure: Callable[[ASGIApp], ASGIApp],
                    dialer: Dialer, registry: ConnectionRegistry,
                    closed: Callable[[asyncio.BaseTransport | None], None]) -> ASGIApp:
        """The gateway listener's app: `gateway` for its own names, the web proxy
        (through `secure`, the edge's checks) for the resources' hosts."""
        self.proxy = WebProxy(self.sites, self.sessions, self.handoff, self.asserter, dialer,
                              self.audit, self.settings.base_dir)
        self.relays = WebSocketRelays(self.proxy, registry, closed)
        return HostDispatch(gateway, secure(self.proxy), self.sites)

    def serve_names(self, context: ssl.SSLContext, certificates: LoadedCertificates,
                    context_for: ContextFor) -> None:
        """Let the gateway listener's `context` present each web host's certificate to
        connections opened for that name (issuing those that are missing)."""
        by_host: dict[str, ssl.SSLContext] = {}
        for choice in host_certificates(self.settings, self.sites):
            cert, key = self.settings.role_cert(choice.name)
            by_host[choice.host] = certificates.track(choice.name,
                                                      context_for(cert, key, choice.host))
        if by_host:
            choose_by_server_name(context, by_host)

    def renew(self) -> None:
        """The daily check: renew the web hosts' certificates that are due."""
        host_certificates(self.settings, self.sites)

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()
