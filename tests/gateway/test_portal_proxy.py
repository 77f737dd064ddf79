"""The gateway's proxy to a portal in another process (split mode), against a real
`portcullis serve portal` (mutual TLS): its connections are made by the Dialer it is
given, whichever that is, and a portal it cannot reach is a 502."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from conftest import Deployment, free_port
from peers.dialers import CarryingDialer
from portcullis.gateway.proxy import PortalProxy
from portcullis.net.dialer import Dialer, DirectDialer
from portcullis.net.tls import client_context


def edge_in_front_of(deployment: Deployment, portal_url: str,
                     dialer: Dialer) -> tuple[httpx.AsyncClient, PortalProxy]:
    """A client of an app that forwards everything to the portal, as the gateway does."""
    pki = deployment.directory / "pki"
    proxy = PortalProxy(portal_url, client_context(deployment.ca, cert_file=pki / "gateway.crt",
                                                   key_file=pki / "gateway.key"), dialer)
    app = Starlette(routes=[Route("/{path:path}", proxy.forward, methods=["GET", "POST"])])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="https://edge"), proxy


async def test_the_split_portal_is_reached_over_the_dialer_it_is_given(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    deployment.set("sta", "id", '"EDGE"')   # the portal alone runs no STA
    portal = start_process("serve", "portal", "--dir", str(deployment.directory),
                           name="portal")
    portal.wait_for(r"portal listening on")
    dialer = CarryingDialer()
    client, proxy = edge_in_front_of(deployment, f"https://127.0.0.1:{deployment.port + 1}",
                                     dialer)
    try:
        pages = [await client.get("/login") for _ in range(2)]
    finally:
        await client.aclose()
        await proxy.close()
    assert [page.status_code for page in pages] == [200, 200]
    assert "<form" in pages[0].text
    assert dialer.dials == 1   # one kept-alive connection, made by the Dialer


async def test_a_portal_the_dialer_cannot_reach_is_a_bad_gateway(
        deployment: Deployment) -> None:
    client, proxy = edge_in_front_of(deployment, f"https://127.0.0.1:{free_port()}",
                                     DirectDialer())
    try:
        page = await client.get("/login")
        browser = await client.get("/login", headers={"accept": "text/html"})
    finally:
        await client.aclose()
        await proxy.close()
    assert (page.status_code, page.text) == (502, "the portal is unavailable")
    # A browser gets a page saying what happened and what to do.
    assert browser.status_code == 502 and "Temporarily unavailable" in browser.text
    assert browser.headers["content-type"].startswith("text/html")


def test_a_portal_alone_dials_directly_whatever_the_edges_dialer_says(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    """A dial-out [dialer] belongs to the edge gateway (the relays connect to it); the
    portal sits inside, starts, and reaches the STA directly."""
    deployment.set("sta", "id", '"EDGE"')
    with deployment.config.open("a") as handle:
        handle.write('\n[dialer]\nvia = "relay"\nmode = "dial-out"\n')
    portal = start_process("serve", "portal", "--dir", str(deployment.directory),
                           name="portal")
    portal.wait_for(r"portal listening on")
    assert "it dials directly" in portal.output()
