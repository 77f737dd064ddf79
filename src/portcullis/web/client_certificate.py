"""The user's client certificate, from the TLS connection to the portal's sign-in.

uvicorn does not fill in the ASGI TLS extension, so the gateway's HTTP protocol class
puts the certificate TLS verified (against auth.client_ca) into
`scope["extensions"]["tls"]["client_cert_chain"]`, as the ASGI spec names it. When the
portal runs in another process, the gateway passes the certificate on in a header that
it strips from every client request, and the portal believes that header only on its
mutual-TLS listener, which only gateways can reach.

Only a user's certificate gets that far. The gateway's listener may trust the deployment
CA in addition to auth.client_ca (relays dialling out present their role certificates
there), and auth.client_ca may itself be the deployment CA: so a certificate whose
common name is a role's never counts, nor does one the deployment CA signed when
auth.client_ca does not hold that CA (TLS verified it for relays, not for users). The
check is on the issuer that must NOT have signed it, so users' certificates from an
intermediate of auth.client_ca keep working.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from portcullis.errors import PKIError
from portcullis.identity.conditions import ClientCertificate
from portcullis.net.tls import server_name_of
from portcullis.pki import issued_by, load_ca_certificates, peer_common_name
from portcullis.pki.roles import ROLE_COMMON_NAMES
from portcullis.web.edge import HeadTimedHttp

FORWARDED_HEADER = b"x-portcullis-client-certificate"


def is_user_certificate(der: bytes, not_for_users: tuple[x509.Certificate, ...]) -> bool:
    """Whether a certificate TLS verified may sign a user in: none that a CA in
    `not_for_users` signed, and none with a role's common name."""
    if issued_by(der, not_for_users):
        return False
    try:
        return peer_common_name(der) not in ROLE_COMMON_NAMES.values()
    except PKIError:
        return False


class ClientCertificateHttp(HeadTimedHttp):
    """Hands the app the user's certificate (see the module's docstring)."""

    # CAs the listener trusts for other purposes than users' sign-ins.
    not_for_users: tuple[x509.Certificate, ...] = ()
    _chain: list[str]
    _server_name: str | None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        self._chain = ([ssl.DER_cert_to_PEM_cert(der)]
                       if der and is_user_certificate(der, self.not_for_users) else [])
        # The host name the connection was opened for, when it is a web resource's.
        self._server_name = server_name_of(ssl_object)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": {"client_cert_chain": self._chain,
                                            "server_name": self._server_name}}


def user_certificate_http(client_ca_file: Path | None,
                          also_trusted: Sequence[Path] = ()) -> type[ClientCertificateHttp]:
    """The HTTP protocol class of a listener whose users sign in with certificates of
    `client_ca_file` (auth.client_ca), and whose TLS also trusts `also_trusted` CAs for
    other peers (the deployment CA, for relays)."""
    for_users = set(load_ca_certificates(client_ca_file)) if client_ca_file else set()
    others = tuple(ca for path in also_trusted for ca in load_ca_certificates(path)
                   if ca not in for_users)

    class UserCertificateHttp(ClientCertificateHttp):
        not_for_users = others

    return UserCertificateHttp


def certificate_in_scope(scope: dict[str, Any]) -> ClientCertificate | None:
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        return None
    return ClientCertificate.from_der(ssl.PEM_cert_to_DER_cert(chain[0]))


def forwarded_value(scope: dict[str, Any]) -> bytes | None:
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    return base64.b64encode(ssl.PEM_cert_to_DER_cert(chain[0])) if chain else None


def certificate_forwarded(headers: list[tuple[bytes, bytes]]) -> ClientCertificate | None:
    for name, value in headers:
        if name.lower() == FORWARDED_HEADER:
            try:
                return ClientCertificate.from_der(base64.b64decode(value, validate=True))
            except (binascii.Error, PKIError):
                return None
    return None
