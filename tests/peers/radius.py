"""A real FreeRADIUS 3 server for the RADIUS tests, on a free UDP port of 127.0.0.1.

The configuration is written from scratch into a private directory (the system's
/etc/freeradius and its service are never touched): one radiusd.conf with only the
pap, files and always modules, one virtual server with a single auth listener, one
client (127.0.0.1) that must send Message-Authenticator, and a users file:

- alice / alice-pass: Access-Accept with Class "staff", Filter-Id "finance" and a
  Reply-Message;
- bob / bob-pass: Access-Accept (used with a wrong password, for Access-Reject);
- dave / dave-pass: Access-Challenge ("Enter the code sent to your phone" and a State),
  then Access-Accept for CHALLENGE_CODE with that State echoed, Access-Reject otherwise.

A tiny RADIUS dictionary for pyrad is written next to the configuration
(FreeRadius.dictionary), because FreeRADIUS's own dictionaries use syntax and
attribute types that pyrad does not read reliably.

start_freeradius() can be called several times: each server gets its own directory,
port and process (for failover tests).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Deployment, Process, free_port
from peers.config import provider_toml
from peers.missing import missing_peer

FREERADIUS = "/usr/sbin/freeradius"

SECRET = b"portcullis-radius-secret"
"""The shared secret of the 127.0.0.1 client, unless start_freeradius gets another."""

ALICE, ALICE_PASSWORD = "alice", "alice-pass"
BOB, BOB_PASSWORD = "bob", "bob-pass"
DAVE, DAVE_PASSWORD = "dave", "dave-pass"
USERS = {ALICE: ALICE_PASSWORD, BOB: BOB_PASSWORD, DAVE: DAVE_PASSWORD}

ALICE_CLASS = "staff"
ALICE_FILTER_ID = "finance"
ALICE_REPLY_MESSAGE = "Welcome, alice"
CHALLENGE_USER = DAVE
CHALLENGE_MESSAGE = "Enter the code sent to your phone"
CHALLENGE_CODE = "424242"
DAVE_REPLY_MESSAGE = "Welcome, dave"

STARTUP_TIMEOUT = 10.0

# The attributes the tests send or read, in the FreeRADIUS dictionary format that
# pyrad.dictionary.Dictionary reads. Class is octets (RFC 2865), so pyrad returns bytes.
DICTIONARY = """\
ATTRIBUTE	User-Name		1	string
ATTRIBUTE	User-Password		2	string	encrypt=1
ATTRIBUTE	NAS-IP-Address		4	ipaddr
ATTRIBUTE	Service-Type		6	integer
ATTRIBUTE	Filter-Id		11	string
ATTRIBUTE	Reply-Message		18	string
ATTRIBUTE	State			24	octets
ATTRIBUTE	Class			25	octets
ATTRIBUTE	Session-Timeout		27	integer
ATTRIBUTE	Calling-Station-Id	31	string
ATTRIBUTE	NAS-Identifier		32	string
ATTRIBUTE	Message-Authenticator	80	octets
"""

# Check items on the first line, reply items indented after it (rlm_files format).
_USERS_FILE = f"""\
{ALICE}	Cleartext-Password := "{ALICE_PASSWORD}"
	Class := "{ALICE_CLASS}",
	Filter-Id := "{ALICE_FILTER_ID}",
	Reply-Message := "{ALICE_REPLY_MESSAGE}"

{BOB}	Cleartext-Password := "{BOB_PASSWORD}"

{DAVE}	Cleartext-Password := "{DAVE_PASSWORD}"
"""

# Everything in one file. No `user`/`group` in security: the server keeps running as
# whoever started it (root in the test containers) and never needs the freerad account.
# reject_delay = 0 because FreeRADIUS otherwise holds every Access-Reject back for 1 s.
_RADIUSD_CONF = """\
prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = {directory}
sbindir = /usr/sbin
logdir = {directory}/log
raddbdir = {directory}
radacctdir = {directory}/log
name = freeradius
confdir = {directory}
modconfdir = {directory}
run_dir = {directory}/run
db_dir = {directory}
libdir = /usr/lib/freeradius
pidfile = {directory}/run/freeradius.pid
max_request_time = 5
cleanup_delay = 1
max_requests = 1024
hostname_lookups = no

log {{
	destination = stdout
	colourise = no
	auth = yes
	auth_badpass = no
	auth_goodpass = no
}}

security {{
	allow_core_dumps = no
	max_attributes = 200
	reject_delay = 0
	status_server = yes
}}

proxy_requests = no

thread pool {{
	start_servers = 2
	max_servers = 4
	min_spare_servers = 1
	max_spare_servers = 2
	max_requests_per_server = 0
}}

client portcullis {{
	ipaddr = 127.0.0.1
	secret = "{secret}"
	# Requests without Message-Authenticator are dropped silently, which is how the
	# tests prove that the gateway sends one (BlastRADIUS, CVE-2024-3596).
	require_message_authenticator = yes
	shortname = portcullis
}}

