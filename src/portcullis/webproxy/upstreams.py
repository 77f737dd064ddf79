"""The connections to an application's upstream: through the node's Dialer, each admitted
by the one admission decision (`policy.admission.admit`) as a launch's are.

The upstream is the administrator's, so the access rules do not apply; what remains is
the never-reachable set: an upstream written as an IP literal is the administrator's
explicit choice (even 127.0.0.1), a name is resolved once per connection and must not
lead to the gateway host's loopback, link-local or own addresses. The address admitted
is the address dialled. TLS still checks the name written in `upstream`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from portcullis.audit import AuditTrail
from portcullis.errors import DialError
from portcullis.net.destinations import HostAddresses, resolve
from portcullis.net.dialer import Dialer, P
from portcullis.policy import Subject
from portcullis.policy.admission import admit, needs_lookup, resource_policy
from portcullis.proto.mux import Reason

log = structlog.get_logger("portcullis.webproxy")


class AdmittedDialer:
    """The Dialer of one application's keep-alive pool (`net.httpdial.StreamDialer`)."""

    def __init__(self, dialer: Dialer, resource: str, audit: AuditTrail,
                 host_addresses: HostAddresses) -> None:
        self._dialer = dialer
        self._subject = Subject(resource, frozenset())
        self._resource = resource
        self._audit = audit
        self._host_addresses = host_addresses

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]:
        policy = resource_policy(host)
        resolved = (await resolve(host, port)
                    if needs_lookup(policy, self._subject, host, port, "tcp") else None)
        admission = admit(policy, self._subject, host, port, "tcp", resolved,
                          host_addresses=self._host_addresses.current())
        if not admission.allowed or admission.address is None:
            log.warning("web upstream refused", resource=self._resource,
                        reason=admission.reason)
            self._audit.record("web.upstream_refused", resource=self._resource,
                               reason=admission.reason)
            raise DialError(f"the upstream is not a destination: {admission.reason}",
                            Reason.DENIED, told=admission.refusal)
        return await self._dialer.connect(str(admission.address), port, protocol_factory,
                                          source=source)
