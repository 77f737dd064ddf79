"""The local SOCKS5 and HTTP proxies close a client that does not finish its handshake
in time, over real loopback sockets."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from portcullis.client.httpproxy import HttpProxyInbound
from portcullis.client.proxies import (
    Inbound,
    ProxySettings,
    SocksInbound,
)
from portcullis.client.tunnel import TunnelClient

TIMEOUT = 0.3
# Generous: the machine is shared; what matters is that the connection ends at all.
BOUND = TIMEOUT + 3.0

Listen = Callable[[type[Inbound]], Awaitable[tuple[str, int]]]

@pytest.fixture
async def listen() -> AsyncIterator[Listen]:
    # The tunnel never comes up here: a client that finishes its handshake waits for it.
    tunnel = TunnelClient("https://127.0.0.1:9", "token", ssl.create_default_context(),
                          say=lambda line: None)
    settings = ProxySettings(handshake_timeout=TIMEOUT)
    servers: list[asyncio.Server] = []

    async def start(kind: type[Inbound]) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: kind(tunnel, settings), "127.0.0.1", 0)
        servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return host, port

    yield start
    for server in servers:
        server.close()


async def closed_after(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the proxy sent until it closed, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), BOUND)
    return data, time.monotonic() - started


@pytest.mark.parametrize("sent", [b"", b"\x05\x02", b"\x05\x01\x00\x05\x01\x00\x03\x10in"],
                         ids=["nothing", "half-greeting", "half-request"])
async def test_a_socks5_client_that_stalls_mid_handshake_is_closed(
        listen: Listen, sent: bytes) -> None:
    reader, writer = await asyncio.open_connection(*await listen(SocksInbound))
    writer.write(sent)
    data, elapsed = await closed_after(reader)
    print(f"SOCKS5 {sent!r}: closed after {elapsed:.2f} s (timeout {TIMEOUT} s)")
    assert data == (b"\x05\x00" if sent.startswith(b"\x05\x01\x00") else b"")
    assert elapsed < BOUND
    writer.close()


@pytest.mark.parametrize("sent", [b"", b"CONNECT wiki:443 HTTP/1.1\r\nHost: wi"],
                         ids=["nothing", "half-head"])
async def test_an_http_client_that_stalls_mid_head_gets_408_and_is_closed(
        listen: Listen, sent: bytes) -> None:
    reader, writer = await asyncio.open_connection(*await listen(HttpProxyInbound))
    writer.write(sent)
    data, elapsed = await closed_after(reader)
    print(f"HTTP {sent!r}: closed after {elapsed:.2f} s (timeout {TIMEOUT} s)")
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert elapsed < BOUND
    writer.close()


async def test_a_finished_handshake_is_not_timed_out_while_the_tunnel_comes_up(
        listen: Listen) -> None:
    reader, writer = await asyncio.open_connection(*await listen(SocksInbound))
    writer.write(b"\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x50")
    assert await asyncio.wait_for(reader.readexactly(2), BOUND) == b"\x05\x00"
    with pytest.raises(TimeoutError):   # still open well past the handshake timeout
        await asyncio.wait_for(reader.read(1), 3 * TIMEOUT)
    writer.close()
