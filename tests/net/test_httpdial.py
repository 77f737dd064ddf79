"""HTTP over whatever the Dialer hands back: a real uvicorn server with mutual TLS,
reached through a DirectDialer and through a dialer whose transport is its own object
(as a relay dialer's is), on asyncio and on uvloop (whose start_tls would refuse such a
transport)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvloop

from conftest import Process, free_port
from peers.dialers import CarryingDialer
from portcullis.net.dialer import DirectDialer
from portcullis.net.httpdial import DialerTransport
from portcullis.net.tls import client_context
from portcullis.pki import create_ca, issue_certificate, write_pair

T = TypeVar("T")
BIG = bytes(range(256)) * 8192   # 2 MiB: more than the read buffer holds

APP = '''
import asyncio
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

BIG = bytes(range(256)) * 8192

async def echo(request):
    return Response(await request.body(), media_type="application/octet-stream")

async def big(request):
    return Response(BIG, media_type="application/octet-stream")

async def silent(request):
    await asyncio.Event().wait()

app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/big", big),
                        Route("/silent", silent)])
'''


class Server:
    def __init__(self, port: int, client_tls: ssl.SSLContext) -> None:
        self.url = f"https://127.0.0.1:{port}"
        self.client_tls = client_tls


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """uvicorn serving https that asks every client for a certificate of its CA."""
    directory = tmp_path_factory.mktemp("httpdial")
    ca = create_ca()
    write_pair(directory, "ca", ca)
    cert, key = write_pair(directory, "server", issue_certificate(
        ca, "server", ip_addresses=["127.0.0.1"]))
    client_cert, client_key = write_pair(directory, "client", issue_certificate(ca, "client"))
    (directory / "app.py").write_text(APP)
    port = free_port()
    process = Process(
        ["-m", "uvicorn", "app:app", "--app-dir", str(directory), "--host", "127.0.0.1",
         "--port", str(port), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
         "--ssl-ca-certs", str(directory / "ca.crt"),
         "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED))],
        directory / "uvicorn.log", program=sys.executable)
    try:
        process.wait_for("Uvicorn running on")
        yield Server(port, client_context(directory / "ca.crt", cert_file=client_cert,
                                          key_file=client_key))
    finally:
        process.stop()


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
DIALERS: dict[str, Callable[[], Any]] = {"direct": DirectDialer, "carrying": CarryingDialer}


def run_on(loop_name: str, coroutine: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        return runner.run(coroutine)


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("dialer_name", DIALERS)
def test_https_with_a_client_certificate_works_over_any_dialer(
        server: Server, dialer_name: str, loop_name: str) -> None:
    async def exchange() -> tuple[bytes, str, bytes]:
        transport = DialerTransport(DIALERS[dialer_name](), server.client_tls)
        async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
            echoed = await client.post("/echo", content=b"through the dialer")
            big = await client.get("/big")
        return echoed.content, echoed.http_version, big.content

    echoed, version, big = run_on(loop_name, exchange())
    assert echoed == b"through the dialer" and version == "HTTP/1.1"
    assert hashlib.sha256(big).digest() == hashlib.sha256(BIG).digest()


def test_requests_reuse_one_dialled_connection(server: Server) -> None:
    dialer = CarryingDialer()

    async def three_requests() -> list[int]:
        transport = DialerTransport(dialer, server.client_tls)
        async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
            return [(await client.post("/echo", content=b"x")).status_code for _ in range(3)]

    assert run_on("uvloop", three_requests()) == [200, 200, 200]
    assert dialer.dials == 1


def test_a_server_that_never_answers_ends_in_a_read_timeout(server: Server) -> None:
    async def silent() -> None:
        transport = DialerTransport(CarryingDialer(), server.client_tls)
        async with httpx.AsyncClient(transport=transport, base_url=server.url,
                                     timeout=0.5) as client:
            await client.get("/silent")

    with pytest.raises(httpx.ReadTimeout):
        run_on("uvloop", silent())


def test_a_listener_that_never_speaks_tls_ends_in_a_connect_timeout(server: Server) -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:   # accepts, never answers
        async def handshake() -> None:
            transport = DialerTransport(CarryingDialer(), server.client_tls)
            async with httpx.AsyncClient(transport=transport, timeout=0.5) as client:
                await client.get(f"https://127.0.0.1:{mute.getsockname()[1]}/")

        with pytest.raises(httpx.ConnectTimeout):
            run_on("uvloop", handshake())


def test_a_refused_dial_is_a_connect_error_with_the_dialers_words(server: Server) -> None:
    port = free_port()

    async def refused() -> None:
        transport = DialerTransport(DirectDialer(), server.client_tls)
        async with httpx.AsyncClient(transport=transport) as client:
            await client.get(f"https://127.0.0.1:{port}/")

    with pytest.raises(httpx.ConnectError,
                       match=re.escape(f"127.0.0.1:{port} refused the connection")):
        run_on("uvloop", refused())


def test_a_server_certificate_of_another_ca_is_refused(server: Server, tmp_path: Path) -> None:
    stranger = create_ca("Another CA")
    write_pair(tmp_path, "other", stranger)

    async def other_ca() -> None:
        tls = client_context(tmp_path / "other.crt")
        async with httpx.AsyncClient(transport=DialerTransport(CarryingDialer(), tls),
                                     base_url=server.url) as client:
            await client.get("/big")

    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        run_on("uvloop", other_ca())
