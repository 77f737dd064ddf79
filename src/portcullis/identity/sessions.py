"""Sessions: a bearer token for the client, a record keyed by the token's keyed hash.

Idle expiry is the ephemeral store's TTL, refreshed on use (by each process at most once
a second: `TOUCH_EVERY`); the absolute limit is checked against the creation time. A
session is valid only while its user exists and is enabled in the durable store, and
only if it was created after the account was last disabled or its password changed:
disabling a user from any process ends their sessions within a second (`AccountStatus`),
for good, whichever ephemeral backend is in use. Every ending is announced on the event
bus (`identity.endings`), so the gateways end the session's connections at once, and a
revoked session leaves a marker saying why.
Never logs a token.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from portcullis.audit import AuditTrail
from portcullis.config.model import SessionSettings
from portcullis.identity.accounts import AccountState, AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.endings import Ending, SessionEnded, announce
from portcullis.store import EphemeralStore, EventBus, SealedRecords
from portcullis.tokens import TokenHasher, new_token

NAMESPACE = "session"
ENDED_PREFIX = "session-ended:"     # handle -> the Ending, while a token could still be tried
USER_SESSIONS_PREFIX = "user-sessions:"
SAML_SUBJECT_PREFIX = "saml-subject:"   # provider and NameID -> the user it signed in as
# How often one process restarts a session's idle time. Every use doing it would be a
# store write each time (three in a launch, one per connection and check); an idle
# timeout is minutes, so ending up to a second sooner changes nothing a user notices.
TOUCH_EVERY = 1.0
TOUCHES_REMEMBERED = 65_536


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
                 audit: AuditTrail | None = None, events: EventBus | None = None) -> None:
        self._events = events
        self._ephemeral = ephemeral
        # Sealed: a record edited in the store (groups added, a later creation time) or
        # copied from another session's key reads as no session, and is audited.
        self._records = SealedRecords(ephemeral, hasher, NAMESPACE, audit)
        self._audit = audit
        self._accounts = accounts
        self._hasher = hasher
        self._settings = settings
        self._touched: dict[str, float] = {}   # handle -> when this process last did it
        self._clock = clock

    def bound_records(self, kind: str) -> SealedRecords:
        """Sealed records of another kind that live beside the sessions (in their store,
        under their deployment's key): a tunnel's carrier joins, bound to a session."""
        return SealedRecords(self._ephemeral, self._hasher, kind, self._audit)

    async def create(self, claims: Claims, client_address: str) -> tuple[str, Session]:
        token = new_token()
        handle = self._hasher.digest(NAMESPACE, token)
        now = self._clock()
        record = {"claims": claims.to_json(), "client_address": client_address, "created_at": now}
        ttl = min(self._settings.idle_timeout, self._settings.absolute_timeout)
        await self._records.put(f"session:{handle}", json.dumps(record).encode(), ttl)
        # Which sessions a user has, so an administrator can revoke them all.
        await self._ephemeral.add_to_set(f"{USER_SESSIONS_PREFIX}{claims.username}", handle,
                                         self._settings.absolute_timeout)
        if claims.saml is not None:
            # A SAML IdP's LogoutRequest names only its NameID, which the flow may have
            # mapped or linked to another user name.
            await self._ephemeral.put(self._saml_subject_key(claims.saml.provider,
                                                             claims.saml.name_id),
                                      claims.username.encode(), self._settings.absolute_timeout)
        return token, Session(handle, claims, client_address, now)

    async def saml_subject_user(self, provider: str, name_id: str) -> str | None:
        """The user the NameID `name_id` of the SAML provider `provider` last signed in
        as, while a session of theirs can last."""
        raw = await self._ephemeral.get(self._saml_subject_key(provider, name_id))
        return raw.decode() if raw is not None else None

    def _saml_subject_key(self, provider: str, name_id: str) -> str:
        subject = self._hasher.digest(NAMESPACE, provider + "\0" + name_id)
        return f"{SAML_SUBJECT_PREFIX}{subject}"

    async def validate(self, token: str) -> Session | None:
        standing = await self.standing_of(token)
        return standing if isinstance(standing, Session) else None

    async def standing_of(self, token: str) -> Session | Ending:
        """`standing` for a token: the session, or why it is no longer valid."""
        if not token or len(token) > 256:
            return Ending.EXPIRED
        return await self.standing(self._hasher.digest(NAMESPACE, token))

    async def standing(self, handle: str) -> Session | Ending:
        """The session named by `handle` if it is still valid (its idle time restarts),
        else why it ended: what a gateway asks of its connections and of a ticket."""
        raw = await self._records.get(f"session:{handle}")
        if raw is None:
            marker = await self._ephemeral.get(f"{ENDED_PREFIX}{handle}")
            try:
                return Ending(marker.decode()) if marker is not None else Ending.EXPIRED
            except ValueError:
                return Ending.EXPIRED
        record = json.loads(raw)
        session = Session(handle, Claims.from_json(record["claims"]), record["client_address"],
                          record["created_at"])
        remaining = session.created_at + self._settings.absolute_timeout - self._clock()
        account = await self._accounts.state(session.username)
        ending = ended_by(account, session, remaining)
        if ending is not None:
            await self._ephemeral.delete(f"session:{handle}")
            return ending
        if self._touch_due(handle):
            try:
                await self._ephemeral.touch(f"session:{handle}",
                                            min(self._settings.idle_timeout, remaining))
            except BaseException:
                self._touched.pop(handle, None)   # not done: the next use tries again
                raise
        return session

    def _touch_due(self, handle: str) -> bool:
        """Whether to restart `handle`'s idle time now: at most every TOUCH_EVERY seconds
        (callers meanwhile skip it, also while a write is under way; a failed one is
        forgotten). Bounded: past TOUCHES_REMEMBERED sessions it forgets the ones not
        touched within the second."""
        now = self._clock()
        last = self._touched.get(handle)
        if last is not None and 0 <= now - last < TOUCH_EVERY:
            return False
        if len(self._touched) >= TOUCHES_REMEMBERED:
            self._touched = {known: when for known, when in self._touched.items()
                             if 0 <= now - when < TOUCH_EVERY}
            if len(self._touched) >= TOUCHES_REMEMBERED:
                self._touched.clear()
        self._touched[handle] = now
        return True

    def absolute_end(self, session: Session) -> float:
        """When `session` ends whatever its use (seconds since the epoch)."""
        return session.created_at + self._settings.absolute_timeout

    async def end(self, token: str, ending: Ending = Ending.SIGNED_OUT) -> None:
        """Sign out (or end for `ending`) the session of `token`, on every node.

        A token with no live session changes nothing: anyone may post a sign-out, and
        must not make the store hold markers for sessions that never were."""
        handle = self._hasher.digest(NAMESPACE, token)
        if await self._ephemeral.take(f"session:{handle}") is not None:
            await self._ended(handle, ending)

    async def revoke(self, handle: str, ending: Ending) -> None:
        """End one session (an administrator's choice): its record goes, a marker says
        why, every node is told, also when the record had expired already."""
        await self._ephemeral.delete(f"session:{handle}")
        await self._ended(handle, ending)

    async def _ended(self, handle: str, ending: Ending) -> None:
        await self._ephemeral.put(f"{ENDED_PREFIX}{handle}", ending.value.encode(),
                                  self._settings.absolute_timeout)
        if self._events is not None:
            await announce(self._events, SessionEnded(ending, handle=handle))

    async def revoke_user(self, username: str, ending: Ending) -> int:
        """End every session of `username`; how many records there were to end."""
        key = f"{USER_SESSIONS_PREFIX}{username}"
        handles = await self._ephemeral.set_members(key)
        for handle in handles:
            await self._ephemeral.delete(f"session:{handle}")
            await self._ephemeral.put(f"{ENDED_PREFIX}{handle}", ending.value.encode(),
                                      self._settings.absolute_timeout)
        await self._ephemeral.delete(key)
        if self._events is not None:
            await announce(self._events, SessionEnded(ending, user=username))
        return len(handles)


def ended_by(account: AccountState, session: Session, remaining: float) -> Ending | None:
    """Why a stored session may not go on (None: it may), from its account's state and
    the time left before its absolute limit."""
    if not account.admits(session.claims.idp):
        return Ending.ACCOUNT_DISABLED
    if session.created_at < account.sessions_valid_after:
        # Disabling also voids older sessions; an account enabled again since then was
        # most likely given a new password with it.
        return Ending.PASSWORD_CHANGED
    if remaining <= 0:
        return Ending.EXPIRED
    return None


# The browser's session cookie, read by the portal and the OpenID provider alike:
# `__Host-` keeps it to this origin, over HTTPS, for every path.
SESSION_COOKIE = "__Host-portcullis-session"
