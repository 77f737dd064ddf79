"""Each web host's certificate: the gateway's when it covers the name, else one issued
from the deployment CA once, kept, and presented to connections opened for that name."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from portcullis.config.model import Settings
from portcullis.net.tls import choose_by_server_name, server_context, server_name_of
from portcullis.pki.ca import create_ca, issue_certificate, write_pair
from portcullis.webproxy.certificates import certificate_names, host_certificates
from portcullis.webproxy.sites import Sites

WEB = {"kind": "web", "groups": ["staff"]}


def deployment(tmp_path: Path, gateway_names: list[str]) -> Settings:
    pki = tmp_path / "pki"
    ca = create_ca("Test CA")
    write_pair(pki, "ca", ca)
    write_pair(pki, "gateway", issue_certificate(ca, "portcullis-gateway",
                                                 dns_names=gateway_names))
    return Settings.model_validate({
        "gateway": {"public_url": "https://gw.test:8443"},
        "resources": [{"name": "wiki", "title": "Wiki", "upstream": "http://127.0.0.1:1",
                       "host": "wiki.gw.test", **WEB},
                      {"name": "chat", "title": "Chat", "upstream": "http://127.0.0.1:2",
                       "host": "chat.gw.test", **WEB}]}).model_copy(
        update={"base_dir": tmp_path})


def test_names_the_gateway_certificate_lacks_get_one_issued_once_from_the_ca(
        tmp_path: Path) -> None:
    settings = deployment(tmp_path, ["gw.test"])
    sites = Sites(settings.resources, settings.gateway.public_url)
    chosen = host_certificates(settings, sites)
    assert [(c.host, c.name) for c in chosen] == [("wiki.gw.test", "web-wiki.gw.test"),
                                                  ("chat.gw.test", "web-chat.gw.test")]
    issued = tmp_path / "pki" / "web-wiki.gw.test.crt"
    assert certificate_names(issued) == ["wiki.gw.test"]
    first = issued.read_bytes()
    host_certificates(settings, sites)
    assert issued.read_bytes() == first   # kept, not issued again
    assert (tmp_path / "pki" / "web-wiki.gw.test.key").stat().st_mode & 0o077 == 0


def test_a_wildcard_gateway_certificate_serves_every_web_host(tmp_path: Path) -> None:
    settings = deployment(tmp_path, ["gw.test", "*.gw.test"])
    sites = Sites(settings.resources, settings.gateway.public_url)
    assert {c.name for c in host_certificates(settings, sites)} == {"gateway"}
    assert not (tmp_path / "pki" / "web-wiki.gw.test.crt").exists()


def test_without_the_ca_key_a_name_falls_back_to_the_gateway_certificate(
        tmp_path: Path) -> None:
    settings = deployment(tmp_path, ["gw.test"])
    (tmp_path / "pki" / "ca.key").unlink()
    sites = Sites(settings.resources, settings.gateway.public_url)
    assert {c.name for c in host_certificates(settings, sites)} == {"gateway"}


async def test_a_connection_gets_its_names_certificate_and_remembers_the_name(
        tmp_path: Path) -> None:
    settings = deployment(tmp_path, ["gw.test"])
    sites = Sites(settings.resources, settings.gateway.public_url)
    pki = tmp_path / "pki"
    base = server_context(pki / "gateway.crt", pki / "gateway.key")
    by_host = {c.host: server_context(*settings.role_cert(c.name), server_name=c.host)
               for c in host_certificates(settings, sites)}
    choose_by_server_name(base, by_host)
    seen: asyncio.Queue[str | None] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.put_nowait(server_name_of(writer.get_extra_info("ssl_object")))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=base)
    port = server.sockets[0].getsockname()[1]
    client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    for name in ("wiki.gw.test", "gw.test"):
        # The client checks the certificate against the name: a wrong one fails here.
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                  server_hostname=name)
        assert await asyncio.wait_for(seen.get(), 10) == (name if name != "gw.test" else None)
        writer.close()
    server.close()
    await server.wait_closed()
