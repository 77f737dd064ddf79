"""The one place a node's Dialer is chosen, from `[dialer]`: node wiring calls
`dialer_from_settings` once and hands the same Dialer to every role that connects
inward (launches, tunnel streams, the STA client, the portal proxy).

Never dials by itself, and nothing else builds a Dialer from settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from portcullis.config.model import DialerSettings
from portcullis.errors import ConfigError, DialError
from portcullis.net.dialer import Dialer, DirectDialer, EchoChannel
from portcullis.net.muxdialer import MuxDialer, RelaySessions
from portcullis.net.socksrelay import ClassicRelayDialer
from portcullis.net.tls import ResumingClientContext
from portcullis.reasons import Reason

P = TypeVar("P", bound=asyncio.BaseProtocol)
D = TypeVar("D", bound=asyncio.DatagramProtocol)


def dialer_from_settings(settings: DialerSettings, *, relays: RelaySessions | None = None,
                         datagram_idle_timeout: float = 60.0,
                         gateway_tls: Callable[[], ResumingClientContext] | None = None
                         ) -> Dialer:
    """`relays`: in dial-out mode, the relay connections this gateway holds (its
    `/api/v1/relay` endpoint's pool). `datagram_idle_timeout`: when a relayed UDP or
    ICMP flow with no traffic ends. `gateway_tls`: in classic mode, the gateway's client
    context (its certificate and the deployment CA), which the node keeps renewed."""
    if settings.via == "direct":
        return DirectDialer(timeout=settings.timeout)
    # via = "relay": one branch per mode.
    if settings.mode == "dial-out":
        if relays is None:
            raise ConfigError("dial-out mode needs the gateway role on this node: relays "
                              "connect to gateways", key="dialer.mode")
        return MuxDialer(relays, timeout=settings.timeout,
                         datagram_idle_timeout=datagram_idle_timeout)
    if gateway_tls is None:
        raise ConfigError("classic mode needs the gateway's certificate on this node: the "
                          "relay accepts only the gateway", key="dialer.mode")
    assert settings.relay is not None   # DialerSettings requires it in classic mode
    return ClassicRelayDialer(settings.relay, gateway_tls(), timeout=settings.timeout)


class TimeBoundDialer:
    """`dialer`, with TCP connections given up after `timeout` seconds (a shorter bound
    for one feature, such as the tunnel's `vpn.dial_timeout`); the rest as it is."""

    def __init__(self, dialer: Dialer, timeout: float) -> None:
        self._dialer = dialer
        self._timeout = timeout

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], P], *,
                      source: str | None = None) -> tuple[asyncio.Transport, P]:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._dialer.connect(host, port, protocol_factory, source=source)
        except TimeoutError:
            raise DialError(f"connecting to {host}:{port} timed out",
                            Reason.TIMED_OUT) from None

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], D], *,
                          source: str | None = None) -> tuple[asyncio.DatagramTransport, D]:
        return await self._dialer.connect_udp(host, port, protocol_factory, source=source)

    async def open_echo(self, address: str, *, source: str | None = None) -> EchoChannel:
        return await self._dialer.open_echo(address, source=source)
