"""Local accounts: user name and password checked against argon2id hashes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from portcullis.identity.claims import Attributes
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.prompts import password_step, typed_username
from portcullis.identity.flow import (
    Attempt,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Refused,
    Step,
)
from portcullis.identity.passwords import verify_password
from portcullis.store import DurableStore


class LocalPasswordFactor:
    kind = "password"
    primary = True

    def __init__(self, name: str, durable: DurableStore) -> None:
        self.name = name
        self._durable = durable

    async def step(self, state: FlowState, context: LoginContext) -> Step:
        return password_step(state)

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        password = answers.get("password", "")
        username = typed_username(state, answers)
        if username is None:
            # The same work as a real attempt, so a malformed name is not told apart by timing.
            await asyncio.to_thread(verify_password, None, password)
            return Failed("malformed user name")
        if not await attempt.admit(username):
            return Refused("account locked", username)
        user = await self._durable.get_user(username)
        usable = user is not None and not user.disabled
        # argon2 is deliberately slow; run it off the event loop (the C code drops the GIL).
        stored = user.password_hash if usable and user else None
        if not await asyncio.to_thread(verify_password, stored, password):
            reason = ("unknown user" if user is None else
                      "account disabled" if user.disabled else "wrong password")
            return Failed(reason, username)
        assert user is not None
        return Passed("password verified", user.name,
                      Attributes(groups=user.groups))
