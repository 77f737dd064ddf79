"""What stands before pysaml2: the XML gate (sizes, one defusedxml parse, no DTD), the
IdP metadata (from a file, or an https URL through a Dialer), the SP key pair, and the
provider's configuration."""

from __future__ import annotations

import base64
import http.server
import ssl
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import defusedxml
import pytest
import saml2.samlp
from pydantic import ValidationError

from peers.saml import SamlPeer, saml_idp_fixture  # noqa: F401  (the fixture)
from portcullis.config.federation import SamlProvider
from portcullis.config.model import Settings
from portcullis.errors import ConfigError
from portcullis.federation.saml import (
    MAX_METADATA_BYTES,
    Refused,
    SamlMessage,
    ServiceProviderSource,
    ensure_key_pair,
    read_saml_message,
)
from portcullis.net.dialer import DirectDialer
from portcullis.pki import create_ca, issue_certificate, write_pair

RESPONSE = "{urn:oasis:names:tc:SAML:2.0:protocol}Response"
MINIMAL = (b'<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" ID="r1" '
           b'Version="2.0" IssueInstant="2026-12-06T00:00:00Z"/>')


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_well_formed_response_passes_the_gate() -> None:
    checked = read_saml_message(b64(MINIMAL), 4096, (RESPONSE,))
    assert isinstance(checked, SamlMessage) and checked.root.tag == RESPONSE


@pytest.mark.parametrize(("message", "reason"), [
    ("not base64!", "message is not base64"),
    (b64(b"<a>unclosed"), "message is not well-formed XML"),
    (b64(b'<x xmlns="urn:other"/>'), "message is a {urn:other}x, not one of"),
    (b64(b'<!DOCTYPE r SYSTEM "http://127.0.0.1:9/evil.dtd">' + MINIMAL),
     "message has a DTD"),
])
def test_the_gate_refuses_with_a_reason(message: str, reason: str) -> None:
    refused = read_saml_message(message, 4096, (RESPONSE,))
    assert isinstance(refused, Refused) and refused.reason.startswith(reason)


def test_a_deflated_message_is_inflated_no_further_than_the_limit() -> None:
    # 100 MB of zeros deflates to ~100 KB: the inflater stops one byte past the limit.
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = bomb.compress(b"\0" * 100_000_000) + bomb.flush()
    refused = read_saml_message(b64(deflated), 1_000_000, (RESPONSE,), deflated=True)
    assert isinstance(refused, Refused)
    assert refused.reason == "message is larger than 1000000 bytes: refused before parsing"


def test_pysaml2s_own_parser_refuses_entities() -> None:
    # The second line of defence: pysaml2 parses with defusedxml too.
    entity = MINIMAL.replace(b"/>", b">&e;</samlp:Response>")
    with pytest.raises(defusedxml.EntitiesForbidden):
        saml2.samlp.response_from_string(b'<!DOCTYPE r [<!ENTITY e "x">]>' + entity)


def test_the_sp_key_pair_is_made_once_and_kept_private(tmp_path: Path) -> None:
    cert, key = ensure_key_pair(tmp_path / "saml-corp.crt", tmp_path / "saml-corp.key", "sp")
    first = cert.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600
    ensure_key_pair(cert, key, "sp")
    assert cert.read_bytes() == first


def test_one_metadata_source_is_required() -> None:
    with pytest.raises(ValidationError, match="exactly one of idp_metadata_file"):
        SamlProvider.model_validate({"type": "saml", "name": "corp"})
    with pytest.raises(ValidationError, match="https"):
        SamlProvider.model_validate({"type": "saml", "name": "corp",
                                     "idp_metadata_url": "http://idp.example/metadata"})


def test_a_claim_name_overrides_the_preset() -> None:
    provider = SamlProvider.model_validate({
        "type": "saml", "name": "corp", "idp_metadata_file": "idp.xml", "claims": "azure",
        "attributes": {"username": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name"}})
    names = provider.attribute_map()
    assert names.username == "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name"
    assert names.groups == ["http://schemas.microsoft.com/ws/2008/06/identity/claims/groups"]


def test_a_flow_may_start_with_a_saml_provider() -> None:
    settings = Settings.model_validate({"auth": {
        "providers": [{"type": "saml", "name": "corp", "idp_metadata_file": "idp.xml"}],
        "flows": [{"name": "default", "steps": [{"provider": "corp"}, {"provider": "totp"}]}]}})
    assert settings.auth.realm_of(settings.auth.flow_named("default")) == "corp"


# -- metadata from an https URL, through a Dialer -------------------------------------------


@pytest.fixture
def metadata_server(tmp_path: Path, saml_idp: SamlPeer) -> Iterator[tuple[str, Path]]:
    """An https server on 127.0.0.1 serving the IdP's metadata at /idp.xml and 2 MB of
    padding at /huge.xml; its CA certificate is the second value."""
    ca = create_ca("metadata CA")
    write_pair(tmp_path, "ca", ca)
    write_pair(tmp_path, "server", issue_certificate(ca, "127.0.0.1", ip_addresses=["127.0.0.1"]))
    documents = {"/idp.xml": saml_idp.metadata_file.read_bytes(),
                 "/huge.xml": b"<x>" + b" " * 2 * MAX_METADATA_BYTES + b"</x>"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = documents.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", tmp_path / "ca.crt"
    finally:
        server.shutdown()
        server.server_close()


def _source(url: str, ca: Path, pki: Path) -> ServiceProviderSource:
    provider = SamlProvider.model_validate({"type": "saml", "name": "corp",
                                            "idp_metadata_url": url,
                                            "idp_metadata_ca_cert": str(ca)})
    return ServiceProviderSource(provider, public_url="https://gateway.test", pki_dir=pki,
                                 resolve=Path, dialer=DirectDialer())


async def test_metadata_is_fetched_through_the_dialer(metadata_server: tuple[str, Path],
                                                      saml_idp: SamlPeer,
                                                      tmp_path: Path) -> None:
    url, ca = metadata_server
    provider = await _source(f"{url}/idp.xml", ca, tmp_path / "pki").get()
    assert provider.idp_entity_id == f"{saml_idp.url}/idp"


async def test_oversize_metadata_is_refused_unparsed(metadata_server: tuple[str, Path],
                                                     tmp_path: Path) -> None:
    url, ca = metadata_server
    with pytest.raises(ConfigError, match="larger than"):
        await _source(f"{url}/huge.xml", ca, tmp_path / "pki").get()


async def test_metadata_from_a_server_the_ca_did_not_sign_is_refused(
        metadata_server: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = metadata_server
    write_pair(tmp_path, "other", create_ca("other CA"))
    with pytest.raises(ConfigError, match="cannot be fetched"):
        await _source(f"{url}/idp.xml", tmp_path / "other.crt", tmp_path / "pki").get()
