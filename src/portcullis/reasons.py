"""Why a stream was refused or reset, why a connection goes away, or why a dial failed:
one vocabulary for the mux wire (docs/protocol/mux.md), the relay and `DialError`.

Imports nothing, so the ground floor (`portcullis.errors`) can use it.
"""

from enum import IntEnum


class Reason(IntEnum):
    """Why a stream was refused or reset, or why a connection goes away."""

    NONE = 0
    DENIED = 1
    REFUSED = 2
    UNREACHABLE = 3
    TIMED_OUT = 4
    NAME_NOT_FOUND = 5
    PROTOCOL_ERROR = 6
    LIMIT_EXCEEDED = 7
    CANCELLED = 8
    INTERNAL_ERROR = 9
    ADMIN_ENDED = 10
    SHUTDOWN = 11
    AUTH_FAILED = 12
