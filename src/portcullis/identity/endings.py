"""Why a sign-in session ended, the event that tells every node, and what the user is told.

Every way a session ends (sign-out, password change, account disable, an administrator,
expiry) is one `Ending`. Whoever ends a session publishes a `SessionEnded` on the event
bus the nodes share (`announce`); every gateway hears it and closes the tunnels and
launches that came from the session, or from any session of the user, with the
`notice` for that ending: why, and whether signing in again can help.

An event only ever ends connections, never grants anything, so a forged one (someone
able to publish on Redis) can at worst end connections. The durable store and the
session records stay the truth; a gateway re-checks them as a backstop. Never carries
a token: a session is named by its handle (the token's keyed hash).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum

from portcullis.proto.mux import Reason
from portcullis.store import EventBus, MemoryEventBus, open_event_bus

CHANNEL = "session-ended"


class Ending(StrEnum):
    SIGNED_OUT = "signed out"
    IDP_SIGNED_OUT = "signed out at the identity provider"
    PASSWORD_CHANGED = "password changed"
    ACCOUNT_DISABLED = "account disabled"
    ADMIN_REVOKED = "ended by an administrator"
    ADMIN_CONNECTIONS = "connections ended by an administrator"
    EXPIRED = "session expired"


@dataclass(frozen=True)
class Notice:
    """What a client is told when its connection ends: the GOAWAY reason and message."""

    reason: Reason
    message: str
    sign_in_helps: bool | None     # None: it depends (ask the administrator)


# AUTH_FAILED and ADMIN_ENDED both stop `portcullis connect`; the message says the rest.
NOTICES: dict[Ending, Notice] = {
    Ending.SIGNED_OUT: Notice(
        Reason.AUTH_FAILED, "your session ended: signed out (here or on another "
        "device); sign in again to reconnect", True),
    Ending.IDP_SIGNED_OUT: Notice(
        Reason.AUTH_FAILED, "your session ended: signed out at your identity provider; "
        "sign in again to reconnect", True),
    Ending.PASSWORD_CHANGED: Notice(
        Reason.AUTH_FAILED, "your session ended: password changed; sign in again with "
        "the new password", True),
    Ending.ACCOUNT_DISABLED: Notice(
        Reason.AUTH_FAILED, "your session ended: account disabled; signing in again will "
        "not help, contact your administrator", False),
    Ending.ADMIN_REVOKED: Notice(
        Reason.ADMIN_ENDED, "your session was ended by an administrator; contact your "
        "administrator before signing in again", None),
    Ending.ADMIN_CONNECTIONS: Notice(
        Reason.ADMIN_ENDED, "this connection was ended by an administrator; your session "
        "is still valid, so you may connect again", True),
    Ending.EXPIRED: Notice(
        Reason.AUTH_FAILED, "your session expired; sign in again", True),
}


def notice(ending: Ending) -> Notice:
    return NOTICES[ending]


@dataclass(frozen=True)
class SessionEnded:
    """One session (`handle`) or every session of a user (`user`) has ended, and why.

    `at` is when it was published (seconds since the epoch), for latency figures only.
    """

    ending: Ending
    handle: str | None = None
    user: str | None = None
    at: float = 0.0

    def __post_init__(self) -> None:
        if (self.handle is None) == (self.user is None):
            raise ValueError("a SessionEnded names a session handle or a user, not both")

    def encode(self) -> bytes:
        return json.dumps({"ending": self.ending.value, "handle": self.handle,
                           "user": self.user, "at": self.at}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SessionEnded | None:
        """The event, or None for anything that is not one (it is then ignored)."""
        try:
            body = json.loads(raw)
            handle, user, at = body["handle"], body["user"], body["at"]
            if not (isinstance(handle, str | None) and isinstance(user, str | None)
                    and isinstance(at, int | float)):
                return None
            return cls(Ending(body["ending"]), handle, user, float(at))
        except (ValueError, KeyError, TypeError):
            return None


async def announce(bus: EventBus, event: SessionEnded) -> None:
    """Tell every node; StoreError if the bus cannot be reached."""
    if not event.at:
        event = SessionEnded(event.ending, event.handle, event.user, time.time())
    await bus.publish(CHANNEL, event.encode())


async def announce_from_elsewhere(ephemeral_url: str, event: SessionEnded) -> bool:
    """Publish from a process that is not a node (the CLI), through the configured
    ephemeral store. False if that store is `memory://`: no node can hear this process,
    and the gateways find the ending at their own checks of the durable store."""
    bus = open_event_bus(ephemeral_url)
    try:
        if isinstance(bus, MemoryEventBus):
            return False
        await announce(bus, event)
        return True
    finally:
        await bus.close()
