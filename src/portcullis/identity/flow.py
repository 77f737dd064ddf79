"""Login as a sequence of steps: each answer yields the next step or a session.

A flow (`[[auth.flows]]`) is a list of steps, each a factor with an optional condition.
Which step comes next is a pure decision (`next_step`) over the flow, what the flow has
learned so far and the client's context; `LoginService` is the shell that runs factors,
keeps the flow's state in the ephemeral store between requests (so any gateway node can
take the next step), counts failures and makes the session. The JSON API, the portal
pages, the CLI and `auth test` are four drivers of this one flow. The state is sealed
(`SealedRecords`): one edited in the store (groups or steps added) restarts the flow.

Rules that make a flow hard to game:
- the user name is fixed by the first factor that names the user, in canonical form;
  later factors use it and never ask again, so a variant spelling cannot skip a factor;
- failures are counted against realm:user and the client address before any verdict;
- a factor that runs before anyone is authenticated (TOTP first) fails *late*: the flow
  goes on and denies at the end, so its answer tells nothing about the account;
- a step that cannot run yet (TOTP enrolment before a password proved who it is) is
  deferred to the end;
- a step that ends in "denied" is answered after the time `identity.pacing` sets, so
  its duration does not tell an unknown name, a wrong password or a locked account apart;
- the client is told "denied"; the reason goes to the audit trail.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from portcullis.audit import AuditTrail
from portcullis.config.auth import Flow
from portcullis.config.model import SessionSettings
from portcullis.identity.claims import Attributes, Claims
from portcullis.identity.conditions import Facts, LoginContext, evaluate
from portcullis.identity.pacing import FailurePacing
from portcullis.identity.sessions import Session, SessionManager
from portcullis.identity.throttle import Throttle
from portcullis.store import EphemeralStore, SealedRecords
from portcullis.tokens import TokenHasher, mask, new_token

NAMESPACE = "login"
MAX_ANSWER = 1024
# A flow has a handful of steps; this bounds challenge rounds and enrolment retries too.
MAX_ROUNDS = 16


@dataclass(frozen=True)
class Prompt:
    name: str
    label: str
    secret: bool = False


@dataclass(frozen=True)
class Step:
    kind: str
    title: str
    prompts: tuple[Prompt, ...]
    message: str | None = None
    # Only for TOTP enrolment: the otpauth URI, its QR code (SVG and terminal text)
    # and the recovery codes, shown this once.
    enrolment: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"kind": self.kind, "title": self.title,
                                   "prompts": [asdict(prompt) for prompt in self.prompts]}
        if self.message:
            body["message"] = self.message
        if self.enrolment:
            body["enrolment"] = dict(self.enrolment)
        return body


@dataclass
class FlowState:
    """What a flow knows between steps; stored as JSON, never holds a secret answer
    (a pending TOTP secret is kept encrypted by its factor)."""

    flow: str
    current: int = 0                  # the step whose answers are awaited
    resume: int = 0                   # where the flow goes on after a deferred step
    username: str | None = None
    provisional: bool = False         # named by a step that cannot vouch for the name
    attributes: dict[str, Any] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    failure: str | None = None        # a late failure: denied when the flow ends
    data: dict[str, str] = field(default_factory=dict)   # the current factor's scratch
    rounds: int = 0
    started: float = field(default_factory=time.time)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.attributes.get("groups", ()))


@dataclass(frozen=True)
class FactorOutcome:
    ok: bool
    reason: str                       # for the audit trail only
    username: str | None = None
    attributes: Attributes | None = None
    again: bool = False               # the same factor asks again (challenge, enrolment)
    defer: bool = False               # not now: run this step after the others
    late: bool = False                # on failure, go on and deny at the end
    unavailable: bool = False         # the provider could not answer: not the user's fault


@dataclass(frozen=True)
class Attempt:
    """One answer being checked: the client, and the gate a factor must pass the user
    through once it knows who they are and before it checks any credential."""

    context: LoginContext
    # False: the account is locked; the factor must refuse without verifying anything.
    admit: Callable[[str], Awaitable[bool]]


class Factor(Protocol):
    name: str                         # the provider's name in the configuration
    kind: str
    # Whether it can tell who the user is (TOTP can only confirm someone named).
    primary: bool

    async def step(self, state: FlowState, context: LoginContext) -> Step: ...

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome: ...


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
class Denied:
    """Deliberately carries no reason: that is in the audit trail."""


LoginResult = NextStep | Authenticated | Denied


@dataclass(frozen=True)
class LoginFlow:
    definition: Flow
    realm: str
    factors: Mapping[str, Factor]

    @property
    def name(self) -> str:
        return self.definition.name


@dataclass(frozen=True)
class StepChoice:
    index: int | None                 # None: no step left
    skipped: tuple[tuple[str, str], ...]   # (provider, why) for steps passed over


def facts_of(state: FlowState, context: LoginContext) -> Facts:
    return Facts(context, state.username,
                 frozenset(group.casefold() for group in state.groups),
                 frozenset(state.passed))


def next_step(flow: Flow, start: int, state: FlowState, context: LoginContext) -> StepChoice:
    """The first step at or after `start` whose condition holds now (pure)."""
    skipped: list[tuple[str, str]] = []
    facts = facts_of(state, context)
    for index in range(start, len(flow.steps)):
        step = flow.steps[index]
        verdict = evaluate(step.when, facts)
        if verdict.holds:
            return StepChoice(index, tuple(skipped))
        skipped.append((step.provider, verdict.reason))
    return StepChoice(None, tuple(skipped))


class LoginService:
    def __init__(self, flow: LoginFlow, ephemeral: EphemeralStore, hasher: TokenHasher,
                 sessions: SessionManager, settings: SessionSettings, audit: AuditTrail,
                 throttle: Throttle) -> None:
        self.flow = flow
        self._records = SealedRecords(ephemeral, hasher, NAMESPACE, audit)
        self._hasher = hasher
        self._sessions = sessions
        self._settings = settings
        self._audit = audit
        self._throttle = throttle
        self._pacing = FailurePacing(throttle.settings.failure_floor)

    async def begin(self, context: LoginContext) -> LoginResult:
        if await self._throttle.address_refused(context.client_address):
            self._audit.record("login.throttled", client=context.client_address,
                               reason="too many failures from this address")
            return Denied()
        state = FlowState(flow=self.flow.name)
        if not await self._throttle.start_unfinished(context.client_address, state.started,
                                                     time.time(),
                                                     self._settings.login_step_timeout):
            self._audit.record("login.throttled", client=context.client_address,
                               reason="too many unfinished sign-ins from this address")
            return Denied()
        choice = next_step(self.flow.definition, 0, state, context)
        self._record_skipped(choice, state, context)
        if choice.index is None:
            await self._throttle.finish_unfinished(context.client_address, state.started)
            # Validation guarantees a primary step, but a condition may exclude them all.
            self._audit.record("login.failed", reason="no step of the flow applies",
                               flow=self.flow.name, client=context.client_address)
            return Denied()
        state.current = choice.index
        state.resume = choice.index + 1
        return await self._ask(new_token(), state, context)

    async def submit(self, handle: str | None, answers: Mapping[str, str],
                     context: LoginContext) -> LoginResult:
        """Answer the current step. Without a handle, the answers are for the first step.
        A denial is answered no earlier than the pacing says (the whole step is timed)."""
        started = time.monotonic()
        result = await self._submit(handle, answers, context)
        elapsed = time.monotonic() - started
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
            self._audit.record("login.failed", reason="unknown or expired login handle",
                               handle=mask(handle), client=client)
            return Denied()
        return await self._answer(handle, state, answers, context)

    async def _answer(self, handle: str, state: FlowState, answers: Mapping[str, str],
                      context: LoginContext) -> LoginResult:
        if any(len(value) > MAX_ANSWER for value in answers.values()):
            return await self._deny(state, "oversized answer", context, None)
        state.rounds += 1
        if state.rounds > MAX_ROUNDS:
            return await self._deny(state, "too many rounds", context, None)
        factor = self._factor(state)
        held: list[str] = []
        refused: list[tuple[str, str]] = []

        async def admit(username: str) -> bool:
            identity = self._identity(username)
            if (await self._throttle.account(identity)).locked:
                refused.append((username, "account locked"))
                return False
            # One check at a time per account, so that parallel guesses cannot all be
            # verified before the first failure is counted.
            if not await self._throttle.hold(identity):
                refused.append((username, "another sign-in of this account is being checked"))
                return False
            held.append(identity)
            return True

        outcome = await factor.verify(state, answers, Attempt(context, admit))
        try:
            verdict = await self._judge(state, factor, outcome, refused, context)
        finally:
            for identity in held:
                await self._throttle.release(identity)
        if verdict == "advance":
            return await self._advance(handle, state, context)
        if verdict == "ask":
            return await self._ask(handle, state, context)
        return verdict

    async def _judge(self, state: FlowState, factor: Factor,
                     outcome: FactorOutcome, refused: list[tuple[str, str]],
                     context: LoginContext) -> Denied | Literal["advance", "ask"]:
        """What an outcome means for the flow; failures are counted here, while the
        account is still held."""
        client = context.client_address
        before_primary = not factor.primary and not self._primary_passed(state)
        if state.username is None or (state.provisional and factor.primary):
            named = outcome.username or (refused[0][0] if refused else None)
        else:
            named = state.username
        if refused:
            if before_primary:
                # Looks like any other late failure: the answer must not tell a locked
                # (or busy) account from a wrong code.
                self._fail_late(state, factor, refused[0][1], named, client)
                return "advance"
            # Refused unverified: a locked account must not keep a directory busy, and
            # attempts while locked do not lengthen the lock.
            return await self._deny(state, refused[0][1], context, factor,
                                    username=named, count=False)
        if outcome.again:
            # The factor asks again (a RADIUS challenge): the name it was given stays.
            self._name(state, named, factor)
            self._audit.record("login.factor_retry", user=named, factor=factor.name,
                               reason=outcome.reason, client=client)
            return "ask"
        if not outcome.ok:
            if outcome.late and before_primary:
                self._fail_late(state, factor, outcome.reason, named, client)
                return "advance"
            return await self._deny(state, outcome.reason, context, factor,
                                    username=named, count=not outcome.unavailable)
        if outcome.defer:
            state.deferred.append(state.current)
            self._name(state, named, factor)
            return "advance"
        # Another name than the flow's: the end, unless the flow's name is provisional
        # and nothing has passed for it yet (then this step's resolved name replaces it).
        replaceable = state.provisional and factor.primary and not state.passed
        if (state.username is not None and outcome.username not in (None, state.username)
                and not replaceable):
            return await self._deny(
                state, f"{factor.name} named another user ({outcome.username})",
                context, factor, username=state.username)
        self._name(state, named, factor)
        state.passed.append(factor.name)
        if outcome.attributes is not None:
            merged = Attributes.from_json(state.attributes).merge(outcome.attributes)
            state.attributes = merged.to_json()
        self._audit.record("login.factor_passed", user=state.username, factor=factor.name,
                           client=client)
        return "advance"

    def _name(self, state: FlowState, username: str | None, factor: Factor) -> None:
        """Record who the flow is about. A name typed at a step that cannot vouch for it
        (TOTP before any password) is provisional: the first primary step replaces it with
        the name it resolves (an LDAP mail address becomes the account name)."""
        if username is None:
            return
        if state.username is None or (state.provisional and factor.primary):
            state.username = username
            state.provisional = not factor.primary
        elif factor.primary:
            state.provisional = False

    def _fail_late(self, state: FlowState, factor: Factor, reason: str, username: str | None,
                   client: str) -> None:
        """Go on as if nothing failed; the flow is denied (and counted, once) at its end."""
        state.failure = state.failure or f"{factor.name}: {reason}"
        self._name(state, username, factor)
        self._audit.record("login.factor_failed", user=username, factor=factor.name,
                           reason=reason, client=client)

    async def _advance(self, handle: str, state: FlowState, context: LoginContext) -> LoginResult:
        state.data = {}
        choice = next_step(self.flow.definition, max(state.current + 1, state.resume), state,
                           context)
        self._record_skipped(choice, state, context)
        index = choice.index
        state.resume = len(self.flow.definition.steps) if index is None else index + 1
        while index is None and state.deferred:
            if not self._primary_passed(state):
                # Nothing said who this is: a deferred enrolment must not run.
                break
            deferred = state.deferred.pop(0)
            verdict = evaluate(self.flow.definition.steps[deferred].when,
                               facts_of(state, context))
            if verdict.holds:
                index = deferred
            else:
                self._record_skipped(StepChoice(None, (
                    (self.flow.definition.steps[deferred].provider, verdict.reason),)),
                    state, context)
        if index is not None:
            state.current = index
            return await self._ask(handle, state, context)
        if state.failure is not None:
            # Counted here, once for the whole flow, whichever steps failed late.
            return await self._deny(state, state.failure, context, None,
                                    username=state.username)
        if state.username is None or not self._primary_passed(state):
            return await self._deny(state, "no factor established the user",
                                    context, None, count=False)
        # The state was taken when this answer arrived: nothing of the flow is left.
        await self._throttle.succeeded(self._identity(state.username))
        await self._throttle.finish_unfinished(context.client_address, state.started)
        claims = Claims.build(self.flow.realm, state.username,
                              Attributes.from_json(state.attributes), tuple(state.passed),
                              time.time())
        token, session = await self._sessions.create(claims, context.client_address)
        self._audit.record("login.succeeded", user=claims.username, realm=claims.idp,
                           flow=self.flow.name, factors=list(claims.amr),
                           client=context.client_address, session=session.handle[:12])
        return Authenticated(token, session)

    def _record_skipped(self, choice: StepChoice, state: FlowState,
                        context: LoginContext) -> None:
        for provider, why in choice.skipped:
            self._audit.record("login.step_skipped", user=state.username, factor=provider,
                               reason=why, client=context.client_address)

    async def _ask(self, handle: str, state: FlowState, context: LoginContext) -> LoginResult:
        # The step first: a factor may note what it showed (a pending enrolment).
        step = await self._factor(state).step(state, context)
        if not step.prompts:
            # Nothing to ask (a client certificate): verify now, no round trip.
            return await self._answer(handle, state, {}, context)
        await self._save(handle, state)
        return NextStep(handle, step, self._factor(state).name)

    async def _deny(self, state: FlowState, reason: str, context: LoginContext,
                    factor: Factor | None, *, username: str | None = None,
                    count: bool = True) -> Denied:
        """The end of a flow: its state was taken when the answer arrived, so the handle is
        already spent; count the failure and audit the reason."""
        user = username or state.username
        await self._throttle.finish_unfinished(context.client_address, state.started)
        lock = (await self._throttle.failed(self._identity(user) if user else None,
                                            context.client_address) if count else None)
        self._audit.record("login.failed", user=user, flow=self.flow.name,
                           factor=factor.name if factor else None, reason=reason,
                           client=context.client_address,
                           locked=lock.locked if lock else None)
        return Denied()

    def _factor(self, state: FlowState) -> Factor:
        return self.flow.factors[self.flow.definition.steps[state.current].provider]

    def _primary_passed(self, state: FlowState) -> bool:
        return any(self.flow.factors[name].primary for name in state.passed)

    def _identity(self, username: str) -> str:
        return f"{self.flow.realm}:{username}"

    def _key(self, handle: str) -> str:
        return f"login:{self._hasher.digest(NAMESPACE, handle)}"

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
