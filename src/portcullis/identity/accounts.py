"""Whether an account may be used right now, asked of the durable store and
remembered for a moment.

Every authenticated request and every launch asks; without the cache each would be a
database round trip. An account disabled from any process stops working here within
`ttl` seconds, which is also how often the gateway looks for connections to end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from portcullis.store import DurableStore

MAX_CACHED = 100_000


class AccountStatus:
    def __init__(self, durable: DurableStore, *, ttl: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._durable = durable
        self._ttl = ttl
        self._clock = clock
        self._known: dict[str, tuple[bool, float]] = {}

    async def is_active(self, username: str) -> bool:
        now = self._clock()
        known = self._known.get(username)
        if known is not None and known[1] > now:
            return known[0]
        user = await self._durable.get_user(username)
        active = user is not None and not user.disabled
        if len(self._known) >= MAX_CACHED:
            self._known.clear()
        self._known[username] = (active, now + self._ttl)
        return active
