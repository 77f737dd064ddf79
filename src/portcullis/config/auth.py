"""The `[auth]` section: identity providers, login flows and their conditions, throttling.

A flow is a list of steps; each step names a provider and may carry a `when` condition
that decides, from what is known at that moment, whether the step applies. That is
enough for the flows organisations ask for:

    "RADIUS, then LDAP"          steps = [{provider="radius"}, {provider="corp"}]
    "company device → password;  steps = [{provider="totp", when={not={certificate="valid"}}},
     others TOTP, then password"          {provider="corp"}]
    "Finance always needs TOTP"  steps = [{provider="corp"},
                                          {provider="totp", when={groups=["finance"]}}]

Everything is checked when the file is read: unknown providers, an empty flow, a flow
whose steps can never establish who the user is, conditions that cannot be evaluated.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from portcullis.config.federation import OidcProvider, SamlProvider
from portcullis.config.linking import check_links
from portcullis.config.section import ProviderName
from portcullis.config.section import Section as _Section
from portcullis.config.values import check_networks, parse_host_port
from portcullis.errors import AuthError
from portcullis.identity.names import canonical_username


class Condition(_Section):
    """Every field that is set must hold. `any` holds when one of its conditions holds;
    `not` when its condition does not. An empty condition always holds."""

    # A certificate that does not verify against auth.client_ca ends the TLS handshake,
    # so a connection either has a valid one or none.
    certificate: Literal["valid", "absent"] | None = None
    certificate_issuer: str | None = None      # RFC 4514 issuer name, exactly
    certificate_subject: str | None = None     # regular expression, whole RFC 4514 subject
    client_address: list[str] | None = None    # networks (CIDR)
    groups: list[str] | None = None            # member of at least one
    users: list[str] | None = None             # the user is one of these
    passed: list[str] | None = None            # these providers have all been passed
    any: list[Condition] | None = None
    not_: Condition | None = Field(default=None, alias="not")

    @field_validator("client_address")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else check_networks(value)

    @field_validator("certificate_subject")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("users")
    @classmethod
    def _canonical(cls, value: list[str] | None) -> list[str] | None:
        try:
            return None if value is None else [canonical_username(name) for name in value]
        except AuthError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [group.casefold() for group in value]

    @field_validator("any")
    @classmethod
    def _nonempty_any(cls, value: list[Condition] | None) -> list[Condition] | None:
        if value is not None and not value:
            raise ValueError("'any' needs at least one condition")
        return value

    def _children(self) -> tuple[Condition, ...]:
        return (*(self.any or ()), *((self.not_,) if self.not_ else ()))

    def providers_named(self) -> set[str]:
        names = set(self.passed or ())
        for child in self._children():
            names |= child.providers_named()
        return names

    def reads_certificate(self) -> bool:
        return (self.certificate is not None or self.certificate_issuer is not None
                or self.certificate_subject is not None
                or any(child.reads_certificate() for child in self._children()))


def _passed_in(step: FlowStep) -> set[str]:
    return step.when.providers_named() if step.when else set()


class LocalProvider(_Section):
    """Accounts kept by Portcullis (`portcullis user add`), passwords hashed with argon2id."""

    type: Literal["local"]
    name: ProviderName


class LdapProvider(_Section):
    """An LDAP directory or Active Directory: find the user with a service account, then
    bind as the user with the password given."""

    type: Literal["ldap"]
    name: ProviderName
    # (Before `servers`, whose check reads them.) ldap:// URLs upgraded with StartTLS.
    start_tls: bool = False
    # Allow ldap:// without StartTLS (passwords in clear text): a warning at every start.
    insecure: bool = False
    # Tried in order; the next one when a server cannot be reached.
    servers: list[Annotated[str, Field(pattern=r"^ldaps?://[^/\s]+/?$")]] = Field(min_length=1)
    # CA certificate(s) that sign the directory's TLS certificate; default: the system's.
    ca_cert: str | None = None
    bind_dn: str
    bind_password_file: str
    base_dn: str
    # The user may sign in with any of these attributes' values.
    login_attributes: list[str] = Field(
        default_factory=lambda: ["sAMAccountName", "userPrincipalName", "mail"], min_length=1)
    user_object_class: str = "person"
    # What becomes the user name in Portcullis (and keys TOTP and lockout).
    username_attribute: str = "sAMAccountName"
    # Attributes without which a sign-in is refused and reported in the log.
    required_attributes: list[str] = Field(default_factory=list)
    # Also the groups the user's groups are members of (AD: LDAP_MATCHING_RULE_IN_CHAIN;
    # other directories: followed level by level).
    nested_groups: bool = False
    active_directory: bool = False
    timeout: float = Field(default=5.0, gt=0, le=60)
    pool_size: int = Field(default=4, ge=1, le=64)

    @field_validator("servers")
    @classmethod
    def _encrypted(cls, value: list[str], info: ValidationInfo) -> list[str]:
        clear = [url for url in value if url.lower().startswith("ldap://")]
        if clear and not info.data.get("start_tls") and not info.data.get("insecure"):
            raise ValueError(f"{clear[0]} would send passwords in clear text; use ldaps://, "
                             "set start_tls = true, or (a test lab only) insecure = true")
        return value

    @field_validator("login_attributes", "required_attributes")
    @classmethod
    def _attribute_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
                raise ValueError(f"{name!r} is not an LDAP attribute name")
        return value


class RadiusProvider(_Section):
    """A RADIUS server (PAP with Message-Authenticator); an Access-Challenge becomes the
    next prompt, as RSA and DUO proxies use it."""

    type: Literal["radius"]
    name: ProviderName
    servers: list[str] = Field(min_length=1)   # HOST:PORT, tried in order
    secret_file: str
    timeout: float = Field(default=3.0, gt=0, le=60)
    retries: int = Field(default=1, ge=0, le=5)
    nas_identifier: str = "portcullis"
    # Reply attribute whose values become groups.
    group_attribute: Literal["Class", "Filter-Id"] = "Class"

    @field_validator("servers")
    @classmethod
    def _servers(cls, value: list[str]) -> list[str]:
        for server in value:
            parse_host_port(server, what="RADIUS server")
        return value


class TotpProvider(_Section):
    """Time-based one-time passwords (RFC 6238) from an authenticator app."""

    type: Literal["totp"]
    name: ProviderName
    issuer: str = Field(default="Portcullis", min_length=1, max_length=64)
    digits: Literal[6, 8] = 6
    period: int = Field(default=30, ge=15, le=120)
    algorithm: Literal["sha1", "sha256", "sha512"] = "sha1"
    # Codes one step either side of now are accepted (clock drift).
    window: int = Field(default=1, ge=0, le=2)
    recovery_codes: int = Field(default=10, ge=0, le=20)


class CertificateProvider(_Section):
    """The client certificate presented to the gateway, as a factor of its own."""

    type: Literal["certificate"]
    name: ProviderName
    # Which part of the certificate names the user.
    username_from: Literal["common_name", "email"] = "common_name"


Provider = Annotated[
    LocalProvider | LdapProvider | RadiusProvider | TotpProvider | CertificateProvider
    | OidcProvider | SamlProvider,
    Field(discriminator="type")]

# Present unless the configuration declares a provider of the same name.
BUILT_IN_PROVIDERS: tuple[Provider, ...] = (
    LocalProvider(type="local", name="local"),
    TotpProvider(type="totp", name="totp"),
    CertificateProvider(type="certificate", name="certificate"),
)

# Providers that can tell who the user is (TOTP only confirms someone already named).
PRIMARY_TYPES = frozenset({"local", "ldap", "radius", "certificate", "oidc", "saml"})


class FlowStep(_Section):
    provider: ProviderName
    when: Condition | None = None


class Flow(_Section):
    name: ProviderName
    steps: list[FlowStep] = Field(min_length=1)
    # Whose namespace the user name belongs to: TOTP secrets and lockout counters are
    # kept per realm. Default: the first step's provider that can name a user.
    realm: ProviderName | None = None


class ThrottleSettings(_Section):
    # A failed sign-in step is answered no sooner than this many seconds after it arrived
    # (or the recent steps' 90th percentile, if longer), plus up to 20 %, so that its time
    # does not tell an unknown name, a wrong password and a locked account apart.
    failure_floor: float = Field(default=0.5, ge=0, le=10)
    # Consecutive failures after which an account is locked (NIST SP 800-63B allows at
    # most 100); a success resets the count.
    account_failures: int = Field(default=10, ge=1, le=100)
    lockout_seconds: float = Field(default=900.0, gt=0, le=86400)
    # Failures from one client address within `address_window` before it is refused.
    address_failures: int = Field(default=50, ge=1, le=100_000)
    address_window: float = Field(default=300.0, gt=0, le=86400)
    # Sign-ins in progress from one client address (generous: one NAT may hide many users).
    address_unfinished: int = Field(default=500, ge=1, le=100_000)


class TotpEnrolmentSettings(_Section):
    # "self": a user without a TOTP secret enrols their first authenticator app at sign-in,
    # once a password has said who they are. "code": only with a one-time enrolment code
    # an administrator issued (`portcullis user totp-code NAME`), so that a password alone
    # is not enough to bind an app to an account.
    enrolment: Literal["self", "code"] = "self"
    # How long an issued enrolment code can be used (seconds).
    code_lifetime: float = Field(default=259200.0, gt=0, le=30 * 86400)


class AuthSettings(_Section):
    # The flow every sign-in follows.
    flow: ProviderName = "default"
    providers: list[Provider] = Field(default_factory=list)
    flows: list[Flow] = Field(default_factory=lambda: [
        Flow(name="default", steps=[FlowStep(provider="local")])])
    # CA certificate(s) for optional client certificates at the gateway; unset: none asked.
    client_ca: str | None = None
    throttle: ThrottleSettings = Field(default_factory=ThrottleSettings)
    totp: TotpEnrolmentSettings = Field(default_factory=TotpEnrolmentSettings)
    # A signed-in user may set up a new authenticator app (replacing the old one) only
    # this many seconds after signing in, which bounds what a stolen session can do.
    recent_sign_in: float = Field(default=600.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _consistent(self) -> AuthSettings:
        declared = [provider.name for provider in self.providers]
        twice = {name for name in declared if declared.count(name) > 1}
        if twice:
            raise ValueError(f"provider name {sorted(twice)[0]!r} is used twice")
        known = self.all_providers()
        check_links(self.providers, known)
        flow_names = [flow.name for flow in self.flows]
        if self.flow not in flow_names:
            raise ValueError(f"auth.flow names {self.flow!r}, which auth.flows does not "
                             f"define (defined: {', '.join(flow_names)})")
        for index, flow in enumerate(self.flows):
            if flow_names.count(flow.name) > 1:
                raise ValueError(f"flow name {flow.name!r} is used twice")
            earlier: set[str] = set()
            for number, step in enumerate(flow.steps):
                where = f"auth.flows[{index}].steps[{number}]"
                unknown = sorted(({step.provider} | _passed_in(step)) - known.keys())
                if unknown:
                    raise ValueError(f"{where} names provider {unknown[0]!r}, which is not "
                                     f"defined (defined: {', '.join(sorted(known))})")
                later = sorted(_passed_in(step) - earlier)
                if later:
                    raise ValueError(f"{where}: passed names {later[0]!r}, which no earlier "
                                     "step of this flow runs (the condition could never hold)")
                uses_certificate = (isinstance(known[step.provider], CertificateProvider)
                                    or (step.when is not None and step.when.reads_certificate()))
                if uses_certificate and self.client_ca is None:
                    raise ValueError(f"{where} reads the client certificate, but "
                                     "auth.client_ca is not set (no certificate is asked for)")
                earlier.add(step.provider)
            if flow.realm is not None and flow.realm not in known:
                raise ValueError(f"auth.flows[{index}].realm names an unknown provider "
                                 f"{flow.realm!r}")
            if not any(known[step.provider].type in PRIMARY_TYPES for step in flow.steps):
                raise ValueError(f"flow {flow.name!r} has no step that can tell who the user "
                                 "is (local, ldap, radius, certificate, oidc or saml)")
        return self

    def all_providers(self) -> dict[str, Provider]:
        providers: dict[str, Provider] = {p.name: p for p in BUILT_IN_PROVIDERS}
        providers.update((p.name, p) for p in self.providers)
        return providers

    def flow_named(self, name: str) -> Flow:
        for flow in self.flows:
            if flow.name == name:
                return flow
        raise KeyError(name)

    def realm_of(self, flow: Flow) -> str | None:
        if flow.realm is not None:
            return flow.realm
        providers = self.all_providers()
        return next((step.provider for step in flow.steps
                     if providers[step.provider].type in PRIMARY_TYPES), None)
