"""A real Samba 4 Active Directory domain controller for the identity tests.

``start_samba(directory)`` provisions a domain (``samba-tool domain provision``, RFC 2307,
no DNS) in *directory*, creates its users offline with samba-tool, and runs
``samba -i -M single`` in the foreground as a child process with only the LDAP service,
bound to one loopback address of its own (Samba's LDAP ports 389/636 are fixed, so each
server gets a 127.x address that nothing else listens on; Samba binds it without the
address being configured, as ``interfaces = 127.a.b.c/8``). Its TLS certificate comes
from a throwaway CA made here for that address. Nothing under /etc/samba or /var/lib/samba
is read or written; the server is stopped by its process id.

The session fixture ``samba`` yields one started domain for the whole run. Users (every
one with mail NAME@pc.test and UPN NAME@pc.test):

    alice     enabled, in the group staff
    dora      disabled                        AD bind sub-code 533
    eve       account expired                 701
    frank     must change password at logon   773
    mallory   locked out by AD itself         775 (a password settings object with a
              lockout threshold applies to her only; the domain has none, so wrong
              passwords for the other users never lock them in AD)
    svc-portcullis   the service account that searches

A wrong password is 52e, an unknown name 525 (the ``data XXX`` of the bind diagnostic).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ldap3
import pytest
from ldap3.core.exceptions import LDAPException

from peers.config import provider_toml
from peers.ldap import make_tls
from peers.missing import missing_peer

REALM = "PC.TEST"
DOMAIN = "PC"
BASE_DN = "DC=pc,DC=test"
USERS_DN = f"CN=Users,{BASE_DN}"
ADMIN_PASSWORD = "Adm1n!Portcullis"
SERVICE = "svc-portcullis"
PASSWORDS = {
    "alice": "Alice-pw-2026!",
    "dora": "Dora-pw-2026!",
    "eve": "Eve-pw-2026!",
    "frank": "Frank-pw-2026!",
    "mallory": "Mallory-pw-2026!",
    SERVICE: "Svc-pw-2026!",
}
LOCKOUT_THRESHOLD = 2          # mallory's, from her password settings object
READY_TIMEOUT = 60.0


class SambaError(RuntimeError):
    """Samba could not be provisioned, started or loaded."""


@dataclass
class Samba:
    directory: Path
    process: subprocess.Popen[bytes]
    address: str
    ca_cert: Path
    log: Path
    base_dn: str = BASE_DN

    @property
    def bind_dn(self) -> str:
        return f"CN={SERVICE},{USERS_DN}"

    @property
    def bind_password(self) -> str:
        return PASSWORDS[SERVICE]

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.address}"

    @property
    def ldap_url(self) -> str:
        return f"ldap://{self.address}"

    def user_dn(self, name: str) -> str:
        return f"CN={name},{USERS_DN}"

    def tls(self) -> ldap3.Tls:
        return ldap3.Tls(ca_certs_file=str(self.ca_cert), validate=ssl.CERT_REQUIRED)

    def bind(self, dn: str, password: str) -> dict[str, Any]:
        """One simple bind over LDAPS; the server's result (code, message)."""
        connection = ldap3.Connection(
            ldap3.Server(self.ldaps_url, tls=self.tls(), get_info=ldap3.NONE,
                         connect_timeout=5), dn, password, receive_timeout=10)
        try:
            connection.bind()
            return dict(connection.result)
        finally:
            connection.unbind()

    def provider(self, name: str, bind_password_file: str, **extra: Any) -> dict[str, Any]:
        """An ldap provider for this domain over LDAPS, as `[auth.providers]` holds it."""
        return {"type": "ldap", "name": name, "servers": [self.ldaps_url],
                "ca_cert": str(self.ca_cert), "bind_dn": self.bind_dn,
                "bind_password_file": bind_password_file, "base_dn": self.base_dn,
                "user_object_class": "user", "active_directory": True, **extra}

    def provider_toml(self, name: str, bind_password_file: str, **extra: Any) -> str:
        return provider_toml(self.provider(name, bind_password_file, **extra))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _tool(directory: Path, *args: str) -> str:
    """samba-tool against this domain's sam.ldb (offline, or beside the running server)."""
    result = subprocess.run(["samba-tool", *args, "-s", str(directory / "etc" / "smb.conf")],
                            capture_output=True, text=True, errors="replace", timeout=120,
                            check=False)
    if result.returncode != 0:
        raise SambaError(f"samba-tool {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
    return result.stdout


def _free_address() -> str:
    """A 127.x address where nothing listens on 389 or 636 (Samba's fixed ports)."""
    for third in range(80, 120):
        for fourth in range(2, 250, 7):
            address = f"127.77.{third}.{fourth}"
            try:
                probes = []
                for port in (389, 636, 3268, 3269):
                    probe = socket.socket()
                    probes.append(probe)
                    probe.bind((address, port))
                return address
            except OSError:
                continue
            finally:
                for probe in probes:
                    probe.close()
    raise SambaError("no free 127.77.x.y address for Samba's LDAP ports")


def _provision(directory: Path, address: str, tls: dict[str, Path]) -> None:
    options = {
        "interfaces": f"{address}/8", "bind interfaces only": "yes",
        "server services": "ldap", "dcerpc endpoint servers": "",
        "log file": str(directory / "samba.log"), "panic action": "",
        # Its own pid file (the default is /run/samba's): a Samba left running by another
        # run must not stop this one from starting.
        "pid directory": str(directory / "run"),
        "tls enabled": "yes", "tls certfile": str(tls["cert"]),
        "tls keyfile": str(tls["key"]), "tls cafile": str(tls["ca"]),
    }
    command = ["samba-tool", "domain", "provision", "--use-rfc2307", f"--realm={REALM}",
               f"--domain={DOMAIN}", "--server-role=dc", "--dns-backend=NONE",
               f"--adminpass={ADMIN_PASSWORD}", f"--targetdir={directory}",
               f"--host-ip={address}", *(f"--option={key}={value}"
                                         for key, value in options.items())]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace",
                            timeout=300, check=False)
    if result.returncode != 0:
        raise SambaError(f"provision failed:\n{result.stderr[-4000:]}{result.stdout[-2000:]}")


