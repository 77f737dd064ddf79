"""A SAML 2.0 identity provider as a sign-in step: the browser goes to the IdP with an
AuthnRequest and comes back to the ACS (`/login/callback/{provider}`) with a Response.

The protocol is `portcullis.federation.saml`'s; this factor keeps what the answer must
match in the flow's sealed state (the request id, the callback URL), refuses an
assertion seen before (its id is kept in the ephemeral store, cluster-wide on Redis,
until it expires), and maps the IdP's attribute names to the claim set.

Rules: the user name is the full text of the NameID (or of the attribute configured),
in canonical form, or the sign-in is refused; a required claim that is missing refuses
the sign-in with a message for the administrator; the reason goes to the audit trail,
the user sees "denied".
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from portcullis.config.federation import NAME_ID, SamlAttributeMap, SamlProvider
from portcullis.errors import AuthError, ConfigError
from portcullis.federation.saml import Asserted, ServiceProviderSource
from portcullis.federation.saml import Refused as ResponseRefused
from portcullis.identity.claims import Attributes, SamlSubject
from portcullis.identity.conditions import LoginContext
from portcullis.identity.flow import (
    Attempt,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Redirect,
    Refused,
    Unavailable,
)
from portcullis.identity.names import canonical_username
from portcullis.store import EphemeralStore

REPLAY_NAMESPACE = "saml-assertion"
# What verify() needs, kept in the flow's sealed state by redirect().
REQUEST_ID = "saml_request_id"
CALLBACK = "saml_callback"


@dataclass(frozen=True)
class MappedIdentity:
    username: str | None
    attributes: Attributes
    missing: tuple[str, ...]


def map_assertion(asserted: Asserted, names: SamlAttributeMap,
                  required: tuple[str, ...]) -> MappedIdentity:
    """The claims an assertion carries under `names` (pure). The first value of a
    single-valued claim counts; every value of every group attribute is a group."""

    def first(attribute: str | None) -> str | None:
        if attribute is None:
            return None
        if attribute == NAME_ID:
            return asserted.name_id
        values = [value for value in asserted.attributes.get(attribute, ()) if value]
        return values[0] if values else None

    groups = tuple(dict.fromkeys(value for attribute in names.groups or ()
                                 for value in asserted.attributes.get(attribute, ()) if value))
    attributes = Attributes(groups=groups, display_name=first(names.display_name),
                            email=first(names.email), upn=first(names.upn),
                            sid=first(names.sid), guid=first(names.guid))
    missing = tuple(claim for claim in required if not getattr(attributes, claim))
    return MappedIdentity(first(names.username), attributes, missing)


class SamlFactor:
    kind = "saml"
    primary = True

    def __init__(self, settings: SamlProvider, source: ServiceProviderSource,
                 ephemeral: EphemeralStore, *, clock: Callable[[], float] = time.time) -> None:
        self.name = settings.name
        self._settings = settings
        self._names = settings.attribute_map()
        self._source = source
        self._ephemeral = ephemeral
        self._clock = clock

    def accepts_unsolicited(self) -> bool:
        return self._settings.allow_idp_initiated

    async def redirect(self, state: FlowState, context: LoginContext, callback: str,
                       relay: str) -> Redirect:
        provider = await self._source.get()
        message = await asyncio.to_thread(provider.authn_request, callback, relay)
        state.data[REQUEST_ID] = message.request_id
        state.data[CALLBACK] = callback
        return Redirect(message.url, message.form)

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        encoded = answers.get("SAMLResponse")
        if not encoded:
            return Failed("no SAMLResponse in the answer")
        try:
            provider = await self._source.get()
        except ConfigError as exc:
            return Unavailable(f"SAML provider unavailable: {exc}")
        # An IdP-initiated answer has no request of ours: it goes to the gateway's ACS.
        callback = state.data.get(CALLBACK, self._source.acs_url)
        asserted = await asyncio.to_thread(provider.accept, encoded, callback=callback,
                                           request_id=state.data.get(REQUEST_ID))
        if isinstance(asserted, ResponseRefused):
            return Failed(f"SAML response refused: {asserted.reason}")
        # Only after the signature held: an unsigned flood must not fill the cache.
        if not await self._first_use(asserted):
            return Failed(f"SAML assertion {asserted.assertion_id} replayed")
        mapped = map_assertion(asserted, self._names, tuple(self._settings.required_attributes))
        try:
            username = canonical_username(mapped.username or "")
        except AuthError:
            return Failed(f"the assertion names no usable user "
                          f"({self._names.username} is {mapped.username!r})")
        if mapped.missing:
            return Failed(f"the assertion lacks required claims: {', '.join(mapped.missing)} "
                          "(see the provider's attributes and required_attributes)", username)
        if not await attempt.admit(username):
            return Refused("account locked", username)
        # Kept with the session (the flow's scratch data is not): signing out of the portal
        # ends the IdP's session too.
        subject = SamlSubject(self.name, asserted.name_id, asserted.name_id_format,
                              asserted.session_index)
        return Passed(f"SAML assertion {asserted.assertion_id} from {asserted.issuer}",
                      username, replace(mapped.attributes, saml=subject))

    async def _first_use(self, asserted: Asserted) -> bool:
        digest = hashlib.sha256(f"{asserted.issuer}\0{asserted.assertion_id}".encode())
        remaining = asserted.valid_until - self._clock() + self._settings.clock_skew
        return await self._ephemeral.put_new(
            f"{REPLAY_NAMESPACE}:{self.name}:{digest.hexdigest()}", b"1", max(remaining, 1.0))
