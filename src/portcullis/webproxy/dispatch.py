"""Which application answers a request on the gateway's listener: by its Host.

A web resource's host name goes to the web proxy, the gateway's own names (and
addresses, and no Host at all) to the gateway as before, anything else gets a generic
answer. A request must also name the host its TLS connection was opened for (SNI): a
connection opened for one resource carries nothing for another resource or the
gateway, and a gateway connection nothing for a resource (browsers open one connection
per origin; anyone else is refused, 421). A request in absolute form is refused on a
resource's host: its target would not be the Host the checks were made for.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from portcullis.webproxy.sites import Destination, Sites

ABSOLUTE_FORM = "portcullis.absolute_form"


def server_name_in(scope: Scope) -> str | None:
    name = scope.get("extensions", {}).get("tls", {}).get("server_name")
    return name if isinstance(name, str) else None


def hosts_of(scope: Scope) -> list[bytes]:
    return [bytes(value) for name, value in scope["headers"] if name == b"host"]


class HostDispatch:
    def __init__(self, gateway: ASGIApp, web: ASGIApp, sites: Sites) -> None:
        self._gateway = gateway
        self._web = web
        self._sites = sites

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._gateway(scope, receive, send)
            return
        hosts = hosts_of(scope)
        if len(hosts) > 1:   # which one would each hop believe? (RFC 9112 §3.2: 400)
            await _misdirected(send)
            return
        destination, site = self._sites.destination(hosts[0] if hosts else None)
        opened_for = self._sites.by_host(server_name_in(scope))
        if destination is Destination.WEB and site is opened_for and \
                not scope.get("extensions", {}).get(ABSOLUTE_FORM):
            await self._web(scope, receive, send)
        elif destination is Destination.GATEWAY and opened_for is None:
            await self._gateway(scope, receive, send)
        else:
            await _misdirected(send)


async def _misdirected(send: Send) -> None:
    body = b"misdirected request\n"
    await send({"type": "http.response.start", "status": 421,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
