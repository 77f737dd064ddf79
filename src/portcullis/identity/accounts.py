"""Whether an account may be used right now, asked of the durable store and
remembered for a moment.

Every authenticated request and every launch asks; without the cache each would be a
database round trip. An account disabled from any process stops working here within
`ttl` seconds, which is also how often the gateway looks for connections to end.
"""

from __future__ import annotations

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

    async def state(self, username: str) -> AccountState:
        now = self._clock()
        known = self._known.get(username)
        if known is not None and known[1] > now:
            return known[0]
        user = await self._durable.get_user(username)
        if user is None:
            state = UNKNOWN
        else:
            after = user.sessions_valid_after
            state = AccountState(True, user.disabled,
                                 after.timestamp() if after is not None else 0.0)
        if len(self._known) >= MAX_CACHED:
            self._known.clear()
        self._known[username] = (state, now + self._ttl)
        return state

    def forget(self, username: str) -> None:
        """Ask the durable store next time: the account has just changed."""
        self._known.pop(username, None)

    async def is_disabled(self, username: str) -> bool:
        return (await self.state(username)).disabled
