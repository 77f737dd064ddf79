"""`portcullis init`: a working deployment in one directory, on embedded defaults.

It writes a commented portcullis.toml, a CA with the role certificates, the token key,
the SQLite database with an administrator account, and two example resources. It
refuses to touch a directory that already holds anything.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from portcullis.config import config_path, load_settings
from portcullis.errors import ConfigError
from portcullis.identity.passwords import hash_password
from portcullis.pki import create_ca, issue_certificate, write_pair
from portcullis.pki.roles import ROLE_COMMON_NAMES
from portcullis.store import DurableStore
from portcullis.tokens import TokenHasher

ADMIN_USER = "admin"

CONFIG_TEMPLATE = """\
# Portcullis deployment configuration. Reference: docs/configuration.md
# Relative paths are relative to this file's directory.

# Who may administer sessions ('portcullis sessions list/kill').
admin_groups = ["admins"]

[gateway]
# The address users and launch files use to reach the gateway.
public_url = "https://{hostname}:{port}"
# Where the gateway listens (the one TLS port at the edge).
listen = "{listen_host}:{port}"
# Worker processes behind these ports; absent: one per core (one with memory://).
# workers = 2
# When the portal role runs in another process: its URL (mutual TLS).
# portal_url = "https://portal.internal:{portal_port}"

[portal]
# Used only by 'portcullis serve portal' without the gateway role.
listen = "127.0.0.1:{portal_port}"

[sta]
# This STA's id: tickets name the STA that issued them.
id = "STA01"
listen = "127.0.0.1:{sta_port}"
ticket_lifetime = 100          # seconds a ticket stays redeemable
bind_client_address = false    # true: only the address that asked for a ticket may use it

# Every STA the portal and gateway may use, by id (mutual TLS).
[sta.authorities]
STA01 = "https://127.0.0.1:{sta_port}"

[session]
idle_timeout = 900             # seconds without a request before a session ends
absolute_timeout = 43200       # seconds after sign-in a session ends regardless

[store]
durable = "sqlite:///portcullis.db"   # or postgresql://user@host/db
ephemeral = "sqlite:///ephemeral.db"  # or redis://host:6379/0 for several nodes

[tls]
ca_cert = "pki/ca.crt"
directory = "pki"              # role certificates: pki/<role>.crt and pki/<role>.key

[log]
level = "info"
format = "text"                # or "json"
audit_file = "audit.jsonl"     # the audit trail: one JSON object per security event

[limits]
max_request_body = 65536       # bytes; larger requests get 413
max_header_bytes = 16384

# The SSL VPN tunnel ('portcullis connect'). Reference: docs/vpn.md
[vpn]
split_tunnel = "on"            # on: only `networks`; off: everything; reverse: all but them
networks = []                  # empty: the networks of each user's allow rules
dns_servers = []
dns_suffixes = []
# address_pool = "10.99.0.0/24"  # each tunnel's own intranet IP (routed to this host)
# pool_full = "refuse"           # or "spill": use the gateway's own address

# Double hop (docs/deployment.md): how the gateway reaches the inside. "direct" connects
# from this host; "relay" goes through a relay in a second DMZ ('portcullis serve relay').
# [dialer]
# via = "relay"
# mode = "classic"               # the gateway connects to the relay; or "dial-out": the
#                                # relay connects to the gateway (no inbound rule to DMZ2)
# relay = "relay.dmz2.example:8444"   # classic mode: the relay's HOST:PORT
# timeout = 10

# On the relay host only ('portcullis serve relay --dir DIR').
# [relay]
# listen = "0.0.0.0:8444"        # classic mode: where gateways connect (mutual TLS, SOCKS5)
# allow = ["10.0.0.0/8:1-65535", "sta.corp.example:443"]   # where the relay may connect
# health_listen = "127.0.0.1:8447"   # /health, /ready, /status (plain HTTP)
# edges = ["https://gateway.example:{port}"]   # dial-out mode: the gateways it connects to
# connections = 2                # dial-out: connections kept to each gateway
# handshake_timeout = 10         # seconds for the TLS handshake, then for the SOCKS request
# dial_timeout = 10              # seconds to resolve, then to connect to, a destination

