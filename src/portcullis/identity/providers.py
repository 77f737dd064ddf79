"""Builds the login flows of a deployment from `[auth]`: one client per provider (shared
by every flow), one factor per flow step (TOTP and lockout need the flow's realm)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import BaseModel

from portcullis.config.auth import (
    PRIMARY_TYPES,
    CertificateProvider,
    LdapProvider,
    LocalProvider,
    Provider,
    RadiusProvider,
    TotpProvider,
)
from portcullis.config.federation import OidcProvider, SamlProvider
from portcullis.config.linking import Linkable
from portcullis.config.model import Settings
from portcullis.errors import ConfigError
from portcullis.federation.oidc import Registration, RelyingParty
from portcullis.federation.saml import ServiceProviderSource
from portcullis.identity.claim_mapping import claim_map
from portcullis.identity.factors.certificate import CertificateFactor
from portcullis.identity.factors.ldap import LdapDirectory, LdapFactor
from portcullis.identity.factors.local import LocalPasswordFactor
from portcullis.identity.factors.oidc import OidcFactor
from portcullis.identity.factors.radius import RadiusFactor, RadiusServers
from portcullis.identity.factors.saml import SamlFactor
from portcullis.identity.factors.totp import TotpFactor
from portcullis.identity.flow import AnyFactor, LoginFlow
from portcullis.identity.linking import DirectoryLinkedFactor
from portcullis.identity.totp import TotpService
from portcullis.net.dialer import Dialer
from portcullis.net.httpdial import DialerTransport
from portcullis.net.tls import client_context
from portcullis.store import DurableStore, EphemeralStore
from portcullis.tokens import TokenHasher


@dataclass
class IdentityProviders:
    settings: Settings
    durable: DurableStore
    ephemeral: EphemeralStore
    hasher: TokenHasher
    # A dry run (`auth test`): recovery codes are checked, not used up.
    dry_run: bool = False
    # The node's one Dialer: RADIUS servers and OpenID providers are asked through it
    # (None: neither is used here).
    dialer: Dialer | None = None
    _clients: dict[str, object] = field(default_factory=dict)

    def _secret_file(self, provider: Provider, key: str, relative: str) -> str:
        index = self._index(provider)
        try:
            return self.settings.path(relative).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {self.settings.path(relative)}: {exc}",
                              key=f"auth.providers[{index}].{key}") from None

    def _index(self, provider: Provider) -> int | str:
        for index, declared in enumerate(self.settings.auth.providers):
            if declared.name == provider.name:
                return index
        return provider.name

    def _path(self, relative: str | None) -> str | None:
        return str(self.settings.path(relative)) if relative else None

    def totp(self, name: str = "totp") -> TotpService:
        provider = self.settings.auth.all_providers().get(name)
        if not isinstance(provider, TotpProvider):
            raise ConfigError(f"there is no TOTP provider named {name!r}", key="auth.providers")
        service = self._clients.get(name)
        if not isinstance(service, TotpService):
            service = TotpService(provider, self.durable, self.ephemeral, self.hasher,
                                  spend_recovery_codes=not self.dry_run)
            self._clients[name] = service
        return service

    def flow_totp(self) -> TotpService:
        """The TOTP of the default flow (its first TOTP step's provider), for users who
        replace their app: the secret must suit the step that will check it."""
        auth = self.settings.auth
        providers = auth.all_providers()
        name = next((step.provider for step in auth.flow_named(auth.flow).steps
                     if providers[step.provider].type == "totp"), "totp")
        return self.totp(name)

    def directory(self, name: str) -> LdapDirectory:
        """The directory of the ldap provider `name` (one per provider, shared)."""
        provider = self.settings.auth.all_providers().get(name)
        if not isinstance(provider, LdapProvider):
            raise ConfigError(f"there is no ldap provider named {name!r}", key="auth.providers")
        directory = self._clients.get(name)
        if not isinstance(directory, LdapDirectory):
            password = self._secret_file(provider, "bind_password_file",
                                         provider.bind_password_file)
            directory = LdapDirectory(provider, password, self._path(provider.ca_cert))
            self._clients[name] = directory
        return directory

    def factor(self, provider: Provider, realm: str) -> AnyFactor:
        return self.linked(provider, self._factor(provider, realm))

    def linked(self, provider: BaseModel, factor: AnyFactor) -> AnyFactor:
        """`factor`, its identities linked to their directory accounts if `provider` has
        a `link` (config/linking.py)."""
        if isinstance(provider, Linkable) and provider.link is not None:
            return DirectoryLinkedFactor(factor, provider.link,
                                         self.directory(provider.link.directory))
        return factor

    def _factor(self, provider: Provider, realm: str) -> AnyFactor:
        if isinstance(provider, LocalProvider):
            return LocalPasswordFactor(provider.name, self.durable)
        if isinstance(provider, LdapProvider):
            return LdapFactor(provider.name, self.directory(provider.name))
        if isinstance(provider, RadiusProvider):
            servers = self._clients.get(provider.name)
            if not isinstance(servers, RadiusServers):
                assert self.dialer is not None, "whoever reads RADIUS flows passes a Dialer"
                secret = self._secret_file(provider, "secret_file", provider.secret_file)
                servers = RadiusServers(provider, secret.encode(), self.dialer)
                self._clients[provider.name] = servers
            return RadiusFactor(provider.name, servers)
        if isinstance(provider, TotpProvider):
            primaries = frozenset(p.name for p in self.settings.auth.all_providers().values()
                                  if p.type in PRIMARY_TYPES)
            return TotpFactor(provider.name, self.totp(provider.name), realm, primaries,
                              enrolment_code=self.settings.auth.totp.enrolment == "code")
        if isinstance(provider, OidcProvider):
            # A redirect factor: identity.flow's redirect step kind runs it.
            return OidcFactor(provider.name, self.relying_party(provider.name),
                              claim_map(provider), tuple(provider.required_claims),
                              provider.preset, device_grant=provider.device_grant)
        if isinstance(provider, SamlProvider):
            return SamlFactor(provider, self.saml(provider), self.ephemeral)
        assert isinstance(provider, CertificateProvider)
        return CertificateFactor(provider)

    def relying_party(self, name: str) -> RelyingParty:
        """The gateway as a client of the OpenID provider `name` (one per provider,
        shared: its discovery document and keys are cached)."""
        provider = self.settings.auth.all_providers().get(name)
        if not isinstance(provider, OidcProvider):
            raise ConfigError(f"there is no oidc provider named {name!r}", key="auth.providers")
        party = self._clients.get(name)
        if not isinstance(party, RelyingParty):
            assert self.dialer is not None, "whoever reads OIDC flows passes a Dialer"
            secret = (self._secret_file(provider, "client_secret_file",
                                        provider.client_secret_file)
                      if provider.client_secret_file else None)
            ca = self.settings.path(provider.ca_cert) if provider.ca_cert else None
            http = httpx.AsyncClient(
                transport=DialerTransport(self.dialer, client_context(ca)),
                timeout=provider.timeout)
            extra = dict(provider.extra_params)
            if provider.prompt:
                extra["prompt"] = provider.prompt
            party = RelyingParty(Registration(
                issuer=provider.issuer, client_id=provider.client_id, client_secret=secret,
                client_auth=provider.client_auth, scopes=tuple(provider.scopes),
                algorithms=tuple(provider.algorithms), clock_skew=provider.clock_skew,
                userinfo=provider.userinfo, extra_params=extra,
                jwks_refetch_interval=provider.jwks_refetch_interval), http)
            self._clients[name] = party
        return party

    async def close(self) -> None:
        """Close the connections kept to OpenID providers."""
        for client in self._clients.values():
            if isinstance(client, RelyingParty):
                await client.close()

    def saml(self, provider: SamlProvider) -> ServiceProviderSource:
        """The SAML service provider of `provider` (one per provider, shared; also what
        serves its metadata)."""
        source = self._clients.get(provider.name)
        if not isinstance(source, ServiceProviderSource):
            source = ServiceProviderSource(
                provider, public_url=self.settings.gateway.public_url,
                pki_dir=self.settings.path(self.settings.tls.directory),
                resolve=self.settings.path, dialer=self.dialer)
            self._clients[provider.name] = source
        return source

    def flow(self, name: str | None = None) -> LoginFlow:
        auth = self.settings.auth
        definition = auth.flow_named(name or auth.flow)
        realm = auth.realm_of(definition)
        assert realm is not None, "validated when the configuration was read"
        providers = auth.all_providers()
        factors = {step.provider: self.factor(providers[step.provider], realm)
                   for step in definition.steps}
        return LoginFlow(definition, realm, factors)


def client_ca_path(settings: Settings) -> Path | None:
    return settings.path(settings.auth.client_ca) if settings.auth.client_ca else None
