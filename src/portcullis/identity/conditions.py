"""Whether a login-flow step applies: a pure decision over what is known, with its reason.

The facts are the client (address, verified certificate) and what the flow has learned
so far (user, groups, providers passed). Nothing here does I/O, so `auth test` and the
unit tests can ask "would this step run?" for any made-up situation.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from portcullis.config.auth import Condition
from portcullis.errors import PKIError


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate that has already passed TLS verification against auth.client_ca."""

    subject: str
    issuer: str
    common_name: str | None
    emails: tuple[str, ...]
    fingerprint: str           # SHA-256 of the DER, hex

    @classmethod
    def from_der(cls, der: bytes) -> ClientCertificate:
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise PKIError(f"cannot read the client certificate: {exc}") from None
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = str(names[0].value) if names else None
        emails = [str(a.value) for a in
                  certificate.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)]
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            emails += san.value.get_values_for_type(x509.RFC822Name)
        except x509.ExtensionNotFound:
            pass
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
            # Extensions are parsed only when read: a CA-signed certificate with a broken
            # one must be a clear refusal, not a server error.
            raise PKIError(f"cannot read the client certificate's extensions: {exc}") from None
        return cls(certificate.subject.rfc4514_string(), certificate.issuer.rfc4514_string(),
                   common_name, tuple(dict.fromkeys(emails)), hashlib.sha256(der).hexdigest())


@dataclass(frozen=True)
class LoginContext:
    """What the connection tells about the client, fixed for a whole sign-in."""

    client_address: str
    certificate: ClientCertificate | None = None


@dataclass(frozen=True)
class Facts:
    context: LoginContext
    username: str | None = None
    groups: frozenset[str] = frozenset()
    passed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Verdict:
    holds: bool
    reason: str


def evaluate(condition: Condition | None, facts: Facts) -> Verdict:
    """Whether `condition` holds; the reason names the first fact that decided it."""
    if condition is None:
        return Verdict(True, "always")
    reasons: list[str] = []
    for check in (_certificate, _issuer, _subject, _address, _groups, _users, _passed,
                  _any, _not):
        verdict = check(condition, facts)
        if verdict is None:
            continue
        if not verdict.holds:
            return verdict
        reasons.append(verdict.reason)
    return Verdict(True, " and ".join(reasons) or "always")


def _certificate(condition: Condition, facts: Facts) -> Verdict | None:
    if condition.certificate is None:
        return None
    present = facts.context.certificate is not None
    wanted = condition.certificate == "valid"
    return Verdict(present == wanted,
                   "a valid client certificate" if present else "no client certificate")


def _issuer(condition: Condition, facts: Facts) -> Verdict | None:
    wanted = condition.certificate_issuer
    if wanted is None:
        return None
    return _certificate_part(facts, "issuer", lambda issuer: issuer == wanted)


def _subject(condition: Condition, facts: Facts) -> Verdict | None:
    pattern = condition.certificate_subject
    if pattern is None:
        return None
    return _certificate_part(facts, "subject",
                             lambda subject: re.fullmatch(pattern, subject) is not None)


def _certificate_part(facts: Facts, part: Literal["issuer", "subject"],
                      matches: Callable[[str], bool]) -> Verdict:
    certificate = facts.context.certificate
    if certificate is None:
        return Verdict(False, "no client certificate")
    value = getattr(certificate, part)
    return Verdict(matches(value), f"certificate {part} {value}")


def _address(condition: Condition, facts: Facts) -> Verdict | None:
    if condition.client_address is None:
        return None
    try:
        address = ipaddress.ip_address(facts.context.client_address)
    except ValueError:
        return Verdict(False, f"client address {facts.context.client_address!r} unknown")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped     # a dual-stack listener's view of an IPv4 client
    for network in condition.client_address:
        parsed = ipaddress.ip_network(network, strict=False)
        if address.version == parsed.version and address in parsed:
            return Verdict(True, f"client {address} in {network}")
    return Verdict(False, f"client {address} in none of {', '.join(condition.client_address)}")


def _groups(condition: Condition, facts: Facts) -> Verdict | None:
    if condition.groups is None:
        return None
    member = sorted(facts.groups & set(condition.groups))
    if member:
        return Verdict(True, f"member of {member[0]}")
    return Verdict(False, f"not a member of {', '.join(condition.groups)}")


def _users(condition: Condition, facts: Facts) -> Verdict | None:
    if condition.users is None:
        return None
    holds = facts.username is not None and facts.username in condition.users
    return Verdict(holds, f"user {facts.username or '(not yet known)'}")


def _passed(condition: Condition, facts: Facts) -> Verdict | None:
    if condition.passed is None:
        return None
    missing = [name for name in condition.passed if name not in facts.passed]
    if missing:
        return Verdict(False, f"{missing[0]} not passed")
    return Verdict(True, f"passed {', '.join(condition.passed)}")


def _any(condition: Condition, facts: Facts) -> Verdict | None:
    if condition.any is None:
        return None
    verdicts = [evaluate(child, facts) for child in condition.any]
    for verdict in verdicts:
        if verdict.holds:
            return verdict
    return Verdict(False, "none of: " + "; ".join(v.reason for v in verdicts))


def _not(condition: Condition, facts: Facts) -> Verdict | None:
    if condition.not_ is None:
        return None
    inner = evaluate(condition.not_, facts)
    return Verdict(not inner.holds, inner.reason)
