"""Throttling of sign-in failures, per account and per client address.

Counters live in the ephemeral store, so every gateway node sees the same numbers.
An account is keyed by its identity (realm:canonical name), never by what was typed, so
"Alice", "alice " and "ａｌｉｃｅ" share one counter. After `account_failures`
consecutive failures (none more than `lockout_seconds` after the one before) the account
is locked for `lockout_seconds`; a success resets the count. An address with
`address_failures` failures within `address_window` is refused every sign-in until the
window passes, whichever accounts it tries. At most `address_unfinished` sign-ins may be
in progress from one address: each counts from its first step until it ends, or at most
the login step timeout after it began (an abandoned one is not released by anyone).
"""

from __future__ import annotations

from dataclasses import dataclass

from portcullis.config.auth import ThrottleSettings
from portcullis.store import EphemeralStore

# Longest a verification may hold its account (a directory or RADIUS timeout is shorter);
# the hold expires by itself should a node die while holding it.
HOLD_SECONDS = 120.0


@dataclass(frozen=True)
class AccountLock:
    failures: int
    locked: bool


class Throttle:
    def __init__(self, ephemeral: EphemeralStore, settings: ThrottleSettings) -> None:
        self._ephemeral = ephemeral
        self._settings = settings

    @property
    def settings(self) -> ThrottleSettings:
        return self._settings

    async def address_refused(self, address: str) -> bool:
        count = await self._ephemeral.get(f"throttle:address:{address}")
        return count is not None and int(count) >= self._settings.address_failures

    async def account(self, identity: str) -> AccountLock:
        count = await self._ephemeral.get(f"throttle:account:{identity}")
        locked = await self._ephemeral.get(f"throttle:locked:{identity}") is not None
        return AccountLock(int(count) if count is not None else 0, locked)

    async def failed(self, identity: str | None, address: str) -> AccountLock | None:
        """Count one failure; the account's state after it when the identity is known."""
        settings = self._settings
        await self._ephemeral.incr(f"throttle:address:{address}", settings.address_window)
        if identity is None:
            return None
        key = f"throttle:account:{identity}"
        count = await self._ephemeral.incr(key, settings.lockout_seconds)
        # The count lives until `lockout_seconds` after the latest failure, not the first:
        # a slow guesser is counted as surely as a fast one.
        await self._ephemeral.touch(key, settings.lockout_seconds)
        if count >= settings.account_failures:
            await self._ephemeral.put(f"throttle:locked:{identity}", b"1",
                                      settings.lockout_seconds)
            return AccountLock(count, True)
        return AccountLock(count, False)

    async def hold(self, identity: str) -> bool:
        """Claim the account for one verification; False while another one holds it."""
        return await self._ephemeral.put_new(f"throttle:busy:{identity}", b"1", HOLD_SECONDS)

    async def release(self, identity: str) -> None:
        await self._ephemeral.delete(f"throttle:busy:{identity}")

    async def succeeded(self, identity: str) -> None:
        await self._ephemeral.delete(f"throttle:account:{identity}")

    async def unlock(self, identity: str) -> None:
        await self._ephemeral.delete(f"throttle:account:{identity}")
        await self._ephemeral.delete(f"throttle:locked:{identity}")

    async def start_unfinished(self, address: str, started: float, now: float,
                               window: float) -> bool:
        """Count a sign-in begun at `started` as in progress from `address`; False (and
        not counted) when that would be more than `address_unfinished`."""
        key = f"throttle:unfinished:{address}"
        member = repr(started)
        # Added, then counted: of concurrent starts over the limit none is let through.
        await self._ephemeral.add_to_set(key, member, window)
        live = 0
        for other in await self._ephemeral.set_members(key):
            if _began(other) + window <= now:
                await self._ephemeral.remove_from_set(key, other)   # abandoned, expired
            else:
                live += 1
        if live > self._settings.address_unfinished:
            await self._ephemeral.remove_from_set(key, member)
            return False
        return True

    async def finish_unfinished(self, address: str, started: float) -> None:
        await self._ephemeral.remove_from_set(f"throttle:unfinished:{address}", repr(started))


def _began(member: str) -> float:
    try:
        return float(member)
    except ValueError:
        return 0.0   # not one of ours: expired
