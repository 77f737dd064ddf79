"""The device's own key and self-signed certificate, and the console's ephemeral CSR.

The device certificate is what the hub registers and the console pins by fingerprint:
P-256, self-signed, CN and SAN DNS = the device name, CA:FALSE (critical), key usage
digitalSignature, extended key usages serverAuth and clientAuth (the agent presents it
as TLS server to consoles and as TLS client to the hub).

Never writes a private key readable by others (0600), never puts one in a message, and
does no network I/O. `cert_info` prints what `x11vnc -sslCertInfo FILE` prints, so the
seed's check reads the same.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portcullis.errors import PKIError
from portcullis.pki import IssuedCert, certificate_fingerprint, load_pair, write_pair
from portcullis.pki.ca import MAX_LEAF_DAYS
from portcullis.pki.renewal import renewal_lock
from portcullis.proto.shadow import valid_device_name

DEVICE_FILE_STEM = "device"          # device.crt and device.key in the state directory
# A renewal's new pair, written before the hub is told of it (device.new.crt/.key): if
# the hub switches and the swap then fails, the next start can still adopt it.
STAGED_FILE_STEM = "device.new"
DEVICE_DAYS = 365
RENEW_BEFORE_DAYS = 30
# Peers' clocks drift; a certificate valid "from now" fails at a peer a minute behind.
_BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class DeviceIdentity:
    """The device's certificate and key (PEM), their files and the fingerprint."""

    pair: IssuedCert
    cert_path: Path
    key_path: Path

    @property
    def fingerprint(self) -> str:
        return certificate_fingerprint(self.pair.cert_pem)

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pair.cert_pem)


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def device_certificate(key: ec.EllipticCurvePrivateKey, name: str, *,
                       days: int = DEVICE_DAYS, now: dt.datetime | None = None) -> bytes:
    """A self-signed PEM certificate for the device `name`, signed with `key`."""
    _check_name(name)
    if not 0 < days <= MAX_LEAF_DAYS:
        raise PKIError(f"a device certificate is valid 1 to {MAX_LEAF_DAYS} days, not {days}")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_before = (now or dt.datetime.now(dt.UTC)) - _BACKDATE
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # Names its own key as issuer: of several anchors with one name (a renewal, a
        # re-registration) a verifier picks this one by key, not the first by name.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def renewed_certificate(name: str, *, days: int = DEVICE_DAYS,
                        now: dt.datetime | None = None) -> IssuedCert:
    """A renewal: a NEW key and its self-signed certificate. The agent sends it to the
    hub over a TLS connection that presents the OLD certificate, which is what vouches
    for the new one; only after the hub took it does `replace_device_files` write it."""
    key = new_private_key()
    return IssuedCert(cert_pem=device_certificate(key, name, days=days, now=now),
                      key_pem=private_key_pem(key))


def create_device_files(directory: Path, name: str, *, days: int = DEVICE_DAYS,
                        now: dt.datetime | None = None) -> DeviceIdentity:
    """Create device.key (0600) and device.crt in `directory`; never replaces them."""
    issued = renewed_certificate(name, days=days, now=now)
    cert_path, key_path = write_pair(directory, DEVICE_FILE_STEM, issued)
    return DeviceIdentity(issued, cert_path, key_path)


def load_device_files(directory: Path) -> DeviceIdentity:
    cert_path = directory / f"{DEVICE_FILE_STEM}.crt"
    key_path = directory / f"{DEVICE_FILE_STEM}.key"
    return DeviceIdentity(load_pair(cert_path, key_path), cert_path, key_path)


def replace_device_files(directory: Path, issued: IssuedCert) -> DeviceIdentity:
    """Put a renewed key and certificate in place of the old ones (key first, each file
    renamed over the old one, under the directory's renewal lock)."""
    from portcullis.pki.renewal import replace_file

    cert_path = directory / f"{DEVICE_FILE_STEM}.crt"
    key_path = directory / f"{DEVICE_FILE_STEM}.key"
    with renewal_lock(directory):
        replace_file(key_path, issued.key_pem, 0o600)
        replace_file(cert_path, issued.cert_pem, 0o644)
    return DeviceIdentity(issued, cert_path, key_path)


