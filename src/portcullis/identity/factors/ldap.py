"""LDAP and Active Directory: find the user with a service account, bind as them.

ldap3 is synchronous; each sign-in runs in a worker thread. Service-account connections
are pooled (`pool_size`, bound once, rebuilt when a server drops them); the user's own
bind needs a connection of its own. Servers are tried in order, and one that failed is
tried last for RETRY_AFTER seconds, so a dead domain controller costs one connect
timeout, not every sign-in.

Rules that are easy to get wrong:
- an empty password is refused before any bind (LDAP treats it as an anonymous bind,
  which "succeeds");
- every value put into a search filter is escaped (RFC 4515);
- an unknown user still costs a bind, so it answers in the same time as a wrong password;
- the user name is the entry's `username_attribute`, whatever the user typed (mail, UPN),
  so TOTP and lockout are keyed by one name; what was typed is searched for in canonical
  form (NFKC, case folded), so a full-width spelling finds the same entry;
- Active Directory says why it refused a bind in the diagnostic message (`data 533`:
  disabled, …); that reason goes to the audit trail, the user sees "denied" as ever;
- `ldap://` without StartTLS is refused when the configuration is read, unless the
  provider says `insecure = true` (then every start logs a warning).
"""

from __future__ import annotations

import asyncio
import math
import queue
import re
import ssl
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ldap3
import structlog
from ldap3.core.exceptions import LDAPCommunicationError, LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from portcullis.config.auth import LdapProvider
from portcullis.errors import AuthError
from portcullis.identity.claims import Attributes
from portcullis.identity.conditions import LoginContext
from portcullis.identity.factors.prompts import password_step, typed_username
from portcullis.identity.flow import (
    Attempt,
    FactorOutcome,
    Failed,
    FlowState,
    Passed,
    Refused,
    Step,
    Unavailable,
)
from portcullis.identity.names import canonical_username

log = structlog.get_logger("portcullis.identity.ldap")

# AD's LDAP_MATCHING_RULE_IN_CHAIN: every group the user is in, nested, in one search.
IN_CHAIN = "1.2.840.113556.1.4.1941"
CLAIM_ATTRIBUTES = ("mail", "displayName", "cn", "sAMAccountName", "userPrincipalName",
                    "objectGUID", "objectSid", "memberOf")
MAX_NESTING = 8
# How long a server that failed is tried after the others.
RETRY_AFTER = 30.0
# AD's sub-code of an invalidCredentials bind ("…AcceptSecurityContext error, data 533, …"),
# [MS-ADTS] and the Win32 error codes it carries.
_AD_SUBCODE = re.compile(r"\bdata ([0-9a-f]{3,8})\b", re.IGNORECASE)
AD_REFUSALS = {
    "525": "no such user (AD 525)",
    "52e": "wrong password",
    "530": "not permitted to sign in at this time (AD 530)",
    "531": "not permitted to sign in from this workstation (AD 531)",
    "532": "password expired (AD 532)",
    "533": "account disabled (AD 533)",
    "568": "too many security identifiers (AD 568)",
    "701": "account expired (AD 701)",
    "773": "password must be changed (AD 773)",
    "775": "account locked by the directory (AD 775)",
}


def bind_refusal(result: Mapping[str, Any]) -> str:
    """Why the directory refused an invalidCredentials bind, for the audit trail: AD's
    sub-code when the diagnostic message carries one, else "wrong password"."""
    match = _AD_SUBCODE.search(str(result.get("message") or ""))
    if match is None:
        return "wrong password"
    code = match.group(1).lower()
    return AD_REFUSALS.get(code, f"refused by the directory (AD {code})")


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    username: str
    attributes: Attributes
    missing: tuple[str, ...]


@dataclass(frozen=True)
class BindResult:
    ok: bool
    reason: str
    user: DirectoryUser | None = None
    unavailable: bool = False


