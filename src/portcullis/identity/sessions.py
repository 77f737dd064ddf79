"""Sessions: a bearer token for the client, a record keyed by the token's keyed hash.

Idle expiry is the ephemeral store's TTL, refreshed on use; the absolute limit is
checked against the creation time. A session is valid only while its user exists and
is enabled in the durable store, and only if it was created after the account was last
disabled or its password changed: disabling a user from any process ends their sessions
within a second (`AccountStatus`), for good, whichever ephemeral backend is in use.
Never logs a token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from portcullis.audit import AuditTrail
from portcullis.config.model import SessionSettings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.store import EphemeralStore, SealedRecords
from portcullis.tokens import TokenHasher, new_token

NAMESPACE = "session"


@dataclass(frozen=True)
class Session:
    handle: str          # the keyed hash: safe to show to administrators, useless as a token
    claims: Claims
    client_address: str
    created_at: float

    @property
    def username(self) -> str:
        return self.claims.username


class SessionManager:
    def __init__(self, ephemeral: EphemeralStore, accounts: AccountStatus, hasher: TokenHasher,
                 settings: SessionSettings, *, clock: Callable[[], float] = time.time,
                 audit: AuditTrail | None = None) -> None:
        self._ephemeral = ephemeral
        # Sealed: a record edited in the store (groups added, a later creation time) or
        # copied from another session's key reads as no session, and is audited.
        self._records = SealedRecords(ephemeral, hasher, NAMESPACE, audit)
        self._accounts = accounts
        self._hasher = hasher
        self._settings = settings
        self._clock = clock

    async def create(self, claims: Claims, client_address: str) -> tuple[str, Session]:
        token = new_token()
        handle = self._hasher.digest(NAMESPACE, token)
        now = self._clock()
        record = {"claims": claims.to_json(), "client_address": client_address, "created_at": now}
        ttl = min(self._settings.idle_timeout, self._settings.absolute_timeout)
        await self._records.put(f"session:{handle}", json.dumps(record).encode(), ttl)
        return token, Session(handle, claims, client_address, now)

    async def validate(self, token: str) -> Session | None:
        if not token or len(token) > 256:
            return None
        handle = self._hasher.digest(NAMESPACE, token)
        raw = await self._records.get(f"session:{handle}")
        if raw is None:
            return None
        record = json.loads(raw)
        session = Session(handle, Claims.from_json(record["claims"]), record["client_address"],
                          record["created_at"])
        remaining = session.created_at + self._settings.absolute_timeout - self._clock()
        account = await self._accounts.state(session.username)
        if (remaining <= 0 or not account.admits(session.claims.idp)
                or session.created_at < account.sessions_valid_after):
            await self._ephemeral.delete(f"session:{handle}")
            return None
        await self._ephemeral.touch(f"session:{handle}",
                                    min(self._settings.idle_timeout, remaining))
        return session

    async def end(self, token: str) -> None:
        await self._ephemeral.delete(f"session:{self._hasher.digest(NAMESPACE, token)}")
