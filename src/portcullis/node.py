"""One process of a deployment: the roles it runs, built from the settings and served.

`portcullis up` is a node with every role; `portcullis serve ROLE…` a node with some.
Roles in one process call each other directly (the in-process shortcut); roles in
other processes are reached over HTTPS with mutual TLS, certificates from the
deployment CA. Every connection towards the inside (launched servers, tunnel streams,
remote STAs, a portal elsewhere) is made by one Dialer, built once from `[dialer]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from portcullis.audit import AuditTrail
from portcullis.config import config_path, load_settings
from portcullis.config.model import DialerSettings, Settings
from portcullis.config.values import parse_host_port
from portcullis.errors import ConfigError, PKIError, StoreError
from portcullis.gateway.admin import admin_routes
from portcullis.gateway.connections import ConnectionRegistry
from portcullis.gateway.launch import PATH as LAUNCH_PATH
from portcullis.gateway.launch import LaunchEndpoint, LaunchSettings
from portcullis.gateway.node_connections import NodeConnections, node_name
from portcullis.gateway.pool import AddressPool
from portcullis.gateway.proxy import PortalProxy
from portcullis.gateway.relays import PATH as RELAY_PATH
from portcullis.gateway.relays import RelayEndpoint, dial_out_endpoint
from portcullis.gateway.revocation import SessionWatch
from portcullis.gateway.tunnel import PATH as TUNNEL_PATH
from portcullis.gateway.tunnel import TunnelEndpoint, mux_timers
from portcullis.gateway.upgrade import websocket_protocol_class
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.login import LoginService
from portcullis.identity.providers import IdentityProviders, client_ca_path
from portcullis.identity.sessions import SessionManager
from portcullis.identity.throttle import Throttle
from portcullis.identity.totp import SelfEnrolment
from portcullis.idp.endpoints import IdpDeps
from portcullis.idp.endpoints import routes as idp_routes
from portcullis.net.dialer import Dialer
from portcullis.net.dialers import TimeBoundDialer, dialer_from_settings
from portcullis.net.tls import ResumingClientContext, client_context, server_context
from portcullis.net.websocket import MAX_WEBSOCKET_MESSAGE, Opened
from portcullis.pki.maintenance import LoadedCertificates, maintain
from portcullis.policy import AccessPolicy
from portcullis.portal.app import PortalDeps, create_portal_app
from portcullis.portal.error_pages import error_handlers
from portcullis.portal.saml import SamlEndpoints, saml_callback_bodies
from portcullis.proto.mux import Reason
from portcullis.shadow.pages import device_pages
from portcullis.shadow.role import ShadowRole
from portcullis.sta.app import create_sta_app
from portcullis.sta.authority import TicketAuthority
from portcullis.sta.client import RemoteTicketAuthority, TicketAuthorities, TicketIssuer
from portcullis.store import (
    DurableStore,
    EphemeralStore,
    EventBus,
    MemoryEventBus,
    open_ephemeral,
    open_event_bus,
    shared_between_processes,
)
from portcullis.tokens import TokenHasher
from portcullis.web.client_certificate import user_certificate_http
from portcullis.web.edge import Edge, EdgeServer, raise_open_files_limit
from portcullis.web.roles import role_checked_http
from portcullis.web.security import SecurityMiddleware
from portcullis.webproxy.role import WebApplications
from portcullis.webvnc.pages import VncPageDeps, vnc_pages
from portcullis.webvnc.relay import PATH as VNC_PATH
from portcullis.webvnc.relay import VncEndpoint

ROLES = ("gateway", "portal", "sta", "shadow-hub")
# The key that sets each role's listening address.
LISTEN_KEYS = {"gateway": "gateway.listen", "portal": "portal.listen", "sta": "sta.listen",
               "shadow-hub": "shadow.listen"}
CERTIFICATE_CHECK_SECONDS = 86400.0
log = structlog.get_logger("portcullis.node")


@dataclass(frozen=True)
class ListenAddress:
    """Where one of a node's listeners takes its connections."""

    role: str
    host: str
    port: int


def listen_addresses(settings: Settings, roles: Sequence[str]) -> list[ListenAddress]:
    """The listeners a node of `roles` serves, in the order `Node.build` makes them,
    known without building it (a supervisor binds them before its workers exist)."""
    # The portal listens on its own only without the gateway, which otherwise serves it.
    listening = [role for role in ("sta", "shadow-hub", "portal", "gateway") if role in roles
                 and not (role == "portal" and "gateway" in roles)]
    return [ListenAddress(role, *parse_host_port(_listen_setting(settings, role)))
            for role in listening]


