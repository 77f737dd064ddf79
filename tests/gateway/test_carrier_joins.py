"""Join records let extra carriers join a tunnel (`gateway.carriers`): only with the
session the tunnel belongs to, only while carrier 0 keeps the record, never from a record
edited or planted in the store."""

from __future__ import annotations

import hashlib

from portcullis.gateway.carriers import KIND, CarrierJoins, JoinRecord, joined
from portcullis.store import MemoryStore
from portcullis.store.sealed import SealedRecords
from portcullis.tokens import TokenHasher

HASHER = TokenHasher(b"k" * 32)
RECORD = JoinRecord(session="handle-alice", tunnel="0123456789abcdef", source="198.19.0.2")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def joins_on(store: MemoryStore, hasher: TokenHasher = HASHER, ttl: float = 30.0
             ) -> CarrierJoins:
    return CarrierJoins(SealedRecords(store, hasher, KIND), ttl)


def test_a_record_joins_only_the_session_it_was_issued_to() -> None:
    assert joined(RECORD, "handle-alice") == RECORD
    assert joined(RECORD, "handle-bob") is None
    assert joined(None, "handle-alice") is None


def test_records_survive_encoding_and_malformed_ones_read_as_none() -> None:
    assert JoinRecord.decode(RECORD.encode()) == RECORD
    no_pool = JoinRecord("h", "t", None)
    assert JoinRecord.decode(no_pool.encode()) == no_pool
    for raw in (b"", b"[]", b'{"session": "h"}', b'{"session": 1, "tunnel": "t", '
                b'"source": null}', b'{"session": "h", "tunnel": "t", "source": 7}'):
        assert JoinRecord.decode(raw) is None


async def test_an_issued_secret_finds_its_record_until_the_tunnel_ends() -> None:
    joins = joins_on(MemoryStore())
    secret = await joins.issue(RECORD)
    assert len(secret) >= 43   # 256 random bits
    assert await joins.find(secret) == RECORD
    await joins.end(secret)
    assert await joins.find(secret) is None


async def test_the_store_holds_the_secret_only_as_a_hash() -> None:
    store = MemoryStore()
    secret = await joins_on(store).issue(RECORD)
    key = f"{KIND}:{hashlib.sha256(secret.encode()).hexdigest()}"
    raw = await store.get(key)
    assert raw is not None and secret.encode() not in raw
    assert b"handle-alice" not in raw    # sealed, not only signed


async def test_a_record_expires_unless_renewed() -> None:
    clock = Clock()
    joins = joins_on(MemoryStore(clock=clock), ttl=30.0)
    secret = await joins.issue(RECORD)
    clock.now += 20
    await joins.renew(secret, RECORD)
    clock.now += 20
    assert await joins.find(secret) == RECORD
    clock.now += 31
    assert await joins.find(secret) is None


async def test_unknown_forged_and_malformed_secrets_find_nothing() -> None:
    joins = joins_on(MemoryStore())
    await joins.issue(RECORD)
    assert await joins.find("a-guess") is None
    assert await joins.find("") is None
    assert await joins.find("x" * 10_000) is None
    assert await joins.find(None) is None
    assert await joins.find(42) is None


async def test_a_record_planted_or_copied_in_the_store_is_refused() -> None:
    store = MemoryStore()
    joins = joins_on(store)
    secret = await joins.issue(RECORD)
    planted = "known-to-the-attacker"
    planted_key = f"{KIND}:{hashlib.sha256(planted.encode()).hexdigest()}"
    # Plain JSON written by someone who can write to the store, but has no token key.
    await store.put(planted_key, JoinRecord("handle-mallory", "t", "10.0.0.1").encode(), 30)
    assert await joins.find(planted) is None
    # A genuine sealed record copied under another key does not open there either.
    genuine = await store.get(f"{KIND}:{hashlib.sha256(secret.encode()).hexdigest()}")
    assert genuine is not None
    await store.put(planted_key, genuine, 30)
    assert await joins.find(planted) is None
    # Nor does one sealed by another deployment.
    other = joins_on(store, TokenHasher(b"o" * 32))
    assert await other.find(secret) is None


async def test_each_carrier_index_of_a_tunnel_is_taken_once_until_freed_or_expired() -> None:
    """However many WebSockets a session opens with the secret, one carrier per index:
    a tunnel has at most MAX_CARRIERS."""
    clock = Clock()
    joins = joins_on(MemoryStore(clock=clock))
    assert await joins.claim_slot(RECORD.tunnel, 1)
    assert not await joins.claim_slot(RECORD.tunnel, 1)
    assert await joins.claim_slot(RECORD.tunnel, 2)
    assert await joins.claim_slot("another-tunnel", 1)
    await joins.free_slot(RECORD.tunnel, 1)
    assert await joins.claim_slot(RECORD.tunnel, 1)
    clock.now += 29
    await joins.keep_slot(RECORD.tunnel, 1)       # a live carrier keeps its slot
    clock.now += 29
    assert not await joins.claim_slot(RECORD.tunnel, 1)
    assert await joins.claim_slot(RECORD.tunnel, 2)   # not kept: expired with its carrier
