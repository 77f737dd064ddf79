"""The deployment's certificates as a node and `portcullis cert status` see them.

Which files a deployment has (its CA, the role certificates, the client-certificate CA
of the sign-in flows), their checks, and the start-of-day and daily routine of a node:
renew its role certificates when due (if `tls.auto_renew` and the CA key is here), then
warn in the log about every certificate that needs attention. Decisions are in
`portcullis.pki.renewal`; this module only gathers paths and logs.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from portcullis.errors import PKIError
from portcullis.net.tls import reload_certificate
from portcullis.pki.ca import load_pair
from portcullis.pki.renewal import (
    CertificateCheck,
    RenewalOutcome,
    check_files,
    renew_due,
    renewal_lock,
)
from portcullis.pki.roles import ROLES

if TYPE_CHECKING:
    from portcullis.config.model import Settings

log = structlog.get_logger("portcullis.pki")


def deployment_files(settings: Settings, roles: Sequence[str] = ROLES) -> list[tuple[str, Path]]:
    """(name, path) of the CA, of the certificate of each of `roles`, and of the
    client-certificate CA of the sign-in flows when it is another file."""
    files = [("ca", settings.ca_cert_path)]
    for role in roles:
        files.append((role, settings.role_cert(role)[0]))
    if settings.auth.client_ca:
        client_ca = settings.path(settings.auth.client_ca)
        if client_ca.resolve() != settings.ca_cert_path.resolve():
            files.append(("auth.client_ca", client_ca))
    return files


def check_deployment(settings: Settings, *, now: dt.datetime | None = None,
                     roles: Sequence[str] | None = None) -> list[CertificateCheck]:
    """Check every certificate of the deployment; without `roles`, the role
    certificates present in the directory."""
    if roles is None:
        roles = [role for role in ROLES if settings.role_cert(role)[0].exists()]
    return check_files(deployment_files(settings, roles), now=now or dt.datetime.now(dt.UTC),
                       warn_before_days=settings.tls.warn_before_days,
                       renew_before_days=settings.tls.renew_before_days)


def maintain(settings: Settings, roles: Sequence[str], *,
             now: dt.datetime | None = None) -> RenewalOutcome:
    """A node's routine, at start and daily: renew its due role certificates, then log a
    warning for each of its certificates that needs attention."""
    now = now or dt.datetime.now(dt.UTC)
    outcome = RenewalOutcome((), ())
    if settings.tls.auto_renew:
        directory = settings.path(settings.tls.directory)
        outcome = renew_due(directory, roles, settings.ca_cert_path, directory / "ca.key",
                            now=now,
                            renew_before_days=settings.tls.renew_before_days)
    for renewed in outcome.renewed:
        log.info("certificate renewed", certificate=renewed.name, path=str(renewed.path),
                 valid_until=f"{renewed.not_after:%Y-%m-%d}")
    for role, reason in outcome.not_renewed:
        log.warning("certificate not renewed", certificate=role, reason=reason)
    for check in check_deployment(settings, now=now, roles=roles):
        if check.problem is not None:
            log.warning("certificate needs attention", certificate=check.name,
                        path=str(check.path), problem=check.problem)
    return outcome


@dataclass
class LoadedCertificates:
    """The TLS contexts a node made with each role's certificate, and the certificate
    they hold, so that a renewed file is loaded into them: new handshakes present it,
    connections already open keep the one they began with."""

    settings: Settings
    _contexts: dict[str, list[ssl.SSLContext]] = field(default_factory=dict)
    _loaded: dict[str, bytes] = field(default_factory=dict)

    def track(self, role: str, context: ssl.SSLContext) -> ssl.SSLContext:
        self._contexts.setdefault(role, []).append(context)
        self._loaded.setdefault(role, self._read(role))
        return context

    def reload_changed(self) -> list[str]:
        """Load each role certificate whose file changed into that role's contexts;
        return the roles reloaded. A file caught mid-renewal is tried at the next check."""
        reloaded = []
        for role, contexts in self._contexts.items():
            if self._read(role) == self._loaded[role]:
                continue
            cert, key = self.settings.role_cert(role)
            try:
                with renewal_lock(cert.parent):
                    current = self._read(role)
                    # A key that does not match would leave the contexts without one.
                    load_pair(cert, key)
                    for context in contexts:
                        reload_certificate(context, cert, key)
            except PKIError as exc:
                log.warning("renewed certificate not loaded", certificate=role, error=str(exc))
                continue
            self._loaded[role] = current
            reloaded.append(role)
            log.info("certificate reloaded", certificate=role, contexts=len(contexts))
        return reloaded

    def _read(self, role: str) -> bytes:
        try:
            return self.settings.role_cert(role)[0].read_bytes()
        except OSError:
            return b""