def _create_users(directory: Path) -> None:
    def create(name: str, *extra: str) -> None:
        _tool(directory, "user", "create", name, PASSWORDS[name],
              f"--mail-address={name}@pc.test", f"--given-name={name.title()}", *extra)

    create(SERVICE)
    create("alice")
    _tool(directory, "group", "add", "staff")
    _tool(directory, "group", "addmembers", "staff", "alice")
    create("dora")
    _tool(directory, "user", "disable", "dora")
    create("eve")
    create("frank", "--must-change-at-next-login")
    create("mallory")
    _tool(directory, "domain", "passwordsettings", "pso", "create", "pc-lockout", "1",
          f"--account-lockout-threshold={LOCKOUT_THRESHOLD}",
          "--account-lockout-duration=600", "--reset-account-lockout-after=600")
    _tool(directory, "domain", "passwordsettings", "pso", "apply", "pc-lockout", "mallory")


def _expire(directory: Path, name: str) -> None:
    """Set accountExpires in the past (samba-tool's setexpiry takes days from now only)."""
    ldif = (f"dn: CN={name},{USERS_DN}\nchangetype: modify\nreplace: accountExpires\n"
            "accountExpires: 116444736000000000\n")   # 1970-01-01
    result = subprocess.run(["ldbmodify", "-H", str(directory / "private" / "sam.ldb")],
                            input=ldif, capture_output=True, text=True, timeout=60,
                            check=False)
    if result.returncode != 0:
        raise SambaError(f"ldbmodify accountExpires failed: {result.stderr}{result.stdout}")


def _wait_ready(server: Samba) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last: object = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SambaError(f"samba exited with status {server.process.returncode}:\n"
                             f"{_tail(server.log)}")
        try:
            result = server.bind(server.bind_dn, server.bind_password)
            if result.get("result") == 0:
                return
            last = result
        except LDAPException as exc:
            last = exc
        time.sleep(0.2)
    raise SambaError(f"samba did not answer LDAPS on {server.address} within "
                     f"{READY_TIMEOUT:.0f} s ({last}):\n{_tail(server.log)}")


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _lock_mallory(server: Samba) -> None:
    for _ in range(LOCKOUT_THRESHOLD):
        server.bind(server.user_dn("mallory"), "not-her-password")
    result = server.bind(server.user_dn("mallory"), PASSWORDS["mallory"])
    if "data 775" not in result.get("message", ""):
        raise SambaError(f"mallory did not lock out: {result}")


def start_samba(directory: Path) -> Samba:
    directory.mkdir(parents=True, exist_ok=True)
    address = _free_address()
    tls = make_tls(directory, ipaddress.ip_address(address))
    _provision(directory, address, tls)
    _create_users(directory)
    _expire(directory, "eve")
    log = directory / "samba.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["samba", "-i", "-M", "single", "-s", str(directory / "etc" / "smb.conf")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    server = Samba(directory, process, address, tls["ca"], log)
    try:
        _wait_ready(server)
        _lock_mallory(server)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def samba(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Samba]:
    """One Samba AD DC for the whole session; tests must not change its users."""
    for program in ("samba", "samba-tool", "ldbmodify"):
        if shutil.which(program) is None:
            missing_peer(f"{program} is not installed (run 'make peers' as root)")
    if not Path("/usr/share/samba/setup/ad-schema").is_dir():
        missing_peer("samba-ad-provision is not installed (run 'make peers' as root)")
    if os.geteuid() != 0:
        missing_peer("a Samba domain controller needs root (its LDAP ports are 389 and 636)")
    server = start_samba(tmp_path_factory.mktemp("samba"))
    try:
        yield server
    finally:
        server.stop()
        # The logs stay for post-mortems; the domain's databases need not.
        shutil.rmtree(server.directory / "private", ignore_errors=True)
        shutil.rmtree(server.directory / "state", ignore_errors=True)
