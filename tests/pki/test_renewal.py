"""Leaf lifetimes, expiry checks and renewal, on an injected clock (no sleeping)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portcullis.errors import PKIError
from portcullis.net.tls import server_context
from portcullis.pki import IssuedCert, create_ca, issue_certificate, load_pair, write_pair
from portcullis.pki.ca import MAX_LEAF_DAYS
from portcullis.pki.maintenance import LoadedCertificates
from portcullis.pki.renewal import check_certificate, check_files, renew_due, renew_role

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
# Issued five minutes after T0, a certificate is valid from T0 (backdated for clock skew)
# to T0 + 365 days, 2027-01-01.
ISSUED = T0 + dt.timedelta(minutes=5)


def cert_of(issued: IssuedCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


@pytest.fixture(scope="module")
def ca() -> IssuedCert:
    return create_ca(now=T0 - DAY)


@pytest.fixture
def pki(tmp_path: Path, ca: IssuedCert) -> Path:
    """A deployment's pki/ directory: the CA and the three role certificates of T0."""
    write_pair(tmp_path, "ca", ca)
    for role in ("gateway", "portal", "sta"):
        write_pair(tmp_path, role, issue_certificate(
            ca, f"portcullis-{role}", dns_names=["localhost", "gw.example.test"],
            ip_addresses=["127.0.0.1", "::1"], server=True, client=role != "sta", now=ISSUED))
    return tmp_path


def long_leaf(ca: IssuedCert, days: int,
              key: ec.EllipticCurvePrivateKey | None = None) -> x509.Certificate:
    """A leaf made before the limit existed (issue_certificate refuses to make one)."""
    ca_cert = cert_of(ca)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = key or ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(7)
            .not_valid_before(T0).not_valid_after(T0 + days * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))


def test_a_leaf_certificate_valid_longer_than_366_days_is_refused(ca: IssuedCert) -> None:
    with pytest.raises(PKIError, match="at most 366 days"):
        issue_certificate(ca, "too-long", valid_days=367)
    leaf = cert_of(issue_certificate(ca, "just-right", valid_days=MAX_LEAF_DAYS, now=T0))
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= 366 * DAY


def test_a_leaf_is_valid_365_days_by_default_and_never_outlives_its_ca() -> None:
    leaf = cert_of(issue_certificate(create_ca(now=T0), "x", now=T0))
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == 365 * DAY
    short_ca = create_ca(valid_days=100, now=T0)
    leaf = cert_of(issue_certificate(short_ca, "x", now=T0))
    assert leaf.not_valid_after_utc == cert_of(short_ca).not_valid_after_utc


def test_a_role_certificate_is_fine_until_30_days_before_expiry(ca: IssuedCert) -> None:
    leaf = cert_of(issue_certificate(ca, "gw", now=ISSUED))
    check = check_certificate("gateway", Path("gw.crt"), leaf, now=T0 + 334 * DAY)
    assert (check.problem, check.renewal, check.days_left) == (None, None, 31)


def test_a_role_certificate_within_30_days_is_flagged_and_due(ca: IssuedCert) -> None:
    leaf = cert_of(issue_certificate(ca, "gw", now=ISSUED))
    check = check_certificate("gateway", Path("gw.crt"), leaf, now=T0 + 345 * DAY)
    assert check.problem == "expires in 20 days, on 2027-01-01"
    assert check.renewal == "expires in 20 days (renewal starts 30 days before)"


def test_an_expired_certificate_says_so(ca: IssuedCert) -> None:
    leaf = cert_of(issue_certificate(ca, "gw", now=ISSUED))
    check = check_certificate("gateway", Path("gw.crt"), leaf, now=T0 + 400 * DAY)
    assert check.problem == check.renewal == "expired on 2027-01-01"


def test_the_warning_and_renewal_windows_are_settings(ca: IssuedCert) -> None:
    leaf = cert_of(issue_certificate(ca, "gw", now=ISSUED))
    check = check_certificate("gateway", Path("gw.crt"), leaf, now=T0 + 300 * DAY,
                              warn_before_days=90, renew_before_days=60)
    assert check.problem == "expires in 65 days, on 2027-01-01"
    assert check.renewal is None


def test_a_leaf_valid_longer_than_366_days_gets_a_warning_and_is_due(ca: IssuedCert) -> None:
    check = check_certificate("gateway", Path("gw.crt"), long_leaf(ca, 825), now=T0 + DAY)
    assert check.problem == "valid 825 days, more than the 366 a leaf certificate may be"
    assert check.renewal == "valid 825 days, more than 366"


def test_a_ca_near_expiry_gets_a_warning_but_is_never_renewed() -> None:
    ca = cert_of(create_ca(valid_days=3650, now=T0))
    check = check_certificate("ca", Path("ca.crt"), ca, now=T0 + 3640 * DAY)
    assert check.is_ca and check.problem is not None and "expires in 10 days" in check.problem
    assert check.renewal is None
    assert check_certificate("ca", Path("ca.crt"), ca, now=T0 + DAY).problem is None


