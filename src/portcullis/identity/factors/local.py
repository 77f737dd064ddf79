"""Local accounts: user name and password checked against argon2id hashes."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from portcullis.errors import AuthError
from portcullis.identity.claims import Claims
from portcullis.identity.flow import FactorOutcome, FlowState, Prompt, Step
from portcullis.identity.names import canonical_username
from portcullis.identity.passwords import verify_password
from portcullis.store import DurableStore


class LocalPasswordFactor:
    kind = "password"

    def __init__(self, durable: DurableStore) -> None:
        self._durable = durable

    def step(self, state: FlowState) -> Step:
        return Step(kind="password", title="Sign in",
                    prompts=(Prompt("username", "User name"),
                             Prompt("password", "Password", secret=True)))

    async def verify(self, state: FlowState, answers: Mapping[str, str]) -> FactorOutcome:
        try:
            username = canonical_username(answers.get("username", ""))
        except AuthError:
            # The same work as a real attempt, so a malformed name is not told apart by timing.
            await asyncio.to_thread(verify_password, None, "")
            return FactorOutcome(False, "malformed user name")
        user = await self._durable.get_user(username)
        usable = user is not None and not user.disabled
        # argon2 is deliberately slow; run it off the event loop (the C code drops the GIL).
        stored = user.password_hash if usable and user else None
        if not await asyncio.to_thread(verify_password, stored, answers.get("password", "")):
            reason = ("unknown user" if user is None else
                      "account disabled" if user.disabled else "wrong password")
            return FactorOutcome(False, reason, username=username)
        assert user is not None
        claims = Claims(sub=f"local:{user.name}", username=user.name, groups=user.groups,
                        idp="local")
        return FactorOutcome(True, "password verified", username=user.name, claims=claims)
