"""Expiry checks and renewal of the deployment's certificates.

`check_certificate` is a pure decision: given a certificate and the time, it says whether
the certificate needs attention (expired, expiring, a leaf valid longer than
MAX_LEAF_DAYS) and whether a role certificate is due for renewal, each with its reason.
`renew_role` re-issues a role certificate from the deployment CA with the same names and
usages and a fresh key; `renew_due` does so for every role certificate that is due.

Renewal is the one deliberate replacement of a certificate: the new key and certificate
are written beside the old ones and renamed over them (key first), under a lock file, so
that two processes sharing the directory do not both renew. This module never logs or
returns a private key, and never renews a certificate the deployment CA did not issue.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portcullis.errors import PKIError
from portcullis.pki.ca import LEAF_DAYS, MAX_LEAF_DAYS, IssuedCert, issue_certificate, load_pair

WARN_BEFORE_DAYS = 30
_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertificateCheck:
    """What `check_certificate` found. `problem` is for the administrator (None: fine);
    `renewal` says why a role certificate is due for renewal (None: not due)."""

    name: str
    path: Path
    subject: str
    not_after: dt.datetime
    days_left: int
    lifetime_days: int
    is_ca: bool
    problem: str | None
    renewal: str | None


def check_certificate(name: str, path: Path, cert: x509.Certificate, *, now: dt.datetime,
                      warn_before_days: int = WARN_BEFORE_DAYS,
                      renew_before_days: int = WARN_BEFORE_DAYS) -> CertificateCheck:
    """Decide whether `cert` (called `name`, read from `path`) needs attention at `now`."""
    not_after = cert.not_valid_after_utc
    left = not_after - now
    days_left = int(left / _DAY)   # whole days, towards zero
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    lifetime_days = int(lifetime / _DAY)
    is_ca = _is_ca(cert)
    problem: str | None = None
    if left <= dt.timedelta(0):
        problem = f"expired on {not_after:%Y-%m-%d}"
    elif left <= dt.timedelta(days=warn_before_days):
        problem = f"expires in {days_left} days, on {not_after:%Y-%m-%d}"
    elif not is_ca and lifetime > dt.timedelta(days=MAX_LEAF_DAYS):
        problem = (f"valid {lifetime_days} days, more than the {MAX_LEAF_DAYS} a leaf "
                   "certificate may be")
    renewal: str | None = None
    if not is_ca:
        if left <= dt.timedelta(days=renew_before_days):
            renewal = (f"expired on {not_after:%Y-%m-%d}" if left <= dt.timedelta(0) else
                       f"expires in {days_left} days (renewal starts "
                       f"{renew_before_days} days before)")
        elif lifetime > dt.timedelta(days=MAX_LEAF_DAYS):
            renewal = f"valid {lifetime_days} days, more than {MAX_LEAF_DAYS}"
    return CertificateCheck(name, Path(path), _common_name(cert), not_after, days_left,
                            lifetime_days, is_ca, problem, renewal)


def check_files(files: Sequence[tuple[str, Path]], *, now: dt.datetime,
                warn_before_days: int = WARN_BEFORE_DAYS,
                renew_before_days: int = WARN_BEFORE_DAYS) -> list[CertificateCheck]:
    """`check_certificate` for each (name, PEM file); a file that cannot be read raises.
    A file holding several certificates (a CA bundle) gives one check per certificate,
    named `name[1]`, `name[2]`..."""
    checks = []
    for name, path in files:
        certificates = _read_certificates(path)
        for index, cert in enumerate(certificates, start=1):
            checks.append(check_certificate(
                name if len(certificates) == 1 else f"{name}[{index}]", path, cert, now=now,
                warn_before_days=warn_before_days, renew_before_days=renew_before_days))
    return checks


def renew_role(directory: Path, role: str, ca: IssuedCert, *,
               now: dt.datetime | None = None) -> CertificateCheck:
    """Re-issue `directory/role.crt` (and a new `role.key`) from `ca`, keeping its
    common name, DNS and IP names and key usages; return the check of the new one."""
    with renewal_lock(directory):
        return _reissue(directory, role, ca, now or dt.datetime.now(dt.UTC))


def _reissue(directory: Path, role: str, ca: IssuedCert, now: dt.datetime) -> CertificateCheck:
    cert_path, key_path = directory / f"{role}.crt", directory / f"{role}.key"
    old = _read_certificate(cert_path)
    _check_issued_by(old, ca, cert_path)
    dns_names, ip_addresses = _alt_names(old)
    usages = _extended_usages(old)
    issued = issue_certificate(
        ca, _common_name(old), dns_names=dns_names, ip_addresses=ip_addresses,
        server=ExtendedKeyUsageOID.SERVER_AUTH in usages,
        client=ExtendedKeyUsageOID.CLIENT_AUTH in usages, valid_days=LEAF_DAYS, now=now)
    # Key first: a reader that sees the new certificate also finds its key.
    replace_file(key_path, issued.key_pem, 0o600)
    replace_file(cert_path, issued.cert_pem, 0o644)
    return check_certificate(role, cert_path, x509.load_pem_x509_certificate(issued.cert_pem),
                             now=now)


@dataclass(frozen=True)
class RenewalOutcome:
    """Which role certificates `renew_due` renewed, and why it left others alone."""

    renewed: tuple[CertificateCheck, ...]
    not_renewed: tuple[tuple[str, str], ...]   # (role, why not)


def renew_due(directory: Path, roles: Sequence[str], ca_cert: Path, ca_key: Path, *,
              now: dt.datetime, renew_before_days: int) -> RenewalOutcome:
    """Renew every role certificate in `directory` that is due at `now`. A due
    certificate that cannot be renewed (the CA key is offline, another CA issued it) is
    reported in `not_renewed`, never raised: a node still starts with what it has."""
    def due(role: str) -> CertificateCheck | None:
        path = directory / f"{role}.crt"
        check = check_certificate(role, path, _read_certificate(path), now=now,
                                  renew_before_days=renew_before_days)
        return check if check.renewal is not None else None

    first = [check for check in map(due, roles) if check is not None]
    if not first:
        return RenewalOutcome((), ())   # the usual case: no lock, nothing written
    renewed: list[CertificateCheck] = []
    not_renewed: list[tuple[str, str]] = []
    ca: IssuedCert | None = None
    try:
        with renewal_lock(directory):
            # Checked again under the lock: a process that waited finds them renewed.
            for check in filter(None, (due(check.name) for check in first)):
                try:
                    if ca is None:
                        if not ca_key.exists():
                            raise PKIError(f"the CA key {ca_key} is not here: run "
                                           "'portcullis cert renew' where it is")
                        ca = load_pair(ca_cert, ca_key)
                    renewed.append(_reissue(directory, check.name, ca, now))
                except PKIError as exc:
                    not_renewed.append((check.name, f"{check.renewal}, but {exc}"))
    except PKIError as exc:   # the directory cannot be locked (read-only, say)
        return RenewalOutcome((), tuple((check.name, f"{check.renewal}, but {exc}")
                                        for check in first))
    return RenewalOutcome(tuple(renewed), tuple(not_renewed))


def _read_certificate(path: Path) -> x509.Certificate:
    return _read_certificates(path)[0]


def _read_certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(Path(path).read_bytes())
    except FileNotFoundError:
        raise PKIError(f"certificate file {path} does not exist") from None
    except OSError as exc:
        raise PKIError(f"cannot read certificate file {path}: {exc.strerror or exc}") from exc
    except ValueError:
        raise PKIError(f"{path} does not hold a PEM certificate") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return ""
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _alt_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (san.get_values_for_type(x509.DNSName),
            [str(address) for address in san.get_values_for_type(x509.IPAddress)])


def _extended_usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def _check_issued_by(cert: x509.Certificate, ca: IssuedCert, path: Path) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"{path} was not issued by the deployment CA; renew it where it "
                       "came from") from None


def replace_file(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise PKIError(f"cannot write {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def renewal_lock(directory: Path) -> Iterator[None]:
    """Held while certificates in `directory` are renewed or read back after renewal."""
    lock = directory / ".renew.lock"
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    except PermissionError:
        # A reader of a directory it may not write: the lock file, if a writer made it.
        try:
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
        except OSError as exc:
            raise PKIError(f"cannot lock {directory}: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise PKIError(f"cannot lock {directory} for renewal: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
