"""A real OpenLDAP ``slapd`` for tests, loaded with Active-Directory-like users and groups.

``start_slapd(directory)`` builds a private cn=config (``slapadd -n0``) in *directory*, runs
``/usr/sbin/slapd`` in the foreground as a child process on two free loopback ports
(``ldap://`` with StartTLS, and ``ldaps://``) with a throwaway CA, then loads the directory
over LDAP as the rootdn so the memberof overlay fills in ``memberOf``. Nothing under
/etc/ldap is read or written, and a system slapd (if any) is left alone.

The session fixture ``slapd`` yields one started server for the whole run; test modules
use it with ``from peers.ldap import slapd  # noqa: F401`` (or via ``pytest_plugins``).

Directory layout (base ``dc=corp,dc=example``)::

    cn=svc-portcullis,ou=service   service account: reads everything but userPassword
    cn=alice,ou=people             staff, finance
    cn=bob,ou=people               staff, emea (emea is itself a member of sales)
    cn=carol,ou=people             staff; has no mail attribute
    cn={staff,finance,emea,sales},ou=groups   groupOfNames

Users carry the AD attribute names sAMAccountName, userPrincipalName, objectGUID and
objectSid (with the AD OIDs, so ldap3 formats the binary ones), plus inetOrgPerson's
mail and displayName. ``memberOf`` is operational here (unlike AD): ask for it by name.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import ldap3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from ldap3.core.exceptions import LDAPException

from peers.config import provider_toml
from peers.missing import missing_peer

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")

BASE_DN = "dc=corp,dc=example"
ADMIN_DN = f"cn=admin,{BASE_DN}"
ADMIN_PASSWORD = "admin-secret"
SERVICE_DN = f"cn=svc-portcullis,ou=service,{BASE_DN}"
SERVICE_PASSWORD = "svc-secret"
USERS_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"

# Simple constants so tests can bind as anyone; "svc-portcullis" is the service account.
PASSWORDS: dict[str, str] = {
    "alice": "alice-pw",
    "bob": "bob-pw",
    "carol": "carol-pw",
    "svc-portcullis": SERVICE_PASSWORD,
}

# The domain SID the user and group SIDs hang off (S-1-5-21-1-2-3-<RID>).
DOMAIN_SID = "S-1-5-21-1-2-3"

READY_TIMEOUT = 10.0


def sid_bytes(sid: str) -> bytes:
    """The binary (wire) form of a SID string such as ``S-1-5-21-1-2-3-1104``, as AD stores
    objectSid: revision, sub-authority count, 48-bit big-endian authority, then each
    sub-authority as a 32-bit little-endian integer."""
    parts = sid.split("-")
    if len(parts) < 3 or parts[0] != "S":
        raise ValueError(f"not a SID: {sid!r}")
    revision, authority = int(parts[1]), int(parts[2])
    subs = [int(part) for part in parts[3:]]
    return (bytes([revision, len(subs)]) + authority.to_bytes(6, "big")
            + b"".join(sub.to_bytes(4, "little") for sub in subs))


@dataclass(frozen=True)
class LdapUser:
    """One loaded user; ``object_guid``/``object_sid`` are the exact stored bytes."""

    name: str
    display_name: str
    surname: str
    password: str
    mail: str | None
    guid: uuid.UUID
    sid: str
    groups: tuple[str, ...]  # direct groupOfNames memberships (cn)

    @property
    def dn(self) -> str:
        return f"cn={self.name},{USERS_DN}"

    @property
    def user_principal_name(self) -> str:
        return f"{self.name}@corp.example"

    @property
    def object_guid(self) -> bytes:
        # AD puts GUIDs on the wire in Microsoft's mixed-endian layout.
        return self.guid.bytes_le

    @property
    def object_sid(self) -> bytes:
        return sid_bytes(self.sid)


USERS: dict[str, LdapUser] = {
    user.name: user for user in (
        LdapUser("alice", "Alice Liddell", "Liddell", PASSWORDS["alice"], "alice@corp.example",
                 uuid.UUID("a11ce000-0000-4000-8000-000000001104"), f"{DOMAIN_SID}-1104",
                 ("staff", "finance")),
        LdapUser("bob", "Bob Builder", "Builder", PASSWORDS["bob"], "bob@corp.example",
                 uuid.UUID("b0b00000-0000-4000-8000-000000001105"), f"{DOMAIN_SID}-1105",
                 ("staff", "emea")),
        LdapUser("carol", "Carol Danvers", "Danvers", PASSWORDS["carol"], None,
                 uuid.UUID("ca201000-0000-4000-8000-000000001106"), f"{DOMAIN_SID}-1106",
                 ("staff",)),
    )
}

# Group cn -> (RID, member group cns). Users are attached from LdapUser.groups. Order
# matters: the memberof overlay only updates members that already exist, so a group is
# added after the groups it contains.
GROUPS: dict[str, tuple[int, tuple[str, ...]]] = {
    "staff": (2001, ()),
    "finance": (2002, ()),
    "emea": (2003, ()),
    "sales": (2004, ("emea",)),
}


def group_dn(name: str) -> str:
    return f"cn={name},{GROUPS_DN}"


# sAMAccountName & co. use Microsoft's OIDs (so ldap3's standard formatters recognise
# objectGUID/objectSid) but, unlike /etc/ldap/schema/msuser.ldif, they have EQUALITY rules:
# msuser defines none, so a filter like (sAMAccountName=alice) would never match. msuser
# also defines memberOf, which collides with the one the memberof overlay registers, and
# its 'user' class requires AD bookkeeping attributes (instanceType, nTSecurityDescriptor,
# objectCategory). Hence this small schema plus an auxiliary class on inetOrgPerson.
# The class OID is under OpenLDAP's experimental arc 1.3.6.1.4.1.4203.666.
AD_SCHEMA_LDIF = """\
dn: cn=portcullis-ad,cn=schema,cn=config
objectClass: olcSchemaConfig
cn: portcullis-ad
olcAttributeTypes: ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.2 NAME 'objectGUID'
  EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
