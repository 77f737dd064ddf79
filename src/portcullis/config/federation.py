"""Providers of federated sign-in: a SAML 2.0 identity provider (`type = "saml"`).

Checked when the file is read: where the IdP's metadata comes from (one file or one
https URL), which signatures are wanted, and which claim names become which of the
gateway's claims (a preset for ADFS, Azure AD / Entra ID or plain attribute names, each
name overridable).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# As config.auth's: that module imports this one for its Provider union.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
ProviderName = Annotated[str, Field(pattern=NAME_PATTERN)]
ClaimName = Annotated[str, Field(min_length=1, max_length=512)]

# The NameID of the assertion's Subject, where a claim name is expected.
NAME_ID = "nameid"



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SamlAttributeMap(_Section):
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


class SamlProvider(_Section):
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
    max_response_bytes: int = Field(default=256 * 1024, ge=4096, le=4 * 1024 * 1024)

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
