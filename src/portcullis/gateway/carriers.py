"""Extra carriers of one tunnel: more WebSockets carrying the same tunnel's streams, so
that one user's parallel streams spread over the cores at both ends (each carrier may
land on another worker process, or another node).

Carrier 0 is the tunnel itself (its HELLO presents the session; it gets the tunnel id and
the intranet address). Its client is also given a join secret. An extra carrier presents
the session token and that secret; any worker checks both in the shared ephemeral store
(nothing is shared in process memory) and then serves the carrier's streams with the
session's claims and the tunnel's id and intranet address.

The secret is stored only as the key of its record (its SHA-256: the secret is 256
random bits, so no key is needed to make the hash unguessable), and the record is sealed
(`store.sealed`), bound to the session's handle: a record edited in the store, or copied
under another key, reads as absent. Carrier 0 renews the record while it lives and
deletes it when it ends; an extra carrier looks for it every `JOIN_CHECK` seconds and
ends when it is gone. Extra carriers are connections of the session like carrier 0, so a
session's ending ends them all, on every node.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from portcullis.store.sealed import SealedRecords

KIND = "carrier-join"
JOIN_TTL = 30.0     # seconds a join record outlives a carrier 0 that stopped renewing it
JOIN_CHECK = 1.0    # how often an extra carrier makes sure its tunnel still lives
# How long a tunnel's intranet address stays held after carrier 0 ended: its extra
# carriers may still source from it until their next check sees the tunnel gone.
RELEASE_AFTER = 2 * JOIN_CHECK
MAX_SECRET = 128    # characters: longer is no secret of ours, and is not looked up


@dataclass(frozen=True)
class JoinRecord:
    """What an extra carrier of a tunnel inherits from carrier 0."""

    session: str           # the handle of the sign-in session the tunnel belongs to
    tunnel: str            # carrier 0's connection id, which names the tunnel
    source: str | None     # the tunnel's intranet address, when a pool gave one

    def encode(self) -> bytes:
        return json.dumps({"session": self.session, "tunnel": self.tunnel,
                           "source": self.source}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> JoinRecord | None:
        try:
            fields = json.loads(raw)
            record = cls(fields["session"], fields["tunnel"], fields["source"])
        except (ValueError, TypeError, KeyError):
            return None
        if not (isinstance(record.session, str) and isinstance(record.tunnel, str)
                and (record.source is None or isinstance(record.source, str))):
            return None
        return record


def joined(record: JoinRecord | None, session_handle: str) -> JoinRecord | None:
    """The record, if it lets a carrier of the session `session_handle` join its tunnel:
    a secret leaked from another user's tunnel is worthless without their session."""
    if record is None or not hmac.compare_digest(record.session, session_handle):
        return None
    return record


class CarrierJoins:
    """The join records of the tunnels, in the ephemeral store every worker shares."""

    def __init__(self, records: SealedRecords, ttl: float = JOIN_TTL) -> None:
        self._records = records
        self.ttl = ttl

    async def issue(self, record: JoinRecord) -> str:
        """A new secret that lets further carriers join the tunnel `record` describes."""
        secret = secrets.token_urlsafe(32)
        await self.renew(secret, record)
        return secret

    async def renew(self, secret: str, record: JoinRecord) -> None:
        await self._records.put(self._key(secret), record.encode(), self.ttl)

    async def find(self, secret: object) -> JoinRecord | None:
        """The record a carrier's secret names, None for an unknown or expired one."""
        if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET:
            return None
        raw = await self._records.get(self._key(secret))
        return JoinRecord.decode(raw) if raw is not None else None

    async def end(self, secret: str) -> None:
        await self._records.take(self._key(secret))

    async def claim_slot(self, tunnel: str, index: int) -> bool:
        """Take carrier slot `index` of `tunnel` (atomic across workers and nodes): one
        carrier per index, so a tunnel has at most MAX_CARRIERS, however many WebSockets
        its session opens with the secret."""
        return await self._records.put_new(self._slot(tunnel, index), b"", self.ttl)

    async def keep_slot(self, tunnel: str, index: int) -> None:
        await self._records.put(self._slot(tunnel, index), b"", self.ttl)

    async def free_slot(self, tunnel: str, index: int) -> None:
        await self._records.take(self._slot(tunnel, index))

    @staticmethod
    def _slot(tunnel: str, index: int) -> str:
        return f"{KIND}-slot:{tunnel}:{index}"

    @staticmethod
    def _key(secret: str) -> str:
        return f"{KIND}:{hashlib.sha256(secret.encode()).hexdigest()}"
