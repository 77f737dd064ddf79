"""The typed configuration of a deployment: one TOML file, validated by pydantic.

Every model forbids unknown keys, so a typo is an error that names the key rather
than a setting silently ignored. Paths are kept as written; `Settings.resolve()` makes
them absolute against the directory of the configuration file.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from portcullis.config.auth import AuthSettings
from portcullis.config.idp import OidcSettings
from portcullis.config.shadow import ShadowSettings
from portcullis.config.values import check_networks, parse_host_port
from portcullis.errors import AuthError
from portcullis.identity.names import canonical_username
from portcullis.policy.model import PolicyRule, check_unique_names
from portcullis.policy.relay_allow import parse_allow_list

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listen(value: str) -> str:
    parse_host_port(value, what="listen")
    return value


class GatewaySettings(Section):
    public_url: str = "https://localhost:8443"
    listen: str = "127.0.0.1:8443"
    # Where the portal role answers when it does not run in the gateway's process.
    portal_url: str | None = None
    # How long a launched connection may stay idle is the application's business; the
    # gateway only bounds how long a client may take to present its ticket.
    ticket_wait_seconds: float = Field(default=10.0, gt=0, le=120)
    # Worker processes serving this node's listening ports (`portcullis up` and `serve`);
    # absent: one per core. See docs/deployment.md, "Workers".
    workers: int | None = Field(default=None, ge=1, le=256)

    _check_listen = field_validator("listen")(_listen)

    @field_validator("public_url", "portal_url")
    @classmethod
    def _https_url(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https://[^/\s]+(/[^\s]*)?", value):
            raise ValueError(f"must be an https:// URL, got {value!r}")
        return value.rstrip("/") if value else value


class PortalSettings(Section):
    listen: str = "127.0.0.1:8444"
    _check_listen = field_validator("listen")(_listen)


class StaSettings(Section):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9]{1,16}$")] = "STA01"
    listen: str = "127.0.0.1:8445"
    ticket_lifetime: float = Field(default=100.0, gt=0, le=3600)
    bind_client_address: bool = False
    # Every STA that portals and gateways may use, by id; tickets name their STA.
    authorities: dict[str, str] = Field(default_factory=lambda: {"STA01": "https://127.0.0.1:8445"})

    _check_listen = field_validator("listen")(_listen)

    @field_validator("authorities")
    @classmethod
    def _authorities(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("at least one STA must be listed")
        for sta_id, url in value.items():
            if not re.fullmatch(r"[A-Za-z0-9]{1,16}", sta_id):
                raise ValueError(f"STA id {sta_id!r} must be 1-16 letters or digits")
            if not url.startswith("https://"):
                raise ValueError(f"STA {sta_id} URL must be https://, got {url!r}")
        return {k: v.rstrip("/") for k, v in value.items()}


class SessionSettings(Section):
    idle_timeout: float = Field(default=900.0, gt=0)
    absolute_timeout: float = Field(default=43200.0, gt=0)
    login_step_timeout: float = Field(default=300.0, gt=0)


class StoreSettings(Section):
    durable: str = "sqlite:///portcullis.db"
    # The embedded store, one file that a node's processes share and a restart keeps;
    # redis:// for several nodes; memory:// for tests only.
    ephemeral: str = "sqlite:///ephemeral.db"

    @field_validator("durable")
    @classmethod
    def _durable(cls, value: str) -> str:
        if not re.match(r"(sqlite|postgresql|postgres)(\+\w+)?://", value):
            raise ValueError(f"must be a sqlite:/// or postgresql:// URL, got {value!r}")
        return value

    @field_validator("ephemeral")
    @classmethod
    def _ephemeral(cls, value: str) -> str:
        if not re.match(r"(memory://|redis://|rediss://|sqlite:///.)", value):
            raise ValueError("must be sqlite:///file.db, a redis:// or rediss:// URL, or "
                             f"memory:// (tests), got {value!r}")
        return value


class TlsSettings(Section):
    ca_cert: str = "pki/ca.crt"
    # Role certificates are pki/<role>.crt and pki/<role>.key unless given here.
    directory: str = "pki"
    # A node re-issues its role certificates from the CA (when pki/ca.key is there) this
    # many days before they expire, at start and daily; and warns this many days before.
    auto_renew: bool = True
    renew_before_days: int = Field(default=30, ge=1, le=180)
    warn_before_days: int = Field(default=30, ge=1, le=180)


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    audit_file: str = "audit.jsonl"


class VpnSettings(Section):
    """What the gateway pushes to a tunnel client (the client enforces nothing of it:
    every stream is checked against the policies at the gateway)."""

    # on: only `networks` go through the tunnel; off: everything; reverse: everything
    # except `networks`.
    split_tunnel: Literal["on", "off", "reverse"] = "on"
    # Empty with split_tunnel "on": the networks of the user's allow rules.
    networks: list[str] = Field(default_factory=list)
    dns_servers: list[str] = Field(default_factory=list)
    dns_suffixes: list[str] = Field(default_factory=list)
    dial_timeout: float = Field(default=10.0, gt=0, le=120)
    # How often a tunnel checks that its sign-in still holds (sign-out, timeouts and
    # password changes then end it), and keeps an active tunnel's session alive.
    session_check: float = Field(default=30.0, ge=0.5, le=3600)
    # A UDP flow with no datagram either way for this long is closed.
    udp_idle_timeout: float = Field(default=60.0, gt=0, le=3600)
    # Tunnels and launches: PING a peer quiet for this long; end one silent for that long.
    keepalive_interval: float = Field(default=15.0, gt=0, le=600)
    dead_peer_timeout: float = Field(default=45.0, gt=0, le=3600)
    # Each tunnel's own intranet address, and the source of its outbound connections.
    # The pool must be routed to the gateway host and local on it (see docs/vpn.md).
    address_pool: str | None = None
    # When every address is leased: refuse new tunnels, or let them use the gateway's.
    pool_full: Literal["refuse", "spill"] = "refuse"

    @field_validator("address_pool")
    @classmethod
    def _pool(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a network ({exc})") from None
        if network.num_addresses < 2:
            raise ValueError("an address pool needs at least 2 addresses")
        return value

    _networks = field_validator("networks")(check_networks)

    @field_validator("dead_peer_timeout")
    @classmethod
    def _dead_after_keepalive(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("keepalive_interval")
        if interval is not None and value <= interval:
            raise ValueError(f"must be more than keepalive_interval ({interval})")
        return value

    @field_validator("dns_servers")
    @classmethod
    def _dns_servers(cls, value: list[str]) -> list[str]:
        for server in value:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ValueError(f"{server!r} is not an IP address") from None
        return value


class LimitSettings(Section):
    max_request_body: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_header_bytes: int = Field(default=16 * 1024, ge=4096, le=256 * 1024)
    # The whole request head must arrive within this many seconds (web/edge.py).
    header_timeout: float = Field(default=20.0, gt=0, le=300)
    tls_handshake_timeout: float = Field(default=10.0, gt=0, le=120)
    # Idle time allowed between two requests on one connection.
    keepalive_timeout: int = Field(default=5, ge=1, le=300)
    # Open connections of the node, tunnels and launches included; and from one address
    # (generous: many users may share one NAT address).
    max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    max_connections_per_address: int = Field(default=1_000, ge=1, le=1_000_000)

    @field_validator("max_connections_per_address")
    @classmethod
    def _per_address(cls, value: int, info: ValidationInfo) -> int:
        total = info.data.get("max_connections")
        if total is not None and value > total:
            raise ValueError(f"must not exceed limits.max_connections ({total})")
        return value


class RelaySettings(Section):
    """The relay role (`portcullis serve relay`), in the second DMZ: it connects inward
    for the edge gateway, to the destinations `allow` names and nowhere else."""

    # Classic mode: where edges connect to it (mutual TLS, SOCKS5 inside). Port 0 picks
    # a free port (tests).
    listen: str = "0.0.0.0:8444"
    # Destinations the relay may connect to, checked at the relay whatever the edge
    # asked: "NETWORK:PORTS" ("10.0.0.0/8:1-65535", "10.1.2.3/32:443,8443") or
    # "NAME:PORTS" ("sta.corp.example:443"). Empty: nothing is relayed.
    allow: list[str] = Field(default_factory=list)
    # Health, readiness and status (plain HTTP; keep it on loopback or a management LAN).
    health_listen: str = "127.0.0.1:8447"
    # Dial-out mode: the edge nodes this relay connects out to (their public https://
    # URL), and how many connections it keeps to each.
    edges: list[str] = Field(default_factory=list)
    connections: int = Field(default=2, ge=1, le=16)
    dial_timeout: float = Field(default=10.0, gt=0, le=120)
    handshake_timeout: float = Field(default=10.0, gt=0, le=120)
    # Reconnect backoff of dial-out connections: from min to max seconds, with jitter.
    reconnect_min: float = Field(default=0.2, gt=0, le=60)
    reconnect_max: float = Field(default=10.0, gt=0, le=600)

    @field_validator("listen", "health_listen")
    @classmethod
    def _listen_any_port(cls, value: str) -> str:
        parse_host_port(value, what="listen", any_port=True)
        return value

    @field_validator("allow")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        parse_allow_list(value)   # the relay's own parser: one syntax, one set of errors
        return value

    @field_validator("edges")
    @classmethod
    def _edges(cls, value: list[str]) -> list[str]:
        for url in value:
            if not re.fullmatch(r"https://[^/\s]+", url.rstrip("/")):
                raise ValueError(f"an edge is its https://HOST[:PORT] URL, got {url!r}")
        return [url.rstrip("/") for url in value]

    @field_validator("reconnect_max")
    @classmethod
    def _backoff_grows(cls, value: float, info: ValidationInfo) -> float:
        least = info.data.get("reconnect_min")
        if least is not None and value < least:
            raise ValueError(f"must not be less than reconnect_min ({least})")
        return value


class DialerSettings(Section):
    """How the edge reaches the inside: directly, or through a relay (double hop). One
    switch for every inward connection: launches, tunnel streams, the STA, the portal."""

    via: Literal["direct", "relay"] = "direct"
    # Classic mode: the relay's HOST:PORT (its certificate must name HOST).
    relay: str | None = None
    # classic: the edge connects to the relay (SOCKS5 in mutual TLS), one TLS connection
    # per relayed connection; dial-out: the relay connects to the edge's own port and the
    # edge's connections travel as mux streams over those (no inbound rule into DMZ2).
    mode: Literal["classic", "dial-out"] = "classic"
    timeout: float = Field(default=10.0, gt=0, le=120)

    @field_validator("relay")
    @classmethod
    def _relay(cls, value: str | None) -> str | None:
        if value is not None:
            parse_host_port(value, what="relay")
        return value

    @model_validator(mode="after")
    def _classic_needs_relay(self) -> DialerSettings:
        if self.via == "relay" and self.mode == "classic" and not self.relay:
            raise ValueError("dialer.relay: classic mode needs the relay's HOST:PORT")
        return self


# One DNS label: what a web resource's host name is made of.
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class Resource(Section):
    """A published application. `tcp`: launched with a ticket by the rich client (launch
    files); `web`: reverse-proxied in the browser at its own host name; `vnc`: a desktop
    shown in the portal by noVNC. Visibility, policy and audit are the same for all."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    title: str = Field(min_length=1, max_length=200)
    kind: Literal["tcp", "web", "vnc"] = "tcp"
    # tcp and vnc: the server's HOST:PORT (never shown to users).
    address: str = ""
    groups: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    description: str = ""
    # web: where the application is (http(s)://HOST[:PORT][/PREFIX]) and the public host
    # name it gets under the gateway's (its own origin, its own cookies).
    upstream: str | None = None
    host: str | None = None
    # web: also send plain X-Forwarded-User/-Email/-Groups (always stripped from clients).
    identity_headers: bool = False
    # web, https upstream: the CA bundle that verifies it (default: the system's).
    upstream_ca_file: str | None = None
    # vnc: a file holding the server's VNC password; the gateway answers it, users never
    # see it.
    password_file: str | None = None

    @field_validator("title", "description", mode="before")
    @classmethod
    def _printable(cls, value: object) -> object:
        if not isinstance(value, str):
            return value   # the type check that follows says what is wrong
        # Titles travel in launch files, where a line break could forge a field.
        if any(ord(char) < 0x20 or ord(char) == 0x7F or char in "\u2028\u2029\x85"
               for char in value):
            raise ValueError("must not contain control characters or line breaks")
        return value.strip()

    @field_validator("users")
    @classmethod
    def _canonical_users(cls, value: list[str]) -> list[str]:
        # Compared with signed-in users' canonical names, so written the same way.
        try:
            return [canonical_username(name) for name in value]
        except AuthError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            parse_host_port(value, what="address")
        return value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip().lower().rstrip(".")
        labels = name.split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"{value!r} is not a host name (letters, digits and '-', "
                             "dot-separated; no port, no scheme)")
        return name

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"{value!r}: expected http(s)://HOST[:PORT][/PREFIX]")
        if parsed.query or parsed.fragment or parsed.username or parsed.password:
            raise ValueError(f"{value!r}: no query, fragment or credentials in an upstream")
        try:
            _ = parsed.port   # raises on a port that is not a number from 1 to 65535
        except ValueError:
            raise ValueError(f"{value!r}: the port is not a number from 1 to 65535") from None
        return value.rstrip("/")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Resource:
        if self.kind == "web":
            missing = [key for key in ("upstream", "host") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"a web resource needs {' and '.join(missing)} "
                                 "(upstream = \"http://HOST:PORT\", host = \"NAME.under.the."
                                 "gateway\")")
            if self.address or self.password_file:
                raise ValueError("a web resource has upstream and host, not address or "
                                 "password_file")
        else:
            if not self.address:
                raise ValueError(f"a {self.kind} resource needs address = \"HOST:PORT\"")
            extra = [key for key in ("upstream", "host", "upstream_ca_file")
                     if getattr(self, key) is not None]
            if self.identity_headers:
                extra.append("identity_headers")
            if self.kind == "tcp" and self.password_file is not None:
                extra.append("password_file")
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for "
                                 f"{'web' if 'password_file' not in extra else 'vnc'} "
                                 f"resources, this one is kind = \"{self.kind}\"")
        return self



