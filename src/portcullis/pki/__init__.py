"""The deployment's private certificate authority and the role certificates it signs.

Never writes a private key readable by others and never overwrites a certificate; see
`portcullis.pki.ca`.
"""

from portcullis.pki.ca import (
    IssuedCert,
    certificate_fingerprint,
    certify_request,
    create_ca,
    create_signing_pair,
    issue_certificate,
    issued_by,
    load_ca_certificates,
    load_pair,
    peer_common_name,
    transport_common_name,
    write_pair,
)

__all__ = [
    "IssuedCert",
    "certificate_fingerprint",
    "certify_request",
    "create_ca",
    "create_signing_pair",
    "issue_certificate",
    "issued_by",
    "load_ca_certificates",
    "load_pair",
    "peer_common_name",
    "transport_common_name",
    "write_pair",
]
