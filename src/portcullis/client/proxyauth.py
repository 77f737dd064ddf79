"""Whether `portcullis connect` makes its local proxies ask for a secret, and the secret.

The SOCKS5 and HTTP proxies listen on loopback, where every user of the machine can
reach them. When the machine has other people's accounts, a secret generated for the run
keeps them from riding the tunnel as you. The rule (``proxy_auth_default``, pure):

    authentication is on by default when the passwd database holds an account other
    than yours with a uid in the range of ordinary users (UID_MIN..UID_MAX of
    /etc/login.defs, 1000..60000 by default) and a login shell (not nologin/false).

System accounts (daemons, ``nobody``) do not count: they have no login. root does not
count: it can read this process's memory anyway. ``--proxy-auth`` / ``--no-proxy-auth``
override the rule.

The secret is printed as proxy URLs and written to ``proxy-credentials.json`` (mode 0600)
under $PORTCULLIS_HOME for scripts; the file is removed when the run ends.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from portcullis.proto.proxyauth import ProxyCredentials

CREDENTIALS_FILE = "proxy-credentials.json"
PROXY_USER = "portcullis"
_NO_LOGIN_SHELLS = ("nologin", "false", "sync", "shutdown", "halt")
_LOGIN_DEFS = Path("/etc/login.defs")


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    shell: str


@dataclass(frozen=True)
class ProxyAuthDecision:
    required: bool
    reason: str


def proxy_auth_default(accounts: Iterable[Account], my_uid: int, *, uid_min: int = 1000,
                       uid_max: int = 60000) -> ProxyAuthDecision:
    """The default of ``--proxy-auth`` for a machine with these accounts (see above)."""
    others = sorted({
        account.name for account in accounts
        if account.uid != my_uid and uid_min <= account.uid <= uid_max
        and account.shell and os.path.basename(account.shell) not in _NO_LOGIN_SHELLS})
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5
                                         else "")
        return ProxyAuthDecision(True, f"other local accounts can reach loopback: {shown}")
    return ProxyAuthDecision(
        False, f"no other local account with a login shell (uid {uid_min}-{uid_max})")


def this_machine_default() -> ProxyAuthDecision:
    """``proxy_auth_default`` for this machine's passwd database and login.defs."""
    uid_min, uid_max = _uid_range(_LOGIN_DEFS)
    accounts = [Account(entry.pw_name, entry.pw_uid, entry.pw_shell)
                for entry in pwd.getpwall()]
    return proxy_auth_default(accounts, os.getuid(), uid_min=uid_min, uid_max=uid_max)


def _uid_range(path: Path) -> tuple[int, int]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        text = ""
    found = dict(re.findall(r"^\s*(UID_MIN|UID_MAX)\s+(\d+)\s*$", text, re.MULTILINE))
    return int(found.get("UID_MIN", 1000)), int(found.get("UID_MAX", 60000))


def new_credentials() -> ProxyCredentials:
    """A secret for one run: URL-safe, so it can be pasted into a proxy URL as is."""
    return ProxyCredentials(PROXY_USER, secrets.token_urlsafe(24))


def proxy_url(kind: str, host: str, port: int, credentials: ProxyCredentials | None) -> str:
    """What to give an application: ``socks5h://USER:SECRET@HOST:PORT`` or ``http://…``."""
    scheme = {"socks": "socks5h", "http": "http"}[kind]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    auth = f"{credentials.user}:{credentials.password}@" if credentials is not None else ""
    return f"{scheme}://{auth}{where}"


def write_credentials(home: Path, credentials: ProxyCredentials,
                      urls: dict[str, str]) -> Path:
    """Write the run's secret for scripts, readable by this user only."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / CREDENTIALS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    # O_EXCL with 0600 from the start: the secret is never readable by anyone else.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"user": credentials.user, "password": credentials.password, **urls},
                  handle, indent=2)
    temporary.replace(path)
    return path
