"""One canonical form of a user name, applied once at the edge.

Every factor and store key uses the canonical form, so that "Alice", " alice " and
"ａｌｉｃｅ" (full-width) are one identity and a variant spelling is never a second
account.
"""

from __future__ import annotations

import re
import unicodedata

from portcullis.errors import AuthError

MAX_USERNAME = 256
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\]")


def canonical_username(raw: str) -> str:
    name = unicodedata.normalize("NFKC", raw).strip().casefold()
    if not name or len(name) > MAX_USERNAME or _FORBIDDEN.search(name):
        raise AuthError("user names are 1-256 characters without control characters or slashes")
    return name