class LdapDirectory:
    """The directory behind one `[[auth.providers]]` of type ldap (blocking calls)."""

    def __init__(self, settings: LdapProvider, bind_password: str,
                 ca_cert: str | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._bind_password = bind_password
        self._clock = clock
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_cert,
                        version=ssl.PROTOCOL_TLS_CLIENT)
        self._servers = [ldap3.Server(url, tls=tls, connect_timeout=settings.timeout,
                                      get_info=ldap3.NONE) for url in settings.servers]
        # When each server last failed: such a server is tried last for a while, so a
        # dead domain controller does not cost every sign-in a connect timeout.
        self._failed_at: dict[str, float] = {}
        self._service: queue.SimpleQueue[ldap3.Connection] = queue.SimpleQueue()
        clear = [url for url in settings.servers
                 if url.lower().startswith("ldap://") and not settings.start_tls]
        if clear:
            # Validation let it through only because the provider says insecure = true.
            log.warning("directory passwords travel in clear text (insecure = true)",
                        provider=settings.name, servers=clear)

    def _open(self, user: str, password: str) -> ldap3.Connection:
        """An open (TLS-protected, not yet bound) connection to the first server that
        answers. Not ldap3's ServerPool: it sleeps 10 s when every server is down, keeps
        every connection it ever made, and shuns a recovered server for its whole
        exhaust period."""
        now = self._clock()
        ordered = sorted(self._servers, key=lambda server: (
            now - self._failed_at.get(server.name, -RETRY_AFTER) < RETRY_AFTER))
        errors: list[str] = []
        for server in ordered:
            connection = ldap3.Connection(
                server, user=user, password=password, read_only=True,
                # Whole seconds: on Linux ldap3 packs it into a timeval with struct
                # 'LL', which refuses a float.
                receive_timeout=math.ceil(self.settings.timeout), raise_exceptions=False)
            try:
                connection.open(read_server_info=False)
                if self.settings.start_tls and not connection.start_tls(read_server_info=False):
                    raise LDAPException(f"StartTLS failed: {connection.last_error}")
            except LDAPException as exc:
                connection.unbind()
                self._failed_at[server.name] = now
                errors.append(f"{server.name}: {exc}")
                continue
            self._failed_at.pop(server.name, None)
            return connection
        raise LDAPException("no directory server answered (" + "; ".join(errors) + ")")

    def _service_bound(self) -> ldap3.Connection:
        connection = self._open(self.settings.bind_dn, self._bind_password)
        if not connection.bind(read_server_info=False):
            connection.unbind()
            raise LDAPException("the service account cannot bind: "
                                f"{connection.result.get('description')} (check bind_dn and "
                                "bind_password_file)")
        return connection

    @contextmanager
    def _service_connection(self) -> Iterator[ldap3.Connection]:
        try:
            connection = self._service.get_nowait()
        except queue.Empty:
            connection = self._service_bound()
        broken = True
        try:
            yield connection
            broken = connection.closed
        finally:
            if broken or self._service.qsize() >= self.settings.pool_size:
                connection.unbind()
            else:
                self._service.put(connection)

    def find(self, typed: str) -> list[DirectoryUser]:
        """The entries whose login attributes match `typed` (at most 2 are fetched)."""
        try:
            return self._find(typed)
        except LDAPCommunicationError:
            # A pooled connection the server has closed (idle timeout, restart): once
            # more on a fresh one.
            return self._find(typed)

    def _find(self, typed: str) -> list[DirectoryUser]:
        settings = self.settings
        value = escape_filter_chars(typed)
        alternatives = "".join(f"({name}={value})" for name in settings.login_attributes)
        search_filter = f"(&(objectClass={settings.user_object_class})(|{alternatives}))"
        wanted = sorted({*CLAIM_ATTRIBUTES, settings.username_attribute,
                         *settings.required_attributes})
        with self._service_connection() as connection:
            found = connection.search(settings.base_dn, search_filter, ldap3.SUBTREE,
                                      attributes=wanted, size_limit=2)
            # 4: size limit exceeded, which is "more than one match", not a failure.
            if not found and connection.result.get("result") not in (0, 4, 32):
                raise LDAPException(f"search failed: {connection.result.get('description')}")
            entries = [e for e in connection.response or ()
                       if e.get("type") == "searchResEntry"]
            return [self._user(connection, entry) for entry in entries]

    def _user(self, connection: ldap3.Connection, entry: dict[str, Any]) -> DirectoryUser:
        raw: dict[str, list[bytes]] = {k.lower(): v for k, v in entry["raw_attributes"].items()}
        settings = self.settings

        def text(name: str) -> str | None:
            values = raw.get(name.lower())
            return values[0].decode("utf-8", "replace") if values else None

        missing = tuple(name for name in (settings.username_attribute,
                                          *settings.required_attributes)
                        if not raw.get(name.lower()))
        group_dns = [dn.decode() for dn in raw.get("memberof", ())]
        if settings.nested_groups:
            group_dns = self._nested_groups(connection, entry["dn"], group_dns)
        groups = tuple(dict.fromkeys(_rdn_value(dn) for dn in group_dns))
        guid = raw.get("objectguid")
        sid = raw.get("objectsid")
        username = text(settings.username_attribute) or ""
        return DirectoryUser(entry["dn"], username, Attributes(
            groups=groups, display_name=text("displayName") or text("cn"), email=text("mail"),
            upn=text("userPrincipalName"),
            sid=_sid_string(sid[0]) if sid else None,
            guid=str(uuid.UUID(bytes_le=guid[0])) if guid and len(guid[0]) == 16 else None),
            missing)

    def _nested_groups(self, connection: ldap3.Connection, user_dn: str,
                       direct: list[str]) -> list[str]:
        if self.settings.active_directory:
            connection.search(self.settings.base_dn,
                              f"(member:{IN_CHAIN}:={escape_filter_chars(user_dn)})",
                              ldap3.SUBTREE, attributes=["cn"])
            return [e["dn"] for e in connection.response or () if e.get("type") == "searchResEntry"]
        seen = list(dict.fromkeys(direct))
        frontier = list(seen)
        for _ in range(MAX_NESTING):
            parents: list[str] = []
            for group in frontier:
                connection.search(group, "(objectClass=*)", ldap3.BASE, attributes=["memberOf"])
                for entry in connection.response or ():
                    for parent in entry.get("raw_attributes", {}).get("memberOf", ()):
                        name = parent.decode()
                        if name not in seen:
                            seen.append(name)
                            parents.append(name)
            if not parents:
                break
            frontier = parents
        return seen

    def bind(self, dn: str, password: str) -> str | None:
        """None: right password; else why the directory refused it (invalidCredentials,
        with AD's sub-code); LDAPException: the directory could not say (unreachable, TLS,
        busy)."""
        connection = self._open(dn, password)
        try:
            if connection.bind(read_server_info=False):
                return None
            if connection.result.get("result") == 49:      # invalidCredentials
                return bind_refusal(connection.result)
            raise LDAPException(f"bind failed: {connection.result.get('description')}")
        finally:
            connection.unbind()

    def authenticate(self, found: list[DirectoryUser], typed: str,
                     password: str) -> BindResult:
        """Bind as the one entry `find` returned for what the user typed."""
        try:
            if len(found) != 1:
                # A bind all the same, so that "no such user" takes as long as a wrong
                # password.
                self.bind(f"cn=portcullis-no-such-user,{self.settings.base_dn}", password)
                return BindResult(False, "unknown user" if not found else
                                  f"{len(found)} directory entries match {typed!r}")
            user = found[0]
            refusal = self.bind(user.dn, password)
            if refusal is not None:
                return BindResult(False, refusal, user)
        except LDAPException as exc:
            log.error("directory unavailable", provider=self.settings.name, error=str(exc))
            return BindResult(False, f"directory unavailable: {exc}", unavailable=True)
        if user.missing:
            log.error("directory entry lacks required attributes", provider=self.settings.name,
                      dn=user.dn, missing=list(user.missing))
            return BindResult(False, f"entry lacks {', '.join(user.missing)}", user)
        return BindResult(True, "directory bind succeeded", user)


