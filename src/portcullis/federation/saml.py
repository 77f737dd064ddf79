"""The gateway as a SAML 2.0 service provider (SP): AuthnRequests out, Responses in,
SP metadata, single logout. pysaml2 does the protocol; the xmlsec1 program checks every
signature against the IdP metadata's certificates only (never a key from the message).

What reaches pysaml2 has been through a gate here first (`read_saml_message`): the
base64 text and the decoded document are measured before anything parses them, the
document is parsed once by defusedxml with no DTD, no entity and no external reference
allowed, and its root must be the message expected. pysaml2 parses with defusedxml too
(entities refused, see the tests), so no parser that expands entities ever sees input.
HTTP-POST messages are never handed to pysaml2's own unwrapping, which would inflate
a deflated body without a bound.

Claims are read only from the assertion pysaml2 took from the verified document: a
Response signature (checked by ID, one Reference, enveloped) covers the assertions in it;
otherwise each assertion's own signature must verify. Exactly one assertion is accepted.

Rules beyond pysaml2's checks, each refused with its reason: no SHA-1 signature or
digest; the Response must name this ACS as Destination and the configured IdP as Issuer;
InResponseTo (of the Response and of its subject confirmation) must be the request this
flow sent, or absent for an IdP-initiated sign-in when that is allowed; an encrypted
assertion can be required. Logout messages from the IdP (HTTP-Redirect) must carry a
query-string signature that a certificate of the IdP metadata verifies.

Never imports portcullis.identity: the factor there turns `Asserted` into claims. Never
logs a SAML message (it carries personal data); errors name the rule broken.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import calendar
import contextlib
import logging
import ssl
import time
import xml.etree.ElementTree as ElementTree
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import defusedxml
import defusedxml.ElementTree
import httpx
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT, saml, samlp, xmldsig
from saml2.client import Saml2Client
from saml2.config import SPConfig
from saml2.metadata import create_metadata_string
from saml2.response import AuthnResponse, LogoutResponse, StatusError
from saml2.saml import NameID
from saml2.sigver import get_xmlsec_binary
from saml2.time_util import str_to_time
from starlette.requests import Request
from starlette.responses import Response

from portcullis.config.federation import SamlProvider
from portcullis.errors import ConfigError, PKIError
from portcullis.net.dialer import Dialer
from portcullis.net.httpdial import DialerTransport
from portcullis.pki import create_signing_pair, load_pair, write_pair

SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
MD = "urn:oasis:names:tc:SAML:2.0:metadata"
DS = "http://www.w3.org/2000/09/xmldsig#"
# Collisions for SHA-1 are practical: neither a signature nor a digest may rely on it.
WEAK_ALGORITHMS = frozenset({xmldsig.SIG_RSA_SHA1, xmldsig.SIG_DSA_SHA1, xmldsig.SIG_ECDSA_SHA1,
                             xmldsig.DIGEST_SHA1})
log = structlog.get_logger("portcullis.federation.saml")
# pysaml2 logs whole messages (names, attributes: personal data) with its errors; the
# reason of every refusal reaches the audit trail through `Refused` instead.
logging.getLogger("saml2").setLevel(logging.CRITICAL)
# IdP metadata is a few kilobytes; a federation's aggregate is not what this reads.
MAX_METADATA_BYTES = 1024 * 1024
# A LogoutResponse is a status and an id or two.
MAX_LOGOUT_BYTES = 16 * 1024
METADATA_FETCH_TIMEOUT = 10.0
SIGNATURE_ALGORITHM = xmldsig.SIG_RSA_SHA256
DIGEST_ALGORITHM = xmldsig.DIGEST_SHA256
# HTTP-Redirect signatures accepted (RSA, as xmlsec1 checks for the XML ones).
REDIRECT_SIGNATURES: dict[str, hashes.HashAlgorithm] = {
    xmldsig.SIG_RSA_SHA256: hashes.SHA256(), xmldsig.SIG_RSA_SHA384: hashes.SHA384(),
    xmldsig.SIG_RSA_SHA512: hashes.SHA512()}
# The replay cache keeps an assertion id at least this long when it says nothing sooner.
DEFAULT_ASSERTION_LIFETIME = 300.0


@dataclass(frozen=True)
class Refused:
    """Why a message was not accepted, for the audit trail (the user sees "denied")."""

    reason: str


@dataclass(frozen=True)
class OutgoingMessage:
    """What the browser must do to carry a SAML request to the IdP: GET `url`, or POST
    `form` to it (HTTP-POST binding)."""

    request_id: str
    url: str
    form: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Asserted:
    """What a verified assertion says, as the IdP sent it (names not yet mapped)."""

    issuer: str
    assertion_id: str
    name_id: str
    name_id_format: str | None
    session_index: str | None
    attributes: Mapping[str, tuple[str, ...]]
    # Until when the assertion could be presented (epoch seconds): the replay cache
    # must remember its id that long.
    valid_until: float
    encrypted: bool


@dataclass(frozen=True)
class SamlMessage:
    """A message that passed the gate: its bytes, for pysaml2, and defusedxml's tree."""

    xml: bytes
    root: ElementTree.Element


