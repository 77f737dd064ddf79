"""The DurableStore's shadow devices, on SQLite and PostgreSQL (the same contract)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from portcullis.errors import DuplicateError
from portcullis.store import DurableStore

CERT_A = "-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n"
CERT_B = "-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n"
FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64


def _now() -> datetime:
    return datetime.now(UTC)


async def test_an_added_device_waits_for_its_code(durable_store: DurableStore) -> None:
    await durable_store.add_shadow_device("kiosk-1", "hash-1", _now() + timedelta(hours=1))
    record = await durable_store.shadow_device("kiosk-1")
    assert record is not None
    assert (record.status, record.certificate, record.fingerprint) == ("enrolling", None, None)
    with pytest.raises(DuplicateError):
        await durable_store.add_shadow_device("kiosk-1", "hash-2", _now())


async def test_the_code_enrols_once_and_only_unexpired(durable_store: DurableStore) -> None:
    await durable_store.add_shadow_device("kiosk-1", "hash-1", _now() + timedelta(hours=1))
    await durable_store.add_shadow_device("kiosk-2", "hash-2", _now() - timedelta(seconds=1))
    assert not await durable_store.enrol_shadow_device("kiosk-1", "wrong", CERT_A, FP_A,
                                                       "10.0.0.1:5900", _now())
    assert not await durable_store.enrol_shadow_device("kiosk-2", "hash-2", CERT_B, FP_B,
                                                       None, _now())
    assert await durable_store.enrol_shadow_device("kiosk-1", "hash-1", CERT_A, FP_A,
                                                   "10.0.0.1:5900", _now())
    assert not await durable_store.enrol_shadow_device("kiosk-1", "hash-1", CERT_B, FP_B,
                                                       None, _now())
    record = await durable_store.shadow_device_with(FP_A)
    assert record is not None
    assert (record.name, record.status, record.advertise, record.approved_by) == (
        "kiosk-1", "approved", "10.0.0.1:5900", "enrolment code")
    assert record.code_hash is None


async def test_two_agents_racing_with_one_code_enrol_one(durable_store: DurableStore) -> None:
    await durable_store.add_shadow_device("kiosk-1", "hash-1", _now() + timedelta(hours=1))
    results = await asyncio.gather(
        durable_store.enrol_shadow_device("kiosk-1", "hash-1", CERT_A, FP_A, None, _now()),
        durable_store.enrol_shadow_device("kiosk-1", "hash-1", CERT_B, FP_B, None, _now()))
    assert sorted(results) == [False, True]


async def test_a_pending_device_is_approved_by_its_fingerprint_only(
        durable_store: DurableStore) -> None:
    await durable_store.add_pending_shadow_device("pos-7", CERT_A, FP_A, None, _now())
    assert not await durable_store.approve_shadow_device("pos-7", FP_B, "admin")
    assert (await durable_store.shadow_device("pos-7")).status == "pending"  # type: ignore[union-attr]
    assert await durable_store.approve_shadow_device("pos-7", FP_A, "admin")
    record = await durable_store.shadow_device("pos-7")
    assert record is not None and (record.status, record.approved_by) == ("approved", "admin")
    with pytest.raises(DuplicateError):   # one certificate, one device
        await durable_store.add_pending_shadow_device("pos-8", CERT_A, FP_A, None, _now())


async def test_renewal_replaces_the_certificate_it_signed_in_with(
        durable_store: DurableStore) -> None:
    await durable_store.add_pending_shadow_device("pos-7", CERT_A, FP_A, None, _now())
    await durable_store.approve_shadow_device("pos-7", FP_A, "admin")
    assert not await durable_store.replace_shadow_certificate("pos-7", FP_B, CERT_B, FP_B)
    assert await durable_store.replace_shadow_certificate("pos-7", FP_A, CERT_B, FP_B)
    assert await durable_store.shadow_device_with(FP_A) is None
    assert (await durable_store.shadow_device_with(FP_B)) is not None


async def test_a_removed_device_is_gone(durable_store: DurableStore) -> None:
    await durable_store.add_pending_shadow_device("pos-7", CERT_A, FP_A, None, _now())
    await durable_store.seen_shadow_device("pos-7", _now(), "10.1.1.1:5900")
    assert [r.name for r in await durable_store.shadow_devices()] == ["pos-7"]
    assert await durable_store.remove_shadow_device("pos-7")
    assert not await durable_store.remove_shadow_device("pos-7")
    assert await durable_store.shadow_device("pos-7") is None
    assert await durable_store.shadow_devices() == []
