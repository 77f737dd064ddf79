"""Providers of federated sign-in: `[[auth.providers]]` with `type = "oidc"` (OpenID
Connect: Azure AD / Entra ID, Okta, any certified provider).

Which claims become the user's name and attributes is a preset (`azure`, `okta`,
`generic`) with per-key overrides in `claims`; the presets themselves live with the
mapping (`portcullis.identity.claim_mapping`).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from portcullis.config.linking import Linkable
from portcullis.config.section import ProviderName, Section

# The signature algorithms an ID token may use. HMAC (HS256...) is left out on purpose: its
# key is the client secret, and a verifier that takes a provider's public key as an HMAC
# key accepts tokens anyone can make.
SignatureAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                             "ES256", "ES384", "ES512", "EdDSA"]
DEFAULT_ALGORITHMS: list[SignatureAlgorithm] = ["RS256", "PS256", "ES256"]
AttributeName = Literal["email", "display_name", "upn", "sid", "guid", "groups"]
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# Authorization request parameters that the sign-in itself sets.
RESERVED_PARAMS = frozenset({"response_type", "client_id", "redirect_uri", "scope", "state",
                             "nonce", "code_challenge", "code_challenge_method", "prompt",
                             "request", "request_uri", "response_mode"})


def _names(value: Any) -> Any:
    """A claim name may be given alone or as a list of names tried in order."""
    return [value] if isinstance(value, str) else value


class ClaimNames(Section):
    """Which claims fill each attribute: the first of the names that the provider's answer
    has. Unset keys keep the preset's names; an empty list turns the attribute off."""

    email: list[str] | None = None
    display_name: list[str] | None = None
    upn: list[str] | None = None
    sid: list[str] | None = None
    guid: list[str] | None = None
    groups: list[str] | None = None

    _lists = field_validator("*", mode="before")(_names)


class OidcProvider(Section, Linkable):
    """An OpenID provider: the user signs in there, the gateway checks its ID token."""

    type: Literal["oidc"]
    name: ProviderName
    # Exactly as the provider's discovery document spells it (trailing "/" included).
    issuer: str
    client_id: str = Field(min_length=1, max_length=255)
    # Unset: a public client, which proves itself with PKCE only.
    client_secret_file: str | None = None
    client_auth: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    algorithms: list[SignatureAlgorithm] = Field(
        default_factory=lambda: list(DEFAULT_ALGORITHMS), min_length=1)
    # Seconds the gateway's and the provider's clocks may differ (exp, iat, nbf).
    clock_skew: float = Field(default=60.0, ge=0, le=600)
    preset: Literal["generic", "azure", "okta"] = "generic"
    claims: ClaimNames = Field(default_factory=ClaimNames)
    # The claims whose first present value becomes the user name; default: the preset's
    # (preferred_username, then email, then sub).
    username_claim: list[str] | None = None
    # Attributes without which a sign-in is refused (the audit says which one is missing).
    required_claims: list[AttributeName] = Field(default_factory=list)
    userinfo: bool = True
    prompt: Literal["login", "consent", "select_account", "none"] | None = None
    # More authorization request parameters (Azure: domain_hint; Okta: idp).
    extra_params: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=10.0, gt=0, le=60)
    # CA certificate(s) for the provider's TLS certificate; default: the system's.
    ca_cert: str | None = None
    # An ID token signed with a key the cached JWKS lacks refetches it at most this often.
    jwks_refetch_interval: float = Field(default=60.0, ge=1, le=3600)

    _username_list = field_validator("username_claim", mode="before")(_names)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.query or parts.fragment or not parts.hostname:
            raise ValueError(f"{value!r} is not an issuer URL (https://HOST[/PATH])")
        if parts.scheme == "https" or (parts.scheme == "http"
                                       and parts.hostname in LOOPBACK_HOSTS):
            return value
        raise ValueError(f"the issuer {value!r} must be an https URL (http only on "
                         "127.0.0.1, for a lab)")

    @field_validator("algorithms", mode="before")
    @classmethod
    def _no_hmac(cls, value: Any) -> Any:
        for alg in value if isinstance(value, list) else ():
            if isinstance(alg, str) and (alg.upper().startswith("HS") or alg.lower() == "none"):
                raise ValueError(f"{alg} is never accepted: an ID token must be signed with "
                                 "the provider's private key (RS256, PS256, ES256...)")
        return value

    @field_validator("scopes")
    @classmethod
    def _openid(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError("the scopes must include 'openid'")
        return value

    @field_validator("extra_params")
    @classmethod
    def _extra(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(RESERVED_PARAMS & value.keys())
        if reserved:
            raise ValueError(f"{reserved[0]!r} is set by the sign-in itself"
                             + (" (use the provider's 'prompt' key)"
                                if reserved[0] == "prompt" else ""))
        return value

    @model_validator(mode="after")
    def _secret(self) -> OidcProvider:
        if self.client_secret_file is None and "client_auth" in self.model_fields_set:
            raise ValueError("client_auth needs client_secret_file (a public client sends "
                             "no secret)")
        return self
