"""Interop, classic mode: our edge -> stunnel -> Debian's dante SOCKS5 server, a stock
relay. stunnel holds the relay certificate of a deployment made by `portcullis init` and
requires the gateway's client certificate (verifyChain, the deployment CA); dante
listens on loopback with method none. UDP never goes to dante's UDP ASSOCIATE: it stays
inside TLS, so a stock relay refuses it, with a reason the administrator can read."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_launch import PASSWORD, login, start_launch

from conftest import Deployment, require_program
from peers.dante import Danted, StunnelServer
from peers.servers import HttpServer
from portcullis.errors import DialError
from portcullis.net.socksrelay import ClassicRelayDialer
from portcullis.net.tls import client_context


@dataclass
class StockRelay:
    address: str   # stunnel's HOST:PORT, the relay the edge is given
    danted_log: Path


@pytest.fixture
def stock_relay(deployment: Deployment, tmp_path: Path) -> Iterator[StockRelay]:
    """stunnel -> danted, logging each connection it makes."""
    pki = deployment.directory / "pki"
    danted = Danted(require_program("danted"), tmp_path, blocked_port=9)
    try:
        stunnel = StunnelServer(require_program("stunnel"), tmp_path, cert=pki / "relay.crt",
                                key=pki / "relay.key", ca=pki / "ca.crt",
                                forward=danted.port)
    except BaseException:
        danted.close()
        raise
    yield StockRelay(f"127.0.0.1:{stunnel.port}", danted.log)
    stunnel.close()
    danted.close()


def edge_dialer(deployment: Deployment, relay: StockRelay) -> ClassicRelayDialer:
    pki = deployment.directory / "pki"
    return ClassicRelayDialer(relay.address, client_context(pki / "ca.crt",
                                                    cert_file=pki / "gateway.crt",
                                                    key_file=pki / "gateway.key"))


class Page(asyncio.Protocol):
    """An HTTP/1.0 response, read until the server closes."""

    def __init__(self) -> None:
        self.body = bytearray()
        self.done = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.body += data

    def eof_received(self) -> None:
        self.done.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


async def test_the_edge_dialer_fetches_a_page_through_stunnel_and_dante(
        deployment: Deployment, stock_relay: StockRelay, http_server: HttpServer) -> None:
    dialer = edge_dialer(deployment, stock_relay)
    transport, page = await dialer.connect("127.0.0.1", http_server.port, Page)
    transport.write(f"GET / HTTP/1.0\r\nHost: 127.0.0.1:{http_server.port}\r\n\r\n"
                    .encode())
    async with asyncio.timeout(20):
        await page.done.wait()
    transport.close()
    head, _, body = bytes(page.body).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert body == b"<h1>intranet home</h1>\n"


async def test_udp_through_dante_is_refused_saying_the_relay_does_not_carry_udp(
        deployment: Deployment, stock_relay: StockRelay) -> None:
    dialer = edge_dialer(deployment, stock_relay)
    with pytest.raises(DialError) as refused:
        await dialer.connect_udp("127.0.0.1", 53, asyncio.DatagramProtocol)
    assert str(refused.value).startswith(
        f"the relay at {stock_relay.address} does not carry UDP")
    assert "a stock SOCKS5 server carries TCP only" in str(refused.value)


def test_a_gateway_dialing_through_stunnel_and_dante_launches_a_page_intact(
        deployment: Deployment, stock_relay: StockRelay, http_server: HttpServer,
        client_home: Path, start_process) -> None:  # type: ignore[no-untyped-def]
    curl = require_program("curl")
    deployment.add_resource("web", http_server.address, ["staff"], "Team web")
    deployment.add_user("alice", PASSWORD, ["staff"])
    with deployment.config.open("a") as config:
        config.write(f'\n[dialer]\nvia = "relay"\nmode = "classic"\n'
                     f'relay = "{stock_relay.address}"\n')
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    login(deployment)
    _, host, port = start_launch(start_process, "web")
    fetched = subprocess.run([curl, "-sS", "--max-time", "20", f"http://{host}:{port}/"],
                             capture_output=True, text=True, timeout=30)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == "<h1>intranet home</h1>\n"
    # dante made the connection: the gateway had no other way to the page.
    assert f"127.0.0.1.{http_server.port}" in stock_relay.danted_log.read_text()