# Secure shadowing (docs/shadow.md): device agents register here ('portcullis shadow-agent').
[shadow]
listen = "{shadow_listen_host}:{shadow_port}"   # the agents' port on the hub (mutual TLS)
mandatory = false              # true: devices refuse plain VNC and tell the viewer why
# [[shadow.device_groups]]
# name = "kiosks"
# devices = ["kiosk-*"]          # device names, shell-style patterns
# consent = "ask"                # none | notify | ask (the device's user must say yes)
# [[shadow.policies]]            # none written: administrators may shadow every device
# name = "helpdesk-kiosks"
# action = "allow"
# groups = ["helpdesk"]
# device_groups = ["kiosks"]

# Access policies of the tunnel, in order; the first that matches decides; no match: deny.
# [[policies]]
# name = "staff-web"
# action = "allow"
# groups = ["staff"]
# networks = ["10.1.0.0/16"]
# ports = ["80", "443"]
# protocols = ["tcp"]

# Published resources. Users see and launch those whose groups (or users) include them.
[[resources]]
name = "intranet"
title = "Intranet web server"
description = "An example: the intranet web site (edit address to point at yours)."
address = "127.0.0.1:8080"
groups = ["staff"]

[[resources]]
name = "ssh"
title = "Jump host (SSH)"
description = "An example: SSH to the jump host."
address = "127.0.0.1:22"
groups = ["admins"]
"""


@dataclass(frozen=True)
class InitResult:
    directory: Path
    admin_user: str
    admin_password: str
    portal_url: str


def init_deployment(directory: Path, *, hostname: str = "localhost",
                    port: int = 8443) -> InitResult:
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} already exists and is not empty; "
                          "choose another --dir (init never overwrites a deployment)")
    if not 0 < port < 65533:
        raise ConfigError("port must be 1-65532 (the portal, STA and shadow hub use the "
                          "next three)", key="--port")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    listen_host = "127.0.0.1" if hostname in ("localhost", "127.0.0.1") else "0.0.0.0"
    config_path(directory).write_text(CONFIG_TEMPLATE.format(
        hostname=f"[{hostname}]" if ":" in hostname else hostname, port=port,
        listen_host=listen_host, portal_port=port + 1,
        sta_port=port + 2, shadow_port=port + 3,
        # Devices are elsewhere on the network: the hub listens beyond loopback unless
        # the whole deployment is a local trial.
        shadow_listen_host=listen_host))

    pki = directory / "pki"
    pki.mkdir(mode=0o700)
    ca = create_ca(f"Portcullis CA ({hostname})")
    write_pair(pki, "ca", ca)
    # A hostname that is an address goes in as an IP name: clients check it that way.
    try:
        addresses = sorted({str(ipaddress.ip_address(hostname)), "127.0.0.1", "::1"})
        names = ["localhost"]
    except ValueError:
        addresses = ["127.0.0.1", "::1"]
        names = sorted({hostname, "localhost"})
    for role, common_name in ROLE_COMMON_NAMES.items():
        cert = issue_certificate(ca, common_name, dns_names=names, ip_addresses=addresses)
        write_pair(pki, role, cert)
    # pki/ca.key signs nothing at run time: an administrator may move it offline and
    # bring it back to issue more certificates.
    TokenHasher.create_key_file(directory / "secrets")

    settings = load_settings(config_path(directory))
    password = secrets.token_urlsafe(12)

    async def create_admin() -> None:
        store = await DurableStore.open(settings.durable_url())
        try:
            await store.add_user(ADMIN_USER, hash_password(password), ["admins", "staff"])
        finally:
            await store.close()

    asyncio.run(create_admin())
    # It holds password hashes: the service's eyes only.
    for database in directory.glob("portcullis.db*"):
        database.chmod(0o600)
    return InitResult(directory, ADMIN_USER, password, settings.gateway.public_url)
