"""The deployment CA, its role certificates, and the TLS contexts that use them.

The TLS tests perform real handshakes over a loopback socket pair: the server side runs
in a thread, the client in the test, and each side reports what it observed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import socket
import ssl
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peers.missing import missing_peer
from portcullis.errors import PKIError
from portcullis.net.tls import (
    MOZILLA_INTERMEDIATE_CIPHERS,
    client_context,
    describe_tls_failure,
    server_context,
)
from portcullis.pki import (
    IssuedCert,
    certificate_fingerprint,
    create_ca,
    issue_certificate,
    load_pair,
    peer_common_name,
    write_pair,
)

ROLE_NAMES = ("localhost", "gw.example.test")
ROLE_IPS = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Deployment:
    ca_crt: Path
    gateway_crt: Path
    gateway_key: Path
    sta_crt: Path
    sta_key: Path


@pytest.fixture(scope="module")
def ca() -> IssuedCert:
    return create_ca()


@pytest.fixture(scope="module")
def deployment(ca: IssuedCert, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    pki = tmp_path_factory.mktemp("pki")
    ca_crt, _ = write_pair(pki, "ca", ca)
    gateway = issue_certificate(
        ca, "portcullis-gateway", dns_names=ROLE_NAMES, ip_addresses=ROLE_IPS
    )
    sta = issue_certificate(ca, "portcullis-sta", dns_names=ROLE_NAMES, ip_addresses=ROLE_IPS)
    gateway_crt, gateway_key = write_pair(pki, "gateway", gateway)
    sta_crt, sta_key = write_pair(pki, "sta", sta)
    return Deployment(ca_crt, gateway_crt, gateway_key, sta_crt, sta_key)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A client certificate with the right name from a different CA."""
    other_ca = create_ca("Someone Else's CA")
    leaf = issue_certificate(other_ca, "portcullis-sta", dns_names=["localhost"])
    return write_pair(tmp_path_factory.mktemp("stranger"), "sta", leaf)


@dataclass
class Outcome:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    server_saw_peer: bytes | None = None
    client_received: bytes = b""


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "localhost"
) -> Outcome:
    """Run one TLS connection: the server answers b"ok" once its handshake succeeds."""
    outcome = Outcome()
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(5)
    client_sock.settimeout(5)

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                outcome.server_saw_peer = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            outcome.server_error = exc
        finally:
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            # With TLS 1.3 the server judges the client certificate after the client
            # finished its handshake; a refusal shows up on the first read.
            outcome.client_received = tls.recv(2)
    except (ssl.SSLError, OSError) as exc:
        outcome.client_error = exc
    finally:
        client_sock.close()
        thread.join(10)
    return outcome


def mutual_server(deployment: Deployment) -> ssl.SSLContext:
    return server_context(
        deployment.gateway_crt,
        deployment.gateway_key,
        client_ca_file=deployment.ca_crt,
        require_client_cert=True,
    )


# --- the CA and its certificates ------------------------------------------------------


def test_ca_is_a_p256_ca_limited_to_signing_leaves(ca: IssuedCert) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    cert.verify_directly_issued_by(cert)


