"""The client's saved sign-in: portal URL, session token and trusted CA, under
$PORTCULLIS_HOME (default ~/.config/portcullis), every file mode 0600."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from portcullis.errors import ClientError

STATE_FILE = "session.json"
CA_FILE = "ca.crt"


def client_home() -> Path:
    configured = os.environ.get("PORTCULLIS_HOME")
    return Path(configured) if configured else Path.home() / ".config" / "portcullis"


@dataclass(frozen=True)
class ClientState:
    url: str
    user: str
    token: str
    ca_file: str | None

    def save(self, home: Path) -> None:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(home / STATE_FILE, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, home: Path) -> ClientState:
        path = home / STATE_FILE
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ClientError(
                "not signed in: run 'portcullis login URL --user NAME' first") from None
        except (OSError, ValueError, TypeError) as exc:
            raise ClientError(f"cannot read {path} ({exc}); sign in again") from None

    @staticmethod
    def forget(home: Path) -> None:
        (home / STATE_FILE).unlink(missing_ok=True)


def keep_ca_file(home: Path, ca_file: Path) -> Path:
    """Copy the CA the user trusted at login, so later commands keep trusting it."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = home / CA_FILE
    if ca_file.resolve() != target.resolve():
        try:
            data = ca_file.read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read the CA file {ca_file}: {exc.strerror}") from None
        _write_private(target, data)
    return target


def _write_private(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(temporary, 0o600)
    shutil.move(str(temporary), str(path))
