"""The launches and tunnels alive on this gateway, so administrators can list them and
end them, by id or by user.

Each connection remembers the sign-in session it came from (its handle), so that the
session's ending ends it (`gateway.revocation`). Disabling an account happens in the
durable store, possibly from another process; a watcher also polls the store for the
users that have connections here and ends theirs.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import structlog

from portcullis.audit import AuditTrail
from portcullis.errors import StoreError
from portcullis.identity.endings import Ending, notice
from portcullis.proto.mux import Reason
from portcullis.store import DurableStore

log = structlog.get_logger("portcullis.gateway")


class Endable(Protocol):
    """What a connection carries (a mux session, a VNC viewer's relay, a web
    application's WebSocket relay): it can be ended,
    telling the client why, and counted."""

    def close(self, reason: Reason, message: str) -> None: ...

    def byte_counts(self) -> tuple[int, int]:
        """(sent to the client, received from it)."""
        ...

    @property
    def open_streams(self) -> int: ...


@dataclass(eq=False)
class Connection:
    kind: Literal["launch", "tunnel", "vnc", "web"]
    user: str
    client: str
    session: Endable
    detail: str = ""                       # the resource, or the tunnel's intranet IP
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    since: float = field(default_factory=time.time)
    session_handle: str | None = None      # the sign-in session it came from

    def describe(self) -> dict[str, object]:
        sent, received = self.session.byte_counts()
        return {"id": self.id, "kind": self.kind, "user": self.user, "client": self.client,
                "detail": self.detail, "since": round(self.since, 3),
                "streams": self.session.open_streams,
                "bytes_to_client": sent, "bytes_from_client": received}


class ConnectionRegistry:
    def __init__(self, audit: AuditTrail) -> None:
        self._audit = audit
        self._connections: dict[str, Connection] = {}
        # Told of every connection added (the session watch re-checks its session).
        self.on_added: Callable[[Connection], None] | None = None

    def add(self, connection: Connection) -> None:
        self._connections[connection.id] = connection
        if self.on_added is not None:
            self.on_added(connection)

    def remove(self, connection: Connection) -> None:
        if self._connections.get(connection.id) is connection:
            del self._connections[connection.id]

    def of_session(self, handle: str) -> list[Connection]:
        return [c for c in self._connections.values() if c.session_handle == handle]

    def of_user(self, user: str) -> list[Connection]:
        return [c for c in self._connections.values() if c.user == user]

    def list(self) -> list[Connection]:
        return sorted(self._connections.values(), key=lambda c: c.since)

    def users(self) -> set[str]:
        return {connection.user for connection in self._connections.values()}

    def end_user(self, user: str, reason: Reason, message: str) -> int:
        ended = [c for c in self._connections.values() if c.user == user]
        for connection in ended:
            connection.session.close(reason, message)
        return len(ended)

    def end_all(self, reason: Reason, message: str) -> None:
        for connection in list(self._connections.values()):
            connection.session.close(reason, message)

    async def watch_disabled(self, durable: DurableStore, interval: float = 1.0) -> None:
        """Run forever: end the connections of users disabled or removed since."""
        while True:
            await asyncio.sleep(interval)
            users = self.users()
            if not users:
                continue
            try:
                disabled = await durable.disabled_among(users)
            except StoreError as exc:
                log.warning("cannot check for disabled accounts", error=str(exc))
                continue
            told = notice(Ending.ACCOUNT_DISABLED)
            for user in disabled:
                ended = self.end_user(user, told.reason, told.message)
                self._audit.record("account.connections_ended", user=user,
                                   connections=ended, reason="account disabled")