def test_role_certificate_is_signed_by_the_ca_with_names_and_usages(ca: IssuedCert) -> None:
    leaf = issue_certificate(
        ca,
        "portcullis-portal",
        dns_names=["portal.example.test", "localhost"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    cert = x509.load_pem_x509_certificate(leaf.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["portal.example.test", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "portcullis-portal"
    )


def test_role_certificate_is_backdated_five_minutes_for_clock_skew(ca: IssuedCert) -> None:
    cert = x509.load_pem_x509_certificate(issue_certificate(ca, "x").cert_pem)
    lead = dt.datetime.now(dt.UTC) - cert.not_valid_before_utc
    assert dt.timedelta(minutes=4) < lead <= dt.timedelta(minutes=5, seconds=5)
    # The backdating counts towards the lifetime (at most 366 days for a leaf).
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=365)


def test_extended_key_usage_follows_the_request(ca: IssuedCert) -> None:
    server_only = issue_certificate(ca, "s", client=False)
    client_only = issue_certificate(ca, "c", server=False)

    def usages(issued: IssuedCert) -> list[x509.ObjectIdentifier]:
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert usages(server_only) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert usages(client_only) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(PKIError, match="server or client"):
        issue_certificate(ca, "neither", server=False, client=False)


def test_serial_numbers_are_random_and_positive(ca: IssuedCert) -> None:
    serials = {
        x509.load_pem_x509_certificate(issue_certificate(ca, "x").cert_pem).serial_number
        for _ in range(5)
    }
    assert len(serials) == 5 and all(0 < s < 2**159 for s in serials)


def test_a_bad_ip_address_is_refused_with_advice(ca: IssuedCert) -> None:
    with pytest.raises(PKIError, match="dns_names"):
        issue_certificate(ca, "x", ip_addresses=["gw.example.test"])


def test_a_leaf_cannot_act_as_a_ca(ca: IssuedCert) -> None:
    leaf = issue_certificate(ca, "x")
    with pytest.raises(PKIError, match="not a CA"):
        issue_certificate(leaf, "y")


def test_keys_are_unencrypted_pkcs8(ca: IssuedCert) -> None:
    assert ca.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert serialization.load_pem_private_key(ca.key_pem, password=None)
    assert b"PRIVATE KEY" not in repr(ca).encode()


# --- files ----------------------------------------------------------------------------


def test_write_pair_makes_the_key_0600_and_the_certificate_0644(
    ca: IssuedCert, tmp_path: Path
) -> None:
    cert_path, key_path = write_pair(tmp_path / "pki", "gateway", issue_certificate(ca, "g"))
    assert (cert_path.name, key_path.name) == ("gateway.crt", "gateway.key")
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert cert_path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in cert_path.parent.iterdir()) == ["gateway.crt", "gateway.key"]


def test_write_pair_refuses_to_overwrite_and_keeps_the_old_files(
    ca: IssuedCert, tmp_path: Path
) -> None:
    first = issue_certificate(ca, "first")
    write_pair(tmp_path, "gateway", first)
    with pytest.raises(PKIError, match=r"gateway\.crt already exists"):
        write_pair(tmp_path, "gateway", issue_certificate(ca, "second"))
    assert (tmp_path / "gateway.crt").read_bytes() == first.cert_pem
    assert (tmp_path / "gateway.key").read_bytes() == first.key_pem


def test_write_pair_refuses_an_existing_key_without_writing_the_certificate(
    ca: IssuedCert, tmp_path: Path
) -> None:
    (tmp_path / "gateway.key").write_bytes(b"old")
    with pytest.raises(PKIError, match=r"gateway\.key already exists"):
        write_pair(tmp_path, "gateway", issue_certificate(ca, "g"))
    assert not (tmp_path / "gateway.crt").exists()


def test_write_pair_refuses_a_name_with_a_path(ca: IssuedCert, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="plain file name"):
        write_pair(tmp_path, "../escape", ca)


def test_load_pair_returns_what_write_pair_wrote(ca: IssuedCert, tmp_path: Path) -> None:
    issued = issue_certificate(ca, "g")
    assert load_pair(*write_pair(tmp_path, "g", issued)) == issued


def test_load_pair_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match=re.escape(str(tmp_path / "nope.crt"))):
        load_pair(tmp_path / "nope.crt", tmp_path / "nope.key")


def test_load_pair_names_a_file_that_is_not_pem(ca: IssuedCert, tmp_path: Path) -> None:
    cert_path, key_path = write_pair(tmp_path, "g", ca)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    with pytest.raises(PKIError, match=re.escape(str(garbage))):
        load_pair(cert_path, garbage)
    with pytest.raises(PKIError, match=re.escape(str(garbage))):
        load_pair(garbage, key_path)


def test_load_pair_refuses_a_key_of_another_certificate(ca: IssuedCert, tmp_path: Path) -> None:
    cert_a, _ = write_pair(tmp_path, "a", issue_certificate(ca, "a"))
    _, key_b = write_pair(tmp_path, "b", issue_certificate(ca, "b"))
    with pytest.raises(PKIError, match="does not belong"):
        load_pair(cert_a, key_b)


def test_fingerprint_is_sha256_of_the_der_certificate(ca: IssuedCert) -> None:
    der = x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(serialization.Encoding.DER)
    assert certificate_fingerprint(ca.cert_pem) == "sha256:" + hashlib.sha256(der).hexdigest()
    with pytest.raises(PKIError):
        certificate_fingerprint(b"nonsense")


def test_peer_common_name_reads_a_der_certificate(ca: IssuedCert) -> None:
    der = x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(serialization.Encoding.DER)
    assert peer_common_name(der) == "Portcullis CA"
    with pytest.raises(PKIError):
        peer_common_name(b"\x30\x00")


# --- TLS contexts ---------------------------------------------------------------------


def test_mutual_tls_succeeds_and_the_server_learns_the_client_role(deployment: Deployment) -> None:
    client = client_context(
        deployment.ca_crt, cert_file=deployment.sta_crt, key_file=deployment.sta_key
    )
    outcome = handshake(mutual_server(deployment), client)
    assert outcome.server_error is None and outcome.client_error is None
    assert outcome.client_received == b"ok"
    assert outcome.server_saw_peer is not None
    assert peer_common_name(outcome.server_saw_peer) == "portcullis-sta"


def test_client_certificate_from_another_ca_is_rejected(
    deployment: Deployment, stranger: tuple[Path, Path]
) -> None:
    client = client_context(deployment.ca_crt, cert_file=stranger[0], key_file=stranger[1])
    outcome = handshake(mutual_server(deployment), client)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "certificate verify failed" in str(outcome.server_error)
    assert outcome.client_received == b""


def test_client_without_certificate_is_rejected_when_required(deployment: Deployment) -> None:
    outcome = handshake(mutual_server(deployment), client_context(deployment.ca_crt))
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "certificate" in str(outcome.server_error)
    assert outcome.client_received == b""


