"""The `[oidc]` section: the gateway as an OpenID Connect provider for other applications.

    [oidc]
    enabled = true

    [[oidc.clients]]
    id = "wiki"
    secret_file = "secrets/wiki.secret"       # left out: a public client (PKCE is required
                                              # of every client anyway)
    redirect_uris = ["https://wiki.example.com/oidc/callback"]
    groups = ["staff"]                        # users outside these groups are refused

The issuer is `gateway.public_url`. Redirect URIs are compared exactly, so they are
checked here to be URIs that can be compared that way: absolute, without a fragment,
https (plain http only on a loopback address, RFC 8252 §7.3).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# What a client may be granted; "openid" is always needed (this is an OpenID provider).
SCOPES = ("openid", "profile", "email", "groups")

ClientId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_redirect_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.fragment or "#" in uri:
        raise ValueError(f"{uri!r}: a redirect URI must not have a fragment")
    if not parts.netloc or parts.scheme not in ("https", "http"):
        raise ValueError(f"{uri!r} is not an absolute https:// URI")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname or "").is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"{uri!r}: plain http is allowed only to a loopback address "
                             "(127.0.0.1, [::1]); use https://")
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in uri):
        raise ValueError(f"{uri!r} contains spaces or control characters")
    return uri


class OidcClient(_Section):
    """One application that signs its users in through the gateway."""

    id: ClientId
    # A file holding the client secret. Left out: a public client (a single-page or
    # native application), which proves itself with PKCE alone.
    secret_file: str | None = None
    # Compared exactly, character by character: no prefixes, no wildcards.
    redirect_uris: list[str] = Field(min_length=1)
    # Where the application may send the browser after signing out (exact, too).
    post_logout_redirect_uris: list[str] = Field(default_factory=list)
    # Only members of these groups may use the application (exact names, as resources).
    groups: list[str] = Field(min_length=1)
    # What the application may ask for; it gets what it asked for among these.
    scopes: list[str] = Field(default_factory=lambda: list(SCOPES))

    @field_validator("redirect_uris", "post_logout_redirect_uris")
    @classmethod
    def _uris(cls, value: list[str]) -> list[str]:
        return [_check_redirect_uri(uri) for uri in value]

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
        if "openid" not in value:
            raise ValueError("must include 'openid'")
        return value

    @property
    def public(self) -> bool:
        return self.secret_file is None


class OidcSettings(_Section):
    enabled: bool = False
    # A new signing key is made this often; it is published a day before it signs, and
    # a retired key stays published for one more period, for tokens it signed.
    signing_key_rotation_days: int = Field(default=30, ge=2, le=365)
    # Seconds. An authorization code is redeemed within moments of being issued.
    code_lifetime: float = Field(default=30.0, gt=0, le=60)
    access_token_lifetime: float = Field(default=600.0, gt=0, le=3600)
    id_token_lifetime: float = Field(default=600.0, gt=0, le=3600)
    # Each use gives a new refresh token (the old one is spent); none outlives the
    # gateway session it came from, whatever this says.
    refresh_token_lifetime: float = Field(default=28800.0, gt=0, le=30 * 86400)
    clients: list[OidcClient] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> OidcSettings:
        seen: set[str] = set()
        for index, client in enumerate(self.clients):
            if client.id in seen:
                raise ValueError(f"oidc.clients[{index}].id: client id {client.id!r} "
                                 "is used twice")
            seen.add(client.id)
        if self.enabled and not self.clients:
            raise ValueError("oidc.clients: enabled, but no client is configured")
        return self

    def client(self, client_id: str) -> OidcClient | None:
        return next((c for c in self.clients if c.id == client_id), None)