@dataclass(frozen=True)
class LogoutOrder:
    """The IdP's LogoutRequest: end the sessions of `name_id` (those with one of
    `session_indexes`, or all when there is none), then answer `logout_response`."""

    request_id: str
    name_id: str
    session_indexes: tuple[str, ...]
    relay_state: str


def read_saml_message(encoded: str, max_bytes: int, roots: tuple[str, ...],
                      *, deflated: bool = False) -> SamlMessage | Refused:
    """A base64 SAML message (deflated too, for HTTP-Redirect), measured before it is
    decoded, then parsed once (`parse_saml_xml`)."""
    # base64 is 4 characters per 3 bytes; the deflated form is no larger than max_bytes.
    if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:
        return Refused(f"message of {len(encoded)} base64 characters is larger than "
                       f"{max_bytes} bytes: refused before decoding")
    try:
        raw = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        return Refused("message is not base64")
    if deflated:
        inflater = zlib.decompressobj(-15)
        try:
            raw = inflater.decompress(raw, max_bytes + 1)
        except zlib.error:
            return Refused("message is not deflated (HTTP-Redirect binding)")
    if len(raw) > max_bytes:
        return Refused(f"message is larger than {max_bytes} bytes: refused before parsing")
    return parse_saml_xml(raw, roots)


def parse_saml_xml(raw: bytes, roots: tuple[str, ...]) -> SamlMessage | Refused:
    """The one parse before pysaml2's: defusedxml, no DTD, a root among `roots` (Clark
    names), no SHA-1 signature or digest anywhere."""
    try:
        root = defusedxml.ElementTree.fromstring(raw, forbid_dtd=True, forbid_entities=True,
                                                 forbid_external=True)
    except defusedxml.DTDForbidden:
        return Refused("message has a DTD (document type declaration): refused unexpanded")
    except defusedxml.EntitiesForbidden:
        return Refused("message declares XML entities: refused unexpanded")
    except defusedxml.ExternalReferenceForbidden:
        return Refused("message refers to an external resource: refused unfetched")
    except (ElementTree.ParseError, defusedxml.DefusedXmlException, UnicodeError):
        return Refused("message is not well-formed XML")
    if root.tag not in roots:
        return Refused(f"message is a {root.tag}, not one of {', '.join(roots)}")
    for method in (*root.iter(f"{{{DS}}}SignatureMethod"), *root.iter(f"{{{DS}}}DigestMethod")):
        if method.get("Algorithm") in WEAK_ALGORITHMS:
            return Refused(f"signed with {method.get('Algorithm')}: SHA-1 is refused; have "
                           "the IdP sign with SHA-256")
    return SamlMessage(raw, root)


