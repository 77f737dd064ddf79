"""Login as a sequence of steps: the pure half, deciding what each factor's answer means.

A flow (`[[auth.flows]]`) is a list of steps, each a factor with an optional condition.
Everything here is a decision without I/O: `start` picks the first step, `decide` takes
the flow's state and one factor's `FactorOutcome` and returns the next state, what to do
(ask a step, deny, finish) and the events that explain it. `identity/login.py` is the
shell that runs factors, keeps the state in the ephemeral store between requests, counts
failures, makes the session and records the events; `auth test` reports the same events.

Rules that make a flow hard to game:
- the user name is fixed by the first factor that names the user, in canonical form;
  later factors use it and never ask again, so a variant spelling cannot skip a factor;
- a factor that runs before anyone is authenticated (TOTP first) fails *late*: the flow
  goes on and denies at the end, so its answer tells nothing about the account;
- a step that cannot run yet (TOTP enrolment before a password proved who it is) is
  deferred to the end;
- the client is told "denied"; the reason goes to the audit trail.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol, runtime_checkable

from portcullis.config.auth import Flow
from portcullis.identity.claims import Attributes
from portcullis.identity.conditions import Facts, LoginContext, evaluate

# A flow has a handful of steps; this bounds challenge rounds and enrolment retries too.
MAX_ROUNDS = 16

# The closed set of steps a driver (portal, JSON API, CLI) must know how to show:
# prompts to answer, except "redirect" (send the browser to an identity provider and
# resume on its callback), "device" (the user signs in at the provider on any device
# with a code, RFC 8628, while the driver polls by answering the step with nothing) and
# "certificate" (nothing to ask: verified at once).
StepKind = Literal["password", "totp", "totp-enrol", "totp-enrolment-code", "challenge",
                   "certificate", "redirect", "device"]


@dataclass(frozen=True)
class Prompt:
    name: str
    label: str
    secret: bool = False


@dataclass(frozen=True)
class Redirect:
    """Where a redirect step sends the browser: GET `url`, or POST `form` to it (the SAML
    HTTP-POST binding)."""

    url: str
    form: Mapping[str, str] | None = None


@dataclass(frozen=True)
class DeviceAuthorization:
    """What a device step shows (RFC 8628 3.2): where to sign in and the code to type
    there. The device code itself stays in the flow's sealed state."""

    verification_uri: str
    user_code: str
    expires_in: int                   # seconds left for the user to sign in
    interval: int                     # seconds the driver waits between two answers
    verification_uri_complete: str | None = None

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"verification_uri": self.verification_uri,
                                   "user_code": self.user_code,
                                   "expires_in": self.expires_in, "interval": self.interval}
        if self.verification_uri_complete:
            body["verification_uri_complete"] = self.verification_uri_complete
        return body


@dataclass(frozen=True)
class Step:
    kind: StepKind
    title: str
    prompts: tuple[Prompt, ...] = ()
    message: str | None = None
    # Only for TOTP enrolment: the otpauth URI, its QR code (SVG and terminal text)
    # and the recovery codes, shown this once.
    enrolment: Mapping[str, Any] | None = None
    redirect: Redirect | None = None      # only for kind "redirect"
    device: DeviceAuthorization | None = None   # only for kind "device"

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"kind": self.kind, "title": self.title,
                                   "prompts": [asdict(prompt) for prompt in self.prompts]}
        if self.message:
            body["message"] = self.message
        if self.enrolment:
            body["enrolment"] = dict(self.enrolment)
        if self.redirect:
            body["redirect"] = {"url": self.redirect.url,
                                **({"form": dict(self.redirect.form)}
                                   if self.redirect.form is not None else {})}
        if self.device:
            body["device"] = self.device.to_json()
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
    # The CLI's loopback URL (RFC 8252) an identity provider's answer is handed on to;
    # None: the browser that started the flow finishes it (the portal).
    return_to: str | None = None
    # The client asked for the device authorization grant (RFC 8628: a CLI whose
    # browser cannot reach its loopback) where a redirect step's provider offers it.
    device: bool = False

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.attributes.get("groups", ()))


# --- a factor's outcome: one closed type -------------------------------------------------

@dataclass(frozen=True)
class Passed:
    reason: str
    username: str | None = None
    attributes: Attributes | None = None


@dataclass(frozen=True)
class Failed:
    """A wrong answer, counted against the account. `late`: when nobody is authenticated
    yet, go on and deny at the end (TOTP first must not tell whether a name exists)."""

    reason: str
    username: str | None = None
    late: bool = False


@dataclass(frozen=True)
class Unavailable:
    """The provider could not answer: not the user's fault, not counted."""

    reason: str
    username: str | None = None