def stage_device_files(directory: Path, issued: IssuedCert) -> DeviceIdentity:
    """Write a renewal's pair as device.new.key (0600) / device.new.crt, replacing an
    earlier staged pair (one the hub never took)."""
    discard_staged_device_files(directory)
    cert_path, key_path = write_pair(directory, STAGED_FILE_STEM, issued)
    return DeviceIdentity(issued, cert_path, key_path)


def load_staged_device_files(directory: Path) -> DeviceIdentity | None:
    """The staged renewal pair, or None when there is none (or it is incomplete: the key
    is written first, so a key alone is a renewal that stopped before the hub heard)."""
    cert_path = directory / f"{STAGED_FILE_STEM}.crt"
    key_path = directory / f"{STAGED_FILE_STEM}.key"
    if not (cert_path.exists() and key_path.exists()):
        return None
    return DeviceIdentity(load_pair(cert_path, key_path), cert_path, key_path)


def discard_staged_device_files(directory: Path) -> None:
    for suffix in (".crt", ".key"):
        (directory / f"{STAGED_FILE_STEM}{suffix}").unlink(missing_ok=True)


def renewal_due(cert: x509.Certificate, now: dt.datetime, before_days: int = RENEW_BEFORE_DAYS
                ) -> bool:
    """Whether `cert` expires within `before_days` of `now` (or already has)."""
    return cert.not_valid_after_utc - now <= dt.timedelta(days=before_days)


