"""The local HTTP proxy's forwarding never waits forever, over real loopback sockets: a
request whose connection the gateway never opens gets 504, and a keep-alive connection
nobody uses is closed."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from portcullis.client.httpproxy import HttpProxyInbound
from portcullis.client.proxies import ProxySettings
from portcullis.client.tunnel import TunnelClient

TIMEOUT = 0.3
BOUND = TIMEOUT + 3.0   # generous: the machine is shared; what matters is that it ends


Start = Callable[[ProxySettings], Awaitable[tuple[str, int]]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    # The tunnel never comes up here: a forwarded request waits for its stream.
    tunnel = TunnelClient("https://127.0.0.1:9", "token", ssl.create_default_context(),
                          say=lambda line: None)
    servers: list[asyncio.Server] = []

    async def listen(settings: ProxySettings) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: HttpProxyInbound(tunnel, settings),
                                          "127.0.0.1", 0)
        servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        return host, port

    yield listen
    for server in servers:
        server.close()


async def test_a_request_whose_stream_never_opens_gets_504_and_is_closed(start: Start) -> None:
    proxy = await start(ProxySettings(upstream_timeout=TIMEOUT))
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(b"POST http://intranet.example/form HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 4\r\n\r\nbody")
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), BOUND)
    print(f"504 after {time.monotonic() - started:.2f} s (timeout {TIMEOUT} s)")
    assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert answer.endswith(b"the gateway did not open the connection in 0.3 s\n")
    writer.close()


async def test_a_request_body_that_stops_coming_gets_408_and_is_closed(start: Start) -> None:
    proxy = await start(ProxySettings(upstream_timeout=60, idle_timeout=TIMEOUT))
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(b"POST http://intranet.example/form HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 400\r\n\r\nthe first bytes of the body")
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), BOUND)
    print(f"408 after {time.monotonic() - started:.2f} s (idle timeout {TIMEOUT} s)")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert answer.endswith(b"the request body stopped coming\n")
    writer.close()
