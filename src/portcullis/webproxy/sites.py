"""Where each web resource is: its upstream, and its public origin under the gateway's.

Pure: built once from the settings. A request's Host (port ignored) names the gateway,
one web resource, or nothing we serve; a URL's origin names one upstream or none.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlsplit

from portcullis.config.model import Resource
from portcullis.web.security import has_dot_segment

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Site:
    """One web resource: where its upstream is and where browsers see it."""

    resource: Resource
    scheme: str           # the upstream's
    host: str             # the upstream's host (lower case, no brackets)
    port: int             # the upstream's port
    prefix: str           # the upstream's path prefix ("" or "/app", no trailing /)
    public_host: str      # the resource's host name
    public_origin: str    # https://NAME[:PORT], the gateway's port

    @property
    def name(self) -> str:
        return self.resource.name

    @property
    def upstream_host_header(self) -> bytes:
        """Host as the upstream expects it: its port only when not the scheme's default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != DEFAULT_PORTS[self.scheme]:
            host = f"{host}:{self.port}"
        return host.encode("ascii")

    def upstream_target(self, raw_path: bytes, query: bytes) -> bytes | None:
        """The upstream request target for a public path: the prefix, then the path.
        None for a path that is not absolute or holds a dot segment (plain or
        percent-encoded): httpx or the upstream would resolve it outside the prefix."""
        if not raw_path.startswith(b"/") or has_dot_segment(raw_path):
            return None
        return self.prefix.encode() + raw_path + (b"?" + query if query else b"")

    def public_path(self, path: str) -> str | None:
        """An upstream path seen from the browser (the prefix taken off), or None when it
        lies outside the prefix."""
        if not self.prefix:
            return path
        if path == self.prefix:
            return "/"
        if path.startswith(self.prefix + "/"):
            return path[len(self.prefix):]
        return None

    def serves(self, scheme: str, host: str, port: int | None) -> bool:
        """A URL at this upstream: at its own origin, or at its host and port with the
        https that the gateway told the application (X-Forwarded-Proto) its users see —
        what an application that builds URLs from its Host and that header writes."""
        return (scheme in (self.scheme, "https") and host == self.host
                and (port or DEFAULT_PORTS.get(scheme)) == self.port)


class Destination(Enum):
    GATEWAY = "gateway"
    WEB = "web"
    UNKNOWN = "unknown"


def host_name(value: str | bytes | None) -> str | None:
    """The name in a Host header (or SNI), lower case, without port, brackets or the
    trailing dot; None when there is none or it is malformed."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not value[end + 1:].startswith(":")):
            return None
        return value[1:end] or None
    name = value.split(":", 1)[0].rstrip(".")
    if not name or any(char in name for char in "/\\@ \t?#%"):
        return None
    return name


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Sites:
    """The web resources of a deployment by public host name, and the gateway's own."""

    def __init__(self, resources: Sequence[Resource], public_url: str) -> None:
        gateway = urlsplit(public_url)
        self.gateway_host = (gateway.hostname or "").lower()
        self.gateway_url = public_url.rstrip("/")
        port = f":{gateway.port}" if gateway.port not in (None, 443) else ""
        self._by_host: dict[str, Site] = {}
        for resource in resources:
            if resource.kind != "web" or resource.host is None or resource.upstream is None:
                continue
            upstream = urlsplit(resource.upstream)
            scheme = upstream.scheme
            self._by_host[resource.host] = Site(
                resource, scheme, (upstream.hostname or "").lower(),
                upstream.port or DEFAULT_PORTS[scheme], upstream.path.rstrip("/"),
                resource.host, f"https://{resource.host}{port}")

    @property
    def all(self) -> list[Site]:
        return list(self._by_host.values())

    def by_host(self, name: str | None) -> Site | None:
        return self._by_host.get(name) if name is not None else None

    def by_name(self, resource: str) -> Site | None:
        return next((site for site in self._by_host.values() if site.name == resource), None)

    def destination(self, host: str | bytes | None) -> tuple[Destination, Site | None]:
        """Where a request with this Host goes. No Host (HTTP/1.0), the gateway's name,
        `localhost` or an address: the gateway, as before web resources existed."""
        if host is None:
            return Destination.GATEWAY, None
        name = host_name(host)
        if name is None:
            return Destination.UNKNOWN, None
        site = self._by_host.get(name)
        if site is not None:
            return Destination.WEB, site
        if name in (self.gateway_host, "localhost") or is_address(name):
            return Destination.GATEWAY, None
        return Destination.UNKNOWN, None

    def is_public(self, name: str) -> bool:
        """The gateway's name or one under it (where resources live)."""
        return name == self.gateway_host or name.endswith("." + self.gateway_host)


def covers(certificate_names: Sequence[str], host: str) -> bool:
    """Whether a certificate's DNS names cover `host`: the name itself, or a wildcard
    for exactly one label in front of the rest (RFC 6125 §6.4.3, left-most label only)."""
    for name in certificate_names:
        name = name.lower().rstrip(".")
        if name == host:
            return True
        if name.startswith("*.") and "." in host:
            label, rest = host.split(".", 1)
            if label and rest == name[2:] and "*" not in rest:
                return True
    return False