def _listen_setting(settings: Settings, role: str) -> str:
    section, _, key = LISTEN_KEYS[role].partition(".")
    return str(getattr(getattr(settings, section), key))


def bind_listeners(addresses: Sequence[ListenAddress]) -> list[socket.socket]:
    """Bind a listening socket for each address, so a taken port is one clear error
    naming its key (and nothing stays bound when one fails)."""
    sockets: list[socket.socket] = []
    for address in addresses:
        try:
            family = socket.getaddrinfo(address.host, address.port,
                                        type=socket.SOCK_STREAM)[0][0]
            sockets.append(socket.create_server((address.host, address.port),
                                                family=family, backlog=1024))
        except OSError as exc:
            for bound in sockets:
                bound.close()
            raise ConfigError(f"cannot listen on {address.host}:{address.port} for the "
                              f"{address.role} role: {exc.strerror}",
                              key=LISTEN_KEYS[address.role]) from None
    return sockets


@dataclass
class Listener:
    role: str
    host: str
    port: int
    app: ASGIApp
    tls: ssl.SSLContext
    trust_forwarded: bool = False
    # Roles whose certificates may connect (mutual TLS); empty: anyone may.
    client_roles: frozenset[str] = frozenset()
    # The HTTP protocol class, when the listener needs its own (the shadow hub's).
    http: type[Any] | None = None
    websockets: dict[str, Opened] | None = None   # its own WebSocket endpoints (the hub's)