def ensure_key_pair(cert_path: Path, key_path: Path, common_name: str) -> tuple[Path, Path]:
    """The SP's key pair at these paths, made (RSA, self-signed) if neither exists yet.
    Another node making it at the same moment wins; its pair is used."""
    if not cert_path.exists() and not key_path.exists():
        with contextlib.suppress(PKIError):
            write_pair(cert_path.parent, cert_path.stem, create_signing_pair(common_name))
    load_pair(cert_path, key_path)     # the pair must match, whoever wrote it
    return cert_path, key_path


def checked_metadata(data: bytes, source: str) -> str:
    """IdP metadata after the same gate as a message: size, one defusedxml parse without
    DTDs, an EntityDescriptor or EntitiesDescriptor root."""
    if len(data) > MAX_METADATA_BYTES:
        raise ConfigError(f"IdP metadata from {source} is larger than {MAX_METADATA_BYTES} "
                          "bytes; give the one IdP's metadata, not a federation aggregate")
    checked = parse_saml_xml(data, (f"{{{MD}}}EntityDescriptor",
                                    f"{{{MD}}}EntitiesDescriptor"))
    if isinstance(checked, Refused):
        raise ConfigError(f"IdP metadata from {source}: {checked.reason}")
    return checked.xml.decode("utf-8")


async def fetch_metadata(url: str, dialer: Dialer, tls: ssl.SSLContext) -> str:
    """The IdP's metadata from an https URL, through the node's Dialer, at most
    MAX_METADATA_BYTES read."""
    async with httpx.AsyncClient(transport=DialerTransport(dialer, tls),
                                 timeout=METADATA_FETCH_TIMEOUT) as client:
        try:
            async with client.stream("GET", url) as answer:
                if answer.status_code != 200:
                    raise ConfigError(f"IdP metadata {url}: HTTP {answer.status_code}")
                body = bytearray()
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_METADATA_BYTES:
                        break
        except httpx.HTTPError as exc:
            raise ConfigError(f"IdP metadata {url} cannot be fetched: {exc}") from None
    return checked_metadata(bytes(body), url)


