"""The secret that the client's local proxies may require, and how it is checked.

`portcullis connect` can make its SOCKS5 and HTTP proxies ask for a user name and a
password generated for the run (RFC 1929 for SOCKS5, ``Proxy-Authorization: Basic``
for HTTP), so that other users of the same machine cannot ride the tunnel. This module
holds the value and the comparison both codecs use, and reads a Basic header.

Pure: no I/O, no clock, no logging. The comparison takes the same time whichever byte
differs, in the name or the password, so a local process cannot guess it byte by byte.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["ProxyCredentials", "basic_credentials", "request_admitted"]


@dataclass(frozen=True)
class ProxyCredentials:
    """The user name and password a local proxy requires (printable ASCII, no ':')."""

    user: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        for what, value in (("user", self.user), ("password", self.password)):
            if not 1 <= len(value) <= 255 or not value.isascii() or not value.isprintable():
                raise ValueError(f"proxy {what} must be 1..255 printable ASCII characters")
        if ":" in self.user:
            raise ValueError("proxy user must not contain ':' (Basic authentication)")

    def admits(self, user: bytes, password: bytes) -> bool:
        """True if ``user`` and ``password`` are these; constant time in both."""
        # Both compared, always: `and` would tell a wrong name from a wrong password.
        right_user = hmac.compare_digest(user, self.user.encode("ascii"))
        right_password = hmac.compare_digest(password, self.password.encode("ascii"))
        return right_user & right_password


def basic_credentials(value: bytes) -> tuple[bytes, bytes] | None:
    """(user, password) from a ``Basic`` authorization value; None if it is not one."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password


def request_admitted(headers: Iterable[tuple[bytes, bytes]],
                     credentials: ProxyCredentials) -> bool:
    """True if an HTTP request's headers (names in lower case, as h11 gives them) carry
    exactly one ``Proxy-Authorization: Basic`` with these credentials."""
    values = [value for name, value in headers if name == b"proxy-authorization"]
    if len(values) != 1:
        return False
    pair = basic_credentials(values[0])
    return pair is not None and credentials.admits(*pair)