class LdapFactor:
    kind = "password"
    primary = True

    def __init__(self, name: str, directory: LdapDirectory) -> None:
        self.name = name
        self._directory = directory

    async def step(self, state: FlowState, context: LoginContext) -> Step:
        return password_step(state)

    async def verify(self, state: FlowState, answers: Mapping[str, str],
                     attempt: Attempt) -> FactorOutcome:
        # Canonical before the search, as before any count: every spelling of a name
        # finds (and is counted against) the one entry.
        typed = typed_username(state, answers)
        password = answers.get("password", "")
        if typed is None and answers.get("username", "").strip():
            return Failed("malformed user name")
        if not typed or not password:
            return Failed("empty user name or password")
        try:
            found = await asyncio.to_thread(self._directory.find, typed)
        except LDAPException as exc:
            log.error("directory unavailable", provider=self.name, error=str(exc))
            return Unavailable(f"directory unavailable: {exc}")
        if len(found) == 1:
            try:
                username = canonical_username(found[0].username)
            except AuthError:
                username = None
            if username is not None and not await attempt.admit(username):
                return Refused("account locked", username)
        result = await asyncio.to_thread(self._directory.authenticate, found, typed, password)
        if result.user is None:
            return (Unavailable(result.reason) if result.unavailable else Failed(result.reason))
        try:
            username = canonical_username(result.user.username)
        except AuthError:
            return Failed(f"directory user name {result.user.username!r} is not usable")
        if not result.ok:
            return Failed(result.reason, username)
        return Passed(result.reason, username, result.user.attributes)


def _rdn_value(dn: str) -> str:
    try:
        return str(parse_dn(dn)[0][1])
    except LDAPException:
        return dn


def _sid_string(raw: bytes) -> str | None:
    """The binary SID (MS-DTYP 2.4.2.2) in its S-1-5-21-… text form."""
    if len(raw) < 8 or len(raw) != 8 + 4 * raw[1]:
        return None
    authority = int.from_bytes(raw[2:8], "big")
    parts = struct.unpack(f"<{raw[1]}I", raw[8:])
    return "-".join(["S", str(raw[0]), str(authority), *map(str, parts)])
