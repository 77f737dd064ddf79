"""The launched connections alive on this gateway, so they can be ended by user.

Disabling an account happens in the durable store, possibly from another process; a
watcher polls the store for the users that have connections here and ends theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from portcullis.audit import AuditTrail
from portcullis.net.muxsession import MuxSession
from portcullis.proto.mux import Reason
from portcullis.store import DurableStore


class ConnectionRegistry:
    def __init__(self, audit: AuditTrail) -> None:
        self._audit = audit
        self._by_user: dict[str, set[MuxSession]] = defaultdict(set)

    def add(self, user: str, session: MuxSession) -> None:
        self._by_user[user].add(session)

    def remove(self, user: str, session: MuxSession) -> None:
        sessions = self._by_user.get(user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_user[user]

    def users(self) -> list[str]:
        return list(self._by_user)

    def count(self) -> int:
        return sum(len(sessions) for sessions in self._by_user.values())

    def end_user(self, user: str, reason: Reason, message: str) -> int:
        sessions = list(self._by_user.get(user, ()))
        for session in sessions:
            session.close(reason, message)
        return len(sessions)

    def end_all(self, reason: Reason, message: str) -> None:
        for user in self.users():
            self.end_user(user, reason, message)

    async def watch_disabled(self, durable: DurableStore, interval: float = 1.0) -> None:
        """Run forever: end the connections of users disabled or removed since."""
        while True:
            await asyncio.sleep(interval)
            users = self.users()
            if not users:
                continue
            with contextlib.suppress(Exception):
                for user in await durable.disabled_among(users):
                    ended = self.end_user(user, Reason.ADMIN_ENDED, "account disabled")
                    self._audit.record("account.connections_ended", user=user,
                                       connections=ended, reason="account disabled")