modules {{
	pap {{
		normalise = no
	}}
	files {{
		filename = {directory}/users
	}}
	# In FreeRADIUS 3 the return codes used below are instances of rlm_always.
	always ok {{
		rcode = ok
	}}
	always reject {{
		rcode = reject
	}}
	always handled {{
		rcode = handled
	}}
}}

server portcullis {{
	listen {{
		type = auth
		ipaddr = 127.0.0.1
		port = {port}
	}}

	authorize {{
		files
		if (&User-Name == "{challenge_user}") {{
			update control {{
				&Auth-Type := Challenge
			}}
		}}
		else {{
			pap
		}}
	}}

	authenticate {{
		Auth-Type PAP {{
			pap
		}}
		# Password, then a one-time code. The first round stores the user in
		# session-state: FreeRADIUS then adds a random State to the Access-Challenge and
		# restores session-state only for a request that echoes that State back, so
		# the second round also proves that the client returned the State.
		Auth-Type Challenge {{
			if (&State) {{
				if (&session-state:Tmp-String-0 == &User-Name && \\
					&User-Password == "{challenge_code}") {{
					update reply {{
						&Reply-Message := "{dave_reply}"
					}}
					ok
				}}
				else {{
					reject
				}}
			}}
			else {{
				pap
				update session-state {{
					&Tmp-String-0 := &User-Name
				}}
				update reply {{
					&Reply-Message := "{challenge_message}"
					&Message-Authenticator := 0x00
				}}
				update control {{
					&Response-Packet-Type := Access-Challenge
				}}
				handled
			}}
		}}
	}}

	# FreeRADIUS 3.2.1 signs only EAP replies; newer releases sign every reply
	# (BlastRADIUS). A Message-Authenticator in the reply list is filled in when the
	# reply is encoded, so clients may insist on it (pyrad's enforce_ma=True).
	post-auth {{
		update reply {{
			&Message-Authenticator := 0x00
		}}
		Post-Auth-Type REJECT {{
			update reply {{
				&Message-Authenticator := 0x00
			}}
		}}
	}}
}}
"""


def free_udp_port() -> int:
    """A UDP port of 127.0.0.1 that the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_dictionary(path: Path) -> Path:
    """Write the pyrad dictionary (DICTIONARY) to path and return path."""
    path.write_text(DICTIONARY)
    return path


@dataclass
class FreeRadius:
    """A running FreeRADIUS child process and what a client needs to talk to it."""

    directory: Path
    port: int
    secret: bytes
    dictionary: Path
    process: subprocess.Popen[bytes]
    address: str = "127.0.0.1"

    @property
    def log(self) -> Path:
        """The server's stdout and stderr (one line per authentication)."""
        return self.directory / "freeradius.log"

    @property
    def endpoint(self) -> str:
        """HOST:PORT, as a radius provider's `servers` names it."""
        return f"{self.address}:{self.port}"

    def provider(self, name: str, secret_file: str, **extra: Any) -> dict[str, Any]:
        """A radius provider for this server, as `[auth.providers]` holds it, with the
        shared secret in secret_file. `extra` adds keys or overrides these."""
        return {"type": "radius", "name": name, "servers": [self.endpoint],
                "secret_file": secret_file, **extra}

    def provider_toml(self, name: str, secret_file: str, **extra: Any) -> str:
        """The same provider as a `[[auth.providers]]` table for portcullis.toml."""
        return provider_toml(self.provider(name, secret_file, **extra))

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _status_server(secret: bytes) -> bytes:
    """A Status-Server request (RFC 5997) with the Message-Authenticator that the
    client entry demands. Built by hand so that readiness needs no RADIUS library."""
    identifier = secrets.randbelow(256)
    authenticator = secrets.token_bytes(16)
    header = struct.pack("!BBH", 12, identifier, 20 + 18) + authenticator
    mac = hmac.new(secret, header + struct.pack("!BB", 80, 18) + bytes(16), hashlib.md5)
    return header + struct.pack("!BB", 80, 18) + mac.digest()


def _answers(port: int, secret: bytes, timeout: float) -> bool:
    request = _status_server(secret)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # Connected, so that "nothing listens yet" comes back at once as
        # ConnectionRefusedError (ICMP port unreachable) instead of as a timeout.
        sock.connect(("127.0.0.1", port))
        sock.settimeout(timeout)
        try:
            sock.send(request)
            reply = sock.recv(4096)
        except OSError:
            return False
    # Any reply with our identifier means the listener and the client entry work
    # (FreeRADIUS answers Status-Server with Access-Accept).
    return len(reply) >= 20 and reply[1] == request[1]


