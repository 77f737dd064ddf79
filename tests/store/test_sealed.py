"""The record seal: what opens is exactly what was sealed, under this key and this store key.

The seal itself is pure (no store); `SealedRecords` is then checked over both ephemeral
backends: a record that does not open reads as absent, is deleted and is audited.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.audit import AuditTrail
from portcullis.errors import StoreError, TamperedRecordError
from portcullis.store import EphemeralStore, RecordSeal, SealedRecords
from portcullis.tokens import TokenHasher

HASHER = TokenHasher(b"d" * 32)
SEAL = RecordSeal.for_kind(HASHER, "session")
KEY = "session:" + "ab" * 32
RECORD = json.dumps({"claims": {"username": "alice", "groups": ["staff"]},
                     "created_at": 1000.0}).encode()
SEALED = SEAL.seal(KEY, RECORD)


def test_a_sealed_record_opens_to_what_was_sealed() -> None:
    assert SEAL.open(KEY, SEALED) == RECORD


def test_a_sealed_record_shows_nothing_of_its_content() -> None:
    assert b"alice" not in SEALED and b"staff" not in SEALED
    assert SEAL.seal(KEY, RECORD) != SEALED   # a fresh salt each time


def test_the_format_is_versioned_and_compact() -> None:
    assert SEALED[0] == 1
    assert len(SEALED) == len(RECORD) + 33     # version, 16-byte salt, 16-byte tag


def test_the_error_is_a_store_error_of_the_one_hierarchy() -> None:
    assert issubclass(TamperedRecordError, StoreError)


@given(st.data())
def test_any_single_bit_flip_fails_to_open(data: st.DataObject) -> None:
    bit = data.draw(st.integers(0, len(SEALED) * 8 - 1))
    flipped = bytearray(SEALED)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TamperedRecordError):
        SEAL.open(KEY, bytes(flipped))


@given(st.integers(0, len(SEALED) - 1))
def test_any_truncation_fails_to_open(length: int) -> None:
    with pytest.raises(TamperedRecordError):
        SEAL.open(KEY, SEALED[:length])


@given(st.binary(min_size=1, max_size=64))
def test_anything_appended_fails_to_open(extra: bytes) -> None:
    with pytest.raises(TamperedRecordError):
        SEAL.open(KEY, SEALED + extra)


@given(st.text(max_size=80).filter(lambda key: key != KEY))
def test_a_record_under_another_store_key_fails_to_open(other_key: str) -> None:
    with pytest.raises(TamperedRecordError):
        SEAL.open(other_key, SEALED)


def test_a_record_sealed_under_another_deployments_key_fails_to_open() -> None:
    forged = RecordSeal.for_kind(TokenHasher(b"e" * 32), "session").seal(KEY, RECORD)
    with pytest.raises(TamperedRecordError, match="does not open"):
        SEAL.open(KEY, forged)


def test_a_record_of_another_kind_fails_to_open_even_under_the_same_store_key() -> None:
    ticket = RecordSeal.for_kind(HASHER, "ticket").seal(KEY, RECORD)
    with pytest.raises(TamperedRecordError):
        SEAL.open(KEY, ticket)


@pytest.mark.parametrize("legacy", [RECORD, b"", b"1", b"\x02" + SEALED[1:]])
def test_an_unsealed_or_unknown_version_record_fails_to_open(legacy: bytes) -> None:
    with pytest.raises(TamperedRecordError):
        SEAL.open(KEY, legacy)


@given(st.binary(max_size=2048), st.text(max_size=200))
def test_any_record_round_trips_under_any_store_key(plaintext: bytes, store_key: str) -> None:
    assert SEAL.open(store_key, SEAL.seal(store_key, plaintext)) == plaintext


# --- SealedRecords over both backends --------------------------------------------------------

def audit_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def records(ephemeral_store: EphemeralStore, audit_path: Path) -> SealedRecords:
    return SealedRecords(ephemeral_store, HASHER, "session", AuditTrail(audit_path))


async def test_a_record_put_through_the_seal_reads_back_and_is_sealed_in_the_store(
        records: SealedRecords, ephemeral_store: EphemeralStore) -> None:
    await records.put(KEY, RECORD, 60)
    assert await records.get(KEY) == RECORD
    stored = await ephemeral_store.get(KEY)
    assert stored is not None and b"alice" not in stored and SEAL.open(KEY, stored) == RECORD
    assert await records.take(KEY) == RECORD
    assert await records.get(KEY) is None


async def test_an_edited_record_reads_as_absent_is_deleted_and_audited(
        records: SealedRecords, ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    await records.put(KEY, RECORD, 60)
    await ephemeral_store.put(KEY, RECORD.replace(b'"staff"', b'"staff", "admins"'), 60)
    assert await records.get(KEY) is None
    assert await ephemeral_store.get(KEY) is None
    [event] = audit_events(audit_path)
    assert event["event"] == "store.tampered"
    assert (event["kind"], event["namespace"], event["record"]) == ("session", "session",
                                                                   "ab" * 6)
    assert "alice" not in json.dumps(event)


async def test_a_valid_record_copied_to_another_key_is_refused_when_taken(
        records: SealedRecords, ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    other = "session:" + "cd" * 32
    await records.put(KEY, RECORD, 60)
    copied = await ephemeral_store.get(KEY)
    assert copied is not None
    await ephemeral_store.put(other, copied, 60)
    assert await records.take(other) is None
    assert await records.get(KEY) == RECORD          # the original is untouched
    assert [e["record"] for e in audit_events(audit_path)] == ["cd" * 6]
