"""The user's client certificate, from the TLS connection to the portal's sign-in.

uvicorn does not fill in the ASGI TLS extension, so the gateway's HTTP protocol class
puts the certificate TLS verified (against auth.client_ca) into
`scope["extensions"]["tls"]["client_cert_chain"]`, as the ASGI spec names it. When the
portal runs in another process, the gateway passes the certificate on in a header that
it strips from every client request, and the portal believes that header only on its
mutual-TLS listener, which only gateways can reach.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ssl
from typing import Any

from portcullis.errors import PKIError
from portcullis.identity.conditions import ClientCertificate
from portcullis.web.edge import HeadTimedHttp

FORWARDED_HEADER = b"x-portcullis-client-certificate"


class ClientCertificateHttp(HeadTimedHttp):
    _chain: list[str]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        self._chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": {"client_cert_chain": self._chain}}


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