olcAttributeTypes: ( 1.2.840.113556.1.4.146 NAME 'objectSid'
  EQUALITY octetStringMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
olcObjectClasses: ( 1.3.6.1.4.1.4203.666.100.1 NAME 'portcullisADObject'
  DESC 'Active Directory account attributes' SUP top AUXILIARY
  MAY ( sAMAccountName $ userPrincipalName $ objectGUID $ objectSid ) )
"""


def _config_ldif(directory: Path, tls: dict[str, Path]) -> str:
    # Read access for the service account, auth-only for anonymous (simple binds run as
    # anonymous until they succeed), userPassword never readable. The rootdn bypasses ACLs.
    schemas = "".join(f"include: file://{SCHEMA_DIR / name}.ldif\n\n"
                      for name in ("core", "cosine", "inetorgperson"))
    return f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {directory / "slapd.pid"}
olcArgsFile: {directory / "slapd.args"}
olcTLSCACertificateFile: {tls["ca"]}
olcTLSCertificateFile: {tls["cert"]}
olcTLSCertificateKeyFile: {tls["key"]}

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_DIR}
olcModuleLoad: back_mdb
olcModuleLoad: memberof

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

{schemas}{AD_SCHEMA_LDIF}
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {directory / "data"}
olcSuffix: {BASE_DN}
olcRootDN: {ADMIN_DN}
olcRootPW: {ADMIN_PASSWORD}
olcDbIndex: objectClass eq
olcDbIndex: cn,uid,mail,sAMAccountName,userPrincipalName eq
olcDbIndex: member,memberOf eq
olcAccess: to attrs=userPassword
  by anonymous auth
  by * none
olcAccess: to *
  by dn.exact="{SERVICE_DN}" read
  by self read
  by * none

dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof
olcMemberOfGroupOC: groupOfNames
olcMemberOfMemberAD: member
olcMemberOfMemberOfAD: memberOf
olcMemberOfRefInt: TRUE
"""


LOOPBACK = ipaddress.ip_address("127.0.0.1")


def make_tls(directory: Path,
             address: ipaddress.IPv4Address | ipaddress.IPv6Address = LOOPBACK
             ) -> dict[str, Path]:
    """A throwaway CA and a server certificate for `address` / localhost, signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    # EC keys: generating RSA keys would cost most of the startup budget.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portcullis test LDAP CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(address))]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(address), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem",
             "key": directory / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def _ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _entries() -> Iterator[tuple[str, dict[str, object]]]:
    """The directory content, parents before children and groups after their members."""
    yield BASE_DN, {"objectClass": ["dcObject", "organization"], "dc": "corp",
                    "o": "Corp Example"}
    for ou in ("service", "people", "groups"):
        yield f"ou={ou},{BASE_DN}", {"objectClass": ["organizationalUnit"], "ou": ou}
    yield SERVICE_DN, {"objectClass": ["applicationProcess", "simpleSecurityObject"],
                       "cn": "svc-portcullis", "userPassword": _ssha(SERVICE_PASSWORD)}
    for user in USERS.values():
        attributes: dict[str, object] = {
            "objectClass": ["inetOrgPerson", "portcullisADObject"],
            "cn": user.name, "uid": user.name, "sn": user.surname,
            "displayName": user.display_name, "sAMAccountName": user.name,
            "userPrincipalName": user.user_principal_name,
            "objectGUID": user.object_guid, "objectSid": user.object_sid,
            "userPassword": _ssha(user.password),
        }
        if user.mail is not None:
            attributes["mail"] = user.mail
        yield user.dn, attributes
    for name, (rid, subgroups) in GROUPS.items():
        members = [u.dn for u in USERS.values() if name in u.groups]
        members += [group_dn(sub) for sub in subgroups]
        yield group_dn(name), {
            "objectClass": ["groupOfNames", "portcullisADObject"], "cn": name,
            "sAMAccountName": name, "objectSid": sid_bytes(f"{DOMAIN_SID}-{rid}"),
            "member": members,
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-limit:]


class SlapdError(RuntimeError):
    """slapd could not be configured, started or loaded."""


@dataclass
class Slapd:
    """A running slapd child process and how to reach it."""

    directory: Path
    process: subprocess.Popen[bytes]
    port: int
    ldaps_port: int
    ca_cert: Path
    log: Path
    base_dn: str = BASE_DN
    admin_dn: str = ADMIN_DN
    admin_password: str = ADMIN_PASSWORD
    bind_dn: str = SERVICE_DN
    bind_password: str = SERVICE_PASSWORD
    users_dn: str = USERS_DN
    groups_dn: str = GROUPS_DN
    users: dict[str, LdapUser] = field(default_factory=lambda: dict(USERS))

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def ldap_url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def user_dn(self, name: str) -> str:
        return f"cn={name},{self.users_dn}"

    def group_dn(self, name: str) -> str:
        return f"cn={name},{self.groups_dn}"

    def tls(self) -> ldap3.Tls:
        """An ldap3 Tls that verifies the server against the throwaway CA."""
        return ldap3.Tls(ca_certs_file=str(self.ca_cert), validate=ssl.CERT_REQUIRED)

    def provider(self, name: str, bind_password_file: str, **extra: Any) -> dict[str, Any]:
        """An ldap provider for this server, as `[auth.providers]` holds it: LDAPS,
        verified against the throwaway CA, searching as the service account whose password
        is in bind_password_file. `extra` adds keys or overrides these."""
        return {"type": "ldap", "name": name, "servers": [self.ldaps_url],
                "ca_cert": str(self.ca_cert), "bind_dn": self.bind_dn,
                "bind_password_file": bind_password_file, "base_dn": self.base_dn, **extra}

    def provider_toml(self, name: str, bind_password_file: str, **extra: Any) -> str:
        """The same provider as a `[[auth.providers]]` table for portcullis.toml."""
        return provider_toml(self.provider(name, bind_password_file, **extra))

    def add_people(self, prefix: str, count: int, password: str) -> list[str]:
        """Add `count` plain users named PREFIX0000…, all with `password` (benchmarks sign
        many users in at once); returns their names."""
        names = [f"{prefix}{index:04d}" for index in range(count)]
        connection = ldap3.Connection(ldap3.Server(self.ldap_url, get_info=ldap3.NONE),
                                      self.admin_dn, self.admin_password, auto_bind=True)
        try:
            for name in names:
                connection.add(f"cn={name},{self.users_dn}", ["inetOrgPerson",
                                                               "portcullisADObject"], {
                    "cn": name, "sn": name, "sAMAccountName": name,
                    "mail": f"{name}@corp.example", "userPassword": _ssha(password)})
                if connection.result["result"] not in (0, 68):   # 68: already exists
                    raise SlapdError(f"cannot add {name}: {connection.result}")
        finally:
            connection.unbind()
        return names

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL if it lingers); safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> Slapd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def _environment() -> dict[str, str]:
    # LDAPNOINIT: libldap inside slapd/slapadd must not read /etc/ldap/ldap.conf or ~/.ldaprc.
    return {**os.environ, "LDAPNOINIT": "1"}


def _configure(directory: Path) -> Path:
    """Write the certificates and build slapd.d with slapadd; returns the CA path."""
    tls = make_tls(directory)
    (directory / "data").mkdir(mode=0o700)
    config_dir = directory / "slapd.d"
    config_dir.mkdir(mode=0o700)
    ldif = directory / "config.ldif"
    ldif.write_text(_config_ldif(directory, tls))
    result = subprocess.run([str(SLAPADD), "-n0", "-F", str(config_dir), "-l", str(ldif)],
                            capture_output=True, text=True, errors="replace",
                            env=_environment(), check=False)
    if result.returncode != 0:
        raise SlapdError(f"slapadd -n0 failed ({result.returncode}):\n"
                         f"{result.stderr}{result.stdout}")
    return tls["ca"]


def _launch(directory: Path, ca_cert: Path) -> Slapd | None:
    """Start slapd on fresh free ports and wait until the rootdn can bind; None when a port
    was taken between choosing it and slapd binding it (the caller retries)."""
    port, ldaps_port = _free_port(), _free_port()
    while ldaps_port == port:
        ldaps_port = _free_port()
    log = directory / "slapd.log"
    urls = f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{ldaps_port}/"
    with log.open("wb") as stderr:
        # -d: stay in the foreground as our child (no daemonising) and log to stderr (our file)
        # instead of syslog; "stats" adds one line per operation, handy after a failure.
        process = subprocess.Popen(
            [str(SLAPD), "-d", "stats", "-F", str(directory / "slapd.d"), "-h", urls],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=_environment())
    server = Slapd(directory=directory, process=process, port=port, ldaps_port=ldaps_port,
                   ca_cert=ca_cert, log=log)
    deadline = time.monotonic() + READY_TIMEOUT
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = _tail(log)
            if "Address already in use" in output:
                return None
            raise SlapdError(f"slapd exited with status {process.returncode}:\n{output}")
        try:
            connection = ldap3.Connection(
                ldap3.Server(server.ldap_url, get_info=ldap3.NONE, connect_timeout=1),
                ADMIN_DN, ADMIN_PASSWORD, receive_timeout=2)
            if connection.bind():
                connection.unbind()
                return server
            last_error = SlapdError(f"rootdn bind refused: {connection.result}")
        except LDAPException as error:
            last_error = error
        time.sleep(0.05)
    server.stop()
    raise SlapdError(f"slapd did not answer on {server.ldap_url} within {READY_TIMEOUT:.0f} s "
                     f"({last_error}):\n{_tail(log)}")


def _load(server: Slapd) -> None:
    """Add the entries online (not with slapadd) so the memberof overlay sets memberOf."""
    connection = ldap3.Connection(ldap3.Server(server.ldap_url, get_info=ldap3.NONE),
                                  ADMIN_DN, ADMIN_PASSWORD, auto_bind=True)
    try:
        for dn, attributes in _entries():
            if not connection.add(dn, attributes=attributes):
                raise SlapdError(f"adding {dn} failed: {connection.result}")
    finally:
        connection.unbind()


def start_slapd(directory: Path) -> Slapd:
    """Configure, start and load a slapd in the (empty or new) *directory*.

    The result is also a context manager that stops slapd on exit. Raises SlapdError with
    slapd's output when it does not come up within READY_TIMEOUT seconds.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert = _configure(directory)
    for _ in range(3):
        server = _launch(directory, ca_cert)
        if server is not None:
            break
    else:
        raise SlapdError(f"slapd could not bind free ports three times:\n"
                         f"{_tail(directory / 'slapd.log')}")
    try:
        _load(server)
    except BaseException:
        server.stop()
        raise
    return server


def _require_slapd() -> None:
    missing = [str(path) for path in (SLAPD, SLAPADD) if not path.exists()]
    if missing:
        message = f"{', '.join(missing)} not installed (run 'make peers' as root)"
        missing_peer(message)


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One slapd for the whole session; tests must not modify its entries."""
    _require_slapd()
    server = start_slapd(tmp_path_factory.mktemp("slapd"))
    try:
        yield server
    finally:
        server.stop()
        # The tmp dir outlives the run for post-mortems, but the DB file need not.
        shutil.rmtree(server.directory / "data", ignore_errors=True)
