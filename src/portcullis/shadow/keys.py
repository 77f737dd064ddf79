"""The shadow hub's own keys, made on the first start of a hub and kept in `tls.directory`:

- `shadow-hub-signing.key`: the Ed25519 key that signs shadow requests. Devices get its
  public half when they register, and the hub checks requests with it.
- `shadow-console-ca.crt/.key`: the CA of the consoles' ephemeral certificates. Devices
  accept a TLS channel only from a certificate it issued, and only for a few minutes.

Several hub nodes must share these files (like the deployment CA and the token key).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from portcullis.errors import PKIError
from portcullis.pki import IssuedCert, certify_request, create_ca, load_pair, write_pair
from portcullis.proto.shadow import key_id_of

SIGNING_KEY_FILE = "shadow-hub-signing.key"
CONSOLE_CA = "shadow-console-ca"
CONSOLE_COMMON_NAME = "portcullis-shadow-console"


@dataclass(frozen=True)
class HubKeys:
    signing_key: Ed25519PrivateKey
    console_ca: IssuedCert

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    @property
    def key_id(self) -> str:
        return key_id_of(self.public_key)

    @property
    def public_key_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def console_certificate(self, csr_pem: bytes, lifetime: float) -> bytes:
        """The console's certificate for the key of its request, valid `lifetime` s."""
        return certify_request(self.console_ca, csr_pem, CONSOLE_COMMON_NAME,
                               valid_for=dt.timedelta(seconds=lifetime))

    @classmethod
    def load_or_create(cls, directory: Path) -> HubKeys:
        directory.mkdir(parents=True, exist_ok=True)
        return cls(_signing_key(directory / SIGNING_KEY_FILE), _console_ca(directory))


def _signing_key(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        # Written whole under a private name, then linked into place: of two hub nodes
        # starting at once on a shared directory one wins, and nobody (nor a crash)
        # ever leaves a half-written key behind.
        staged = path.with_name(f".{path.name}.{os.getpid()}")
        descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(pem)
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(staged, path)
        finally:
            staged.unlink()
    if path.stat().st_mode & 0o077:
        raise PKIError(f"{path} is readable by others: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read the shadow hub's signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PKIError(f"{path} is not an Ed25519 private key")
    return key


def _console_ca(directory: Path) -> IssuedCert:
    cert, key = directory / f"{CONSOLE_CA}.crt", directory / f"{CONSOLE_CA}.key"
    if not cert.exists():
        try:
            write_pair(directory, CONSOLE_CA, create_ca("Portcullis shadow console CA"))
        except PKIError:
            if not cert.exists():   # not merely another node's write first
                raise
    return load_pair(cert, key)