def test_renewal_keeps_the_names_and_usages_with_a_new_key_and_a_new_year(
        pki: Path, ca: IssuedCert) -> None:
    before = x509.load_pem_x509_certificate((pki / "sta.crt").read_bytes())
    old_key = (pki / "sta.key").read_bytes()
    later = T0 + 340 * DAY
    check = renew_role(pki, "sta", ca, now=later)
    after = x509.load_pem_x509_certificate((pki / "sta.crt").read_bytes())
    assert after.subject == before.subject
    san = x509.SubjectAlternativeName
    assert (after.extensions.get_extension_for_class(san).value
            == before.extensions.get_extension_for_class(san).value)
    assert list(after.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert after.not_valid_before_utc <= later < after.not_valid_after_utc == check.not_after
    assert after.not_valid_after_utc - after.not_valid_before_utc == 365 * DAY
    assert (pki / "sta.key").read_bytes() != old_key
    load_pair(pki / "sta.crt", pki / "sta.key")   # the new key belongs to the new cert
    assert stat.S_IMODE((pki / "sta.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "sta.crt").stat().st_mode) == 0o644


def test_only_due_role_certificates_are_renewed(pki: Path, ca: IssuedCert) -> None:
    gateway_before = (pki / "gateway.crt").read_bytes()
    outcome = renew_due(pki, ["gateway", "sta"], pki / "ca.crt", pki / "ca.key",
                        now=T0 + 300 * DAY, renew_before_days=30)
    assert outcome.renewed == () and outcome.not_renewed == ()
    outcome = renew_due(pki, ["gateway", "sta"], pki / "ca.crt", pki / "ca.key",
                        now=T0 + 340 * DAY, renew_before_days=30)
    assert [check.name for check in outcome.renewed] == ["gateway", "sta"]
    assert (pki / "gateway.crt").read_bytes() != gateway_before
    portal = x509.load_pem_x509_certificate((pki / "portal.crt").read_bytes())
    assert portal.not_valid_after_utc == T0 + 365 * DAY   # not among the roles: left alone


def test_without_the_ca_key_a_due_certificate_is_reported_not_renewed(
        pki: Path) -> None:
    (pki / "ca.key").rename(pki.parent / "offline-ca.key")
    before = (pki / "gateway.crt").read_bytes()
    outcome = renew_due(pki, ["gateway"], pki / "ca.crt", pki / "ca.key",
                        now=T0 + 340 * DAY, renew_before_days=30)
    assert outcome.renewed == ()
    [(role, why)] = outcome.not_renewed
    assert role == "gateway" and "ca.key is not here" in why and "expires in 25 days" in why
    assert (pki / "gateway.crt").read_bytes() == before


def test_a_role_certificate_valid_longer_than_366_days_is_renewed_to_365(
        pki: Path, ca: IssuedCert) -> None:
    old = issue_certificate(ca, "portcullis-portal", now=ISSUED)   # for its key
    key = serialization.load_pem_private_key(old.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    for name in ("portal.crt", "portal.key"):
        (pki / name).unlink()
    write_pair(pki, "portal", IssuedCert(long_leaf(ca, 825, key).public_bytes(
        serialization.Encoding.PEM), old.key_pem))
    outcome = renew_due(pki, ["portal"], pki / "ca.crt", pki / "ca.key",
                        now=T0 + 10 * DAY, renew_before_days=30)
    [renewed] = outcome.renewed
    assert renewed.lifetime_days == 365 and renewed.problem is None


def test_a_certificate_from_another_ca_is_never_renewed(pki: Path) -> None:
    other = create_ca("Someone Else", now=T0)
    (pki / "gateway.crt").unlink()
    (pki / "gateway.key").unlink()
    write_pair(pki, "gateway", issue_certificate(other, "portcullis-gateway", now=T0))
    outcome = renew_due(pki, ["gateway"], pki / "ca.crt", pki / "ca.key",
                        now=T0 + 340 * DAY, renew_before_days=30)
    [(_, why)] = outcome.not_renewed
    assert "was not issued by the deployment CA" in why


def served_serial(context: ssl.SSLContext) -> int:
    """Handshake with `context` over a socket pair; the serial the server presented."""
    server_sock, client_sock = socket.socketpair()

    def serve() -> None:
        try:
            with context.wrap_socket(server_sock, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with client.wrap_socket(client_sock) as conn:
        der = conn.getpeercert(binary_form=True)
    thread.join(5)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


class _Settings:
    """The one method LoadedCertificates needs of the settings."""

    def __init__(self, pki: Path) -> None:
        self.pki = pki

    def role_cert(self, role: str) -> tuple[Path, Path]:
        return self.pki / f"{role}.crt", self.pki / f"{role}.key"


def test_a_renewed_certificate_is_loaded_into_the_running_context(
        pki: Path, ca: IssuedCert) -> None:
    loaded = LoadedCertificates(_Settings(pki))  # type: ignore[arg-type]
    context = loaded.track("gateway", server_context(pki / "gateway.crt", pki / "gateway.key"))
    first = served_serial(context)
    assert loaded.reload_changed() == []           # nothing changed on disk
    renew_role(pki, "gateway", ca, now=T0 + 340 * DAY)
    assert loaded.reload_changed() == ["gateway"]
    renewed = x509.load_pem_x509_certificate((pki / "gateway.crt").read_bytes()).serial_number
    assert served_serial(context) == renewed != first


def test_each_certificate_of_a_ca_bundle_is_checked(tmp_path: Path) -> None:
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(create_ca("A", now=T0).cert_pem
                       + create_ca("B", valid_days=40, now=T0).cert_pem)
    checks = check_files([("auth.client_ca", bundle)], now=T0 + 20 * DAY)
    assert [(check.name, check.subject, check.problem) for check in checks] == [
        ("auth.client_ca[1]", "A", None),
        ("auth.client_ca[2]", "B", "expires in 20 days, on 2026-02-10")]
