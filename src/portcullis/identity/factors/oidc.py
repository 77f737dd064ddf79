"""Sign-in at an OpenID provider (Azure AD / Entra ID, Okta, any certified provider): a
redirect factor.

`redirect` sends the browser to the provider's authorization endpoint with PKCE (S256),
`state` (the service's relay token) and a `nonce`; what the callback needs (nonce, code
verifier, callback URL, relay) is kept in the flow's sealed state, never sent out.
`verify` takes the callback's parameters: it redeems the code and checks the ID token
(`portcullis.federation.oidc`), maps the verified claims (`claim_mapping`), and admits
the user. Each refusal's reason names what was wrong, for the audit trail; the user is
told "denied". The secrets kept for one callback are used once: a second callback for
the same sign-in finds none.
"""

from __future__ import annotations

from collections.abc import Mapping

from portcullis.errors import AuthError, FederationError
from portcullis.federation.oidc import RelyingParty
from portcullis.identity.claim_mapping import ClaimMap, Refusal, map_claims
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

# What `redirect` keeps in FlowState.data for `verify`.
KEPT = ("oidc_nonce", "oidc_verifier", "oidc_callback", "oidc_relay")


class OidcFactor:
    kind = "oidc"
    primary = True

    def __init__(self, name: str, party: RelyingParty, names: ClaimMap,
                 required: tuple[str, ...] = (), preset: str = "generic") -> None:
        self.name = name
        self._party = party
        self._names = names
        self._required = required
        self._preset = preset

    async def redirect(self, state: FlowState, context: LoginContext, callback: str,
                       relay: str) -> Redirect:
        request = await self._party.authorization_request(callback, relay)
        state.data.update(oidc_nonce=request.nonce, oidc_verifier=request.verifier,
                          oidc_callback=callback, oidc_relay=relay)
        return Redirect(request.url)

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        kept = [state.data.pop(key, "") for key in KEPT]
        nonce, verifier, callback, relay = kept
        if not all(kept):
            return Failed("no sign-in at the provider is waiting for this callback "
                          "(already answered, or never started)")
        try:
            claims = await self._party.complete(answers, state=relay, nonce=nonce,
                                                verifier=verifier, callback=callback)
        except FederationError as exc:
            return Unavailable(str(exc)) if exc.unavailable else Failed(str(exc))
        mapped = map_claims(claims, self._names, self._required, self._preset)
        if isinstance(mapped, Refusal):
            return Failed(mapped.reason)
        try:
            username = canonical_username(mapped.username)
        except AuthError:
            return Failed(f"the user name {mapped.username!r} (claim "
                          f"{mapped.username_claim}) is not usable here")
        if not await attempt.admit(username):
            return Refused("account locked", username)
        return Passed(f"signed in at {self._party.registration.issuer} as subject "
                      f"{claims['sub']!r}", username, mapped.attributes)