@dataclass(frozen=True)
class Retry:
    """The same factor asks again (a RADIUS challenge, another enrolment try)."""

    reason: str
    username: str | None = None


@dataclass(frozen=True)
class Deferred:
    """Not now: run this step after the others (TOTP enrolment before a password)."""

    reason: str
    username: str | None = None


@dataclass(frozen=True)
class Refused:
    """The account may not be tried now (locked, or another check of it is running);
    nothing was verified, so nothing is counted."""

    reason: str
    username: str | None = None


@dataclass(frozen=True)
class Pending:
    """The provider has no answer yet (the user is still signing in on another device):
    the same step is asked again. Not a round: a five-minute wait is legitimate, and
    the factor bounds it by its code's expiry."""

    reason: str


FactorOutcome = Passed | Failed | Unavailable | Retry | Deferred | Refused | Pending


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


@runtime_checkable
class RedirectFactor(Protocol):
    """A factor whose step sends the browser to an identity provider (OIDC, SAML); its
    `verify` gets the provider's callback parameters as the answers."""

    name: str
    kind: str
    primary: bool

    async def redirect(self, state: FlowState, context: LoginContext, callback: str,
                       relay: str) -> Redirect:
        """Where to send the browser. `callback`: the URL the provider must answer to;
        `relay`: sent as OIDC `state` / SAML `RelayState`, it finds the flow again.
        What verify() needs later (nonce, PKCE verifier, request id) goes in state.data."""
        ...

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome: ...


@runtime_checkable
class DeviceFactor(Protocol):
    """A redirect factor whose provider may also be signed in to with a code on any device
    (RFC 8628), for a flow that asked for that (`FlowState.device`). While its device step
    is awaited (`polling`), `verify` polls the provider once per answer: `Pending` until
    the user has signed in, never faster than the provider's interval."""

    async def device(self, state: FlowState) -> DeviceAuthorization | None:
        """The step to show: the one already begun, or a new one from the provider (kept
        in state.data); None: the provider offers no device authorization."""
        ...

    def polling(self, state: FlowState) -> bool: ...


@runtime_checkable
class AcceptsUnsolicited(Protocol):
    """A redirect factor whose provider may answer though no step asked it (a SAML
    IdP-initiated sign-in), if its settings allow that."""

    def accepts_unsolicited(self) -> bool: ...


# What a flow step runs: a factor that prompts (or needs nothing), or one that redirects.
AnyFactor = Factor | RedirectFactor


# --- the decisions --------------------------------------------------------------------

EventKind = Literal["step_skipped", "factor_passed", "factor_retry", "factor_failed",
                    "failed", "succeeded"]


@dataclass(frozen=True)
class FlowEvent:
    """One thing that happened in a flow, audited as `login.<kind>` and shown by
    `auth test`."""

    kind: EventKind
    factor: str | None = None
    user: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class AskStep:
    index: int


@dataclass(frozen=True)
class Deny:
    reason: str
    user: str | None
    factor: str | None = None
    count: bool = True                # counted against the account and the address


@dataclass(frozen=True)
class Finish:
    username: str


Action = AskStep | Deny | Finish


@dataclass(frozen=True)
class Decision:
    state: FlowState
    action: Action
    events: tuple[FlowEvent, ...] = ()


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


def _skipped(choice: StepChoice, user: str | None) -> list[FlowEvent]:
    return [FlowEvent("step_skipped", provider, user, why) for provider, why in choice.skipped]


def start(flow: Flow, state: FlowState, context: LoginContext) -> Decision:
    """The first step of a new flow."""
    state = copy.deepcopy(state)
    choice = next_step(flow, 0, state, context)
    events = _skipped(choice, None)
    if choice.index is None:
        # Validation guarantees a primary step, but a condition may exclude them all.
        return Decision(state, Deny("no step of the flow applies", None), tuple(events))
    state.current = choice.index
    state.resume = choice.index + 1
    return Decision(state, AskStep(choice.index), tuple(events))


def exhausted(state: FlowState) -> str | None:
    """Why an answer is refused before its factor sees it, if it is."""
    if state.rounds >= MAX_ROUNDS:
        return "too many rounds"
    return None


