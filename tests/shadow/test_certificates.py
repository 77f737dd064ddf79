"""The device certificate: its profile, its files, renewal, and `cert-info` (the output of
`x11vnc -sslCertInfo`, which reads the same file)."""

from __future__ import annotations

import datetime as dt
import os
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import require_program
from portcullis.cli.shadow_agent import shadow_agent
from portcullis.errors import PKIError
from portcullis.shadow.certificates import (
    cert_info,
    console_csr,
    create_device_files,
    load_device_files,
    renewal_due,
    renewed_certificate,
    replace_device_files,
)


def test_device_certificate_has_the_profile_of_the_brief(tmp_path: Path) -> None:
    identity = create_device_files(tmp_path, "kiosk-7", days=200)
    cert = identity.certificate
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"   # type: ignore[union-attr]
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kiosk-7"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["kiosk-7"]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc) == dt.timedelta(days=200)
    cert.verify_directly_issued_by(cert)   # self-signed, and the signature holds


def test_key_file_is_0600_and_files_load_back(tmp_path: Path) -> None:
    identity = create_device_files(tmp_path, "kiosk-7")
    assert stat.S_IMODE(os.stat(identity.key_path).st_mode) == 0o600
    assert load_device_files(tmp_path).fingerprint == identity.fingerprint
    assert identity.fingerprint.startswith("sha256:") and len(identity.fingerprint) == 71


def test_first_start_never_replaces_existing_files(tmp_path: Path) -> None:
    create_device_files(tmp_path, "kiosk-7")
    with pytest.raises(PKIError, match="already exists"):
        create_device_files(tmp_path, "kiosk-7")


def test_bad_device_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="not a device name"):
        create_device_files(tmp_path, "-bad name")


def test_renewal_is_due_within_the_window_only(tmp_path: Path) -> None:
    cert = create_device_files(tmp_path, "kiosk-7", days=100).certificate
    start = cert.not_valid_before_utc
    assert not renewal_due(cert, start + dt.timedelta(days=69), 30)
    assert renewal_due(cert, start + dt.timedelta(days=71), 30)
    assert renewal_due(cert, start + dt.timedelta(days=101), 30)


def test_renewal_makes_a_new_key_and_replaces_the_files(tmp_path: Path) -> None:
    old = create_device_files(tmp_path, "kiosk-7")
    renewed = renewed_certificate("kiosk-7")
    new = replace_device_files(tmp_path, renewed)
    assert new.fingerprint != old.fingerprint
    assert new.pair.key_pem != old.pair.key_pem
    assert load_device_files(tmp_path).fingerprint == new.fingerprint
    assert stat.S_IMODE(os.stat(new.key_path).st_mode) == 0o600


def test_console_csr_is_a_signed_p256_request() -> None:
    key, pem = console_csr()
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()


def test_openssl_reads_the_certificate_file(tmp_path: Path) -> None:
    openssl = require_program("openssl")
    identity = create_device_files(tmp_path, "kiosk-7")
    result = subprocess.run([openssl, "x509", "-noout", "-text", "-in", str(identity.cert_path)],
                            capture_output=True, text=True, check=True)
    assert "Subject: CN = kiosk-7" in result.stdout
    assert "CA:FALSE" in result.stdout and "DNS:kiosk-7" in result.stdout


def test_cert_info_prints_what_x11vnc_ssl_cert_info_prints(tmp_path: Path) -> None:
    x11vnc = require_program("x11vnc")
    identity = create_device_files(tmp_path / "state", "kiosk-7")
    # x11vnc creates ~/.vnc/certs on its way: keep it in the test's directory.
    result = subprocess.run([x11vnc, "-sslCertInfo", str(identity.cert_path)],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert cert_info(identity.pair.cert_pem, str(identity.cert_path)) == result.stdout


def test_cert_info_command_prints_the_state_directory_certificate(tmp_path: Path) -> None:
    identity = create_device_files(tmp_path, "kiosk-7")
    result = CliRunner().invoke(shadow_agent, ["cert-info", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output == cert_info(identity.pair.cert_pem, str(identity.cert_path))
    assert "Subject: CN = kiosk-7" in result.output


def test_cert_info_refuses_what_is_no_certificate() -> None:
    with pytest.raises(PKIError, match="not a PEM certificate"):
        cert_info(b"hello")

