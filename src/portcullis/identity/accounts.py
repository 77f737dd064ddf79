"""Whether an account may be used right now, asked of the durable store and
remembered for a moment.

Every authenticated request and every launch asks; without the cache each would be a
database round trip. An account disabled from any process stops working here within
`ttl` seconds, which is also how often the gateway looks for connections to end.
When the remembered answer expires, the callers that ask meanwhile share one query
instead of each sending their own (at a few hundred launches a second, a herd of them
every `ttl`, each taking a database connection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from portcullis.store import DurableStore

MAX_CACHED = 100_000


@dataclass(frozen=True)
class AccountState:
    """What the local account store says about a name. Directory users usually have no
    local account; one that exists and is disabled blocks them too, so an administrator
    can shut out a directory user without touching the directory."""

    exists: bool
    disabled: bool = False
    # Sessions created before this (seconds since the epoch) are void.
    sessions_valid_after: float = 0.0

    @property
    def active(self) -> bool:
        return self.exists and not self.disabled

    def admits(self, realm: str) -> bool:
        """May a session of `realm` for this name go on? Local sessions need the account."""
        return self.active if realm == LOCAL_REALM else not self.disabled


LOCAL_REALM = "local"
UNKNOWN = AccountState(exists=False)


class AccountStatus:
    def __init__(self, durable: DurableStore, *, ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._durable = durable
        self._ttl = ttl
        self._clock = clock
        self._known: dict[str, tuple[AccountState, float]] = {}
        self._lookups: dict[str, asyncio.Future[AccountState]] = {}

    async def state(self, username: str) -> AccountState:
        known = self._known.get(username)
        if known is not None and known[1] > self._clock():
            return known[0]
        lookup = self._lookups.get(username)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up(username))
            self._lookups[username] = lookup
            lookup.add_done_callback(lambda done: self._lookup_done(username, done))
        # Shielded: a caller that gives up must not cancel the others' answer.
        return await asyncio.shield(lookup)

    def forget(self, username: str) -> None:
        """Ask the durable store next time: the account has just changed (a query
        already under way may predate the change, so its answer is not kept either)."""
        self._known.pop(username, None)
        self._lookups.pop(username, None)

    async def _look_up(self, username: str) -> AccountState:
        asked_at = self._clock()
        user = await self._durable.get_user(username)
        if user is None:
            state = UNKNOWN
        else:
            after = user.sessions_valid_after
            state = AccountState(True, user.disabled,
                                 after.timestamp() if after is not None else 0.0)
        if self._lookups.get(username) is asyncio.current_task():   # not forgotten since
            if len(self._known) >= MAX_CACHED:
                self._known.clear()
            # From when it was asked: an answer is never remembered for longer than ttl.
            self._known[username] = (state, asked_at + self._ttl)
        return state

    def _lookup_done(self, username: str, lookup: asyncio.Future[AccountState]) -> None:
        if self._lookups.get(username) is lookup:
            del self._lookups[username]

    async def is_disabled(self, username: str) -> bool:
        return (await self.state(username)).disabled
