"""What crosses the web proxy, header by header: the request as the upstream gets it,
the answer as the browser gets it.

Pure functions of bytes and what the deployment knows (`Site`s): no I/O. They never let
through an identity or forwarding header a client sent, the gateway's own cookie, or a
hop-by-hop header; and never let an upstream's internal address reach the browser (a
redirect there is refused) nor set a cookie for the gateway's domain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from portcullis.webproxy.sites import Site, host_name, is_address

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1, and what proxies have used as such (Keep-Alive, Proxy-Connection).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                        b"proxy-authorization", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
# Never from a client: the gateway says who the user is and where the request came from.
# Nor any name with "_": CGI and FastCGI servers read X_Forwarded_User as
# X-Forwarded-User (both become HTTP_X_FORWARDED_USER), as nginx drops them by default.
CLIENT_FORBIDDEN_PREFIXES = (b"x-portcullis-", b"x-forwarded-")
CLIENT_FORBIDDEN = frozenset({b"forwarded", b"x-real-ip", b"host", b"expect"})
# The app-session cookie on resource hosts (host-only by its prefix); never sent upstream,
# never set by an upstream.
APP_COOKIE = "__Host-portcullis-app"
STATE_COOKIE = "__Host-portcullis-state"   # the sign-in's (webproxy.handoff)
OWN_COOKIE_PREFIX = "__host-portcullis"
ASSERTION_HEADER = b"x-portcullis-assertion"
# Names no web application has a claim to, however it spells them.
INTERNAL_SUFFIXES = (".local", ".internal", ".lan", ".localdomain", ".home.arpa", ".corp",
                     ".intranet", ".localhost")


def connection_named(headers: Headers) -> set[bytes]:
    """The header names a Connection header lists (they are hop-by-hop too)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return named


def without_cookie(value: bytes, *cookies: str) -> bytes:
    """A Cookie header without the cookies named `cookies`."""
    wanted = {cookie.encode() for cookie in cookies}
    kept = [pair.strip() for pair in value.split(b";")
            if pair.strip() and pair.strip().split(b"=", 1)[0].strip() not in wanted]
    return b"; ".join(kept)


def cookie_value(headers: Headers, cookie: str) -> str | None:
    """The value of the cookie `cookie` in the request's Cookie headers (the first)."""
    wanted = cookie.encode()
    for name, value in headers:
        if name.lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            key, _, found = pair.strip().partition(b"=")
            if key.strip() == wanted:
                try:
                    return found.strip().decode("ascii")
                except UnicodeDecodeError:
                    return None
    return None


@dataclass(frozen=True)
class Forwarding:
    """What the gateway tells the upstream about the request it forwards."""

    client: str            # the client's address
    identity: Headers = field(default_factory=list)   # the assertion (and identity headers)


def upstream_request_headers(headers: Headers, site: Site, forwarding: Forwarding, *,
                             websocket: bool = False) -> Headers:
    """The client's request headers as the upstream gets them: everything the client
    may not decide or that is hop-by-hop removed, then Host, X-Forwarded-* and identity
    set by the gateway. A WebSocket upgrade keeps its Upgrade and Connection."""
    named = connection_named(headers)
    kept: Headers = [(b"host", site.upstream_host_header)]
    for name, value in headers:
        lower = name.lower()
        if (lower in HOP_BY_HOP or lower in named or lower in CLIENT_FORBIDDEN
                or lower.startswith(CLIENT_FORBIDDEN_PREFIXES) or b"_" in lower):
            continue
        if lower == b"cookie":
            value = without_cookie(value, APP_COOKIE, STATE_COOKIE)
            if not value:
                continue
        kept.append((lower, value))
    if websocket:
        kept += [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]
    return [*kept, (b"x-forwarded-for", forwarding.client.encode()),
            (b"x-forwarded-proto", b"https"),
            # The resource's public authority, not the Host as sent (any case or port).
            (b"x-forwarded-host", site.public_origin.split("://", 1)[1].encode()),
            *forwarding.identity]


# -- the answer ------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """A header value as the browser gets it (None: dropped), and why it changed."""

    value: bytes | None
    reason: str