class Settings(Section):
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    portal: PortalSettings = Field(default_factory=PortalSettings)
    sta: StaSettings = Field(default_factory=StaSettings)
    session: SessionSettings = Field(default_factory=SessionSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    vpn: VpnSettings = Field(default_factory=VpnSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    dialer: DialerSettings = Field(default_factory=DialerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    # The gateway as an OpenID Connect provider for other applications.
    oidc: OidcSettings = Field(default_factory=OidcSettings)
    # The shadow hub: registered devices, who may shadow them, secure shadowing mandatory.
    shadow: ShadowSettings = Field(default_factory=ShadowSettings)
    # Members of these groups may use the administration API (sessions list/kill).
    admin_groups: list[str] = Field(default_factory=lambda: ["admins"])
    secrets_dir: str = "secrets"
    resources: list[Resource] = Field(default_factory=list)
    policies: list[PolicyRule] = Field(default_factory=list)

    # Set by the loader: the directory relative paths are resolved against.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _unique_resources(self) -> Settings:
        check_unique_names(self.policies)
        seen: set[str] = set()
        hosts: set[str] = set()
        for resource in self.resources:
            if resource.name in seen:
                raise ValueError(f"resource name {resource.name!r} is used twice")
            seen.add(resource.name)
            if resource.host is not None:
                gateway_host = (urlsplit(self.gateway.public_url).hostname or "").lower()
                if not resource.host.endswith("." + gateway_host):
                    raise ValueError(
                        f"resources: {resource.name}: host {resource.host!r} must be a name "
                        f"under the gateway's ({'NAME.' + gateway_host!r}), so that one "
                        "wildcard certificate and the gateway's sign-in serve it")
                if resource.host in hosts:
                    raise ValueError(f"resources: host {resource.host!r} is used twice")
                hosts.add(resource.host)
        return self

    @model_validator(mode="after")
    def _pool_needs_direct_dialer(self) -> Settings:
        # Through a relay the servers see the relay's address: a pool address would be
        # promised to the intranet's firewalls and silently not kept.
        if self.vpn.address_pool and self.dialer.via == "relay":
            raise ValueError("vpn.address_pool: tunnels' pool addresses are the source of "
                             "their connections only with dialer.via = \"direct\"; through "
                             "a relay the servers see the relay's address. Remove "
                             "address_pool, or dial directly")
        return self

    def path(self, relative: str) -> Path:
        candidate = Path(relative)
        return candidate if candidate.is_absolute() else self.base_dir / candidate

    def role_cert(self, role: str) -> tuple[Path, Path]:
        directory = self.path(self.tls.directory)
        return directory / f"{role}.crt", directory / f"{role}.key"

    @property
    def ca_cert_path(self) -> Path:
        return self.path(self.tls.ca_cert)

    def durable_url(self) -> str:
        """The durable store URL with a relative SQLite path made absolute."""
        return self._absolute_sqlite(self.store.durable)

    def ephemeral_url(self) -> str:
        """The ephemeral store URL with a relative SQLite path made absolute: every
        process of the deployment (workers, the CLI) opens the same file."""
        return self._absolute_sqlite(self.store.ephemeral)

    def _absolute_sqlite(self, url: str) -> str:
        match = re.match(r"(sqlite(?:\+\w+)?:///)(.*)", url)
        if match and match.group(2) and not match.group(2).startswith("/"):
            return match.group(1) + str(self.path(match.group(2)))
        return url

