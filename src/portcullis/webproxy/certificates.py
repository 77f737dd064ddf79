"""A certificate for each web resource's host name, so that browsers trust its origin.

The administrator's gateway certificate serves every name it covers (a wildcard
`*.gw.example.org` covers them all). For a name it does not cover, the node issues one
from the deployment CA at start, kept in the tls directory as `web-NAME.crt`/`.key`,
and renewed when due like the role certificates (`pki.renewal.renew_due`, at start and
in the daily check). Without the CA key here, such a name is served with the gateway's
certificate, and the log says why browsers will not trust it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509

from portcullis.config.model import Settings
from portcullis.errors import PKIError
from portcullis.pki.ca import issue_certificate, load_pair
from portcullis.pki.renewal import renew_due, renewal_lock, replace_file
from portcullis.webproxy.sites import Sites, covers

log = structlog.get_logger("portcullis.webproxy")


@dataclass(frozen=True)
class HostCertificate:
    host: str
    name: str     # its files' name in the tls directory (`gateway` for the gateway's own)


def certificate_names(path: Path) -> list[str]:
    """The DNS names of the certificate in `path` (none if it cannot be read)."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(name) for name in alt.value.get_values_for_type(x509.DNSName)]


def host_certificates(settings: Settings, sites: Sites, *,
                      now: dt.datetime | None = None) -> list[HostCertificate]:
    """Which certificate serves each web host; issue or renew those that must be."""
    now = now or dt.datetime.now(dt.UTC)
    directory = settings.path(settings.tls.directory)
    gateway_names = certificate_names(settings.role_cert("gateway")[0])
    chosen: list[HostCertificate] = []
    for site in sites.all:
        host = site.public_host
        if covers(gateway_names, host):
            chosen.append(HostCertificate(host, "gateway"))
            continue
        name = f"web-{host}"
        cert_path, key_path = settings.role_cert(name)
        try:
            if not covers(certificate_names(cert_path), host) or not key_path.exists():
                _issue(settings, host, cert_path, key_path, now)
            chosen.append(HostCertificate(host, name))
        except PKIError as exc:
            log.warning("no certificate for a web resource's host: browsers will not trust "
                        "it", host=host, error=str(exc))
            chosen.append(HostCertificate(host, "gateway"))
    own = [choice.name for choice in chosen if choice.name != "gateway"]
    if own and settings.tls.auto_renew:
        outcome = renew_due(directory, own, settings.ca_cert_path, directory / "ca.key",
                            now=now, renew_before_days=settings.tls.renew_before_days)
        for renewed in outcome.renewed:
            log.info("certificate renewed", certificate=renewed.name)
        for certificate, reason in outcome.not_renewed:
            log.warning("certificate not renewed", certificate=certificate, reason=reason)
    return chosen


def _issue(settings: Settings, host: str, cert_path: Path, key_path: Path,
           now: dt.datetime) -> None:
    ca_key = settings.path(settings.tls.directory) / "ca.key"
    if not ca_key.exists():
        raise PKIError(f"the CA key {ca_key} is not here to issue one; put a certificate "
                       f"for {host} at {cert_path}, or use a wildcard gateway certificate")
    issued = issue_certificate(load_pair(settings.ca_cert_path, ca_key), host,
                               dns_names=[host], client=False, now=now)
    with renewal_lock(cert_path.parent):
        replace_file(key_path, issued.key_pem, 0o600)
        replace_file(cert_path, issued.cert_pem, 0o644)
    log.info("certificate issued for a web resource's host", host=host, path=str(cert_path))
