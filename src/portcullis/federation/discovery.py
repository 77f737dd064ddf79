"""OpenID Connect discovery: where a provider's endpoints and keys are.

The document is taken only from the configured issuer, and only if it names that issuer
exactly (OpenID Connect Discovery 1.0 section 4.3): a provider cannot speak for another
one, and a typo in the configuration (a missing or extra "/") is caught at the first
sign-in with a message that shows both spellings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from portcullis.errors import FederationError

WELL_KNOWN = "/.well-known/openid-configuration"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
OPTIONAL_ENDPOINTS = ("userinfo_endpoint", "device_authorization_endpoint")


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    # RFC 8628: where a device authorization begins; None if the provider offers none.
    device_authorization_endpoint: str | None
    # RFC 9207: the provider puts `iss` into its authorization responses, so an answer
    # from another provider (a mix-up attack) is told apart.
    issuer_in_response: bool


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + WELL_KNOWN


def endpoint_problem(url: str, issuer: str) -> str | None:
    """Why `url` cannot be an endpoint of `issuer`, or None. https only, except that a
    loopback issuer (a lab, the tests) may use http on loopback hosts."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return None
    if (parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS
            and urlsplit(issuer).hostname in LOOPBACK_HOSTS):
        return None
    return f"{url!r} is not an https URL"


def parse_metadata(document: dict[str, Any], issuer: str) -> ProviderMetadata:
    """The endpoints of a discovery document, checked; FederationError says what is
    wrong with it, for the administrator."""
    where = discovery_url(issuer)
    named = document.get("issuer")
    if named != issuer:
        raise FederationError(f"the discovery document at {where} names the issuer "
                              f"{named!r}, not the configured {issuer!r}: they must be "
                              "equal, character for character", unavailable=True)
    endpoints: dict[str, str | None] = {}
    for key in ("authorization_endpoint", "token_endpoint", "jwks_uri", "userinfo_endpoint",
                "device_authorization_endpoint"):
        value = document.get(key)
        if value is None and key in OPTIONAL_ENDPOINTS:
            endpoints[key] = None
            continue
        problem = (f"{key} is missing" if value is None
                   else f"{key} is not a string" if not isinstance(value, str)
                   else endpoint_problem(value, issuer))
        if problem:
            raise FederationError(f"the discovery document at {where}: {problem}",
                                  unavailable=True)
        endpoints[key] = value
    methods = document.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        raise FederationError(f"the provider at {issuer} does not offer PKCE with S256 "
                              f"(code_challenge_methods_supported: {methods})",
                              unavailable=True)
    return ProviderMetadata(
        issuer=issuer,
        authorization_endpoint=str(endpoints["authorization_endpoint"]),
        token_endpoint=str(endpoints["token_endpoint"]),
        jwks_uri=str(endpoints["jwks_uri"]),
        userinfo_endpoint=endpoints["userinfo_endpoint"],
        device_authorization_endpoint=endpoints["device_authorization_endpoint"],
        issuer_in_response=document.get("authorization_response_iss_parameter_supported")
        is True)