def decide(flow: Flow, primaries: frozenset[str], state: FlowState, outcome: FactorOutcome,
           context: LoginContext) -> Decision:
    """What the current step's outcome means: the next state, the action, the events.
    `primaries`: the flow's providers that can tell who the user is."""
    state = copy.deepcopy(state)
    if isinstance(outcome, Pending):
        # Not counted in `rounds`: MAX_ROUNDS must not end a user's wait at the provider
        # (every `interval` seconds for minutes); the factor ends it at its code's expiry.
        return Decision(state, AskStep(state.current))
    state.rounds += 1
    factor = flow.steps[state.current].provider
    primary = factor in primaries
    before_primary = not primary and not _primary_passed(state, primaries)
    if state.username is None or (state.provisional and primary):
        named = outcome.username
    else:
        named = state.username
    match outcome:
        case Refused(reason=reason):
            if before_primary:
                # Looks like any other late failure: the answer must not tell a locked
                # (or busy) account from a wrong code.
                return _advance(flow, primaries, *_fail_late(state, factor, reason, named,
                                                             primary), context)
            # Refused unverified: a locked account must not keep a directory busy, and
            # attempts while locked do not lengthen the lock.
            return Decision(state, Deny(reason, named, factor, count=False))
        case Retry(reason=reason):
            # The factor asks again (a RADIUS challenge): the name it was given stays.
            _name(state, named, primary)
            return Decision(state, AskStep(state.current),
                            (FlowEvent("factor_retry", factor, named, reason),))
        case Failed(reason=reason, late=True) if before_primary:
            return _advance(flow, primaries, *_fail_late(state, factor, reason, named,
                                                         primary), context)
        case Failed(reason=reason):
            return Decision(state, Deny(reason, named, factor))
        case Unavailable(reason=reason):
            return Decision(state, Deny(reason, named, factor, count=False))
        case Deferred():
            state.deferred.append(state.current)
            _name(state, named, primary)
            return _advance(flow, primaries, state, [], context)
        case Passed(username=username, attributes=attributes):
            # Another name than the flow's: the end, unless the flow's name is provisional
            # and nothing has passed for it yet (then this step's resolved name replaces it).
            replaceable = state.provisional and primary and not state.passed
            if (state.username is not None and username not in (None, state.username)
                    and not replaceable):
                return Decision(state, Deny(f"{factor} named another user ({username})",
                                            state.username, factor))
            _name(state, named, primary)
            state.passed.append(factor)
            if attributes is not None:
                if attributes.groups and not attributes.groups_from:
                    attributes = replace(attributes, groups_from=(factor,))
                merged = Attributes.from_json(state.attributes).merge(attributes)
                state.attributes = merged.to_json()
            return _advance(flow, primaries, state,
                            [FlowEvent("factor_passed", factor, state.username)], context)


def _primary_passed(state: FlowState, primaries: frozenset[str]) -> bool:
    return any(name in primaries for name in state.passed)


def _name(state: FlowState, username: str | None, primary: bool) -> None:
    """Record who the flow is about. A name typed at a step that cannot vouch for it
    (TOTP before any password) is provisional: the first primary step replaces it with
    the name it resolves (an LDAP mail address becomes the account name)."""
    if username is None:
        return
    if state.username is None or (state.provisional and primary):
        state.username = username
        state.provisional = not primary
    elif primary:
        state.provisional = False


def _fail_late(state: FlowState, factor: str, reason: str, username: str | None,
               primary: bool) -> tuple[FlowState, list[FlowEvent]]:
    """Go on as if nothing failed; the flow is denied (and counted, once) at its end."""
    state.failure = state.failure or f"{factor}: {reason}"
    _name(state, username, primary)
    return state, [FlowEvent("factor_failed", factor, username, reason)]


def _advance(flow: Flow, primaries: frozenset[str], state: FlowState,
             events: list[FlowEvent], context: LoginContext) -> Decision:
    state.data = {}
    choice = next_step(flow, max(state.current + 1, state.resume), state, context)
    events += _skipped(choice, state.username)
    index = choice.index
    state.resume = len(flow.steps) if index is None else index + 1
    while index is None and state.deferred:
        if not _primary_passed(state, primaries):
            # Nothing said who this is: a deferred enrolment must not run.
            break
        deferred = state.deferred.pop(0)
        verdict = evaluate(flow.steps[deferred].when, facts_of(state, context))
        if verdict.holds:
            index = deferred
        else:
            events.append(FlowEvent("step_skipped", flow.steps[deferred].provider,
                                    state.username, verdict.reason))
    if index is not None:
        state.current = index
        return Decision(state, AskStep(index), tuple(events))
    if state.failure is not None:
        # Counted here, once for the whole flow, whichever steps failed late.
        return Decision(state, Deny(state.failure, state.username), tuple(events))
    if state.username is None or not _primary_passed(state, primaries):
        return Decision(state, Deny("no factor established the user", state.username,
                                    count=False), tuple(events))
    return Decision(state, Finish(state.username), tuple(events))


@dataclass(frozen=True)
class LoginFlow:
    definition: Flow
    realm: str
    factors: Mapping[str, AnyFactor]

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def primaries(self) -> frozenset[str]:
        return frozenset(name for name, factor in self.factors.items() if factor.primary)
