"""The SAML identity provider of the tests (peers/saml_idp.py, pysaml2's IdP side) as a
real process on a free port, and a browser's part of a sign-in driven with httpx.

`saml_idp` (module scope) starts it: its own key pair, made here; the SP's metadata,
taken from the gateway's own code (`ServiceProvider.metadata()`), so the IdP knows the
gateway as any IdP would. `SamlPeer.provider(**settings)` is the `[[auth.providers]]`
entry for it; `browse()` is what a browser does between redirect() and the callback.
"""

from __future__ import annotations

import asyncio
import html.parser
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Process, free_port, require_program
from peers.saml_idp import idp_server
from portcullis.config.federation import SamlProvider
from portcullis.federation.saml import ServiceProviderSource
from portcullis.pki import create_signing_pair, write_pair

PUBLIC_URL = "https://gateway.test"
PROVIDER = "corp"
CALLBACK = f"{PUBLIC_URL}/login/callback/{PROVIDER}"
USERS: dict[str, dict[str, Any]] = {
    "alice": {"password": "alice-pass", "attributes": {
        "mail": ["alice@corp.example"], "displayName": ["Alice Liddell"],
        "userPrincipalName": ["alice@corp.example"],
        "objectSid": ["S-1-5-21-1004336348-1177238915-682003330-1105"],
        "objectGUID": ["0b5ee5a4-3b0c-4f8e-9c11-2f5a7d2c1e01"],
        "groups": ["staff", "finance"]}},
    # Claim names as AD FS sends them.
    "bob": {"password": "bob-pass", "attributes": {
        "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn": ["bob@corp.example"],
        "http://schemas.xmlsoap.org/claims/Group": ["vpn-users"],
        "http://schemas.microsoft.com/ws/2008/06/identity/claims/primarysid":
            ["S-1-5-21-1004336348-1177238915-682003330-1106"]}},
    # The NameID the IdP signs is "admin.evil": a comment put into it must not make
    # the gateway read "admin".
    "mallory": {"password": "mallory-pass", "name_id": "admin.evil", "attributes": {}},
    # So many groups that the signed Response (about 110 KB, more in base64) is larger
    # than the gateway's limit for any other request body (limits.max_request_body).
    "carol": {"password": "carol-pass", "attributes": {
        "groups": ["staff", *(f"project-team-{number:04d}" for number in range(1500))]}},
}


class _Fields(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self.action: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "form":
            self.action = found.get("action")
        if tag == "input" and found.get("type") == "hidden" and found.get("name"):
            self.fields[str(found["name"])] = found.get("value") or ""


def form_of(page: str) -> tuple[str | None, dict[str, str]]:
    """The first form's action and hidden fields."""
    parser = _Fields()
    parser.feed(page)
    return parser.action, parser.fields


@dataclass
class SamlPeer:
    url: str
    directory: Path
    metadata_file: Path
    pki_dir: Path

    def provider(self, **settings: Any) -> SamlProvider:
        return SamlProvider.model_validate({
            "type": "saml", "name": PROVIDER, "idp_metadata_file": str(self.metadata_file),
            **settings})

    def source(self, **settings: Any) -> ServiceProviderSource:
        return ServiceProviderSource(self.provider(**settings), public_url=PUBLIC_URL,
                                     pki_dir=self.pki_dir, resolve=Path)

    async def browse(self, url: str, form: dict[str, str] | None, username: str,
                     password: str, **answer: str) -> dict[str, str]:
        """A browser at the IdP: follow the redirect (or POST the form), sign in, and
        return the fields the IdP's page would POST to the ACS."""
        async with httpx.AsyncClient(timeout=20) as http:
            page = (await http.get(url)) if form is None else await http.post(url, data=form)
            assert page.status_code == 200, page.text
            _, fields = form_of(page.text)
            signed_in = await http.post(f"{self.url}/login", data={
                **fields, "username": username, "password": password, **answer})
            assert signed_in.status_code == 200, signed_in.text
            action, posted = form_of(signed_in.text)
            assert action == fields["acs"]
            return posted

    async def unsolicited(self, username: str, password: str, **answer: str) -> dict[str, str]:
        """An IdP-initiated sign-in to the gateway's ACS."""
        async with httpx.AsyncClient(timeout=20) as http:
            page = await http.post(f"{self.url}/unsolicited", data={
                "username": username, "password": password, "acs": CALLBACK,
                "sp": f"{PUBLIC_URL}/saml/{PROVIDER}", **answer})
            assert page.status_code == 200, page.text
            return form_of(page.text)[1]


@dataclass
class IdpFiles:
    """The IdP's configuration, made before it runs: its metadata (for the SP) is ready,
    and it will trust the SP metadata written to `sp_metadata_file`."""

    port: int
    directory: Path
    config_file: Path
    metadata_file: Path
    sp_metadata_file: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def prepare_idp(directory: Path) -> IdpFiles:
    """The IdP's key pair, configuration and metadata (as its own code writes it; it
    serves the same at /metadata)."""
    require_program("xmlsec1")
    port = free_port()
    cert_file, key_file = write_pair(directory, "idp", create_signing_pair("test-idp"))
    sp_metadata_file = directory / "sp.xml"
    config = {"port": port, "key_file": str(key_file), "cert_file": str(cert_file),
              "sp_metadata_file": str(sp_metadata_file), "users": USERS}
    sp_metadata_file.write_text(_EMPTY_ENTITIES)
    from saml2.metadata import create_metadata_string
    metadata_file = directory / "idp.xml"
    metadata_file.write_bytes(create_metadata_string(None, idp_server(config).config,
                                                     sign=False))
    config_file = directory / "idp.json"
    config_file.write_text(json.dumps(config))
    return IdpFiles(port, directory, config_file, metadata_file, sp_metadata_file)


def start_idp(files: IdpFiles, sp_metadata: bytes) -> Process:
    """The IdP, trusting the SP that `sp_metadata` describes; stop() it when done."""
    files.sp_metadata_file.write_bytes(sp_metadata)
    process = Process([str(Path(__file__).with_name("saml_idp.py")), str(files.config_file)],
                      files.directory / "idp.log", program=sys.executable)
    try:
        process.wait_listening(files.port)
    except BaseException:
        process.stop()
        raise
    return process


def start_saml_idp(directory: Path) -> tuple[SamlPeer, Process]:
    """The IdP on a free port, its files in `directory`, knowing the gateway of
    PUBLIC_URL (whose SAML key pair is made in `pki_dir`, its metadata by the gateway's
    own code); the caller stops the process. The fixture saml_idp and the federation
    benchmark start it so."""
    files = prepare_idp(directory)
    peer = SamlPeer(files.url, files.directory, files.metadata_file, files.directory / "pki")
    return peer, start_idp(files, asyncio.run(peer.source().get()).metadata())


@pytest.fixture(scope="module", name="saml_idp")
def saml_idp_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SamlPeer]:
    peer, process = start_saml_idp(tmp_path_factory.mktemp("saml-idp"))
    try:
        yield peer
    finally:
        process.stop()


_EMPTY_ENTITIES = ('<md:EntitiesDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"'
                   ' Name="none"/>')
