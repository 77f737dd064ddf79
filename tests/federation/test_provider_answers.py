"""Answers from a provider's address are bounded: a body past the limit, compressed or
not, is refused before it is all read, and an address nobody answers is "unavailable".
The peer is a plain asyncio server on 127.0.0.1 that answers one endless response."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import httpx
import pytest

from portcullis.errors import FederationError
from portcullis.federation.http import get_json
from portcullis.net.dialer import DirectDialer
from portcullis.net.httpdial import DialerTransport
from portcullis.net.tls import client_context

CHUNK = b"[" + b" " * 65535


async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(1000):        # 64 MiB at most: bounded even if the client reads on
            writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def bomb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    body = gzip.compress(b" " * (8 * 1024 * 1024))     # 8 MiB in ~8 KiB
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=DialerTransport(DirectDialer(), client_context(None)),
                                 timeout=10) as client:
        yield client


@pytest.mark.parametrize("serve", [endless, bomb])
async def test_an_answer_past_the_limit_is_refused(http: httpx.AsyncClient, serve) -> None:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(FederationError, match="answered more than 262144 bytes") as caught:
            await get_json(http, f"http://127.0.0.1:{port}/jwks", what="JWKS")
        assert caught.value.unavailable
    finally:
        server.close()


async def test_an_address_nobody_answers_is_unavailable(http: httpx.AsyncClient) -> None:
    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(FederationError, match="cannot reach the JWKS") as caught:
        await get_json(http, f"http://127.0.0.1:{port}/jwks", what="JWKS")
    assert caught.value.unavailable


async def not_found(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    page = b"<html>no such tenant</html>"
    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(page), page))
    await writer.drain()
    writer.close()


async def test_an_error_page_is_reported_by_its_status(http: httpx.AsyncClient) -> None:
    server = await asyncio.start_server(not_found, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(FederationError) as caught:
            await get_json(http, f"http://127.0.0.1:{port}/.well-known/openid-configuration",
                           what="discovery document")
    finally:
        server.close()
    assert str(caught.value) == (f"the discovery document at http://127.0.0.1:{port}/"
                                 ".well-known/openid-configuration answered HTTP 404")
