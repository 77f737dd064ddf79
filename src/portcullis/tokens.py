"""Bearer secrets (session tokens, tickets, login-flow handles) and how they are kept.

A token is at least 128 random bits. Stores never see a token: they see its keyed hash
(HMAC-SHA-256 under the deployment's token key), so a database or Redis dump yields
nothing usable. Logs see only `mask(token)`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from portcullis.errors import PKIError

_STA_ID = re.compile(r"[A-Za-z0-9]{1,16}")
TOKEN_BYTES = 32  # 256 bits: comfortably above the 128-bit floor
KEY_FILE = "token.key"


def new_token(nbytes: int = TOKEN_BYTES) -> str:
    return secrets.token_urlsafe(nbytes)


def mask(token: str) -> str:
    """What a log may show of a token: enough to correlate lines, never enough to use it.

    A ticket keeps its STA id and the first 6 characters of its secret (36 of 192 bits).
    """
    prefix, separator, secret = token.rpartition(";")
    if separator and not _STA_ID.fullmatch(prefix):
        return "…"   # not a ticket's shape: show nothing an attacker chose
    if len(secret) <= 12 or not secret.isascii() or not secret.isprintable():
        return prefix + separator + "…"
    return prefix + separator + secret[:6] + "…"


class TokenHasher:
    """Keyed hashing of tokens, namespaced so a session id can never pass as a ticket."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise PKIError("the token key must be at least 32 bytes")
        self._key = key

    def digest(self, namespace: str, token: str) -> str:
        message = namespace.encode() + b"\0" + token.encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def derived_key(self, purpose: str) -> bytes:
        """A 256-bit key for one purpose (HMAC as a PRF), so every node that has the token
        key has it too, and no two purposes share a key."""
        return hmac.new(self._key, b"derive\0" + purpose.encode(), hashlib.sha256).digest()

    @classmethod
    def create_key_file(cls, directory: Path) -> Path:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / KEY_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        return path

    @classmethod
    def from_directory(cls, directory: Path) -> TokenHasher:
        path = directory / KEY_FILE
        try:
            return cls(path.read_bytes())
        except OSError as exc:
            raise PKIError(
                f"cannot read the token key {path}: {exc.strerror}; every node of a deployment "
                "needs the same key file (created by 'portcullis init')"
            ) from None
