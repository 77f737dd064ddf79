"""WebSocket upgrades on the gateway's port go straight to our mux endpoints, or to the
web proxy when they are for a web resource's host.

uvicorn parses the HTTP request and, on `Upgrade: websocket`, hands the connection to
the class configured as its `ws` protocol. This is that class: it routes first by Host
(`by_host`: a web resource's upgrades go to the web proxy, which relays them to the
application), then by exact path to an endpoint, and runs the connection as a
`WebSocketMux`, bypassing ASGI, whose per-message queue would cost the data path most of
its throughput.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from websockets.http11 import Request

from portcullis.net.websocket import Opened, WebSocketMux, accept, reject, server_websocket

# Takes the upgrade when it is for one of its hosts (True), else leaves it (False).
ByHost = Callable[[WebSocketMux, Request], bool]


def websocket_protocol_class(
        endpoints: Mapping[str, Opened],
        closed: Callable[[asyncio.BaseTransport | None], None] = lambda transport: None,
        by_host: ByHost | None = None,
) -> type[asyncio.BaseProtocol]:
    """`closed(transport)` is told when each connection ends (the edge's count)."""

    def route(carrier: WebSocketMux, request: Request) -> None:
        if by_host is not None and by_host(carrier, request):
            return
        opened = endpoints.get(urlsplit(request.path).path)
        if opened is None:
            reject(carrier, 404, "no such endpoint\n")
        else:
            accept(carrier, request, opened)

    class GatewayWebSocket(WebSocketMux):
        def __init__(self, config: Any = None, server_state: Any = None,
                     app_state: Any = None, _loop: Any = None) -> None:
            super().__init__(server_websocket(), on_request=route)

        def connection_lost(self, exc: Exception | None) -> None:
            closed(self.transport)
            super().connection_lost(exc)

    return GatewayWebSocket
