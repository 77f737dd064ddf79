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

For a flow that asked for it (a CLI in an ssh session), `device` begins the device
authorization grant instead (RFC 8628) when the provider offers it: the user signs in
at the provider on any device with the code shown, and each answer to the step makes
`verify` poll the token endpoint once, never sooner than the provider's interval (a
faster client is told Pending without the provider being asked), and never after the
code's expiry (at most MAX_DEVICE_WAIT).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from portcullis.errors import AuthError, FederationError
from portcullis.federation.oidc import SLOW_DOWN, DevicePending, RelyingParty
from portcullis.identity.claim_mapping import ClaimMap, Refusal, map_claims
from portcullis.identity.conditions import LoginContext
from portcullis.identity.flow import (
    Attempt,
    DeviceAuthorization,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Pending,
    Redirect,
    Refused,
    Unavailable,
)
from portcullis.identity.names import canonical_username

# What `redirect` keeps in FlowState.data for `verify`.
KEPT = ("oidc_nonce", "oidc_verifier", "oidc_callback", "oidc_relay")
# What `device` keeps there; the device code is the secret, never shown.
DEVICE_CODE = "oidc_device_code"
# However long the provider's code lives, a flow waits at most this long for the user.
MAX_DEVICE_WAIT = 900


class OidcFactor:
    kind = "oidc"
    primary = True

    def __init__(self, name: str, party: RelyingParty, names: ClaimMap,
                 required: tuple[str, ...] = (), preset: str = "generic", *,
                 device_grant: bool = True) -> None:
        self.name = name
        self._device_grant = device_grant
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

    def polling(self, state: FlowState) -> bool:
        return DEVICE_CODE in state.data

    async def device(self, state: FlowState) -> DeviceAuthorization | None:
        data = state.data
        now = time.time()
        if not self.polling(state):
            grant = (await self._party.device_authorization() if self._device_grant
                     else None)
            if grant is None:
                return None
            data.update({DEVICE_CODE: grant.device_code, "oidc_user_code": grant.user_code,
                         "oidc_verification_uri": grant.verification_uri,
                         "oidc_verification_uri_complete":
                             grant.verification_uri_complete or "",
                         "oidc_device_expires": str(now + min(grant.expires_in,
                                                              MAX_DEVICE_WAIT)),
                         "oidc_device_interval": str(grant.interval),
                         # RFC 8628 3.4: the first poll waits an interval too.
                         "oidc_device_next": str(now + grant.interval)})
        return DeviceAuthorization(
            verification_uri=data["oidc_verification_uri"], user_code=data["oidc_user_code"],
            expires_in=max(0, int(float(data["oidc_device_expires"]) - now)),
            interval=int(data["oidc_device_interval"]),
            verification_uri_complete=data["oidc_verification_uri_complete"] or None)

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        if self.polling(state):
            return await self._poll(state, attempt)
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
        return await self._admitted(claims, attempt)

    async def _poll(self, state: FlowState, attempt: Attempt) -> FactorOutcome:
        data = state.data
        now = time.time()
        if now >= float(data["oidc_device_expires"]):
            return Failed("the device code expired before the user signed in at the provider")
        if now < float(data["oidc_device_next"]):
            return Pending("answered sooner than the provider's polling interval: the "
                           "provider was not asked")
        try:
            polled = await self._party.poll_device(data[DEVICE_CODE])
        except FederationError as exc:
            return Unavailable(str(exc)) if exc.unavailable else Failed(str(exc))
        if isinstance(polled, DevicePending):
            interval = int(data["oidc_device_interval"]) + (SLOW_DOWN if polled.slow_down
                                                            else 0)
            data.update(oidc_device_interval=str(interval),
                        oidc_device_next=str(now + interval))
            return Pending("slow_down" if polled.slow_down else "authorization_pending")
        return await self._admitted(polled, attempt)

    async def _admitted(self, claims: dict[str, Any], attempt: Attempt) -> FactorOutcome:
        """The provider's verified claims, mapped, and the user they name admitted."""
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