class ServiceProvider:
    """One `[[auth.providers]]` of type saml: pysaml2's SP client for one IdP.

    Blocking (xmlsec1 runs as a subprocess): callers run `authn_request`, `accept` and
    the logout calls in a worker thread.
    """

    def __init__(self, settings: SamlProvider, *, entity_id: str, acs_url: str,
                 slo_url: str, cert_file: Path, key_file: Path, idp_metadata: str) -> None:
        self.settings = settings
        self.entity_id = entity_id
        self.acs_url = acs_url
        self.slo_url = slo_url
        key = f"auth.providers.{settings.name}"
        config = SPConfig()
        try:
            config.load({
                "entityid": entity_id,
                "xmlsec_binary": get_xmlsec_binary(["/usr/bin", "/usr/local/bin"]),
                "key_file": str(key_file),
                "cert_file": str(cert_file),
                "encryption_keypairs": [{"key_file": str(key_file),
                                         "cert_file": str(cert_file)}],
                "metadata": {"inline": [idp_metadata]},
                "accepted_time_diff": int(settings.clock_skew),
                "allow_unknown_attributes": True,
                "signing_algorithm": SIGNATURE_ALGORITHM,
                "digest_algorithm": DIGEST_ALGORITHM,
                "service": {"sp": {
                    "endpoints": {
                        "assertion_consumer_service": [(acs_url, BINDING_HTTP_POST)],
                        "single_logout_service": [(slo_url, BINDING_HTTP_REDIRECT)],
                    },
                    "authn_requests_signed": settings.sign_requests,
                    "logout_requests_signed": True,
                    "want_response_signed": settings.want_response_signed,
                    "want_assertions_signed": settings.want_assertions_signed,
                    "want_assertions_or_response_signed": True,
                    "allow_unsolicited": settings.allow_idp_initiated,
                    # Keys come from the IdP's metadata, never from the message.
                    "only_use_keys_in_metadata": True,
                }},
            })
        except Exception as exc:   # xmlsec1 missing, metadata pysaml2 will not take, ...
            raise ConfigError(f"the SAML provider cannot be set up: "
                              f"{type(exc).__name__}: {exc}", key=key) from None
        # Attribute names stay as the IdP sends them: the mapping is the administrator's
        # (presets for ADFS and Azure AD), not pysaml2's built-in renaming tables.
        config.attribute_converters = []
        self._client = Saml2Client(config)
        idps = list(self._client.metadata.identity_providers())
        if settings.idp_entity_id is not None:
            if settings.idp_entity_id not in idps:
                raise ConfigError(f"the IdP metadata does not describe {settings.idp_entity_id!r}"
                                  f" (it describes {', '.join(idps) or 'no IdP'})",
                                  key=f"{key}.idp_entity_id")
            self.idp_entity_id = settings.idp_entity_id
        elif len(idps) == 1:
            self.idp_entity_id = idps[0]
        else:
            raise ConfigError(f"the IdP metadata describes {len(idps)} IdPs; say which with "
                              "idp_entity_id", key=f"{key}.idp_entity_id")

    # -- sign-in ---------------------------------------------------------------------

    def authn_request(self, callback: str, relay: str) -> OutgoingMessage:
        """An AuthnRequest asking the IdP to POST its Response to `callback`."""
        binding = (BINDING_HTTP_REDIRECT if self.settings.binding == "redirect"
                   else BINDING_HTTP_POST)
        destination = self._idp_location("single_sign_on_service", binding)
        # HTTP-Redirect signs the query string; HTTP-POST signs the XML itself.
        sign = self.settings.sign_requests
        request_id, request = self._client.create_authn_request(
            destination, binding=BINDING_HTTP_POST, assertion_consumer_service_url=callback,
            sign=sign and binding == BINDING_HTTP_POST, sign_alg=SIGNATURE_ALGORITHM,
            digest_alg=DIGEST_ALGORITHM)
        return self._outgoing(request_id, str(request), destination, binding, relay, sign)

    def accept(self, saml_response: str, *, callback: str,
               request_id: str | None) -> Asserted | Refused:
        """Check an HTTP-POST Response: `callback` is where it must have been sent,
        `request_id` the AuthnRequest it must answer (None: an IdP-initiated one)."""
        settings = self.settings
        message = read_saml_message(saml_response, settings.max_response_bytes,
                                    (f"{{{SAMLP}}}Response",))
        if isinstance(message, Refused):
            return message
        encrypted = message.root.find(f"{{{SAML}}}EncryptedAssertion") is not None
        if settings.require_encrypted_assertions and not encrypted:
            return Refused("the assertion is not encrypted (require_encrypted_assertions)")
        if request_id is None and not settings.allow_idp_initiated:
            return Refused("unsolicited response (IdP-initiated sign-in is not allowed)")
        outstanding = {request_id: callback} if request_id else {}
        try:
            # Not parse_authn_request_response: that one unwraps HTTP-POST itself (an
            # unbounded inflate), checks Destination against the configured ACS only (the
            # CLI's loopback callback differs) and keeps every user in a memory cache.
            response = self._client._parse_response(
                message.xml.decode("utf-8"), AuthnResponse, "assertion_consumer_service", None,
                outstanding_queries=outstanding, return_addrs=[callback],
                # Only an IdP-initiated answer (allowed, or refused above) is unsolicited:
                # an answer to our request is checked against it, whatever the setting.
                allow_unsolicited=request_id is None,
                want_assertions_signed=settings.want_assertions_signed,
                want_response_signed=settings.want_response_signed,
                want_assertions_or_response_signed=True,
                entity_id=self.entity_id, attribute_converters=[],
                allow_unknown_attributes=True,
                # Any non-empty conversation makes pysaml2 check Recipient against the
                # return addresses only.
                conv_info={"callback": callback})
        except Exception as exc:   # pysaml2 raises bare Exceptions for several rules
            return Refused(_refusal(exc))
        if response is None:
            return Refused("not a SAML Response")
        return self._asserted(response, callback, request_id, encrypted, time.time())

    def _asserted(self, response: Any, callback: str, request_id: str | None,
                  encrypted: bool, now: float) -> Asserted | Refused:
        message = response.response
        # pysaml2 returns a Response whose assertion it silently skipped when Destination
        # or InResponseTo did not match: each is checked here, with its reason.
        if message.destination != callback:
            return Refused(f"Destination {message.destination!r} is not this ACS {callback!r}")
        issuer = (message.issuer.text or "").strip() if message.issuer is not None else ""
        if issuer != self.idp_entity_id:
            return Refused(f"Issuer {issuer!r} is not the IdP {self.idp_entity_id!r}")
        if message.in_response_to != request_id:
            return Refused(f"InResponseTo {message.in_response_to!r} does not answer this "
                           "sign-in's request")
        if len(response.assertions) != 1 or response.assertion is None:
            return Refused(f"{len(response.assertions)} assertions; exactly one is accepted")
        assertion = response.assertion
        weak = _weak_algorithm(assertion.signature)
        if weak is not None:
            # The gate read only the outer document; an encrypted assertion's own
            # signature is seen here, decrypted.
            return Refused(f"the assertion is signed with {weak}: SHA-1 is refused; have the "
                           "IdP sign with SHA-256")
        assertion_issuer = (assertion.issuer.text or "").strip() if assertion.issuer else ""
        if assertion_issuer != self.idp_entity_id:
            return Refused(f"assertion Issuer {assertion_issuer!r} is not the IdP")
        name_id = response.name_id
        if name_id is None or not (name_id.text or "").strip():
            return Refused("the assertion names no subject (no NameID)")
        info = response.session_info()
        # The earliest of the Conditions' and the bearer confirmation's NotOnOrAfter; the
        # replay cache keeps the id until then (plus the skew).
        limits = [float(response.not_on_or_after)] if response.not_on_or_after else []
        for confirmation in assertion.subject.subject_confirmation:
            data = confirmation.subject_confirmation_data
            if data is None:
                continue
            if data.in_response_to != request_id:
                return Refused(f"the subject confirmation's InResponseTo "
                               f"{data.in_response_to!r} does not answer this sign-in's request")
            if data.not_on_or_after:
                limits.append(_epoch(data.not_on_or_after))
        valid_until = min(limits) if limits else now + DEFAULT_ASSERTION_LIFETIME
        attributes = {name: tuple(str(value) for value in values)
                      for name, values in (info.get("ava") or {}).items()}
        return Asserted(issuer=issuer, assertion_id=assertion.id, name_id=name_id.text.strip(),
                        name_id_format=name_id.format, session_index=info.get("session_index"),
                        attributes=attributes, valid_until=valid_until, encrypted=encrypted)

    # -- metadata ---------------------------------------------------------------------

    def metadata(self) -> bytes:
        """The SP's metadata: entity id, ACS (HTTP-POST), SLO, the signing and encryption
        certificate."""
        return create_metadata_string(None, self._client.config, sign=False)  # type: ignore[no-any-return]

    # -- single logout ------------------------------------------------------------------

    def logout_request(self, name_id: str, name_id_format: str | None,
                       session_index: str | None, relay: str) -> OutgoingMessage:
        """A signed LogoutRequest (HTTP-Redirect) ending the IdP's session of this user."""
        destination = self._idp_location("single_logout_service", BINDING_HTTP_REDIRECT)
        request_id, request = self._client.create_logout_request(
            destination, self.idp_entity_id,
            name_id=NameID(text=name_id, format=name_id_format),
            session_indexes=[session_index] if session_index else None, sign=False)
        return self._outgoing(request_id, str(request), destination, BINDING_HTTP_REDIRECT,
                              relay, True)

    def accept_logout_response(self, query: str, *, request_id: str) -> Refused | None:
        """Check the IdP's LogoutResponse to our LogoutRequest `request_id`, from the raw
        query string of the HTTP-Redirect that brought it (its signature is required)."""
        fields = self._signed_redirect(query, "SAMLResponse")
        if isinstance(fields, Refused):
            return fields
        checked = read_saml_message(fields["SAMLResponse"], MAX_LOGOUT_BYTES,
                                    (f"{{{SAMLP}}}LogoutResponse",), deflated=True)
        if isinstance(checked, Refused):
            return checked
        try:
            response = self._client._parse_response(
                checked.xml.decode("utf-8"), LogoutResponse, "single_logout_service", None,
                return_addrs=[self.slo_url])
            if response is None or response.response is None:
                return Refused("not a LogoutResponse")
            response.status_ok()
        except Exception as exc:
            return Refused(_refusal(exc))
        message = response.response
        refused = self._from_idp(message)
        if refused is not None:
            return refused
        if message.in_response_to != request_id:
            return Refused(f"InResponseTo {message.in_response_to!r} is not our LogoutRequest")
        return None

    def accept_logout_request(self, query: str) -> LogoutOrder | Refused:
        """Check a LogoutRequest the IdP sends (IdP-initiated single logout), from the raw
        query string of its HTTP-Redirect (its signature is required)."""
        fields = self._signed_redirect(query, "SAMLRequest")
        if isinstance(fields, Refused):
            return fields
        checked = read_saml_message(fields["SAMLRequest"], MAX_LOGOUT_BYTES,
                                    (f"{{{SAMLP}}}LogoutRequest",), deflated=True)
        if isinstance(checked, Refused):
            return checked
        try:
            request = self._client.parse_logout_request(checked.xml.decode("utf-8"), None)
        except Exception as exc:
            return Refused(_refusal(exc))
        if request is None:
            return Refused("not a LogoutRequest")
        message = request.message
        refused = self._from_idp(message)
        if refused is not None:
            return refused
        if message.not_on_or_after and _epoch(message.not_on_or_after) \
                + self.settings.clock_skew < time.time():
            return Refused(f"the LogoutRequest expired at {message.not_on_or_after}")
        if message.name_id is None or not (message.name_id.text or "").strip():
            return Refused("the LogoutRequest names no subject (no NameID)")
        return LogoutOrder(request_id=message.id, name_id=message.name_id.text.strip(),
                           session_indexes=tuple((index.text or "").strip()
                                                 for index in message.session_index),
                           relay_state=unquote_plus(fields.get("RelayState", "")))

    def logout_response(self, order: LogoutOrder) -> OutgoingMessage:
        """The signed LogoutResponse (HTTP-Redirect) telling the IdP its order was done."""
        asked = samlp.LogoutRequest(id=order.request_id,
                                    issuer=saml.Issuer(text=self.idp_entity_id))
        response = self._client.create_logout_response(asked, [BINDING_HTTP_REDIRECT],
                                                       sign=False)
        info = self._client.apply_binding(BINDING_HTTP_REDIRECT, str(response),
                                          response.destination, order.relay_state,
                                          response=True, sign=True, sigalg=SIGNATURE_ALGORITHM)
        return OutgoingMessage(response.id, dict(info["headers"])["Location"])

    # -- shared --------------------------------------------------------------------------

    def _from_idp(self, message: Any) -> Refused | None:
        issuer = (message.issuer.text or "").strip() if message.issuer is not None else ""
        if issuer != self.idp_entity_id:
            return Refused(f"Issuer {issuer!r} is not the IdP {self.idp_entity_id!r}")
        if message.destination != self.slo_url:
            return Refused(f"Destination {message.destination!r} is not this SLO {self.slo_url!r}")
        return None

    def _signed_redirect(self, query: str, kind: str) -> dict[str, str] | Refused:
        """The fields of an HTTP-Redirect message whose signature (SAML bindings 3.4.4.1:
        over the query string as it came, `kind`, RelayState, SigAlg in that order) the
        IdP metadata's signing certificate verifies; values are still URL-encoded."""
        if len(query) > MAX_LOGOUT_BYTES * 2:
            return Refused("the query string is too long: refused before decoding")
        fields: dict[str, str] = {}
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name in fields:
                return Refused(f"{name} appears twice in the query string")
            fields[name] = value
        if kind not in fields or "Signature" not in fields or "SigAlg" not in fields:
            return Refused(f"the redirect carries no signed {kind}")
        algorithm = REDIRECT_SIGNATURES.get(unquote_plus(fields["SigAlg"]))
        if algorithm is None:
            return Refused(f"signature algorithm {unquote_plus(fields['SigAlg'])!r} is refused")
        signed = "&".join(f"{name}={fields[name]}" for name in (kind, "RelayState", "SigAlg")
                          if name in fields).encode("ascii", "replace")
        try:
            signature = base64.b64decode(unquote_plus(fields["Signature"]), validate=True)
        except (binascii.Error, ValueError):
            return Refused("the redirect's Signature is not base64")
        for _, text in self._client.metadata.certs(self.idp_entity_id, "idpsso", "signing"):
            key = x509.load_der_x509_certificate(base64.b64decode(text)).public_key()
            if not isinstance(key, rsa.RSAPublicKey):
                continue
            try:
                key.verify(signature, signed, padding.PKCS1v15(), algorithm)
            except InvalidSignature:
                continue
            fields[kind] = unquote_plus(fields[kind])
            return fields
        return Refused("the redirect's signature does not verify with the IdP metadata's "
                       "certificates")

    def _idp_location(self, service: str, binding: str) -> str:
        locations = getattr(self._client.metadata, service)(self.idp_entity_id, binding,
                                                            "idpsso")
        if not locations:
            raise ConfigError(f"the IdP metadata has no {service} for {binding}",
                              key=f"auth.providers.{self.settings.name}")
        return str(locations[0]["location"])

    def _outgoing(self, request_id: str, xml: str, destination: str, binding: str,
                  relay: str, sign: bool) -> OutgoingMessage:
        if binding == BINDING_HTTP_POST:
            return OutgoingMessage(request_id, destination, {
                "SAMLRequest": base64.b64encode(xml.encode()).decode(), "RelayState": relay})
        info = self._client.apply_binding(BINDING_HTTP_REDIRECT, xml, destination, relay,
                                          sign=sign, sigalg=SIGNATURE_ALGORITHM)
        location = dict(info["headers"])["Location"]
        return OutgoingMessage(request_id, location)


