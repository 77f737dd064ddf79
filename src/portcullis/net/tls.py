"""TLS contexts for every Portcullis listener and client, and readable TLS failures.

All contexts follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, the profile's
TLS 1.2 cipher list, the key-exchange groups X25519, P-256 and P-384 only (see
`portcullis.net.tls_groups`), no compression, no renegotiation, and the client's cipher
order (the profile's "server preference: no"). TLS 1.3 suites are OpenSSL's defaults, which are
the profile's.

This module must never weaken verification on its own: a client context always checks the
peer's chain, and only the caller may turn off the host name check. It must never import
the project configuration; callers pass plain paths. `ssl` and `OSError` failures while
loading files are mapped here to `PKIError` naming the file.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

from portcullis.errors import PKIError
from portcullis.net.tls_groups import restrict_groups

MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)

# The profile's key-exchange groups (OpenSSL's default adds X448, P-521 and FFDHE).
MOZILLA_INTERMEDIATE_GROUPS = ("X25519", "P-256", "P-384")

# OpenSSL X509_V_ERR_* codes for which --ca is the wrong advice.
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_HOSTNAME_MISMATCH = 62
_X509_V_ERR_IP_ADDRESS_MISMATCH = 64


class ServerContext(ssl.SSLContext):
    """A server context, and the name (SNI) it is presented for, if only one."""

    server_name: str | None = None


def server_context(
    cert_file: Path,
    key_file: Path,
    *,
    client_ca_file: Path | None = None,
    require_client_cert: bool = False,
    also_trust: Sequence[Path] = (),
    server_name: str | None = None,
) -> ssl.SSLContext:
    """A server context presenting `cert_file`; with `server_name`, the context that
    `choose_by_server_name` swaps in for connections opened for that name.

    With `client_ca_file`, client certificates signed by that CA are verified: required
    (mutual TLS) when `require_client_cert`, otherwise optional. `also_trust` adds CAs
    whose client certificates are verified too (optional ones only): a listener that
    accepts several kinds of client must then check, per use, which CA signed one.
    """
    if require_client_cert and client_ca_file is None:
        raise PKIError("requiring client certificates needs a client CA file to verify them")
    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.server_name = server_name
    _apply_profile(context)
    # CPython turns server cipher preference on by default; Mozilla intermediate turns it
    # off so that clients without AES hardware can pick ChaCha20.
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, Path(cert_file), Path(key_file))
    if client_ca_file is not None:
        _load_ca(context, Path(client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    for ca_file in also_trust:
        _load_ca(context, Path(ca_file))
        if context.verify_mode == ssl.CERT_NONE:
            context.verify_mode = ssl.CERT_OPTIONAL
    return context


def choose_by_server_name(context: ssl.SSLContext, by_name: Mapping[str, ssl.SSLContext]
                          ) -> None:
    """Make `context` hand connections opened for a name of `by_name` (SNI) to that
    name's context: its certificate, and `server_name_of` names it afterwards."""

    def choose(ssl_object: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        chosen = by_name.get((name or "").lower().rstrip("."))
        if chosen is not None:
            ssl_object.context = chosen

    context.sni_callback = choose


def server_name_of(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The name a connection was opened for, when a context of `choose_by_server_name`
    took it; else None."""
    context = ssl_object.context if ssl_object is not None else None
    return context.server_name if isinstance(context, ServerContext) else None


class ResumingClientContext(ssl.SSLContext):
    """A client context that offers `session_to_offer` (a session from an earlier
    connection to the same server) in every new handshake, to resume it.

    asyncio's and uvloop's `create_connection` take no session argument, but both open
    TLS through `context.wrap_bio`: this is where the session goes in. The session must
    come from this same context (OpenSSL's rule); a server that declines it costs only a
    full handshake."""

    session_to_offer: ssl.SSLSession | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 server_side: bool = False, server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.session_to_offer
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def client_context(
    ca_file: Path | None,
    *,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    check_hostname: bool = True,
) -> ResumingClientContext:
    """A client context that verifies the server against `ca_file` (None: system store).

    `cert_file` (and `key_file`, unless the key is in the same file) present a client
    certificate for mutual TLS. The chain is always verified; `check_hostname=False`
    only skips matching the server's name.
    """
    if key_file is not None and cert_file is None:
        raise PKIError(f"a client key ({key_file}) was given without its certificate")
    context = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_profile(context)
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(context, Path(ca_file))
    if cert_file is not None:
        _load_chain(context, Path(cert_file), Path(key_file) if key_file is not None else None)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def reload_certificate(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    """Load a renewed certificate and key into an existing context: handshakes that
    begin after this present them; open connections are not affected."""
    _load_chain(context, Path(cert_file), Path(key_file))


def describe_tls_failure(
    exc: BaseException, url: str, *, peer: str = "gateway",
    untrusted_remedy: str = "pass --ca FILE with the deployment's CA certificate "
                            "(DIR/pki/ca.crt)",
) -> str | None:
    """An actionable sentence when `exc` (or an exception it wraps) is a failed
    certificate verification while connecting to `url`; None for any other failure.

    httpx, websockets and asyncio wrap the `ssl.SSLCertVerificationError`, so the
    `__cause__` / `__context__` chain (and exception groups) are searched. `peer` names
    the server in the sentence ("gateway", "portal"...); `untrusted_remedy` is what to
    do when its chain does not lead to a trusted CA.
    """
    error = _find_verification_error(exc)
    if error is None:
        return None
    reason = str(error.verify_message or error.reason or error).rstrip(".")
    code = error.verify_code
    if code in (_X509_V_ERR_HOSTNAME_MISMATCH, _X509_V_ERR_IP_ADDRESS_MISMATCH):
        return (
            f"the {peer}'s certificate at {url} is not valid for that name ({reason}): "
            "connect with a host name the certificate was issued for, or reissue the "
            "certificate with this name"
        )
    if code in (_X509_V_ERR_CERT_HAS_EXPIRED, _X509_V_ERR_CERT_NOT_YET_VALID):
        return (
            f"the {peer}'s certificate at {url} is outside its validity period ({reason}): "
            "check this machine's clock, or reissue the certificate"
        )
    return f"cannot verify the {peer}'s certificate at {url} ({reason}): {untrusted_remedy}"


def _apply_profile(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    restrict_groups(context, MOZILLA_INTERMEDIATE_GROUPS)


def _load_chain(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    for path, what in ((cert_file, "certificate"), (key_file, "private key")):
        if path is not None and not path.is_file():
            raise PKIError(f"{what} file {path} does not exist")
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        key_part = f" and key {key_file}" if key_file is not None else ""
        raise PKIError(
            f"cannot load certificate {cert_file}{key_part}: {exc.reason or exc} "
            "(not PEM, encrypted, or the key does not match the certificate)"
        ) from exc
    except OSError as exc:
        raise PKIError(f"cannot read certificate {cert_file} or key {key_file}: "
                       f"{exc.strerror or exc}") from exc


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    if not ca_file.is_file():
        raise PKIError(f"CA certificate file {ca_file} does not exist")
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise PKIError(f"CA certificate file {ca_file} holds no usable PEM certificate: "
                       f"{exc.reason or exc}") from exc
    except OSError as exc:
        raise PKIError(f"cannot read CA certificate file {ca_file}: {exc.strerror or exc}") from exc


def _find_verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        linked = [current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):
            linked.extend(current.exceptions)
        # Some wrappers keep the original only as an argument (urllib's URLError.reason).
        linked.extend(arg for arg in current.args if isinstance(arg, BaseException))
        pending.extend(item for item in linked if item is not None)
    return None