def test_client_without_certificate_is_accepted_when_optional(deployment: Deployment) -> None:
    server = server_context(
        deployment.gateway_crt, deployment.gateway_key, client_ca_file=deployment.ca_crt
    )
    assert server.verify_mode == ssl.CERT_OPTIONAL
    outcome = handshake(server, client_context(deployment.ca_crt))
    assert outcome.client_received == b"ok"
    assert outcome.server_saw_peer is None


def test_hostname_mismatch_fails_verification(deployment: Deployment) -> None:
    server = server_context(deployment.gateway_crt, deployment.gateway_key)
    outcome = handshake(
        server, client_context(deployment.ca_crt), server_hostname="other.example.test"
    )
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert outcome.client_error.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH


def test_hostname_check_can_be_skipped_but_the_chain_is_still_verified(
    deployment: Deployment, stranger: tuple[Path, Path]
) -> None:
    lenient = client_context(deployment.ca_crt, check_hostname=False)
    server = server_context(deployment.gateway_crt, deployment.gateway_key)
    assert handshake(server, lenient, "other.example.test").client_received == b"ok"
    foreign_server = server_context(*stranger)
    outcome = handshake(foreign_server, lenient, "localhost")
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)


def test_tls_1_1_client_cannot_connect(deployment: Deployment) -> None:
    server = server_context(deployment.gateway_crt, deployment.gateway_key)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(deployment.ca_crt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        # Lower OpenSSL's security level so the client really offers TLS 1.1 and the
        # refusal comes from our server, not from the client's own policy.
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError) as exc:
        # CI's machine can build one (checked): there, not being able to is a failure.
        message = f"local OpenSSL cannot build a TLS 1.1 client: {exc}"
        missing_peer(message)
    outcome = handshake(server, old)
    assert outcome.client_received == b""
    assert outcome.client_error is not None
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert (
        "version" in str(outcome.server_error).lower()
        or "protocol" in str(outcome.server_error).lower()
    )


def test_contexts_use_the_mozilla_intermediate_profile(deployment: Deployment) -> None:
    for context in (
        server_context(deployment.gateway_crt, deployment.gateway_key),
        client_context(deployment.ca_crt),
    ):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 == set(MOZILLA_INTERMEDIATE_CIPHERS.split(":"))
    server = server_context(deployment.gateway_crt, deployment.gateway_key)
    assert not server.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_server_context_names_a_missing_certificate_file(
    deployment: Deployment, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.crt"
    with pytest.raises(PKIError, match=re.escape(str(missing))):
        server_context(missing, deployment.gateway_key)


def test_server_context_refuses_a_key_that_does_not_match(deployment: Deployment) -> None:
    with pytest.raises(PKIError, match=re.escape(str(deployment.gateway_crt))):
        server_context(deployment.gateway_crt, deployment.sta_key)


def test_client_context_names_an_unusable_ca_file(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.crt"
    bogus.write_text("not a certificate")
    with pytest.raises(PKIError, match=re.escape(str(bogus))):
        client_context(bogus)


def test_requiring_client_certificates_needs_a_ca(deployment: Deployment) -> None:
    with pytest.raises(PKIError, match="client CA"):
        server_context(deployment.gateway_crt, deployment.gateway_key, require_client_cert=True)


# --- explaining failures --------------------------------------------------------------


def test_untrusted_gateway_certificate_is_explained_with_the_ca_option(
    deployment: Deployment,
) -> None:
    server = server_context(deployment.gateway_crt, deployment.gateway_key)
    untrusting = client_context(Path(deployment.ca_crt).with_name("sta.crt"))  # trusts a leaf only
    error = handshake(server, untrusting).client_error
    assert isinstance(error, ssl.SSLCertVerificationError)
    # httpx wraps the ssl error the way it does for a real request.
    try:
        try:
            raise error
        except ssl.SSLError as exc:
            raise httpx.ConnectError(str(exc)) from exc
    except httpx.ConnectError as wrapped:
        message = describe_tls_failure(wrapped, "https://localhost:8443")
    assert message is not None
    assert "https://localhost:8443" in message
    assert "--ca FILE" in message
    assert "pki/ca.crt" in message


def test_hostname_mismatch_is_explained_without_suggesting_another_ca(
    deployment: Deployment,
) -> None:
    server = server_context(deployment.gateway_crt, deployment.gateway_key)
    error = handshake(server, client_context(deployment.ca_crt), "other.example.test").client_error
    assert error is not None
    message = describe_tls_failure(error, "wss://other.example.test:8443", peer="portal")
    assert message is not None
    assert "portal's certificate" in message and "--ca" not in message


def test_other_failures_are_not_described() -> None:
    assert describe_tls_failure(ConnectionRefusedError(111, "refused"), "https://h") is None
    assert describe_tls_failure(ssl.SSLError(1, "handshake failure"), "https://h") is None