class ServiceProviderSource:
    """The `ServiceProvider` of one provider, built on first use (the key pair made if
    needed, the metadata read or fetched) and rebuilt when fetched metadata is older
    than `idp_metadata_max_age`; a failed refetch keeps the one there is."""

    def __init__(self, settings: SamlProvider, *, public_url: str, pki_dir: Path,
                 resolve: Callable[[str], Path], dialer: Dialer | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        name = settings.name
        self.entity_id = settings.entity_id or f"{public_url}/saml/{name}"
        self.acs_url = f"{public_url}/login/callback/{name}"
        self.slo_url = f"{public_url}/saml/{name}/slo"
        self._pki_dir = pki_dir
        self._resolve = resolve
        self._dialer = dialer
        self._clock = clock
        self._current: ServiceProvider | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> ServiceProvider:
        async with self._lock:
            stale = (self.settings.idp_metadata_url is not None and self._clock()
                     - self._fetched_at > self.settings.idp_metadata_max_age)
            if self._current is None or stale:
                try:
                    metadata = await self._metadata()
                    self._current = await asyncio.to_thread(self._build, metadata)
                    self._fetched_at = self._clock()
                except ConfigError as exc:
                    if self._current is None:
                        raise
                    log.warning("IdP metadata not refreshed; the previous one stays",
                                provider=self.settings.name, error=str(exc))
                    self._fetched_at = self._clock()
            return self._current

    async def _metadata(self) -> str:
        settings = self.settings
        if settings.idp_metadata_url is not None:
            if self._dialer is None:
                raise ConfigError("fetching IdP metadata needs the node's Dialer",
                                  key=f"auth.providers.{settings.name}.idp_metadata_url")
            tls = ssl.create_default_context(cafile=str(self._resolve(
                settings.idp_metadata_ca_cert)) if settings.idp_metadata_ca_cert else None)
            return await fetch_metadata(settings.idp_metadata_url, self._dialer, tls)
        assert settings.idp_metadata_file is not None, "validated: one of file and URL"
        path = self._resolve(settings.idp_metadata_file)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}",
                              key=f"auth.providers.{settings.name}.idp_metadata_file") from None
        return checked_metadata(data, str(path))

    def _build(self, metadata: str) -> ServiceProvider:
        settings = self.settings
        try:
            if settings.sp_cert_file and settings.sp_key_file:
                cert = self._resolve(settings.sp_cert_file)
                key = self._resolve(settings.sp_key_file)
                load_pair(cert, key)
            else:
                cert, key = ensure_key_pair(self._pki_dir / f"saml-{settings.name}.crt",
                                            self._pki_dir / f"saml-{settings.name}.key",
                                            f"portcullis-saml-{settings.name}"[:64])
        except PKIError as exc:
            raise ConfigError(f"the SP key pair: {exc}",
                              key=f"auth.providers.{settings.name}.sp_cert_file") from None
        return ServiceProvider(settings, entity_id=self.entity_id, acs_url=self.acs_url,
                               slo_url=self.slo_url, cert_file=cert, key_file=key,
                               idp_metadata=metadata)


