"""May this request reach the application: pure decisions that say why.

The policy is the portal broker's (`portal.broker.decide`), the same function as for
launches and the resource list, applied to the claims of the gateway session the app
cookie is tied to. Nothing a client sends is believed beyond the cookie's token, which
only names a record the gateway wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

from portcullis.identity.endings import Ending
from portcullis.identity.sessions import Session
from portcullis.portal.broker import decide
from portcullis.webproxy.sites import Site


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

