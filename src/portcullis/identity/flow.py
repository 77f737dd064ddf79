"""Login as a sequence of steps: each answer yields the next step or a session.

A flow is data (an ordered list of factors) and its state is a small serialisable
record kept in the ephemeral store between requests, so any gateway node can take the
next step. The JSON API, the portal pages and the CLI are three drivers of this one
flow. Failure reasons go to the audit trail only; the client is told "denied".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from portcullis.audit import AuditTrail
from portcullis.config.model import SessionSettings
from portcullis.identity.claims import Claims
from portcullis.identity.sessions import Session, SessionManager
from portcullis.store import EphemeralStore
from portcullis.tokens import TokenHasher, mask, new_token

NAMESPACE = "login"
MAX_ANSWER = 1024


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

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "title": self.title,
                "prompts": [asdict(prompt) for prompt in self.prompts]}


@dataclass
class FlowState:
    """What a flow knows between steps; stored as JSON, never holds a secret answer."""

    flow: str
    position: int = 0
    username: str | None = None
    claims: dict[str, object] | None = None
    amr: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FactorOutcome:
    ok: bool
    reason: str                       # for the audit trail only
    username: str | None = None
    claims: Claims | None = None


class Factor(Protocol):
    kind: str

    def step(self, state: FlowState) -> Step: ...

    async def verify(self, state: FlowState, answers: Mapping[str, str]) -> FactorOutcome: ...


@dataclass(frozen=True)
class NextStep:
    handle: str
    step: Step


@dataclass(frozen=True)
class Authenticated:
    token: str
    session: Session


@dataclass(frozen=True)
class Denied:
    """Deliberately carries no reason: that is in the audit trail."""


LoginResult = NextStep | Authenticated | Denied


class LoginFlow:
    def __init__(self, name: str, factors: Sequence[Factor]) -> None:
        if not factors:
            raise ValueError("a login flow needs at least one factor")
        self.name = name
        self.factors = tuple(factors)


class LoginService:
    def __init__(self, flow: LoginFlow, ephemeral: EphemeralStore, hasher: TokenHasher,
                 sessions: SessionManager, settings: SessionSettings, audit: AuditTrail) -> None:
        self._flow = flow
        self._ephemeral = ephemeral
        self._hasher = hasher
        self._sessions = sessions
        self._settings = settings
        self._audit = audit

    async def begin(self) -> NextStep:
        state = FlowState(flow=self._flow.name)
        handle = new_token()
        await self._save(handle, state)
        return NextStep(handle, self._flow.factors[0].step(state))

    async def submit(self, handle: str | None, answers: Mapping[str, str],
                     client_address: str) -> LoginResult:
        """Answer the current step. Without a handle, the answers are for the first step."""
        if handle is None:
            state: FlowState | None = FlowState(flow=self._flow.name)
            handle = new_token()
        else:
            state = await self._load(handle)
        if state is None:
            self._audit.record("login.failed", reason="unknown or expired login handle",
                               handle=mask(handle), client=client_address)
            return Denied()
        if any(len(value) > MAX_ANSWER for value in answers.values()):
            self._audit.record("login.failed", reason="oversized answer", client=client_address)
            await self._ephemeral.delete(self._key(handle))
            return Denied()
        factor = self._flow.factors[state.position]
        outcome = await factor.verify(state, answers)
        if not outcome.ok:
            await self._ephemeral.delete(self._key(handle))
            self._audit.record("login.failed", user=outcome.username or state.username,
                               factor=factor.kind, reason=outcome.reason, client=client_address)
            return Denied()
        state.position += 1
        state.amr.append(factor.kind)
        state.username = outcome.username or state.username
        if outcome.claims is not None:
            state.claims = outcome.claims.to_json()
        if state.position < len(self._flow.factors):
            await self._save(handle, state)
            return NextStep(handle, self._flow.factors[state.position].step(state))
        await self._ephemeral.delete(self._key(handle))
        assert state.claims is not None, "the last factor of a flow must establish claims"
        claims = Claims.from_json({**state.claims, "amr": state.amr})
        token, session = await self._sessions.create(claims, client_address)
        self._audit.record("login.succeeded", user=claims.username, factors=state.amr,
                           client=client_address, session=session.handle[:12])
        return Authenticated(token, session)

    def _key(self, handle: str) -> str:
        return f"login:{self._hasher.digest(NAMESPACE, handle)}"

    async def _save(self, handle: str, state: FlowState) -> None:
        await self._ephemeral.put(self._key(handle), json.dumps(asdict(state)).encode(),
                                  self._settings.login_step_timeout)

    async def _load(self, handle: str) -> FlowState | None:
        if len(handle) > 256:
            return None
        raw = await self._ephemeral.get(self._key(handle))
        return FlowState(**json.loads(raw)) if raw is not None else None
