"""Sealed records: what the ephemeral store hands back is believed only if it opens.

Sessions, sign-ins in progress, tickets and pending TOTP enrolments carry claims and
grants, and they sit in Redis, which other programs may be able to write to. Each such
record is sealed with AES-256-GCM under a key derived from the deployment's token key
for its kind, with the record's store key as associated data: an edited, truncated or
forged value, a value sealed under another deployment's key, and a valid value copied
under another key all fail to open, and are then treated as absent, deleted and audited
(`store.tampered`).

A seal proves where a record came from, not that it is the latest: it cannot stop a
record from being deleted, or an old copy from being put back under its own key within
its lifetime (docs/security.md says what that allows). Counters and markers whose only
power is their presence (throttling, used TOTP steps, address leases) are not sealed.

Never logs or audits a value, a token or more of a key than its namespace and the first
12 hex digits of its keyed hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portcullis.audit import AuditTrail
from portcullis.errors import TamperedRecordError
from portcullis.store.ephemeral import EphemeralStore
from portcullis.tokens import TokenHasher

log = structlog.get_logger("portcullis.store")

VERSION = 1
_VERSION_BYTE = bytes([VERSION])
SALT_BYTES = 16
TAG_BYTES = 16
# Each record is sealed under its own key (from a random salt), so the nonce may be fixed:
# no key ever seals twice, whatever the volume, and no nonce has to be counted or drawn.
_NONCE = bytes(12)
OVERHEAD = 1 + SALT_BYTES + TAG_BYTES


class RecordSeal:
    """AEAD for the records of one kind: `seal` and `open`, bound to the record's key.

    Format, version 1: 0x01 ‖ salt (16 bytes) ‖ AES-256-GCM ciphertext ‖ tag (16 bytes),
    under the key HMAC-SHA-256(kind key, salt), with associated data 0x01 ‖ store key.
    """

    def __init__(self, kind_key: bytes) -> None:
        if len(kind_key) != 32:
            raise ValueError("a record seal needs a 256-bit key")
        self._kind_key = kind_key

    @classmethod
    def for_kind(cls, hasher: TokenHasher, kind: str) -> RecordSeal:
        """The seal of `kind` ("session", "login", ...): every node with the deployment's
        token key derives the same key, and no two kinds (nor any other purpose) share one."""
        return cls(hasher.derived_key(f"sealed-record:{kind}"))

    def seal(self, store_key: str, plaintext: bytes) -> bytes:
        salt = secrets.token_bytes(SALT_BYTES)
        sealed = self._aead(salt).encrypt(_NONCE, plaintext, _associated(store_key))
        return _VERSION_BYTE + salt + sealed

    def open(self, store_key: str, sealed: bytes) -> bytes:
        """The plaintext; TamperedRecordError (its message is the reason) if it does not open."""
        if len(sealed) < OVERHEAD:
            raise TamperedRecordError("truncated or not a sealed record")
        if sealed[:1] != _VERSION_BYTE:
            raise TamperedRecordError("not a sealed record of a known version")
        salt, body = sealed[1:1 + SALT_BYTES], sealed[1 + SALT_BYTES:]
        try:
            return self._aead(salt).decrypt(_NONCE, body, _associated(store_key))
        except InvalidTag:
            raise TamperedRecordError(
                "does not open: altered, moved from another key, or sealed under another "
                "token key") from None

    def _aead(self, salt: bytes) -> AESGCM:
        return AESGCM(hmac.new(self._kind_key, b"record\0" + salt, hashlib.sha256).digest())


def _associated(store_key: str) -> bytes:
    return _VERSION_BYTE + store_key.encode()


class SealedRecords:
    """The records of one kind in an ephemeral store, sealed on the way in and checked on
    the way out. A record that fails the check reads as absent: it is deleted, audited
    as `store.tampered` and logged as a warning."""

    def __init__(self, store: EphemeralStore, hasher: TokenHasher, kind: str,
                 audit: AuditTrail | None = None) -> None:
        self._store = store
        self._seal = RecordSeal.for_kind(hasher, kind)
        self._kind = kind
        self._audit = audit

    async def put(self, key: str, value: bytes, ttl: float) -> None:
        await self._store.put(key, self._seal.seal(key, value), ttl)

    async def put_new(self, key: str, value: bytes, ttl: float) -> bool:
        """Store only if `key` is absent (atomic across every client of the store)."""
        return await self._store.put_new(key, self._seal.seal(key, value), ttl)

    async def get(self, key: str) -> bytes | None:
        raw = await self._store.get(key)
        if raw is None:
            return None
        opened = self._opened(key, raw)
        if opened is None:
            await self._store.delete(key)
        return opened

    async def take(self, key: str) -> bytes | None:
        raw = await self._store.take(key)
        return None if raw is None else self._opened(key, raw)

    def _opened(self, key: str, raw: bytes) -> bytes | None:
        try:
            return self._seal.open(key, raw)
        except TamperedRecordError as exc:
            namespace, _, digest = key.partition(":")
            fields = {"kind": self._kind, "namespace": namespace, "record": digest[:12],
                      "reason": str(exc)}
            log.warning("an ephemeral record failed its integrity check and was refused",
                        **fields)
            if self._audit is not None:
                self._audit.record("store.tampered", **fields)
            return None
