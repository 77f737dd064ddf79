"""The provider's ES256 signing keys: kept in the durable store, rotated on a schedule.

Every node of a deployment signs with the same key, read from the durable store (the
private JWK sealed under a key derived from the token key, so a database dump signs
nothing). Rotation never surprises a relying party: a new key is published in the JWKS
a day before it signs (`PUBLISH_AHEAD`), and a key that stopped signing stays published
for one more rotation period, far longer than any token it signed lives. The schedule
is one pure function, `plan_keys`; `KeyRing` only reads, makes and drops what it says.

Never logs or returns a private key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from joserfc.jwk import ECKey, Key, KeySet

from portcullis.errors import StoreError
from portcullis.store import DurableStore, RecordSeal, SigningKeyRecord
from portcullis.tokens import TokenHasher

ALGORITHM = "ES256"
PUBLISH_AHEAD = 86400.0
# How often a node looks at the store for keys another node made (well within a day).
REREAD_SECONDS = 60.0
DAY = 86400.0


@dataclass(frozen=True)
class KeyTimes:
    generation: int
    signs_from: float      # seconds since the epoch


@dataclass(frozen=True)
class KeyPlan:
    """What the key schedule says at one moment, and why."""

    signing: int | None              # the generation that signs now
    make_signing_from: float | None  # make a new key that signs from then
    drop: tuple[int, ...]            # generations no token can need any more
    reason: str


def plan_keys(keys: Sequence[KeyTimes], now: float, rotation: float) -> KeyPlan:
    """The key schedule: which key signs, whether to make the next one, which to drop."""
    if not keys:
        return KeyPlan(None, now, (), "no key yet: make one that signs at once")
    ordered = sorted(keys, key=lambda key: key.generation)
    started = [key for key in ordered if key.signs_from <= now]
    # A clock set back before every key's start still signs, with the oldest.
    signing = started[-1] if started else ordered[0]
    drop = tuple(key.generation for key, successor in itertools.pairwise(ordered)
                 if successor.signs_from + rotation <= now)
    pending = [key for key in ordered if key.signs_from > now]
    if not pending and signing.signs_from + rotation - PUBLISH_AHEAD <= now:
        return KeyPlan(signing.generation, now + PUBLISH_AHEAD, drop,
                       f"key {signing.generation} is due for rotation: publish the next "
                       "one a day before it signs")
    return KeyPlan(signing.generation, None, drop, f"key {signing.generation} signs")


@dataclass(frozen=True)
class ActiveKeys:
    signing: ECKey
    verifying: KeySet         # every published key, for tokens signed before a rotation
    jwks: dict[str, object]   # the public JWKS document


class KeyRing:
    """The deployment's signing keys as this node sees them, re-read every minute."""

    def __init__(self, durable: DurableStore, hasher: TokenHasher, rotation_days: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._durable = durable
        self._seal = RecordSeal.for_kind(hasher, "oidc-signing-key")
        self._rotation = rotation_days * DAY
        self._clock = clock
        self._lock = asyncio.Lock()
        self._active: ActiveKeys | None = None
        self._fresh_until = 0.0

    async def active(self) -> ActiveKeys:
        now = self._clock()
        if self._active is not None and now < self._fresh_until:
            return self._active
        async with self._lock:
            if self._active is None or self._clock() >= self._fresh_until:
                self._active, self._fresh_until = await self._reload(self._clock())
        return self._active

    async def _reload(self, now: float) -> tuple[ActiveKeys, float]:
        records = await self._durable.signing_keys()
        plan = plan_keys([_times(record) for record in records], now, self._rotation)
        if plan.drop:
            await self._durable.drop_signing_keys(plan.drop)
        if plan.make_signing_from is not None:
            generation = max((record.generation for record in records), default=0) + 1
            # False: another node made this generation first; its key is as good.
            await self._durable.add_signing_key(self._new_key(generation,
                                                              plan.make_signing_from))
        if plan.drop or plan.make_signing_from is not None:
            records = await self._durable.signing_keys()
            plan = plan_keys([_times(record) for record in records], now, self._rotation)
        if plan.signing is None:
            raise StoreError("the OpenID provider has no signing key and could not store one")
        keys = {record.generation: self._open(record) for record in records}
        public: list[Key] = [ECKey.import_key(key.as_dict(private=False)) for key in keys.values()]
        pending = [record.signs_from.timestamp() for record in records
                   if record.signs_from.timestamp() > now]
        fresh_until = min([now + REREAD_SECONDS, *pending])
        return ActiveKeys(keys[plan.signing], KeySet(public),
                          {"keys": [key.as_dict(private=False) for key in public]}), fresh_until

    def _new_key(self, generation: int, signs_from: float) -> SigningKeyRecord:
        key = ECKey.generate_key("P-256", private=True)
        kid = key.thumbprint()
        key = ECKey.import_key(key.as_dict(private=True),
                               {"kid": kid, "use": "sig", "alg": ALGORITHM})
        sealed = self._seal.seal(kid, json.dumps(key.as_dict(private=True)).encode())
        return SigningKeyRecord(generation, kid, sealed, datetime.fromtimestamp(signs_from, UTC))

    def _open(self, record: SigningKeyRecord) -> ECKey:
        # A key that does not open (another token key) raises TamperedRecordError: the
        # provider cannot sign, and the administrator is told why.
        return ECKey.import_key(json.loads(self._seal.open(record.kid, record.sealed_jwk)))


def _times(record: SigningKeyRecord) -> KeyTimes:
    return KeyTimes(record.generation, record.signs_from.timestamp())
