"""Providers of federated sign-in: `[[auth.providers]]` with `type = "oidc"` (OpenID
Connect: Azure AD / Entra ID, Okta, any certified provider) and `type = "saml"` (a SAML
2.0 identity provider: AD FS, Entra ID, Shibboleth, Keycloak...).

Which claims become the user's name and attributes is a preset (`azure`, `okta`,
`generic`) with per-key overrides in `claims`; the presets themselves live with the
mapping (`portcullis.identity.claim_mapping`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
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
    # Whether `portcullis login --device` may use the provider's device authorization
    # grant (RFC 8628) where it offers one. A device code can be phished (RFC 8628 5.4:
    # someone persuades a user to type their code): false where no one signs in from ssh.
    device_grant: bool = True
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


# --- SAML 2.0 ---------------------------------------------------------------------------

ClaimName = Annotated[str, Field(min_length=1, max_length=512)]

# The NameID of the assertion's Subject, where a claim name is expected.
NAME_ID = "nameid"
# The largest max_response_bytes: what the ACS route may ever have to take in.
MAX_SAML_RESPONSE = 4 * 1024 * 1024



class SamlAttributeMap(Section):
    """Which SAML attribute (its Name, as the IdP sends it) becomes which claim; unset:
    the preset's. `username` may be "nameid" (the Subject's NameID)."""

    username: ClaimName | None = None
    email: ClaimName | None = None
    display_name: ClaimName | None = None
    upn: ClaimName | None = None
    sid: ClaimName | None = None
    guid: ClaimName | None = None
    # Every value of every one of these attributes is a group.
    groups: list[ClaimName] | None = None


_MS = "http://schemas.microsoft.com"
_XMLSOAP = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims"
CLAIM_PRESETS: dict[str, SamlAttributeMap] = {
    # LDAP/AD attribute names, as Shibboleth, Keycloak or SimpleSAMLphp send them.
    "plain": SamlAttributeMap(
        username=NAME_ID, email="mail", display_name="displayName",
        upn="userPrincipalName", sid="objectSid", guid="objectGUID",
        groups=["groups", "memberOf"]),
    # AD FS claim rules' outgoing claim types ("Send LDAP Attributes as Claims").
    "adfs": SamlAttributeMap(
        username=NAME_ID, email=f"{_XMLSOAP}/emailaddress", display_name=f"{_XMLSOAP}/name",
        upn=f"{_XMLSOAP}/upn", sid=f"{_MS}/ws/2008/06/identity/claims/primarysid",
        guid=f"{_MS}/LiveID/Federation/2008/05/ImmutableID",
        groups=["http://schemas.xmlsoap.org/claims/Group",
                f"{_MS}/ws/2008/06/identity/claims/groups"]),
    # Azure AD / Entra ID enterprise application defaults; the SID is the claim an
    # administrator adds for user.onpremisessecurityidentifier under this name.
    "azure": SamlAttributeMap(
        username=NAME_ID, email=f"{_XMLSOAP}/emailaddress",
        display_name=f"{_MS}/identity/claims/displayname", upn=f"{_XMLSOAP}/name",
        sid=f"{_MS}/identity/claims/onpremisessecurityidentifier",
        guid=f"{_MS}/identity/claims/objectidentifier",
        groups=[f"{_MS}/ws/2008/06/identity/claims/groups"]),
}


class SamlProvider(Section, Linkable):
    """A SAML 2.0 identity provider; the gateway is its service provider (SP)."""

    type: Literal["saml"]
    name: ProviderName
    # The IdP's metadata: a file, or an https URL fetched through the node's Dialer.
    idp_metadata_file: str | None = None
    idp_metadata_url: Annotated[str, Field(pattern=r"^https://[^/\s]+(/\S*)?$")] | None = None
    # CA certificate(s) of the metadata URL's TLS certificate; default: the system's.
    idp_metadata_ca_cert: str | None = None
    # Seconds a fetched metadata document is used before it is fetched again.
    idp_metadata_max_age: float = Field(default=86400.0, ge=60, le=30 * 86400)
    # Which IdP of the metadata; needed only when it describes several.
    idp_entity_id: str | None = None
    # The SP's entity id; default "{gateway.public_url}/saml/{name}".
    entity_id: str | None = None
    # How the AuthnRequest reaches the IdP; the answer always comes by HTTP-POST.
    binding: Literal["redirect", "post"] = "redirect"
    sign_requests: bool = True
    # Which signature the IdP must make. Neither set: either one, as long as a signature
    # covers the assertion (a signed Response covers the assertions inside it).
    want_response_signed: bool = False
    want_assertions_signed: bool = False
    # Refuse assertions sent in clear (encrypted ones are always decrypted with the SP key).
    require_encrypted_assertions: bool = False
    # Accept responses no AuthnRequest of ours asked for (sign-in started at the IdP).
    allow_idp_initiated: bool = False
    # Seconds of clock difference tolerated for NotBefore / NotOnOrAfter / IssueInstant.
    clock_skew: float = Field(default=60.0, ge=0, le=600)
    # The SP's signing and decryption key pair; default: made on first use as
    # {tls.directory}/saml-{name}.crt and .key (RSA, self-signed, as SAML metadata has).
    sp_cert_file: str | None = None
    sp_key_file: str | None = None
    claims: Literal["plain", "adfs", "azure"] = "plain"
    attributes: SamlAttributeMap = Field(default_factory=SamlAttributeMap)
    # Claims without which a sign-in is refused (and the administrator told why).
    required_attributes: list[Literal["email", "display_name", "upn", "sid", "guid",
                                      "groups"]] = Field(default_factory=list)
    # Bytes of the decoded SAMLResponse accepted; anything larger is refused unparsed.
    max_response_bytes: int = Field(default=256 * 1024, ge=4096, le=MAX_SAML_RESPONSE)

    @model_validator(mode="after")
    def _consistent(self) -> SamlProvider:
        if (self.idp_metadata_file is None) == (self.idp_metadata_url is None):
            raise ValueError("set exactly one of idp_metadata_file and idp_metadata_url")
        if (self.sp_cert_file is None) != (self.sp_key_file is None):
            raise ValueError("set both sp_cert_file and sp_key_file, or neither (then a key "
                             "pair is made on first use)")
        if self.idp_metadata_ca_cert is not None and self.idp_metadata_url is None:
            raise ValueError("idp_metadata_ca_cert is only for idp_metadata_url")
        return self

    def attribute_map(self) -> SamlAttributeMap:
        """The preset with this provider's own names put over it."""
        preset = CLAIM_PRESETS[self.claims]
        return preset.model_copy(update=self.attributes.model_dump(exclude_none=True))