def _launch(root: Path, port: int, secret: bytes) -> FreeRadius:
    """Write the configuration into root, start FreeRADIUS and wait until it answers."""
    for sub in ("log", "run"):
        (root / sub).mkdir(exist_ok=True)
    (root / "users").write_text(_USERS_FILE)
    (root / "radiusd.conf").write_text(
        _RADIUSD_CONF.format(
            directory=root,
            port=port,
            secret=secret.decode(),
            challenge_user=CHALLENGE_USER,
            challenge_code=CHALLENGE_CODE,
            challenge_message=CHALLENGE_MESSAGE,
            dave_reply=DAVE_REPLY_MESSAGE,
        )
    )
    # FreeRADIUS refuses a configuration that other users may write to.
    root.chmod(0o700)
    for name in ("radiusd.conf", "users"):
        (root / name).chmod(0o600)
    dictionary = write_dictionary(root / "dictionary.pyrad")

    with (root / "freeradius.log").open("wb") as log:
        # -f: foreground child we can stop; -n radiusd: read radiusd.conf of -d;
        # -l stdout: log lines into freeradius.log instead of log/radius.log.
        process = subprocess.Popen(
            [FREERADIUS, "-f", "-d", str(root), "-n", "radiusd", "-l", "stdout"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    server = FreeRadius(root, port, secret, dictionary, process)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and server.running():
        if _answers(port, secret, 0.2):
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(
        f"FreeRADIUS did not answer on 127.0.0.1:{port} within {STARTUP_TIMEOUT:.0f} s "
        f"(exit status {process.returncode}); its output:\n{server.output()}"
    )


def start_freeradius(
    directory: Path, secret: bytes = SECRET, port: int | None = None
) -> FreeRadius:
    """Write a configuration under directory and run FreeRADIUS in the foreground on
    a free UDP port of 127.0.0.1 (or on port), returning once it answers a
    Status-Server request.

    Each call makes its own subdirectory of directory, so several servers can run side
    by side (for failover tests). Raises RuntimeError with the server's output if it
    does not start within STARTUP_TIMEOUT seconds.
    """
    if b'"' in secret or b"\\" in secret:
        raise ValueError("the secret is written into radiusd.conf between quotes")
    directory.mkdir(parents=True, exist_ok=True)
    # A free port may be taken by someone else before FreeRADIUS binds it; then try
    # another one (only when the caller did not ask for a specific port).
    attempts = 3 if port is None else 1
    for attempt in range(1, attempts + 1):
        root = Path(tempfile.mkdtemp(prefix="freeradius-", dir=directory))
        try:
            return _launch(root, free_udp_port() if port is None else port, secret)
        except RuntimeError as error:
            if attempt == attempts or "Address already in use" not in str(error):
                raise
    raise AssertionError("unreachable")


def require_freeradius() -> None:
    """Fail under CI (the peer must be installed there), skip elsewhere."""
    if os.access(FREERADIUS, os.X_OK):
        return
    message = f"{FREERADIUS} is not installed (run 'make peers' as root)"
    missing_peer(message)


@pytest.fixture(scope="session")
def freeradius(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreeRadius]:
    """One FreeRADIUS server shared by the whole session."""
    require_freeradius()
    server = start_freeradius(tmp_path_factory.mktemp("freeradius"))
    try:
        yield server
    finally:
        server.stop()


# -- RADIUS through a relay, and in a deployment -----------------------------------------

def start_relay_to(server: FreeRadius, deployment: Deployment,
                   start_process: Callable[..., Process]) -> str:
    """`portcullis serve relay` on the deployment, its allow-list holding `server` only;
    the relay's HOST:PORT."""
    port = free_port()
    with deployment.config.open("a") as config:
        config.write(f'\n[relay]\nlisten = "127.0.0.1:{port}"\n'
                     f'health_listen = "127.0.0.1:{free_port()}"\n'
                     f'allow = ["{server.address}/32:{server.port}"]\n')
    relay = start_process("serve", "relay", "--dir", str(deployment.directory), name="relay")
    relay.wait_for(r"Relay: listening on 127\.0\.0\.1:\d+")
    return f"127.0.0.1:{port}"


def relay_audit(deployment: Deployment, event: str, destination: str,
                timeout: float = 15) -> dict[str, Any]:
    """The audit line `event` for `destination` (a relay audits a stream as it ends)."""
    path = deployment.directory / "audit.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        for entry in map(json.loads, lines):
            if entry["event"] == event and entry.get("destination") == destination:
                return dict(entry)
        time.sleep(0.05)
    raise AssertionError(f"no {event} for {destination} in the audit trail")


def configure_radius_flow(deployment: Deployment, server: FreeRadius, dialer: str) -> None:
    """The deployment's default flow: one step, provider "radius" asking `server`; and
    `dialer` as its [dialer] section."""
    (deployment.directory / "secrets" / "radius").write_text(server.secret.decode() + "\n")
    with deployment.config.open("a") as handle:
        handle.write('\n[auth]\nflow = "otp"\n'
                     + server.provider_toml("radius", "secrets/radius", timeout=2)
                     + '\n[[auth.flows]]\nname = "otp"\n[[auth.flows.steps]]\n'
                       'provider = "radius"\n\n[dialer]\n' + dialer)
