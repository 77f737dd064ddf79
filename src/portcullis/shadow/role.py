"""The `shadow-hub` role of a node: its keys, its agent listener's TLS context, the hub,
and the routes it adds (agents' on `shadow.listen`; operators' on the gateway's port, or
on `shadow.listen` too when the node runs no gateway)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Route

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.config.values import parse_host_port
from portcullis.gateway.relays import node_id
from portcullis.identity.sessions import SessionManager
from portcullis.net.tls import server_context
from portcullis.net.websocket import Opened
from portcullis.pki.maintenance import LoadedCertificates
from portcullis.shadow.api import agent_routes, operator_routes
from portcullis.shadow.dialout import DialOut
from portcullis.shadow.hub import DeviceTrust, ShadowHub
from portcullis.shadow.keys import HubKeys
from portcullis.store import DurableStore, EphemeralStore, EventBus
from portcullis.tokens import TokenHasher
from portcullis.web.client_certificate import ClientCertificateHttp


class DeviceCertificateHttp(ClientCertificateHttp):
    """Hands the hub's app the certificate a device presented (TLS verified it against
    the registered devices' certificates; the hub checks which one it is)."""


@dataclass
class ShadowRole:
    hub: ShadowHub
    operator_routes: list[Route]
    agent_app: Starlette
    host: str
    port: int
    tls: ssl.SSLContext
    dial_out: DialOut
    # WebSocket endpoints: the agents' dial-out connections on the hub's listener; the
    # consoles' channels to those devices on the gateway's port (or here, without one).
    agent_websockets: dict[str, Opened]
    operator_websockets: dict[str, Opened]

    http = DeviceCertificateHttp

    @classmethod
    def build(cls, current: Callable[[], Settings], durable: DurableStore,
              ephemeral: EphemeralStore, events: EventBus, audit: AuditTrail, hasher: TokenHasher,
              sessions: SessionManager, certificates: LoadedCertificates, *,
              with_gateway: bool) -> ShadowRole:
        settings = current()
        cert, key = settings.role_cert("shadow-hub")

        def device_context() -> ssl.SSLContext:
            # Read each time: a renewed hub certificate goes into the next context too.
            context = server_context(cert, key)
            # Optional: an agent registering has no registered certificate yet.
            context.verify_mode = ssl.CERT_OPTIONAL
            return context

        context = certificates.track("shadow-hub", device_context())
        hub = ShadowHub(current, durable, ephemeral, events, audit,
                        HubKeys.load_or_create(settings.path(settings.tls.directory)),
                        hasher, sessions, DeviceTrust(context, device_context))
        operators = operator_routes(hub, sessions, lambda: current().admin_groups)
        routes = agent_routes(hub) + ([] if with_gateway else operators)
        host, port = parse_host_port(settings.shadow.listen)
        dial_out = DialOut.build(hub, sessions, ephemeral, audit, node_id())
        agent_websockets = {**dial_out.agents, **({} if with_gateway else dial_out.consoles)}
        return cls(hub, operators, Starlette(routes=routes), host, port, context, dial_out,
                   agent_websockets, dial_out.consoles)

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [self.hub.keep_trust_fresh(), self.hub.listen_for_ends()]
