"""A shadowed device in the browser: the gateway is the console proxy of secure
shadowing (docs/shadow.md) for the portal's VNC viewer.

`GatewayConsole` is `shadow.console.ConsoleProxy` — the same request, TLS channel,
certificate pinning and ACCEPT — with three differences that come from running inside
the gateway: the hub is asked in this process, as the viewer's signed-in session (no
HTTP, no sign-in token); the device is dialled through the node's Dialer; and the
console's throw-away key never leaves memory except as the brief 0600 file the TLS
context loads (as in the CLI). Devices behind NAT (dial-out) are not reached this way
yet. Never logs a request or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from portcullis.errors import ClientError, DialError
from portcullis.identity.sessions import Session
from portcullis.net.dialer import Dialer
from portcullis.shadow.console import (
    ANSWER_TIMEOUT,
    CONNECT_TIMEOUT,
    ConsoleChannel,
    ConsoleProxy,
    ShadowGrant,
)
from portcullis.shadow.hub import HubRefusal, ShadowHub

#: What a device's ticket names as its resource; no resource name contains ":".
DEVICE_PREFIX = "device:"


class GatewayConsole(ConsoleProxy):
    """One shadowing of `device` for the browser of `session`."""

    def __init__(self, hub: ShadowHub, session: Session, device: str, dialer: Dialer,
                 client: str) -> None:
        # Not ConsoleProxy.__init__: that one signs in over HTTP with a saved token; here
        # the hub and the session are in this process.
        self.device = device
        self._say = lambda line: None
        self._connect_timeout = CONNECT_TIMEOUT
        self._answer_timeout = ANSWER_TIMEOUT
        self.session_id: str | None = None
        self._carried = None
        self._hub = hub
        self._session = session
        self._dialer = dialer
        self._client = client

    async def _ask(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._hub.issue(self._session, payload, self._client)
        except HubRefusal as exc:
            raise ClientError(f"cannot shadow {self.device}: {exc}") from None

    async def report(self, grant: ShadowGrant, problem: str, detail: str) -> None:
        with contextlib.suppress(HubRefusal):
            await self._hub.report(self._session, grant.request_id,
                                   {"problem": problem, "detail": detail}, self._client)

    async def _through_hub(self, grant: ShadowGrant) -> socket.socket:
        detail = "the device is behind NAT (dial-out): the browser cannot reach it yet"
        await self.report(grant, "unreachable", detail)
        raise ClientError(f"cannot shadow {grant.device} in the browser: {detail}; use "
                          f"'portcullis shadow {grant.device}'")

    async def _connect_direct(self, channel: ConsoleChannel, host: str, port: int,
                              tls: ssl.SSLContext, server_name: str
                              ) -> tuple[asyncio.Transport, ConsoleChannel]:
        try:
            raw, _ = await self._dialer.connect(host, port, lambda: channel)
        except DialError as exc:
            raise ConnectionError(str(exc)) from None
        secured = await asyncio.get_running_loop().start_tls(raw, channel, tls,
                                                             server_hostname=server_name)
        if secured is None:   # the loop's signature allows it; a TCP transport never is
            raise ConnectionError("TLS could not start on the connection")
        channel.connection_made(secured)   # start_tls does not tell the protocol
        return secured, channel


async def open_device(hub: ShadowHub, session: Session, device: str, dialer: Dialer,
                      client: str) -> tuple[asyncio.Transport, bytes]:
    """The device's channel, accepted, and what the device's VNC server said already;
    ClientError with a reason the viewer can be shown when it cannot be opened."""
    console = GatewayConsole(hub, session, device, dialer, client)
    key_pem, grant = await console.ask_hub()
    try:
        transport, channel = await console.open_channel(grant, key_pem)
    except ClientError as exc:
        # The console's messages name where it connected (for an operator at a shell);
        # the browser is told no address. The hub's audit has the detail (report).
        if grant.address is not None and grant.address[0] in str(exc):
            raise ClientError(f"cannot shadow {device}: the device cannot be reached "
                              "now; try again later") from None
        raise
    return transport, channel.take_pending()
