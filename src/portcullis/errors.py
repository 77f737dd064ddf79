"""The one exception hierarchy of Portcullis.

Messages are written for the administrator who reads them: what went wrong and what
to do. Answers to clients never carry these messages for security failures; they say
only "denied" and the detail goes to the audit trail.
"""

from __future__ import annotations

from portcullis.reasons import Reason


class PortcullisError(Exception):
    """Base of every error Portcullis raises on purpose."""


class ConfigError(PortcullisError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, message: str, *, key: str | None = None, line: int | None = None,
                 path: str | None = None) -> None:
        self.key = key
        self.line = line
        self.path = path
        where = ""
        if path:
            where = path + (f":{line}" if line else "") + ": "
        keypart = f"{key}: " if key else ""
        super().__init__(f"{where}{keypart}{message}")


class ProtocolError(PortcullisError):
    """A peer sent bytes that break a protocol (mux frame, launch file, SOCKS...)."""


class LaunchFileError(ProtocolError):
    """A launch file cannot be read."""


class StoreError(PortcullisError):
    """A durable or ephemeral store failed or refused an operation."""


class TamperedRecordError(StoreError):
    """A record read back from the ephemeral store failed its integrity check: altered,
    truncated, moved to another key, or sealed under another deployment's key."""


class DuplicateError(StoreError):
    """A record with that name already exists."""


class NotFoundError(StoreError):
    """No record with that name exists."""


class PKIError(PortcullisError):
    """Certificates or keys are missing, invalid or do not match."""


class TicketError(PortcullisError):
    """A ticket cannot be issued or redeemed. Clients are told only 'denied'."""


class AuthError(PortcullisError):
    """Authentication or authorisation failed. Clients are told only 'denied'."""


class FederationError(AuthError):
    """An identity provider's answer (OpenID Connect, SAML) was refused, or the provider
    could not be asked (`unavailable`: not the user's fault). The message is the audit
    trail's reason; the user is told "denied"."""

    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        self.unavailable = unavailable
        super().__init__(message)


class DialError(PortcullisError):
    """An outbound connection could not be made; `reason` says why in the terms a mux
    REFUSE carries (`portcullis.reasons.Reason`), so a refused stream can tell its
    client. The message is for the administrator (the audit trail); `told` is what the
    client of a refused stream hears: the message itself, unless that names what is no
    client's business (a relay's address, a certificate file)."""

    def __init__(self, message: str, reason: Reason, *, told: str | None = None) -> None:
        self.reason = reason
        self.told = message if told is None else told
        super().__init__(message)


class ClientError(PortcullisError):
    """The command-line client cannot do what was asked; the message says why."""
