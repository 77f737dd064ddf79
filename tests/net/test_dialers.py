"""The Dialer a node builds from `[dialer]`, and the tunnel's shorter bound on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Deployment
from peers.servers import EchoServer
from portcullis.config.model import DialerSettings
from portcullis.errors import ConfigError, DialError
from portcullis.gateway.relays import RelayPool
from portcullis.net.dialers import TimeBoundDialer, dialer_from_settings
from portcullis.net.muxdialer import MuxDialer
from portcullis.net.socksrelay import ClassicRelayDialer
from portcullis.net.tls import ResumingClientContext, client_context
from portcullis.reasons import Reason


class _Received(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()


async def test_the_direct_setting_gives_a_dialer_that_connects(
        echo_server: EchoServer) -> None:
    dialer = dialer_from_settings(DialerSettings(via="direct"))
    transport, received = await dialer.connect("127.0.0.1", echo_server.port, _Received)
    transport.write(b"inward")
    await asyncio.wait_for(received.arrived.wait(), 10)
    transport.close()
    assert bytes(received.data) == b"inward"


def test_dial_out_gives_the_mux_dialer_over_the_gateway_s_relay_connections() -> None:
    relays = RelayPool()
    assert isinstance(dialer_from_settings(DialerSettings(via="relay", mode="dial-out"),
                                           relays=relays), MuxDialer)
    with pytest.raises(ConfigError, match=r"dialer\.mode: .*needs the gateway role"):
        dialer_from_settings(DialerSettings(via="relay", mode="dial-out"))


def test_classic_gives_the_relay_dialer_with_the_gateways_tls_context(
        deployment: Deployment) -> None:
    pki = deployment.directory / "pki"
    settings = DialerSettings(via="relay", mode="classic", relay="127.0.0.1:8444")
    asked: list[str] = []

    def gateway_tls() -> ResumingClientContext:
        asked.append("gateway")
        return client_context(pki / "ca.crt", cert_file=pki / "gateway.crt",
                              key_file=pki / "gateway.key")

    assert isinstance(dialer_from_settings(settings, gateway_tls=gateway_tls),
                      ClassicRelayDialer)
    assert asked == ["gateway"]
    with pytest.raises(ConfigError, match=r"dialer\.mode: classic mode needs the gateway"):
        dialer_from_settings(settings)


class _NeverConnects:
    """A dialer still trying: as a relay that neither answers nor gives up."""

    async def connect(self, host: str, port: int, protocol_factory: Callable[[], Any], *,
                      source: str | None = None) -> Any:
        await asyncio.Event().wait()

    async def connect_udp(self, host: str, port: int, protocol_factory: Callable[[], Any], *,
                          source: str | None = None) -> Any:
        raise DialError("no UDP here", Reason.REFUSED)

    async def open_echo(self, address: str, *, source: str | None = None) -> Any:
        raise DialError("no ICMP here", Reason.REFUSED)


async def test_a_time_bound_dialer_gives_up_as_timed_out() -> None:
    bounded = TimeBoundDialer(_NeverConnects(), 0.2)
    with pytest.raises(DialError, match=r"connecting to 192\.0\.2\.1:80 timed out") as raised:
        await bounded.connect("192.0.2.1", 80, asyncio.Protocol)
    assert raised.value.reason == Reason.TIMED_OUT


async def test_a_time_bound_dialer_passes_udp_and_echo_to_its_dialer() -> None:
    bounded = TimeBoundDialer(_NeverConnects(), 0.2)
    with pytest.raises(DialError, match="no UDP here"):
        await bounded.connect_udp("192.0.2.1", 53, asyncio.DatagramProtocol)
    with pytest.raises(DialError, match="no ICMP here"):
        await bounded.open_echo("192.0.2.1")