def rewrite_location(location: bytes, site: Site, sites: Sequence[Site],
                     is_public: Callable[[str], bool]) -> Verdict:
    """A redirect's target as the browser may see it.

    At an upstream's origin (this resource's or another's): that resource's public
    origin, the upstream's prefix taken off. Relative: the prefix taken off an absolute
    path. Elsewhere on the gateway's names or on the Internet: unchanged. At any other
    internal address (an address that is not global, a single-label name, a reserved
    internal suffix): refused, so that it never leaks."""
    try:
        # Browsers read a backslash in a web address as a slash ("/\\internal/x" is
        # "//internal/x"): so is it read here.
        text = location.decode("ascii").replace("\\", "/").replace("\t", "")
        parts = urlsplit(text)
        port = parts.port
    except (UnicodeDecodeError, ValueError):
        return Verdict(None, "not a valid URL")
    if not parts.netloc:
        if parts.scheme.lower() in ("http", "https"):
            # "http:internal/x": a browser takes what follows for the host.
            return Verdict(None, "a web address without a host")
        if parts.scheme:
            return Verdict(location, "not a web address: the browser decides")
        if not parts.path.startswith("/"):
            return Verdict(location, "relative to the page")
        public = site.public_path(parts.path)
        if public is None:
            return Verdict(None, f"outside the application's prefix {site.prefix}")
        return Verdict(urlunsplit(("", "", public, parts.query, parts.fragment)).encode(),
                       "relative: prefix taken off" if public != parts.path else "relative")
    scheme = (parts.scheme or site.scheme).lower()
    host = (parts.hostname or "").lower()
    for candidate in (site, *sites):
        if candidate.serves(scheme, host, port):
            public = candidate.public_path(parts.path or "/")
            if public is None:
                return Verdict(None, f"outside {candidate.name}'s prefix")
            rewritten = urlunsplit(("https", candidate.public_origin.split("://", 1)[1],
                                    public, parts.query, parts.fragment))
            return Verdict(rewritten.encode(), f"upstream of {candidate.name}: its public host")
    if is_public(host):
        return Verdict(location, "a name of the gateway")
    if is_internal(host, sites):
        return Verdict(None, "an internal address")
    return Verdict(location, "elsewhere")


def is_internal(host: str, sites: Sequence[Site] = ()) -> bool:
    """A name or address a browser has no business with: any upstream's host (at another
    port), an address that is not global, a name without a dot or under a reserved
    suffix."""
    if not host:
        return True
    if any(host == site.host for site in sites):
        return True
    if is_address(host):
        return not ipaddress.ip_address(host).is_global
    return "." not in host or host.endswith(INTERNAL_SUFFIXES)


def rewrite_set_cookie(value: bytes, site: Site, gateway_host: str) -> Verdict:
    """An upstream's cookie as the browser gets it: host-only on the resource's host
    (Domain dropped when it is the upstream's or the resource's), Secure, the
    upstream's prefix taken off its Path. Refused (dropped): a Domain at or above the
    gateway's domain, or any other domain; a cookie named like the gateway's own."""
    parts = value.split(b";")
    name = parts[0].split(b"=", 1)[0].strip()
    if name.decode("latin-1").lower().startswith(OWN_COOKIE_PREFIX):
        return Verdict(None, "named like the gateway's own cookies")
    kept = [parts[0].strip()]
    secure = False
    reasons: list[str] = []
    for attribute in parts[1:]:
        key, _, attr_value = attribute.strip().partition(b"=")
        lower = key.strip().lower()
        if lower == b"domain":
            domain = attr_value.strip().lstrip(b".").decode("latin-1").lower().rstrip(".")
            if domain == gateway_host or gateway_host.endswith("." + domain):
                return Verdict(None, f"Domain={domain} is the gateway's domain or above")
            if not domain or domain in (site.public_host, site.host) or \
                    site.host.endswith("." + domain):
                reasons.append("Domain dropped: host-only")
                continue
            return Verdict(None, f"Domain={domain} is neither the application's nor its "
                                 "host's")
        if lower == b"path":
            path = attr_value.strip().decode("latin-1")
            public = site.public_path(path) if path.startswith("/") else None
            if public is not None and public != path:
                kept.append(b"Path=" + public.encode("latin-1"))
                reasons.append("prefix taken off Path")
                continue
        if lower == b"secure":
            secure = True
        if attribute.strip():
            kept.append(attribute.strip())
    if not secure:
        kept.append(b"Secure")
        reasons.append("Secure added")
    return Verdict(b"; ".join(kept), ", ".join(reasons) or "unchanged")


@dataclass(frozen=True)
class Answer:
    """An upstream's response headers as the browser gets them."""

    headers: Headers
    refused_location: str | None = None   # why a redirect was refused (answer 502)
    refused_cookies: tuple[str, ...] = ()  # why each dropped cookie was


def browser_response_headers(headers: Headers, site: Site, sites: Sequence[Site],
                             gateway_host: str) -> Answer:
    """Hop-by-hop headers dropped, Location and Set-Cookie rewritten (see above)."""
    named = connection_named(headers)
    kept: Headers = []
    refused_cookies: list[str] = []
    refused_location: str | None = None

    def is_public(name: str) -> bool:
        return name == gateway_host or name.endswith("." + gateway_host)

    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        if lower == b"location":
            verdict = rewrite_location(value, site, sites, is_public)
            if verdict.value is None:
                refused_location = verdict.reason
                continue
            value = verdict.value
        elif lower == b"set-cookie":
            verdict = rewrite_set_cookie(value, site, gateway_host)
            if verdict.value is None:
                refused_cookies.append(verdict.reason)
                continue
            value = verdict.value
        kept.append((lower, value))
    return Answer(kept, refused_location, tuple(refused_cookies))


def request_host_ok(value: bytes | None, site: Site) -> bool:
    """The Host of a request on a resource's connection names that resource."""
    return host_name(value) == site.public_host