def console_csr(name: str = "portcullis-console") -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """An ephemeral P-256 key and a PEM CSR for it: the hub's console CA signs it for a
    few minutes, and the request the hub signs names that certificate's fingerprint."""
    key = new_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def cert_info(cert_pem: bytes, path: str | None = None) -> str:
    """What `x11vnc -sslCertInfo FILE` prints for a PEM certificate: its header naming
    the file (with `path`), then the `openssl x509 -text` dump x11vnc runs, then the PEM.

    Rendered here rather than by running openssl so that `cert-info` works on a device
    without it; the rendering covers the extensions a device certificate has (others
    are shown by OID), and the tests compare it with x11vnc's own output."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise PKIError("the data is not a PEM certificate") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    lines = ["Certificate:", "    Data:",
             f"        Version: {cert.version.value + 1} ({cert.version.value:#x})",
             *_serial_lines(cert.serial_number),
             f"        Signature Algorithm: {_signature_name(cert)}",
             f"        Issuer: {_openssl_name(cert.issuer)}",
             "        Validity",
             f"            Not Before: {_openssl_time(cert.not_valid_before_utc)}",
             f"            Not After : {_openssl_time(cert.not_valid_after_utc)}",
             f"        Subject: {_openssl_name(cert.subject)}",
             "        Subject Public Key Info:",
             *_public_key_lines(cert)]
    if cert.extensions:
        lines.append("        X509v3 extensions:")
        for extension in cert.extensions:
            lines.extend(_extension_lines(extension))
    lines.append(f"    Signature Algorithm: {_signature_name(cert)}")
    lines.append("    Signature Value:")
    lines.extend(_hex_block(cert.signature, 18, "        "))
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    header = f"\nVNC Certificate file:\n\t{path}\n\n" if path is not None else ""
    return header + "\n".join(lines) + "\n" + pem.decode("ascii")


_SIGNATURE_NAMES = {"1.2.840.10045.4.3.2": "ecdsa-with-SHA256",
                    "1.2.840.10045.4.3.3": "ecdsa-with-SHA384",
                    "1.2.840.113549.1.1.11": "sha256WithRSAEncryption",
                    "1.3.101.112": "ED25519"}
_CURVES = {"secp256r1": ("prime256v1", "P-256"), "secp384r1": ("secp384r1", "P-384")}
_KEY_USAGES = (("digital_signature", "Digital Signature"),
               ("content_commitment", "Non Repudiation"),
               ("key_encipherment", "Key Encipherment"),
               ("data_encipherment", "Data Encipherment"),
               ("key_agreement", "Key Agreement"), ("key_cert_sign", "Certificate Sign"),
               ("crl_sign", "CRL Sign"))
_EXTENDED_USAGES = {ExtendedKeyUsageOID.SERVER_AUTH: "TLS Web Server Authentication",
                    ExtendedKeyUsageOID.CLIENT_AUTH: "TLS Web Client Authentication"}


def _serial_lines(serial: int) -> list[str]:
    # openssl shows a serial that fits a signed long in decimal, others as DER bytes.
    if serial < 2**63:
        return [f"        Serial Number: {serial} ({serial:#x})"]
    content = serial.to_bytes((serial.bit_length() + 8) // 8, "big")
    if content[0] == 0 and len(content) > 1 and content[1] < 0x80:
        content = content[1:]
    return ["        Serial Number:", "            " + ":".join(f"{b:02x}" for b in content)]


def _signature_name(cert: x509.Certificate) -> str:
    oid = cert.signature_algorithm_oid.dotted_string
    return _SIGNATURE_NAMES.get(oid, oid)


def _public_key_lines(cert: x509.Certificate) -> list[str]:
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return [f"            Public Key Algorithm: {type(public_key).__name__}"]
    point = public_key.public_bytes(serialization.Encoding.X962,
                                    serialization.PublicFormat.UncompressedPoint)
    asn1_name, nist_name = _CURVES.get(public_key.curve.name,
                                       (public_key.curve.name, public_key.curve.name))
    return ["            Public Key Algorithm: id-ecPublicKey",
            f"                Public-Key: ({public_key.key_size} bit)",
            "                pub:", *_hex_block(point, 15, "                    "),
            f"                ASN1 OID: {asn1_name}",
            f"                NIST CURVE: {nist_name}"]


def _extension_lines(extension: x509.Extension[x509.ExtensionType]) -> list[str]:
    value = extension.value
    critical = " critical" if extension.critical else ""
    body: list[str]
    if isinstance(value, x509.BasicConstraints):
        title = "X509v3 Basic Constraints:"
        text = "CA:TRUE" if value.ca else "CA:FALSE"
        if value.ca and value.path_length is not None:
            text += f", pathlen:{value.path_length}"
        body = [text]
    elif isinstance(value, x509.KeyUsage):
        title = "X509v3 Key Usage:"
        body = [", ".join(label for attribute, label in _KEY_USAGES
                          if getattr(value, attribute))]
    elif isinstance(value, x509.ExtendedKeyUsage):
        title = "X509v3 Extended Key Usage:"
        body = [", ".join(_EXTENDED_USAGES.get(oid, oid.dotted_string) for oid in value)]
    elif isinstance(value, x509.SubjectAlternativeName):
        title = "X509v3 Subject Alternative Name:"
        body = [", ".join([f"DNS:{name}" for name in value.get_values_for_type(x509.DNSName)]
                          + [f"IP Address:{address}"
                             for address in value.get_values_for_type(x509.IPAddress)])]
    elif isinstance(value, x509.SubjectKeyIdentifier):
        title = "X509v3 Subject Key Identifier:"
        body = [_colon_hex(value.digest)]
    elif isinstance(value, x509.AuthorityKeyIdentifier) and value.key_identifier:
        title = "X509v3 Authority Key Identifier:"
        body = [_colon_hex(value.key_identifier)]
    else:
        title = f"{extension.oid.dotted_string}:"
        body = [value.public_bytes().hex()]
    # openssl leaves a space after the colon of a non-critical extension's title.
    return [f"            {title}{critical or ' '}", *(f"                {line}" for line in body)]


def _hex_block(data: bytes, per_line: int, indent: str) -> list[str]:
    rows = [data[start:start + per_line] for start in range(0, len(data), per_line)]
    return [indent + ":".join(f"{byte:02x}" for byte in row)
            + (":" if index < len(rows) - 1 else "") for index, row in enumerate(rows)]


def _check_name(name: str) -> None:
    # The name is the certificate's DNS name and the request's device field: one rule.
    if not valid_device_name(name):
        raise PKIError(f"{name!r} is not a device name: use letters, digits, '.', '_' and "
                       "'-' (at most 253), starting and ending with a letter or digit")


def _openssl_name(name: x509.Name) -> str:
    return ", ".join(f"{attribute.rfc4514_attribute_name} = {attribute.value!s}"
                     for attribute in name)


def _openssl_time(moment: dt.datetime) -> str:
    return moment.strftime("%b %e %H:%M:%S %Y GMT")


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in data)
