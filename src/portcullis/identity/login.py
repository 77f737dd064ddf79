"""Login: the shell around the pure flow decisions of `identity/flow.py`.

`LoginService` runs the factors, keeps each flow's state in the ephemeral store between
requests (so any gateway node can take the next step), counts failures, makes the session
and records what `flow.decide` says happened. The JSON API, the portal pages, the CLI and
`auth test` are four drivers of this one service. The state is sealed (`SealedRecords`):
one edited in the store (groups or steps added) restarts the flow.

A redirect step (OIDC, SAML) sends the browser to the identity provider with a `relay`
token; the provider answers to `/login/callback/{provider}`, whose route hands the answer
to `callback()`. The portal's browser finishes the flow there, proving it is the browser
that started it (the login cookie holds the flow's handle). A CLI flow began with a
loopback `return_to` (RFC 8252): the answer is kept under a one-time code that only the
loopback receives, and the CLI submits that code — so an identity provider's answer can
finish only the flow of whoever's browser received it. A flow begun with `device` (a CLI
in an ssh session, whose browser is elsewhere) shows a "device" step instead where the
provider offers the device authorization grant (RFC 8628): the user signs in at the
provider with a code, and the client answers the step with nothing until that is done.

Failures are counted against realm:user and the client address before any verdict; a
step that ends in "denied" is answered after the time `identity.pacing` sets, so its
duration does not tell an unknown name, a wrong password or a locked account apart.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from urllib.parse import urlencode

from portcullis.audit import AuditTrail
from portcullis.config.federation import MAX_SAML_RESPONSE
from portcullis.config.model import SessionSettings
from portcullis.errors import FederationError
from portcullis.identity.claims import Attributes, Claims
from portcullis.identity.conditions import LoginContext
from portcullis.identity.flow import (
    AcceptsUnsolicited,
    AnyFactor,
    AskStep,
    Attempt,
    Decision,
    Deny,
    DeviceFactor,
    FactorOutcome,
    Finish,
    FlowEvent,
    FlowState,
    LoginFlow,
    RedirectFactor,
    Refused,
    Step,
    decide,
    exhausted,
    next_step,
    start,
)
from portcullis.identity.pacing import FailurePacing
from portcullis.identity.sessions import Session, SessionManager
from portcullis.identity.throttle import Throttle
from portcullis.store import EphemeralStore, SealedRecords
from portcullis.tokens import TokenHasher, mask, new_token

NAMESPACE = "login"
MAX_ANSWER = 1024
# A SAML response is far larger than any typed answer: its factor bounds it by the
# provider's max_response_bytes (at most 4 MiB, in base64 here); this is only a backstop.
MAX_CALLBACK_ANSWER = (MAX_SAML_RESPONSE + 2) // 3 * 4 + 4096
# The code a CLI's loopback receives is redeemed at once; a minute is plenty.
HANDOFF_LIFETIME = 60.0
CALLBACK_CODE = "callback_code"
# Where identity providers answer: CALLBACK_PATH + the provider's name.
CALLBACK_PATH = "/login/callback/"
# The parameters that carry the relay token back: OIDC `state`, SAML `RelayState`.
RELAY_PARAMETERS = ("state", "RelayState")


def relay_of(answers: Mapping[str, str]) -> str:
    return next((answers[name] for name in RELAY_PARAMETERS if name in answers), "")


@dataclass(frozen=True)
class NextStep:
    handle: str
    step: Step
    provider: str = ""                # whose step it is (for `auth test` and the audit)


@dataclass(frozen=True)
class Authenticated:
    token: str
    session: Session


@dataclass(frozen=True)
class HandOff:
    """An identity provider answered a CLI's flow: send the browser to `url` (the CLI's
    loopback, with the one-time code that finishes the step)."""

    url: str


@dataclass(frozen=True)
class Denied:
    """Deliberately carries no reason: that is in the audit trail. `restart` is no reason
    either: the answer was for a flow that is gone (expired, finished in another tab, never
    begun), so nothing was checked and a browser's page should simply begin again. Every
    denial compares equal, and the JSON API answers them all alike."""

    restart: bool = field(default=False, compare=False)


LoginResult = NextStep | Authenticated | HandOff | Denied


class LoginService:
    def __init__(self, flow: LoginFlow, ephemeral: EphemeralStore, hasher: TokenHasher,
                 sessions: SessionManager, settings: SessionSettings, audit: AuditTrail,
                 throttle: Throttle, *, public_url: str = "https://localhost",
                 observe: Callable[[FlowEvent], None] | None = None) -> None:
        self.flow = flow
        self._records = SealedRecords(ephemeral, hasher, NAMESPACE, audit)
        self._hasher = hasher
        self._sessions = sessions
        self._settings = settings
        self._audit = audit
        self._throttle = throttle
        self._pacing = FailurePacing(throttle.settings.failure_floor)
        self._public_url = public_url.rstrip("/")
        self._observe = observe

    def callback_url(self, provider: str) -> str:
        return f"{self._public_url}{CALLBACK_PATH}{provider}"

    async def begin(self, context: LoginContext, *, return_to: str | None = None,
                    device: bool = False) -> LoginResult:
        """A new flow. `return_to`: a CLI's loopback URL (checked by the caller with
        `loopback_return_to`) that redirect steps hand their answers on to; `device`: a
        redirect step whose provider offers the device authorization grant uses it."""
        state = FlowState(flow=self.flow.name, return_to=return_to, device=device)
        if not await self._may_begin(state, context):
            return Denied()
        return await self._act(new_token(), start(self.flow.definition, state, context),
                               context)

    async def _may_begin(self, state: FlowState, context: LoginContext) -> bool:
        """Whether the client may begin the flow `state`: not throttled (audited if so)."""
        if await self._throttle.address_refused(context.client_address):
            self._audit.record("login.throttled", client=context.client_address,
                               reason="too many failures from this address")
            return False
        if not await self._throttle.start_unfinished(context.client_address, state.started,
                                                     time.time(),
                                                     self._settings.login_step_timeout):
            self._audit.record("login.throttled", client=context.client_address,
                               reason="too many unfinished sign-ins from this address")
            return False
        return True

    def _unsolicited_by(self, provider: str | None, context: LoginContext) -> bool:
        """Whether `provider` may answer with no step of ours asking (a SAML IdP-initiated
        sign-in): it allows that, and it is the flow's first step, so its answer begins a
        flow as a step of ours would."""
        factor = self.flow.factors.get(provider or "")
        if not isinstance(factor, AcceptsUnsolicited) or not factor.accepts_unsolicited():
            return False
        first = next_step(self.flow.definition, 0, FlowState(flow=self.flow.name),
                          context).index
        return first is not None and self.flow.definition.steps[first].provider == provider

    async def submit(self, handle: str | None, answers: Mapping[str, str],
                     context: LoginContext) -> LoginResult:
        """Answer the current step. Without a handle, the answers are for the first step.
        A denial is answered no earlier than the pacing says (the whole step is timed)."""
        return await self._paced(self._submit(handle, answers, context))

    async def callback(self, relay: str, answers: Mapping[str, str], context: LoginContext,
                       browser_handle: str | None, *, provider: str | None = None
                       ) -> LoginResult:
        """An identity provider's answer to a redirect step, found by its `relay` token.
        `browser_handle`: the flow handle the browser's login cookie holds; `provider`:
        the one the callback's URL names (an answer no step asked for is taken only from
        a provider that allows it, see `_unsolicited_by`)."""
        return await self._paced(self._callback(relay, answers, context, browser_handle,
                                                provider))

    async def _paced(self, work: Awaitable[LoginResult]) -> LoginResult:
        started = time.monotonic()
        result = await work
        elapsed = time.monotonic() - started
        if not (isinstance(result, NextStep) and result.step.kind == "device"):
            # A device step's polls (many, most answered without asking anyone) are not
            # the work the pacing equalises: they would pull its percentile down.
            self._pacing.observe(elapsed)
        if isinstance(result, Denied):
            await asyncio.sleep(self._pacing.delay(elapsed, random.random()).wait)
        return result

    async def _submit(self, handle: str | None, answers: Mapping[str, str],
                      context: LoginContext) -> LoginResult:
        client = context.client_address
        if handle is None:
            begun = await self.begin(context)
            if not isinstance(begun, NextStep):
                return begun
            handle = begun.handle
        elif await self._throttle.address_refused(client):
            self._audit.record("login.throttled", client=client,
                               reason="too many failures from this address")
            return Denied()
        # Taken, not read: of two requests with one handle, only one goes on.
        state = await self._take(handle)
        if state is None:
            # Not counted by the throttle: nothing was checked (a stale page, a second tab).
            self._audit.record("login.failed", reason="unknown or expired login handle",
                               handle=mask(handle), client=client)
            return Denied(restart=True)
        factor = self._factor(state)
        if isinstance(factor, RedirectFactor) and not (isinstance(factor, DeviceFactor)
                                                       and factor.polling(state)):
            # A redirect step is answered by the identity provider through the callback
            # route, or (a CLI flow) by the one-time code its loopback received.
            handed = await self._redeem(handle, answers.get(CALLBACK_CODE, ""))
            if handed is None:
                return await self._conclude(handle, Decision(
                    state, Deny("a redirect step was answered without the identity "
                                "provider's answer", state.username, count=False)), context)
            answers = handed
        return await self._answer(handle, state, answers, context)

    async def _callback(self, relay: str, answers: Mapping[str, str], context: LoginContext,
                        browser_handle: str | None, provider: str | None) -> LoginResult:
        client = context.client_address
        handle_bytes = (await self._records.take(self._relay_key(relay))
                        if 0 < len(relay) <= 256 else None)
        if handle_bytes is None and self._unsolicited_by(provider, context):
            return await self._begin_unsolicited(provider or "", answers, context)
        if handle_bytes is None:
            unsolicited = isinstance(self.flow.factors.get(provider or ""), AcceptsUnsolicited)
            self._audit.record("login.failed", reason="unknown, used or expired callback state"
                               + (f", and {provider} may not begin a sign-in (IdP-initiated "
                                  "sign-in is off, or it is not the flow's first step)"
                                  if unsolicited else ""),
                               factor=provider if unsolicited else None, client=client)
            return Denied()
        handle = handle_bytes.decode()
        state = await self._take(handle)
        if state is None:
            self._audit.record("login.failed", reason="the callback's flow has expired",
                               handle=mask(handle), client=client)
            return Denied()
        if state.return_to is not None:
            # A CLI's flow: only its loopback gets the code that finishes the step.
            code = new_token()
            await self._records.put(self._handoff_key(code), json.dumps(
                {"handle": handle, "answers": dict(answers)}).encode(), HANDOFF_LIFETIME)
            await self._save(handle, state)
            separator = "&" if "?" in state.return_to else "?"
            return HandOff(f"{state.return_to}{separator}{urlencode({CALLBACK_CODE: code})}")
        if browser_handle != handle:
            # Someone else's browser: a sign-in link sent to a victim must not sign the
            # sender in as the victim (nor the other way round).
            return await self._conclude(handle, Decision(
                state, Deny("the identity provider's answer reached another browser than "
                            "the one that started the sign-in", state.username,
                            count=False)), context)
        return await self._answer(handle, state, answers, context)

    async def _begin_unsolicited(self, provider: str, answers: Mapping[str, str],
                                 context: LoginContext) -> LoginResult:
        """A new flow whose first step is answered by `answers` at once. Its handle is
        new: a later step binds this browser as any flow's does."""
        state = FlowState(flow=self.flow.name)
        if not await self._may_begin(state, context):
            return Denied()
        self._audit.record("login.unsolicited", factor=provider, client=context.client_address,
                           reason="IdP-initiated sign-in (allow_idp_initiated)")
        decision = start(self.flow.definition, state, context)
        self._record(decision.events, context)
        if not isinstance(decision.action, AskStep):
            return await self._act(new_token(), decision, context)
        return await self._answer(new_token(), decision.state, answers, context)

    async def _redeem(self, handle: str, code: str) -> dict[str, str] | None:
        if not 0 < len(code) <= 256:
            return None
        raw = await self._records.take(self._handoff_key(code))
        if raw is None:
            return None
        handed = json.loads(raw)
        return dict(handed["answers"]) if handed["handle"] == handle else None

    async def _answer(self, handle: str, state: FlowState, answers: Mapping[str, str],
                      context: LoginContext) -> LoginResult:
        factor = self._factor(state)
        limit = MAX_CALLBACK_ANSWER if isinstance(factor, RedirectFactor) else MAX_ANSWER
        if any(len(value) > limit for value in answers.values()):
            return await self._conclude(handle, Decision(state, Deny("oversized answer",
                                                                     state.username)), context)
        if (why := exhausted(state)) is not None:
            return await self._conclude(handle, Decision(state, Deny(why, state.username)),
                                        context)
        held: list[str] = []
        refused: list[Refused] = []

        async def admit(username: str) -> bool:
            identity = self._identity(username)
            if (await self._throttle.account(identity)).locked:
                refused.append(Refused("account locked", username))
                return False
            # One check at a time per account, so that parallel guesses cannot all be
            # verified before the first failure is counted.
            if not await self._throttle.hold(identity):
                refused.append(Refused("another sign-in of this account is being checked",
                                       username))
                return False
            held.append(identity)
            return True

        try:
            outcome: FactorOutcome = await factor.verify(state, answers,
                                                         Attempt(context, admit))
            if refused:
                outcome = refused[0]
            decision = decide(self.flow.definition, self.flow.primaries, state, outcome,
                              context)
            if isinstance(decision.action, Deny):
                # Counted while the account is still held.
                return await self._act(handle, decision, context)
        finally:
            for identity in held:
                await self._throttle.release(identity)
        return await self._act(handle, decision, context)

    async def _act(self, handle: str, decision: Decision, context: LoginContext
                   ) -> LoginResult:
        """Record what a decision says happened, then do what it says."""
        self._record(decision.events, context)
        state, action = decision.state, decision.action
        if isinstance(action, AskStep):
            return await self._ask(handle, state, context)
        if isinstance(action, Finish):
            return await self._finish(state, action.username, context)
        return await self._conclude(handle, decision, context)

    async def _ask(self, handle: str, state: FlowState, context: LoginContext) -> LoginResult:
        factor = self._factor(state)
        if isinstance(factor, RedirectFactor):
            try:
                step = await self._provider_step(handle, state, context, factor)
            except FederationError as exc:
                # The provider cannot be asked (discovery failed): not the user's fault.
                return await self._act(handle, Decision(state, Deny(
                    str(exc), state.username, factor.name, count=False)), context)
            await self._save(handle, state)
            return NextStep(handle, step, factor.name)
        # The step first: a factor may note what it showed (a pending enrolment).
        step = await factor.step(state, context)
        if not step.prompts:
            # Nothing to ask (a client certificate): verify now, no round trip.
            return await self._answer(handle, state, {}, context)
        await self._save(handle, state)
        return NextStep(handle, step, factor.name)

    async def _provider_step(self, handle: str, state: FlowState, context: LoginContext,
                             factor: RedirectFactor) -> Step:
        """A device step if the flow asked for one and the provider offers it (the same
        one again while it is awaited), else a redirect to the provider."""
        if state.device and isinstance(factor, DeviceFactor):
            device = await factor.device(state)
            if device is not None:
                return Step(kind="device", title=f"Sign in with {factor.name} on any device",
                            device=device)
        relay = new_token()
        redirect = await factor.redirect(state, context, self.callback_url(factor.name), relay)
        await self._records.put(self._relay_key(relay), handle.encode(),
                                self._settings.login_step_timeout)
        return Step(kind="redirect", title=f"Sign in with {factor.name}", redirect=redirect)

    async def _finish(self, state: FlowState, username: str, context: LoginContext
                      ) -> Authenticated:
        # The state was taken when this answer arrived: nothing of the flow is left.
        await self._throttle.succeeded(self._identity(username))
        await self._throttle.finish_unfinished(context.client_address, state.started)
        claims = Claims.build(self.flow.realm, username, Attributes.from_json(state.attributes),
                              tuple(state.passed), time.time())
        token, session = await self._sessions.create(claims, context.client_address)
        if self._observe:
            self._observe(FlowEvent("succeeded", None, claims.username))
        self._audit.record("login.succeeded", user=claims.username, realm=claims.idp,
                           flow=self.flow.name, factors=list(claims.amr),
                           client=context.client_address, session=session.handle[:12])
        return Authenticated(token, session)

    async def _conclude(self, handle: str, decision: Decision, context: LoginContext
                        ) -> Denied:
        """The end of a flow: its state was taken when the answer arrived, so the handle is
        already spent; count the failure and audit the reason."""
        state, deny = decision.state, decision.action
        assert isinstance(deny, Deny)
        await self._throttle.finish_unfinished(context.client_address, state.started)
        lock = (await self._throttle.failed(self._identity(deny.user) if deny.user else None,
                                            context.client_address) if deny.count else None)
        event = FlowEvent("failed", deny.factor, deny.user, deny.reason)
        if self._observe:
            self._observe(event)
        self._audit.record("login.failed", user=deny.user, flow=self.flow.name,
                           factor=deny.factor, reason=deny.reason,
                           client=context.client_address,
                           locked=lock.locked if lock else None)
        return Denied()

    def _record(self, events: tuple[FlowEvent, ...], context: LoginContext) -> None:
        for event in events:
            if self._observe:
                self._observe(event)
            self._audit.record(f"login.{event.kind}", user=event.user, factor=event.factor,
                               reason=event.reason, client=context.client_address)

    def _factor(self, state: FlowState) -> AnyFactor:
        return self.flow.factors[self.flow.definition.steps[state.current].provider]

    def _identity(self, username: str) -> str:
        return f"{self.flow.realm}:{username}"

    def _key(self, handle: str) -> str:
        return f"login:{self._hasher.digest(NAMESPACE, handle)}"

    def _relay_key(self, relay: str) -> str:
        return f"login-relay:{self._hasher.digest(NAMESPACE, relay)}"

    def _handoff_key(self, code: str) -> str:
        return f"login-handoff:{self._hasher.digest(NAMESPACE, code)}"

    async def _save(self, handle: str, state: FlowState) -> None:
        await self._records.put(self._key(handle), json.dumps(asdict(state)).encode(),
                                self._settings.login_step_timeout)

    async def _take(self, handle: str) -> FlowState | None:
        if len(handle) > 256:
            return None
        raw = await self._records.take(self._key(handle))
        if raw is None:
            return None
        state = FlowState(**json.loads(raw))
        return state if state.flow == self.flow.name else None
