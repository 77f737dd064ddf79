"""The client certificate as a factor: asks nothing, reads what TLS already verified."""

from __future__ import annotations

from collections.abc import Mapping

from portcullis.config.auth import CertificateProvider
from portcullis.errors import AuthError
from portcullis.identity.claims import Attributes
from portcullis.identity.conditions import LoginContext
from portcullis.identity.flow import (
    Attempt,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Refused,
    Step,
    Unavailable,
)
from portcullis.identity.names import canonical_username


class CertificateFactor:
    kind = "certificate"
    primary = True

    def __init__(self, settings: CertificateProvider) -> None:
        self.name = settings.name
        self._settings = settings

    async def step(self, state: FlowState, context: LoginContext) -> Step:
        # No prompts: the flow verifies this step at once, without a round trip.
        return Step(kind="certificate", title="Client certificate", prompts=())

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        certificate = attempt.context.certificate
        if certificate is None:
            # Nothing was guessed: not counted against the address (a page view without a
            # certificate must not throttle colleagues behind the same NAT).
            return Unavailable("no client certificate")
        named = (certificate.common_name if self._settings.username_from == "common_name"
                 else next(iter(certificate.emails), None))
        try:
            username = canonical_username(named or "")
        except AuthError:
            return Failed(f"certificate {certificate.subject} names no usable user")
        if not await attempt.admit(username):
            return Refused("account locked", username)
        return Passed(f"certificate {certificate.fingerprint[:16]}", username,
                      Attributes(certificate=certificate.subject))