@dataclass
class Node:
    settings: Settings
    roles: tuple[str, ...]
    durable: DurableStore
    ephemeral: EphemeralStore
    audit: AuditTrail
    registry: ConnectionRegistry
    policy: AccessPolicy
    listeners: list[Listener] = field(default_factory=list)
    websocket_endpoints: dict[str, Opened] = field(default_factory=dict)
    # Session endings, shared with the other nodes through the ephemeral store.
    events: EventBus = field(default_factory=MemoryEventBus)
    session_watch: SessionWatch | None = None
    node_connections: NodeConnections | None = None   # the gateway's, across workers
    relays: RelayEndpoint | None = None   # dial-out: the relays connected to this edge
    shadow_hub: ShadowRole | None = None
    web: WebApplications | None = None   # web resources, each at its own host name
    edge: Edge = field(init=False)
    _closers: list[Callable[[], Any]] = field(default_factory=list)
    certificates: LoadedCertificates = field(init=False)

    @property
    def first_settings(self) -> Settings:
        return self._first_settings

    def __post_init__(self) -> None:
        self._first_settings = self.settings
        self.certificates = LoadedCertificates(self.settings)
        self.edge = Edge(self.settings.limits)

    @classmethod
    async def build(cls, settings: Settings, roles: Sequence[str]) -> Node:
        unknown = [role for role in roles if role not in ROLES]
        if unknown or not roles:
            raise ConfigError(f"roles must be among {', '.join(ROLES)}; got {list(roles)}")
        maintain(settings, roles)   # renew due certificates before the listeners load them
        durable = await DurableStore.open(settings.durable_url())
        ephemeral = open_ephemeral(settings.ephemeral_url())
        try:
            await ephemeral.ping()   # a wrong Redis URL fails now, not at the first login
        except StoreError:
            await durable.close()
            raise
        audit = AuditTrail(settings.path(settings.log.audit_file))
        node = cls(settings, tuple(dict.fromkeys(roles)), durable, ephemeral, audit,
                   ConnectionRegistry(audit), AccessPolicy(settings.policies),
                   events=open_event_bus(settings.ephemeral_url()))
        node._wire()
        return node

    def role_tls_server(self, role: str, *, require_client_cert: bool) -> ssl.SSLContext:
        cert, key = self.settings.role_cert(role)
        # Only listeners that need client certificates ask browsers for one.
        return self.certificates.track(role, server_context(
            cert, key, require_client_cert=require_client_cert,
            client_ca_file=self.settings.ca_cert_path if require_client_cert else None))

    def role_tls_client(self, role: str) -> ResumingClientContext:
        cert, key = self.settings.role_cert(role)
        context = client_context(self.settings.ca_cert_path, cert_file=cert, key_file=key)
        self.certificates.track(role, context)
        return context

    def check_certificates(self, now: dt.datetime | None = None) -> list[str]:
        """Renew this node's due certificates, warn about any that need attention, and
        load renewed files into the listeners; return the roles reloaded."""
        try:
            maintain(self.settings, self.roles, now=now)
            if self.web is not None:
                self.web.renew()
        except PKIError as exc:
            log.error("certificates not checked", error=str(exc))
        return self.certificates.reload_changed()

    def _wire(self) -> None:
        """Build each role this node runs, and its listener."""
        hasher = TokenHasher.from_directory(self.settings.path(self.settings.secrets_dir))
        accounts = AccountStatus(self.durable)
        local_sta = self._sta_role(hasher) if "sta" in self.roles else None
        sessions = SessionManager(self.ephemeral, accounts, hasher, self.settings.session,
                                  audit=self.audit, events=self.events)
        if "shadow-hub" in self.roles:
            self.shadow_hub = ShadowRole.build(
                lambda: self.settings, self.durable, self.ephemeral, self.events, self.audit,
                hasher, sessions, self.certificates, with_gateway="gateway" in self.roles)
            hub = self.shadow_hub
            self.listeners.append(Listener("shadow-hub", hub.host, hub.port,
                                           self._secure(hub.agent_app), hub.tls,
                                           http=hub.http, websockets=hub.agent_websockets))
        if not {"gateway", "portal"} & set(self.roles):
            return
        # Dial-out: the relays connect to this gateway, and the Dialer uses them.
        if "gateway" in self.roles:
            self.relays = dial_out_endpoint(self.settings, self.ephemeral, self.audit,
                                            mux_timers(self.settings.vpn))
        # The one Dialer of this node: every role's inward connections go through it. The
        # relay is the edge gateway's way in; a node without the gateway role (a portal
        # alone) sits inside and dials directly, whatever [dialer] says.
        dialer_settings = (self.settings.dialer if "gateway" in self.roles
                           else DialerSettings(timeout=self.settings.dialer.timeout))
        if dialer_settings != self.settings.dialer:
            log.info("this node runs no gateway role: it dials directly",
                     ignored="dialer.via = relay")
        dialer = dialer_from_settings(
            dialer_settings, relays=self.relays.pool if self.relays else None,
            datagram_idle_timeout=self.settings.vpn.udp_idle_timeout,
            gateway_tls=lambda: self.role_tls_client("gateway"))
        authorities = self._ticket_authorities(local_sta, dialer)
        self.web = WebApplications(self.settings, sessions, self.durable, self.ephemeral,
                                   hasher, self.audit)
        self._closers.append(self.web.close)
        portal_app = (self._portal_role(hasher, sessions, authorities, dialer)
                      if "portal" in self.roles else None)
        if "gateway" in self.roles:
            self._gateway_role(accounts, sessions, authorities, portal_app, dialer)

    def reload(self) -> None:
        """Re-read the configuration: new access policies and tunnel settings apply to
        new streams; tunnels stay up. Everything else needs a restart. Certificates
        are checked too: renewed, and renewed files loaded."""
        self.check_certificates()
        try:
            fresh = load_settings(config_path(self.settings.base_dir))
        except ConfigError as exc:
            log.error("configuration not reloaded", error=str(exc))
            return
        self.policy = AccessPolicy(fresh.policies)
        # What the running endpoints were built with (the first settings): only a
        # restart changes those.
        first = self.first_settings
        held = {"vpn.address_pool": (first.vpn.address_pool, fresh.vpn.address_pool),
                "vpn.dial_timeout": (first.vpn.dial_timeout, fresh.vpn.dial_timeout),
                "admin_groups": (first.admin_groups, fresh.admin_groups),
                "dialer": (first.dialer, fresh.dialer),
                "shadow.listen": (first.shadow.listen, fresh.shadow.listen),
                # The portal, the web proxy's host names and certificates, the VNC
                # endpoint: all built from the resources at start.
                "resources": (first.resources, fresh.resources)}
        needs_restart = [key for key, (old, new) in held.items() if old != new]
        self.settings = self.settings.model_copy(update={"policies": fresh.policies,
                                                         "vpn": fresh.vpn,
                                                         "shadow": fresh.shadow})
        log.info("configuration reloaded", policies=len(fresh.policies),
                 needs_restart=needs_restart or None)

    def _sta_role(self, hasher: TokenHasher) -> TicketAuthority:
        settings = self.settings
        if settings.sta.id not in settings.sta.authorities:
            raise ConfigError(f"this node runs the STA {settings.sta.id}, which "
                              "sta.authorities does not list: portals and gateways "
                              "could not reach it", key="sta.id")
        authority = TicketAuthority(
            settings.sta.id, self.ephemeral, hasher, self.audit,
            lifetime=settings.sta.ticket_lifetime,
            bind_client_address=settings.sta.bind_client_address)
        host, port = parse_host_port(settings.sta.listen)
        self.listeners.append(Listener(
            "sta", host, port, self._secure(create_sta_app(authority)),
            self.role_tls_server("sta", require_client_cert=True),
            client_roles=frozenset({"gateway", "portal"})))
        return authority

    def _ticket_authorities(self, local_sta: TicketAuthority | None,
                            dialer: Dialer) -> TicketAuthorities:
        """Every configured STA: this process's directly, the others over mutual TLS."""
        settings = self.settings
        client_role = "gateway" if "gateway" in self.roles else "portal"
        by_id: dict[str, TicketIssuer] = {}
        for sta_id, url in settings.sta.authorities.items():
            if local_sta is not None and sta_id == local_sta.sta_id:
                by_id[sta_id] = local_sta
            else:
                remote = RemoteTicketAuthority(url, self.role_tls_client(client_role), dialer)
                by_id[sta_id] = remote
                self._closers.append(remote.close)
        issuing = settings.sta.id if settings.sta.id in by_id else next(iter(by_id))
        return TicketAuthorities(issuing, by_id)

    def _portal_role(self, hasher: TokenHasher, sessions: SessionManager,
                     authorities: TicketIssuer, dialer: Dialer) -> Starlette:
        settings = self.settings
        # Identity providers' servers (RADIUS, OpenID providers) are inward connections too.
        providers = IdentityProviders(settings, self.durable, self.ephemeral, hasher,
                                      dialer=dialer)
        self._closers.append(providers.close)
        login = LoginService(providers.flow(), self.ephemeral, hasher, sessions,
                             settings.session, self.audit,
                             Throttle(self.ephemeral, settings.auth.throttle),
                             public_url=settings.gateway.public_url)
        saml = SamlEndpoints(providers, sessions, self.ephemeral, hasher, self.audit)
        portal_app = create_portal_app(PortalDeps(
            settings=settings, sessions=sessions, login=login, authorities=authorities,
            hasher=hasher, durable=self.durable, ephemeral=self.ephemeral, audit=self.audit,
            self_enrolment=SelfEnrolment(providers.flow_totp(), self.ephemeral, hasher,
                                         settings.session.login_step_timeout,
                                         audit=self.audit),
            forwarded_certificates="gateway" not in self.roles,
            sign_out_at_idp=saml.sign_out_at_idp, shadowing=self.shadow_hub is not None))
        # The OpenID provider answers beside the portal, whose session cookie it reads.
        idp = (idp_routes(IdpDeps(settings, sessions, self.durable, self.ephemeral, hasher,
                                  self.audit)) if settings.oidc.enabled else [])
        devices = (device_pages(self.shadow_hub.hub, sessions, settings.gateway.public_url)
                   if self.shadow_hub is not None else [])
        vnc = vnc_pages(VncPageDeps(settings.resources, sessions, authorities, hasher,
                                    self.audit,
                                    self.shadow_hub.hub if self.shadow_hub else None))
        web = self.web.portal_routes() if self.web is not None else []
        portal_app = Starlette(exception_handlers=error_handlers(),
                               routes=[*saml.routes(), *idp, *devices, *vnc, *web,
                                       Mount("/", app=portal_app)])
        if "gateway" not in self.roles:
            host, port = parse_host_port(settings.portal.listen)
            # Alone, the portal is reached only through gateways (mutual TLS), whose
            # X-Forwarded-For it may therefore believe.
            self.listeners.append(Listener(
                "portal", host, port, self._secure(portal_app),
                self.role_tls_server("portal", require_client_cert=True),
                trust_forwarded=True, client_roles=frozenset({"gateway"})))
        return portal_app

    def _gateway_role(self, accounts: AccountStatus, sessions: SessionManager,
                      authorities: TicketIssuer, portal_app: Starlette | None,
                      dialer: Dialer) -> None:
        settings = self.settings
        # A portal in another process with a memory:// store (tests) keeps sessions this
        # gateway cannot see: launches are then not tied to them (and tunnels cannot sign
        # in). The embedded store is one file that both processes open.
        sessions_here = ("portal" in self.roles
                         or shared_between_processes(settings.store.ephemeral))
        if not sessions_here:
            log.warning("the portal runs in another process and store.ephemeral is "
                        "memory://: ending a sign-in session will not end its launched "
                        "connections; use a store the processes share (the default "
                        "sqlite:///ephemeral.db, or redis://)")
        if self.relays is not None:
            self.websocket_endpoints[RELAY_PATH] = self.relays.opened
        launch = LaunchEndpoint(
            authorities, dialer, accounts, self.registry, self.audit,
            LaunchSettings(ticket_wait=settings.gateway.ticket_wait_seconds,
                           timers=mux_timers(settings.vpn)),
            sessions if sessions_here else None)
        self.websocket_endpoints[LAUNCH_PATH] = launch.opened
        self.websocket_endpoints[VNC_PATH] = VncEndpoint(
            launch.gate, dialer, self.registry, self.audit, settings,
            self.shadow_hub.hub if self.shadow_hub else None).opened
        pool = (AddressPool(ipaddress.ip_network(settings.vpn.address_pool), self.ephemeral)
                if settings.vpn.address_pool else None)
        # vpn.dial_timeout bounds a tunnel's TCP streams within what the Dialer allows.
        tunnel = TunnelEndpoint(sessions, lambda: self.policy, lambda: self.settings.vpn,
                                TimeBoundDialer(dialer, settings.vpn.dial_timeout),
                                self.registry, self.audit, pool=pool,
                                processes=self._processes)
        self.websocket_endpoints[TUNNEL_PATH] = tunnel.opened
        self.session_watch = SessionWatch(self.registry, sessions, accounts, self.events,
                                          self.audit, lambda: self.settings.vpn.session_check)
        self.node_connections = NodeConnections(self.registry, self.ephemeral, self.events,
                                                node_name(settings.gateway.listen))
        routes: list[Any] = admin_routes(self.registry, sessions, settings.admin_groups,
                                         self.audit, self.events, self.ephemeral,
                                         self.node_connections)
        if self.shadow_hub is not None:
            routes.extend(self.shadow_hub.operator_routes)
            self.websocket_endpoints.update(self.shadow_hub.operator_websockets)
        if portal_app is not None:
            routes.append(Mount("/", app=portal_app))
        else:
            if not settings.gateway.portal_url:
                raise ConfigError("set gateway.portal_url when the portal runs elsewhere",
                                  key="gateway.portal_url")
            proxy = PortalProxy(settings.gateway.portal_url, self.role_tls_client("gateway"),
                                dialer)
            self._closers.append(proxy.close)
            methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]
            routes.append(Route("/{path:path}", proxy.forward, methods=methods))
        host, port = parse_host_port(settings.gateway.listen)
        cert, key = settings.role_cert("gateway")
        # Browsers are asked for a certificate only when flows can use one, or relays
        # dial out to this port (their role certificates never sign a user in: see
        # web/client_certificate.py).
        tls = self.certificates.track("gateway", server_context(
            cert, key, client_ca_file=client_ca_path(settings),
            also_trust=self._trusted_for_relays()))
        app = self._secure(Starlette(routes=routes))
        if self.web is not None:
            app = self.web.gateway_app(app, self._secure, dialer, self.registry, self.edge.closed)
            self.web.serve_names(tls, self.certificates, lambda cert, key, name: server_context(
                cert, key, client_ca_file=client_ca_path(settings),
                also_trust=self._trusted_for_relays(), server_name=name))
        self.listeners.append(Listener("gateway", host, port, app, tls))

    def _processes(self) -> int:
        """How many worker processes serve this node (known once they all run)."""
        return self.node_connections.siblings + 1 if self.node_connections else 1

    def _trusted_for_relays(self) -> list[Path]:
        """CAs the gateway's listener trusts for relays dialling out, not for users."""
        return [self.settings.ca_cert_path] if self.relays is not None else []

    def _secure(self, app: ASGIApp) -> ASGIApp:
        limits = self.settings.limits
        return SecurityMiddleware(app, max_body=limits.max_request_body,
                                  max_header_bytes=limits.max_header_bytes,
                                  larger=saml_callback_bodies(self.settings))

    def uvicorn_config(self, listener: Listener) -> uvicorn.Config:
        # The gateway's listener (and the hub's) take WebSocket upgrades, straight to
        # their endpoints.
        endpoints = self.websocket_endpoints if listener.role == "gateway" else listener.websockets
        by_host = (self.web.relays.take if listener.role == "gateway" and self.web is not None
                   and self.web.relays is not None else None)
        websocket: Any = (websocket_protocol_class(endpoints, self.edge.closed, by_host)
                          if endpoints is not None else "none")
        http = (listener.http if listener.http is not None
                else role_checked_http(listener.client_roles, listener.role, self.audit)
                if listener.client_roles
                else user_certificate_http(client_ca_path(self.settings),
                                           self._trusted_for_relays()))
        # No TLS here: the edge's acceptor does it (web/edge.py, EdgeServer).
        return uvicorn.Config(
            listener.app, host=listener.host, port=listener.port,
            http=http, ws=websocket, ws_per_message_deflate=False,
            ws_max_size=MAX_WEBSOCKET_MESSAGE,
            timeout_keep_alive=self.settings.limits.keepalive_timeout,
            lifespan="off", log_config=None, server_header=False, access_log=False,
            proxy_headers=listener.trust_forwarded,
            forwarded_allow_ips="*" if listener.trust_forwarded else None,
            timeout_graceful_shutdown=3)

    @property
    def addresses(self) -> list[ListenAddress]:
        return [ListenAddress(listener.role, listener.host, listener.port)
                for listener in self.listeners]

    def bind(self) -> list[socket.socket]:
        """Bind every listener's socket now, so a taken port is one clear error."""
        return bind_listeners(self.addresses)

    async def serve(self, on_ready: Callable[[Node], None] | None = None,
                    sockets: Sequence[socket.socket] | None = None) -> None:
        """Serve every listener until SIGINT/SIGTERM; then close the stores. `sockets`:
        listening sockets bound already, one per listener in order (a worker's, from
        its supervisor); without them the listeners are bound here."""
        sockets = self.bind() if sockets is None else list(sockets)
        raise_open_files_limit(self.settings.limits.max_connections)
        servers = [EdgeServer(self.uvicorn_config(listener), self.edge, listener.tls)
                   for listener in self.listeners]
        loop = asyncio.get_running_loop()

        def stop() -> None:
            for server in servers:
                server.should_exit = True

        watchers = [asyncio.ensure_future(self.registry.watch_disabled(self.durable)),
                    asyncio.ensure_future(self._check_certificates_daily())]
        if self.session_watch is not None:
            watchers.append(asyncio.ensure_future(self.session_watch.run()))
        if self.node_connections is not None:
            watchers.append(asyncio.ensure_future(self.node_connections.run()))
        if self.shadow_hub is not None:
            watchers.extend(asyncio.ensure_future(task) for task in self.shadow_hub.tasks())
        # _serve, not serve: serve() would install its own signal handlers per server,
        # and one process runs several servers that must stop together.
        tasks = [asyncio.ensure_future(server._serve([sock]))
                 for server, sock in zip(servers, sockets, strict=True)]
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            while not all(server.started for server in servers):
                if any(task.done() for task in tasks):
                    break
                await asyncio.sleep(0.02)
            if all(server.started for server in servers) and on_ready is not None:
                on_ready(self)
            await asyncio.gather(*tasks)
        finally:
            stop()
            for watcher in watchers:
                watcher.cancel()
            if self.relays is not None:   # they reconnect to another edge node
                self.relays.pool.drain("this edge node is stopping")
            if self.shadow_hub is not None:   # dial-out agents reconnect likewise
                self.shadow_hub.dial_out.connections.drain("this hub node is stopping")
            self.registry.end_all(Reason.SHUTDOWN, "the gateway is shutting down")
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.close()

    async def _check_certificates_daily(self) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_SECONDS)
            self.check_certificates()

    async def close(self) -> None:
        for closer in self._closers:
            with contextlib.suppress(Exception):
                await closer()
        with contextlib.suppress(StoreError):
            await self.events.close()
        await self.ephemeral.close()
        await self.durable.close()
        self.audit.close()
