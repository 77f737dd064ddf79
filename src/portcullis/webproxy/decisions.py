"""May this request reach the application: pure decisions that say why.

The policy is the portal broker's (`portal.broker.decide`), the same function as for
launches and the resource list, applied to the claims of the gateway session the app
cookie is tied to. Nothing a client sends is believed beyond the cookie's token, which
only names a record the gateway wrote.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from portcullis.identity.endings import Ending
from portcullis.identity.sessions import Session
from portcullis.portal.broker import decide
from portcullis.webproxy.sites import Site

# What a request may do whatever page asked for it (RFC 9110 §9.2.1's safe methods).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Sec-Fetch-Site values of a request some other site's page (or a sibling resource's,
# or the portal's: all are one site to the browser) made.
FOREIGN_FETCH = frozenset({b"same-site", b"cross-site"})
# A denial is audited once per key (session and resource) in this many seconds.
AUDIT_INTERVAL = 60.0
AUDIT_KEYS = 10_000


@dataclass(frozen=True)
class WebDecision:
    allowed: bool
    reason: str
    session: Session | None = None
    audited: bool = False     # a denial by policy (worth an audit line), not a missing cookie


def admit_request(site: Site, bound_to: str | None, standing: Session | Ending | None
                  ) -> WebDecision:
    """A request on `site`'s host whose app cookie named the resource `bound_to` (None: no
    valid cookie) and whose gateway session stands as `standing`."""
    if bound_to is None or standing is None:
        return WebDecision(False, "no application session")
    if bound_to != site.name:
        return WebDecision(False, f"the application session is for {bound_to}, not "
                                  f"{site.name}", audited=True)
    if isinstance(standing, Ending):
        return WebDecision(False, f"the gateway session ended: {standing.value}")
    broker = decide(site.resource, standing.claims)
    if not broker.allowed:
        return WebDecision(False, broker.reason, standing, audited=True)
    return WebDecision(True, broker.reason, standing)


def is_navigation(method: str) -> bool:
    """A request a browser makes to show a page, which may be sent to sign in and back;
    anything else (a form post, a script's call) is answered 401 instead."""
    return method in ("GET", "HEAD")



def cross_site_refusal(site: Site, method: str, headers: Sequence[tuple[bytes, bytes]], *,
                       websocket: bool = False) -> str | None:
    """Why a request on `site`'s host was made by another site's page, or None.

    All resource hosts and the portal are one site (they share the gateway's domain), so
    SameSite=Lax lets a page of one resource send the browser's app cookie of another
    along. A WebSocket upgrade whose Origin is not the resource's own is refused (a
    browser always sends one; a program without one is not a page of another site); so
    is a request that is not safe (POST, PUT, ...) with a foreign Origin or a
    Sec-Fetch-Site of same-site or cross-site. "none" (typed, bookmarked) and
    same-origin pass."""
    own = site.public_origin.encode()
    origins = [value.strip() for name, value in headers if name.lower() == b"origin"]
    foreign = [origin for origin in origins if origin.lower() != own]
    if websocket:
        return f"WebSocket from origin {foreign[0].decode('latin-1')}" if foreign else None
    if method in SAFE_METHODS:
        return None
    fetch = [value.strip().lower() for name, value in headers
             if name.lower() == b"sec-fetch-site"]
    if any(value in FOREIGN_FETCH for value in fetch):
        return f"{method} from another site's page (Sec-Fetch-Site)"
    if foreign:
        return f"{method} from origin {foreign[0].decode('latin-1')}"
    return None


class OncePer:
    """Says whether something keyed `key` is due at `now`: the first time, then again
    only `interval` seconds later. Holds at most `limit` keys (the oldest go first), so
    a flood of keys costs bounded memory and at worst a repeated line."""

    def __init__(self, interval: float = AUDIT_INTERVAL, limit: int = AUDIT_KEYS) -> None:
        self._interval = interval
        self._limit = limit
        self._last: dict[Hashable, float] = {}

    def due(self, key: Hashable, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return False
        self._last.pop(key, None)
        if len(self._last) >= self._limit:
            del self._last[next(iter(self._last))]
        self._last[key] = now
        return True