def _weak_algorithm(signature: Any) -> str | None:
    """The SHA-1 algorithm a parsed ds:Signature uses, if any."""
    info = signature.signed_info if signature is not None else None
    if info is None:
        return None
    methods = [info.signature_method.algorithm if info.signature_method else None,
               *(reference.digest_method.algorithm for reference in info.reference
                 if reference.digest_method is not None)]
    return next((method for method in methods if method in WEAK_ALGORITHMS), None)


def _epoch(timestamp: str) -> float:
    return float(calendar.timegm(str_to_time(timestamp)))


def _refusal(exc: Exception) -> str:
    """A pysaml2 failure as one line for the audit trail (never the message itself)."""
    detail: Any = exc.args[0] if exc.args else ""
    if isinstance(detail, dict):     # sigver's error contexts carry the whole document
        detail = detail.get("message", "")
        validators = exc.args[0].get("validators")
        if isinstance(validators, dict):
            detail += ": " + ", ".join(rule for rule, ok in validators.items() if not ok)
    text = " ".join(str(detail).split())[:200]
    kind = {"SignatureError": "signature", "SigverError": "signature",
            "MissingKey": "signature (no key in the IdP metadata for this issuer)",
            "CertificateError": "signature certificate",
            "UnsolicitedResponse": "unsolicited response",
            "ResponseLifetimeExceed": "expired", "ToEarly": "not yet valid",
            "DecryptError": "decryption", "InvalidAssertion": "assertion",
            "VerificationError": "verification", "XMLSchemaError": "schema",
            "Exception": "condition"}.get(
                type(exc).__name__, type(exc).__name__)
    if isinstance(exc, StatusError):
        kind = "the IdP answered an error status"
    return f"{kind}: {text}" if text else kind


ProviderLookup = Callable[[str], Awaitable[ServiceProvider | None]]


def metadata_endpoint(lookup: ProviderLookup) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint for `/saml/{provider}/metadata`: the SP metadata of the
    provider named in the path (404 for a name that is no SAML provider)."""

    async def metadata_xml(request: Request) -> Response:
        provider = await lookup(str(request.path_params["provider"]))
        if provider is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(provider.metadata(), media_type="application/samlmetadata+xml")

    return metadata_xml
