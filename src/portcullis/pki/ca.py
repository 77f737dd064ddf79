"""The deployment's own certificate authority: create it, issue role certificates, store them.

Every Portcullis deployment has a private CA (ECDSA P-256, SHA-256 signatures) that signs
one certificate per role ("portcullis-gateway", "portcullis-portal", "portcullis-sta").
The roles authenticate each other with mutual TLS and identify a peer by the common name
of its certificate (`peer_common_name`).

This module must never write a private key with permissions wider than 0600, never
overwrite an existing certificate or key, and never put a private key in an error
message or a log line. It does no network I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portcullis.errors import PKIError

# Clocks of the peers drift; a certificate that is valid "from now" is refused by a
# peer whose clock is a few seconds behind.
_BACKDATE = dt.timedelta(minutes=5)

# Leaf certificates are valid at most this long (CA/Browser Forum practice, Mozilla's
# intermediate profile); role certificates are renewed before they expire.
MAX_LEAF_DAYS = 366
LEAF_DAYS = 365

_CERT_MODE = 0o644
_KEY_MODE = 0o600


@dataclass(frozen=True)
class IssuedCert:
    """A PEM certificate and its PEM private key (PKCS8, unencrypted)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def create_ca(common_name: str = "Portcullis CA", *, valid_days: int = 3650,
              now: dt.datetime | None = None) -> IssuedCert:
    """Create a self-signed CA that may sign leaf certificates only (pathlen 0), valid
    from `now` (default: the current time)."""
    if not common_name:
        raise PKIError("the CA needs a non-empty common name")
    if valid_days <= 0:
        raise PKIError(f"valid_days must be positive, not {valid_days}")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = now or dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCert(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def issue_certificate(
    ca: IssuedCert,
    common_name: str,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    server: bool = True,
    client: bool = True,
    valid_days: int = LEAF_DAYS,
    now: dt.datetime | None = None,
) -> IssuedCert:
    """Issue a leaf certificate signed by `ca` with a fresh P-256 key, valid from `now`
    (default: the current time) for `valid_days`, at most MAX_LEAF_DAYS and never past
    the CA's own expiry.

    `server` / `client` select the extended key usages (serverAuth / clientAuth); the
    DNS names and IP addresses become the subjectAltName a TLS client checks.
    """
    if not common_name:
        raise PKIError("a certificate needs a non-empty common name")
    if not (server or client):
        raise PKIError("a certificate must be usable for server or client authentication")
    if valid_days <= 0:
        raise PKIError(f"valid_days must be positive, not {valid_days}")
    if valid_days > MAX_LEAF_DAYS:
        raise PKIError(f"a leaf certificate may be valid at most {MAX_LEAF_DAYS} days, "
                       f"not {valid_days}; renew it instead ('portcullis cert renew')")
    ca_cert, ca_key = _load_ca(ca)

    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    for address in ip_addresses:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise PKIError(
                f"{address!r} is not an IP address; put host names in dns_names"
            ) from None
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )

    key = ec.generate_private_key(ec.SECP256R1())
    not_before = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    # The whole period counts, backdating included: 366 days means 366 days.
    not_after = min(not_before + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    builder = _leaf(ca_cert, common_name, key.public_key(), not_before, not_after, usages)
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return IssuedCert(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def certify_request(ca: IssuedCert, csr_pem: bytes, common_name: str, *,
                    valid_for: dt.timedelta, now: dt.datetime | None = None) -> bytes:
    """A client certificate for the key of a PKCS#10 request (whose signature proves its
    sender holds that key), named `common_name` whatever the request asked for; PEM."""
    try:
        request = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise PKIError("the certificate request is not a PEM PKCS#10 request") from None
    if not request.is_signature_valid:
        raise PKIError("the certificate request's signature does not match its key")
    public_key = request.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise PKIError("the certificate request's key must be an EC or Ed25519 key")
    ca_cert, ca_key = _load_ca(ca)
    not_before = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    not_after = min(not_before + _BACKDATE + valid_for, ca_cert.not_valid_after_utc)
    cert = _leaf(ca_cert, common_name, public_key, not_before, not_after,
                 [ExtendedKeyUsageOID.CLIENT_AUTH]).sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


def _leaf(ca_cert: x509.Certificate, common_name: str,
          public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
          not_before: dt.datetime, not_after: dt.datetime,
          usages: list[x509.ObjectIdentifier]) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )


def create_signing_pair(common_name: str, *, valid_days: int = 3650,
                        now: dt.datetime | None = None) -> IssuedCert:
    """A self-signed RSA-3072 certificate for XML signatures and encryption (a SAML
    service provider's): peers trust it as published in metadata, not by a chain, and
    XML encryption's key transport needs RSA."""
    if not common_name:
        raise PKIError("a certificate needs a non-empty common name")
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCert(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def write_pair(directory: Path, name: str, cert: IssuedCert) -> tuple[Path, Path]:
    """Write `name.crt` (0644) and `name.key` (0600) into `directory`; return their paths.

    Each file appears complete or not at all, and an existing file is never replaced:
    rotating a certificate is a deliberate act of removing the old one first.
    """
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise PKIError(f"{name!r} is not a plain file name for a certificate")
    directory = Path(directory)
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise PKIError(f"{path} already exists; remove it first to replace the certificate")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create directory {directory}: {exc.strerror or exc}") from exc
    _write_new_file(key_path, cert.key_pem, _KEY_MODE)
    try:
        _write_new_file(cert_path, cert.cert_pem, _CERT_MODE)
    except PKIError:
        # Do not leave a key without its certificate behind.
        with contextlib.suppress(OSError):
            key_path.unlink()
        raise
    return cert_path, key_path


def load_pair(cert_path: Path, key_path: Path) -> IssuedCert:
    """Read a certificate and its private key, checking that they belong together."""
    cert_pem = _read(Path(cert_path), "certificate")
    key_pem = _read(Path(key_path), "private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PKIError(f"{cert_path} does not hold a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise PKIError(f"{key_path} holds an encrypted private key; store it unencrypted "
                       "(mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{key_path} does not hold a PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if cert.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise PKIError(f"the private key {key_path} does not belong to the certificate {cert_path}")
    # Normalised so that IssuedCert.key_pem is always PKCS8, whatever the file held.
    return IssuedCert(cert_pem=cert_pem, key_pem=_key_pem(key))


def certificate_fingerprint(cert_pem: bytes) -> str:
    """The SHA-256 fingerprint of a PEM certificate's DER encoding, as "sha256:<hex>"."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PKIError("cannot fingerprint: the data is not a PEM certificate") from None
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def peer_common_name(der_cert: bytes) -> str | None:
    """The subject common name of a DER certificate, or None when it has none.

    Meant for `SSLSocket.getpeercert(binary_form=True)`; raises PKIError when the bytes
    are not a certificate, so a caller cannot mistake garbage for "no name".
    """
    try:
        cert = x509.load_der_x509_certificate(der_cert)
    except ValueError:
        raise PKIError("the peer certificate is not a DER certificate") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def load_ca_certificates(ca_file: Path) -> tuple[x509.Certificate, ...]:
    """The CA certificates in a PEM file (a bundle may hold several)."""
    try:
        return tuple(x509.load_pem_x509_certificates(_read(ca_file, "CA certificate")))
    except ValueError:
        raise PKIError(f"CA certificate file {ca_file} holds no usable PEM certificate") from None


def issued_by(der_cert: bytes, cas: Sequence[x509.Certificate]) -> bool:
    """Whether one of `cas` signed this DER certificate. For a listener that trusts
    several CAs at the TLS handshake and must know which one vouched for a peer."""
    try:
        cert = x509.load_der_x509_certificate(der_cert)
    except ValueError:
        return False
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def transport_common_name(transport: asyncio.BaseTransport) -> str | None:
    """The common name of the certificate the peer of a TLS `transport` presented; None
    without one (or with bytes that are no certificate)."""
    ssl_object = transport.get_extra_info("ssl_object")
    certificate = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    try:
        return peer_common_name(certificate) if certificate else None
    except PKIError:
        return None


def _random_serial() -> int:
    # RFC 5280: positive, at most 20 octets; 159 random bits keep it positive and short.
    return secrets.randbits(159) | 1


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_ca(ca: IssuedCert) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError):
        raise PKIError("the CA certificate or key cannot be read") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PKIError("the CA key is not an ECDSA key; recreate the CA with create_ca()")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PKIError("the CA certificate is not a CA (basicConstraints CA:false)")
    return ca_cert, ca_key


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()  # type: ignore[arg-type]
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a temporary file, then link it to `path`, which must not exist."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # os.open applied the umask; the mode is exact
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() fails if the target exists, unlike rename(): no race can overwrite.
        os.link(tmp, path)
    except FileExistsError:
        raise PKIError(
            f"{path} already exists; remove it first to replace the certificate"
        ) from None
    except OSError as exc:
        raise PKIError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise PKIError(f"cannot read {what} file {path}: {exc.strerror or exc}") from exc
