"""Ends a gateway's tunnels and launches when the sign-in session they came from ends.

`SessionWatch` hears every `SessionEnded` on the event bus the nodes share and closes
the matching connections at once, with the notice that says why and whether signing in
again helps. As a backstop (an event missed while the bus was down, an idle or absolute
expiry, which no one announces) it re-checks the session of every connection every
`interval` seconds, at once after each (re)subscription to the bus, and once for each
new connection (an ending announced while it was being set up). Absolute expiry is
noticed on time: a check arms a timer for the sessions whose limit falls before the
next check. A check restarts the session's idle time: an open connection keeps its
session alive, as a user at the portal does.

It never trusts an event to grant anything: events only end connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable

import structlog

from portcullis.audit import AuditTrail
from portcullis.errors import StoreError
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.endings import CHANNEL, Ending, SessionEnded, notice
from portcullis.identity.sessions import Session, SessionManager
from portcullis.proto.mux import Reason
from portcullis.store import EventBus

log = structlog.get_logger("portcullis.gateway")


class SessionWatch:
    def __init__(self, registry: ConnectionRegistry, sessions: SessionManager,
                 accounts: AccountStatus, events: EventBus, audit: AuditTrail,
                 interval: Callable[[], float], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._registry = registry
        self._sessions = sessions
        self._accounts = accounts
        self._events = events
        self._audit = audit
        self._interval = interval
        self._clock = clock
        self._check_now = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._expiry_timers: dict[str, asyncio.TimerHandle] = {}
        registry.on_added = self._added

    async def run(self) -> None:
        """Listen and re-check until cancelled."""
        listener = asyncio.ensure_future(
            self._events.listen(CHANNEL, self.deliver, on_ready=self._check_now.set))
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._check_now.wait(), self._interval())
                self._check_now.clear()
                await self.check(self._registry.list())
        finally:
            listener.cancel()
            for task in list(self._tasks):
                task.cancel()
            for timer in self._expiry_timers.values():
                timer.cancel()

    # -- the event -------------------------------------------------------------------
    def deliver(self, raw: bytes) -> None:
        event = SessionEnded.decode(raw)
        if event is None:
            log.warning("ignored a malformed session-ending event")
            return
        if event.user is not None:
            self._accounts.forget(event.user)   # tickets and sign-ins see the change now
            connections = self._registry.of_user(event.user)
        else:
            assert event.handle is not None
            connections = self._registry.of_session(event.handle)
        self._end(connections, event.ending, user=event.user, session=event.handle,
                  delay=round(self._clock() - event.at, 3) if event.at else None)

    # -- the backstop ----------------------------------------------------------------
    def _added(self, connection: Connection) -> None:
        if connection.session_handle is None:
            return
        task = asyncio.ensure_future(self.check([connection]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check(self, connections: Iterable[Connection]) -> None:
        """Ask the store about the session of each connection; end those whose ended."""
        by_session: dict[str, list[Connection]] = {}
        for connection in connections:
            if connection.session_handle is not None:
                by_session.setdefault(connection.session_handle, []).append(connection)
        horizon = self._clock() + self._interval()
        for handle, held in by_session.items():
            try:
                standing = await self._sessions.standing(handle)
            except StoreError as exc:
                # Fail closed, but not for good: the client reconnects, and its sign-in
                # is checked again then.
                log.warning("cannot check a connection's session", error=str(exc))
                for connection in held:
                    connection.session.close(Reason.INTERNAL_ERROR,
                                             "the gateway cannot check your session now; "
                                             "reconnect in a moment")
                continue
            if isinstance(standing, Ending):
                self._end(held, standing, user=None, session=handle, delay=None)
            else:
                self._arm_expiry(handle, standing, horizon)

    def _arm_expiry(self, handle: str, session: Session, horizon: float) -> None:
        ends_at = self._sessions.absolute_end(session)
        if ends_at > horizon or handle in self._expiry_timers:
            return
        loop = asyncio.get_running_loop()

        def expired() -> None:
            del self._expiry_timers[handle]
            self._end(self._registry.of_session(handle), Ending.EXPIRED, user=None,
                      session=handle, delay=None)

        self._expiry_timers[handle] = loop.call_later(max(0.0, ends_at - self._clock()),
                                                      expired)

    def _end(self, connections: list[Connection], ending: Ending, *, user: str | None,
             session: str | None, delay: float | None) -> None:
        if not connections:
            return
        told = notice(ending)
        for connection in connections:
            connection.session.close(told.reason, told.message)
        self._audit.record("session.connections_ended", ending=ending.value,
                           user=user or connections[0].user, session=session,
                           connections=[c.id for c in connections], delay=delay)
