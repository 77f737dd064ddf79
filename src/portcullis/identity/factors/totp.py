"""The TOTP step of a flow: a code from the user's app, or enrolment when they have none.

Enrolment happens only after a factor that can name the user has passed (else anyone
knowing a user name could bind their own phone to it): a TOTP step reached earlier, for
a user without a secret, is deferred to the end of the flow. A wrong code before any
such factor fails late, so the answer tells nothing about whether the user is enrolled.
With `auth.totp.enrolment = "code"` the enrolment first asks for the one-time code an
administrator issued; a wrong, spent or expired code ends the sign-in (and is audited).
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog

from portcullis.errors import AuthError
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.prompts import USERNAME, typed_username
from portcullis.identity.flow import (
    Attempt,
    Deferred,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Prompt,
    Refused,
    Retry,
    Step,
)
from portcullis.identity.totp import Enrolment, TotpService

log = structlog.get_logger("portcullis.identity.totp")
CODE = Prompt("code", "Code from your authenticator app (or a recovery code)")
ENROL_CODE = Prompt("code", "Code shown by the app now")
ENROLMENT_CODE = Prompt("enrolment_code", "Enrolment code from your administrator", secret=True)


def enrolment_step(enrolment: Enrolment, *, retry: bool) -> Step:
    """The step that shows a new secret (at sign-in, or when a user replaces their app)."""
    again = "That code did not match; try the next one. " if retry else ""
    return Step(
        kind="totp-enrol", title="Set up your authenticator app", prompts=(ENROL_CODE,),
        message=(again + "Scan the QR code with your authenticator app (or enter the key), "
                 "then type the code it shows. Keep the recovery codes somewhere safe: each "
                 "signs you in once without the app. They are shown only now."),
        enrolment={"otpauth_uri": enrolment.uri, "secret": enrolment.secret,
                   "qr_svg": enrolment.qr_svg_data_uri(), "qr_text": enrolment.qr_text(),
                   "recovery_codes": list(enrolment.recovery_codes)})


class TotpFactor:
    kind = "totp"
    primary = False

    def __init__(self, name: str, service: TotpService, realm: str,
                 primary_names: frozenset[str], *, enrolment_code: bool = False) -> None:
        self.name = name
        self._service = service
        self._realm = realm
        self._primary_names = primary_names
        self._enrolment_code = enrolment_code     # enrolling needs an administrator's code

    def _identity(self, username: str) -> str:
        return f"{self._realm}:{username}"

    def _may_enrol(self, state: FlowState) -> bool:
        return state.username is not None and bool(self._primary_names & set(state.passed))

    async def step(self, state: FlowState, context: LoginContext) -> Step:
        if state.username is None:
            return Step(kind="totp", title="Verification code", prompts=(USERNAME, CODE))
        identity = self._identity(state.username)
        if "enrolment" not in state.data and self._may_enrol(state) and (
                await self._service.record(identity) is None):
            if self._enrolment_code and state.data.get("enrolment_code") != "accepted":
                state.data["enrolment_code"] = "asked"
                return Step(kind="totp-enrolment-code", title="Set up your authenticator app",
                            prompts=(ENROLMENT_CODE,),
                            message="Type the enrolment code your administrator gave you.")
            enrolment = self._service.new_enrolment(state.username)
            state.data["enrolment"] = self._service.seal_enrolment(identity, enrolment)
        if "enrolment" in state.data:
            enrolment = self._service.open_enrolment(identity, state.data["enrolment"])
            return enrolment_step(enrolment, retry="retry" in state.data)
        return Step(kind="totp", title="Verification code", prompts=(CODE,),
                    message=f"Signing in as {state.username}")

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        code = answers.get("code", "")
        username = typed_username(state, answers)
        if username is None:
            return Failed("malformed user name", late=True)
        if not await attempt.admit(username):
            return Refused("account locked", username)
        identity = self._identity(username)
        if state.data.get("enrolment_code") == "asked":
            check = await self._service.redeem_enrolment_code(
                identity, answers.get("enrolment_code", ""))
            if not check.ok:
                return Failed(check.reason, username)
            state.data["enrolment_code"] = "accepted"
            # Now the secret to enrol is shown.
            return Retry(check.reason, username)
        if "enrolment" in state.data:
            enrolment = self._service.open_enrolment(identity, state.data["enrolment"])
            check = await self._service.confirm(identity, enrolment, code)
            if not check.ok:
                # The user already proved who they are; let them try the code again.
                state.data["retry"] = "1"
                return Retry(f"enrolment: {check.reason}", username)
            return Passed("enrolled a new TOTP secret", username)
        record = await self._service.record(identity)
        if record is None:
            # Enrol once a password has said who this is (or, for an unknown user, fail
            # there); nothing distinguishes this answer from a wrong code's.
            return Deferred("no TOTP secret yet", username)
        try:
            check = await self._service.verify(identity, record, code)
        except AuthError as exc:
            # The secret does not open (the token key was replaced): fail closed, and
            # tell the administrator, who resets the user (they then enrol again).
            log.error("TOTP secret unreadable", identity=identity, error=str(exc))
            return Failed("TOTP secret unreadable: reset the user", username, late=True)
        return (Passed(check.reason, username) if check.ok
                else Failed(check.reason, username, late=True))
