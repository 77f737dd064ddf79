"""TOTP (RFC 6238) against real reference implementations: the RFC's own test vectors
and codes made by `oathtool` (OATH Toolkit), over a real SQLite database and both
ephemeral backends. The service's clock is a FakeClock, so no test waits for time."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any, Literal

import pytest
import sqlalchemy

from peers.login import BuildLogin, flow
from peers.stores import FakeClock
from peers.totp import oathtool_code
from portcullis.config.auth import TotpProvider
from portcullis.errors import AuthError
from portcullis.identity.login import Authenticated, NextStep
from portcullis.identity.passwords import hash_password
from portcullis.identity.totp import Enrolment, TotpService
from portcullis.store import DurableStore, EphemeralStore, MemoryStore
from portcullis.store.migrations import metadata
from portcullis.tokens import TokenHasher

Algorithm = Literal["sha1", "sha256", "sha512"]

HASHER_KEY = b"k" * 32
ALICE = "local:alice"
BOB = "local:bob"
# Mid-way through a 30-second step, so that ±1 step is unambiguous.
NOW = 1_700_000_015.0
PERIOD = 30


@pytest.fixture
def totp_clock() -> FakeClock:
    clock = FakeClock()
    clock.now = NOW
    return clock


def service(durable: DurableStore, ephemeral: EphemeralStore, clock: FakeClock,
            **settings: Any) -> TotpService:
    provider = TotpProvider(type="totp", name="totp", **settings)
    return TotpService(provider, durable, ephemeral, TokenHasher(HASHER_KEY), clock=clock)


async def enrol(totp: TotpService, identity: str, clock: FakeClock, **tool: Any) -> Enrolment:
    """A fresh enrolment confirmed with oathtool's code at the current (fake) time."""
    enrolment = totp.new_enrolment(identity.split(":", 1)[1])
    code = oathtool_code(enrolment.secret, clock.now, **tool)
    check = await totp.confirm(identity, enrolment, code)
    assert check.ok, check.reason
    return enrolment


def database_contents(tmp_path: Path) -> tuple[dict[str, list[dict[str, Any]]], bytes]:
    """Every row of every table (read with a separate engine), and the raw bytes of the
    database files (WAL included)."""
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'db'}")
    try:
        with engine.connect() as conn:
            rows = {table.name: [dict(row._mapping)
                                 for row in conn.execute(sqlalchemy.select(table))]
                    for table in metadata.sorted_tables}
    finally:
        engine.dispose()
    raw = b"".join(path.read_bytes() for path in sorted(tmp_path.glob("db*")))
    return rows, raw


# --- RFC 6238 Appendix B ---------------------------------------------------------------

SEEDS: dict[Algorithm, bytes] = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
VECTORS: dict[Algorithm, list[tuple[int, str]]] = {
    "sha1": [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
             (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")],
    "sha256": [(59, "46119246"), (1111111109, "68084774"), (1111111111, "67062674"),
               (1234567890, "91819424"), (2000000000, "90698825"), (20000000000, "77737706")],
    "sha512": [(59, "90693936"), (1111111109, "25091201"), (1111111111, "99943326"),
               (1234567890, "93441116"), (2000000000, "38618901"), (20000000000, "47863826")],
}


def _off_by_one(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "sha512"])
async def test_rfc6238_test_vectors(algorithm: Algorithm, durable: DurableStore,
                                    totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock, digits=8, algorithm=algorithm)
    secret = base64.b32encode(SEEDS[algorithm]).decode().rstrip("=")
    vectors = VECTORS[algorithm]
    # The reference tool agrees with the RFC (so the other tests can trust it).
    for at, expected in vectors:
        assert oathtool_code(SEEDS[algorithm].hex(), at, digits=8, algorithm=algorithm,
                             base32=False) == expected

    first_at, first_code = vectors[0]
    totp_clock.now = first_at
    enrolment = Enrolment(secret, (), "otpauth://totp/test")
    assert not (await totp.confirm(ALICE, enrolment, _off_by_one(first_code))).ok
    assert (await totp.confirm(ALICE, enrolment, first_code)).ok
    record = await totp.record(ALICE)
    assert record is not None
    for at, expected in vectors[1:]:
        totp_clock.now = at
        wrong = await totp.verify(ALICE, record, _off_by_one(expected))
        assert (wrong.ok, wrong.reason) == (False, "wrong code"), at
        right = await totp.verify(ALICE, record, expected)
        assert (right.ok, right.reason) == (True, "code verified"), at


# --- codes from oathtool ------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "tool"), [
    ({}, {}),
    ({"algorithm": "sha256"}, {"algorithm": "sha256"}),
    ({"algorithm": "sha512", "digits": 8}, {"algorithm": "sha512", "digits": 8}),
    ({"period": 60}, {"period": 60}),
], ids=["sha1-6-30s", "sha256-6-30s", "sha512-8-30s", "sha1-6-60s"])
async def test_codes_from_oathtool_are_accepted(
        settings: dict[str, Any], tool: dict[str, Any], durable: DurableStore,
        totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock, **settings)
    enrolment = await enrol(totp, ALICE, totp_clock, **tool)
    record = await totp.record(ALICE)
    assert record is not None
    # The URI the app scans carries exactly these parameters.
    assert f"secret={enrolment.secret}" in enrolment.uri
    assert f"digits={totp.settings.digits}" in enrolment.uri
    assert f"period={totp.settings.period}" in enrolment.uri
    assert f"algorithm={totp.settings.algorithm.upper()}" in enrolment.uri
    for later in (1, 2, 5, 1000):
        totp_clock.now = NOW + later * totp.settings.period
        code = oathtool_code(enrolment.secret, totp_clock.now, **tool)
        check = await totp.verify(ALICE, record, code)
        assert (check.ok, check.reason) == (True, "code verified"), later


async def test_a_code_for_another_algorithm_is_refused(
        durable: DurableStore, totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock, algorithm="sha256")
    enrolment = totp.new_enrolment("alice")
    sha1_code = oathtool_code(enrolment.secret, totp_clock.now)
    sha256_code = oathtool_code(enrolment.secret, totp_clock.now, algorithm="sha256")
    assert sha1_code != sha256_code
    assert not (await totp.confirm(ALICE, enrolment, sha1_code)).ok
    assert (await totp.confirm(ALICE, enrolment, sha256_code)).ok


@pytest.mark.parametrize(("window", "steps", "accepted"), [
    (1, -1, True), (1, 1, True), (1, -2, False), (1, 2, False),
    (0, 0, True), (0, -1, False), (0, 1, False),
    (2, -2, True), (2, 2, True), (2, -3, False), (2, 3, False),
])
async def test_codes_are_accepted_within_the_window_only(
        window: int, steps: int, accepted: bool, durable: DurableStore,
        totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock, window=window)
    enrolment = await enrol(totp, ALICE, totp_clock)
    record = await totp.record(ALICE)
    assert record is not None
    totp_clock.now = NOW + 10 * PERIOD       # well away from the enrolment's step
    code = oathtool_code(enrolment.secret, totp_clock.now + steps * PERIOD)
    check = await totp.verify(ALICE, record, code)
    assert check.ok is accepted, check.reason
    if not accepted:
        assert check.reason == "wrong code"


async def test_a_replayed_code_is_refused(
        ephemeral_store: EphemeralStore, durable: DurableStore, totp_clock: FakeClock) -> None:
    totp = service(durable, ephemeral_store, totp_clock)
    enrolment = await enrol(totp, ALICE, totp_clock)
    record = await totp.record(ALICE)
    assert record is not None
    # The code that confirmed the enrolment has been used already.
    enrol_code = oathtool_code(enrolment.secret, NOW)
    assert (await totp.verify(ALICE, record, enrol_code)).reason == "code already used"

    totp_clock.now = NOW + 5 * PERIOD
    code = oathtool_code(enrolment.secret, totp_clock.now)
    assert (await totp.verify(ALICE, record, code)).ok
    again = await totp.verify(ALICE, record, code)
    assert (again.ok, again.reason) == (False, "code already used")
    # Still refused a step later, while the code is inside the window...
    totp_clock.now += PERIOD
    assert (await totp.verify(ALICE, record, code)).reason == "code already used"
    # ...and spelled differently.
    assert not (await totp.verify(ALICE, record, f" {code[:3]} {code[3:]} ")).ok
    # Two nodes racing with one code: exactly one wins.
    totp_clock.now += 5 * PERIOD
    fresh = oathtool_code(enrolment.secret, totp_clock.now)
    results = await asyncio.gather(*(totp.verify(ALICE, record, fresh) for _ in range(8)))
    assert sorted(check.ok for check in results) == [False] * 7 + [True]


async def test_a_used_code_is_refused_for_its_own_identity_only(
        ephemeral_store: EphemeralStore, durable: DurableStore, totp_clock: FakeClock) -> None:
    totp = service(durable, ephemeral_store, totp_clock)
    # Two users who happen to hold the same secret: one's use does not burn the other's.
    enrolment = totp.new_enrolment("alice")
    code = oathtool_code(enrolment.secret, NOW)
    assert (await totp.confirm(ALICE, enrolment, code)).ok
    assert (await totp.confirm(BOB, enrolment, code)).ok


async def test_re_enrolment_retires_the_old_secret_and_recovery_codes(
        durable: DurableStore, totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock)
    old = await enrol(totp, ALICE, totp_clock)
    totp_clock.now += 3 * PERIOD
    new = await enrol(totp, ALICE, totp_clock)
    assert new.secret != old.secret
    record = await totp.record(ALICE)
    assert record is not None and record.recovery_codes_left == len(new.recovery_codes)
    totp_clock.now += 3 * PERIOD
    old_code = oathtool_code(old.secret, totp_clock.now)
    new_code = oathtool_code(new.secret, totp_clock.now)
    assert old_code != new_code
    assert (await totp.verify(ALICE, record, old_code)).reason == "wrong code"
    assert not (await totp.verify(ALICE, record, old.recovery_codes[0])).ok
    assert (await totp.verify(ALICE, record, new_code)).ok
    assert (await totp.verify(ALICE, record, new.recovery_codes[0])).ok


async def test_a_wrong_code_does_not_replace_an_enrolment(
        durable: DurableStore, totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock)
    old = await enrol(totp, ALICE, totp_clock)
    before = await totp.record(ALICE)
    attempt = totp.new_enrolment("alice")
    totp_clock.now += 3 * PERIOD
    # A code of the *old* secret does not confirm the new one.
    check = await totp.confirm(ALICE, attempt, oathtool_code(old.secret, totp_clock.now))
    assert not check.ok
    assert await totp.record(ALICE) == before


async def test_reset_removes_the_record_and_its_recovery_codes(
        durable: DurableStore, totp_clock: FakeClock, tmp_path: Path) -> None:
    totp = service(durable, MemoryStore(), totp_clock)
    await enrol(totp, ALICE, totp_clock)
    await enrol(totp, BOB, totp_clock)
    assert await totp.reset(ALICE) is True
    assert await totp.record(ALICE) is None
    assert await totp.reset(ALICE) is False
    assert await totp.record(BOB) is not None      # nobody else's
    rows, _ = database_contents(tmp_path)
    assert {row["identity"] for row in rows["totp_secrets"]} == {BOB}
    assert {row["identity"] for row in rows["recovery_codes"]} == {BOB}


async def test_after_reset_a_flow_leads_the_user_to_enrolment(
        durable: DurableStore, build_login: BuildLogin) -> None:
    await durable.add_user("alice", hash_password("pw"), ["staff"])
    login = build_login(flow({"provider": "local"}, {"provider": "totp"}))
    totp = login.totp
    enrolment = totp.new_enrolment("alice")   # the service runs on real time here
    assert (await totp.confirm(ALICE, enrolment, oathtool_code(enrolment.secret))).ok

    enrolled = await login.sign_in("alice", "pw")
    assert isinstance(enrolled, NextStep) and enrolled.step.kind == "totp"
    assert enrolled.step.enrolment is None

    assert await totp.reset(ALICE)
    reset = await login.sign_in("alice", "pw")
    assert isinstance(reset, NextStep) and reset.step.kind == "totp-enrol"
    assert reset.step.enrolment is not None
    fresh = reset.step.enrolment["secret"]
    assert fresh != enrolment.secret
    # The old secret's code does not finish the enrolment; the new one's does.
    step_ahead = time.time() + PERIOD
    old_code = oathtool_code(enrolment.secret, step_ahead)
    retry = await login.submit(reset.handle, {"code": old_code})
    assert isinstance(retry, NextStep) and retry.step.kind == "totp-enrol"
    done = await login.submit(reset.handle, {"code": oathtool_code(fresh, step_ahead)})
    assert isinstance(done, Authenticated)
    assert done.session.claims.amr == ("local", "totp")


# --- recovery codes -------------------------------------------------------------------

async def test_recovery_codes_work_once_each_and_are_stored_hashed(
        durable: DurableStore, totp_clock: FakeClock, tmp_path: Path) -> None:
    totp = service(durable, MemoryStore(), totp_clock, recovery_codes=5)
    enrolment = await enrol(totp, ALICE, totp_clock)
    codes = enrolment.recovery_codes
    assert len(codes) == 5 and len(set(codes)) == 5
    record = await totp.record(ALICE)
    assert record is not None and record.recovery_codes_left == 5

    first = await totp.verify(ALICE, record, codes[0])
    assert (first.ok, first.reason) == (True, "recovery code used")
    assert (await totp.verify(ALICE, record, codes[0])).reason == "wrong code"
    # Typed loosely: upper case, without the dash, with spaces.
    loose = f" {codes[1].upper().replace('-', '')} "
    assert (await totp.verify(ALICE, record, loose)).ok
    assert not (await totp.verify(ALICE, record, codes[1])).ok
    left = await totp.record(ALICE)
    assert left is not None and left.recovery_codes_left == 3
    # Bound to the identity: alice's codes do nothing for bob.
    await enrol(totp, BOB, totp_clock)
    bob = await totp.record(BOB)
    assert bob is not None
    assert not (await totp.verify(BOB, bob, codes[2])).ok

    rows, raw = database_contents(tmp_path)
    alice_rows = [row for row in rows["recovery_codes"] if row["identity"] == ALICE]
    assert len(alice_rows) == 5
    assert sum(row["used_at"] is not None for row in alice_rows) == 2
    dump = repr(rows)
    for code in codes:
        for spelling in (code, code.replace("-", ""), code.upper()):
            assert spelling not in dump
            assert spelling.encode() not in raw
    for row in alice_rows:
        assert set(row) == {"identity", "code_hash", "used_at"}     # no plain column
        assert len(row["code_hash"]) == 64
        assert row["code_hash"] not in {c.replace("-", "") for c in codes}


async def test_without_recovery_codes_none_is_stored(
        durable: DurableStore, totp_clock: FakeClock, tmp_path: Path) -> None:
    totp = service(durable, MemoryStore(), totp_clock, recovery_codes=0)
    enrolment = await enrol(totp, ALICE, totp_clock)
    assert enrolment.recovery_codes == ()
    record = await totp.record(ALICE)
    assert record is not None and record.recovery_codes_left == 0
    assert not (await totp.verify(ALICE, record, "abcde-fghjk")).ok
    rows, _ = database_contents(tmp_path)
    assert rows["recovery_codes"] == []


# --- the sealed secret ------------------------------------------------------------------

async def test_the_sealed_secret_opens_only_for_its_identity(
        durable: DurableStore, totp_clock: FakeClock, tmp_path: Path) -> None:
    totp = service(durable, MemoryStore(), totp_clock)
    enrolment = await enrol(totp, ALICE, totp_clock)
    alice = await totp.record(ALICE)
    assert alice is not None
    # Someone with write access to the database copies alice's row onto bob's.
    await durable.set_totp(BOB, alice.sealed_secret, [])
    bob = await totp.record(BOB)
    assert bob is not None and bob.sealed_secret == alice.sealed_secret
    totp_clock.now += 3 * PERIOD
    code = oathtool_code(enrolment.secret, totp_clock.now)
    with pytest.raises(AuthError):
        await totp.verify(BOB, bob, code)
    # The pending enrolment in the flow state is bound the same way.
    sealed = totp.seal_enrolment(ALICE, enrolment)
    assert totp.open_enrolment(ALICE, sealed) == enrolment
    with pytest.raises(AuthError):
        totp.open_enrolment(BOB, sealed)
    assert enrolment.secret not in sealed
    # Another deployment's key does not open it either.
    other = TotpService(totp.settings, durable, MemoryStore(), TokenHasher(b"o" * 32),
                        clock=totp_clock)
    with pytest.raises(AuthError):
        await other.verify(ALICE, alice, code)
    # A tampered row does not open.
    flipped = bytes([alice.sealed_secret[0] ^ 1]) + alice.sealed_secret[1:]
    await durable.set_totp(BOB, flipped, [])
    tampered = await totp.record(BOB)
    assert tampered is not None
    with pytest.raises(AuthError):
        await totp.verify(BOB, tampered, code)
    # Alice is unaffected by all this.
    assert (await totp.verify(ALICE, alice, code)).ok


async def test_the_database_never_holds_the_secret_in_clear(
        durable: DurableStore, totp_clock: FakeClock, tmp_path: Path) -> None:
    totp = service(durable, MemoryStore(), totp_clock)
    first = await enrol(totp, ALICE, totp_clock)
    totp_clock.now += 3 * PERIOD
    second = await enrol(totp, ALICE, totp_clock)   # re-enrolment too
    rows, raw = database_contents(tmp_path)
    for enrolment in (first, second):
        secret_bytes = base64.b32decode(enrolment.secret)
        assert enrolment.secret not in repr(rows)
        assert enrolment.secret.encode() not in raw
        assert enrolment.secret.lower().encode() not in raw
        assert secret_bytes not in raw
    (row,) = rows["totp_secrets"]
    assert set(row) == {"identity", "sealed_secret", "enrolled_at"}
    assert row["identity"] == ALICE
    sealed = row["sealed_secret"]
    # 12-byte nonce + 32 base32 characters + 16-byte GCM tag.
    assert len(sealed) == 12 + len(second.secret) + 16


# --- malformed input --------------------------------------------------------------------

MALFORMED = ["", " ", "abcdef", "12345", "1234567", "12345a", "12.456", "-123456",
             "+123456", "0x1234", "x" * 1000, "1" * 1000, "\x00" * 6,
             "123456\n123456", "abcde-fghjk-lmnop"]


@pytest.mark.parametrize("code", MALFORMED, ids=range(len(MALFORMED)))
async def test_malformed_codes_are_refused_without_exceptions(
        code: str, durable: DurableStore, totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock)
    enrolment = await enrol(totp, ALICE, totp_clock)
    record = await totp.record(ALICE)
    assert record is not None
    totp_clock.now += 3 * PERIOD
    assert not (await totp.verify(ALICE, record, code)).ok
    assert not (await totp.confirm(BOB, totp.new_enrolment("bob"), code)).ok
    left = await totp.record(ALICE)
    assert left is not None and left.recovery_codes_left == len(enrolment.recovery_codes)
    assert await totp.record(BOB) is None


# Full-width digits come from East Asian input methods.
NON_ASCII_DIGITS = ["１２３４５６", "١٢٣٤٥٦", "۱۲۳۴۵۶", "¹²³⁴⁵⁶", "१२३४५६"]


@pytest.mark.parametrize("code", NON_ASCII_DIGITS)
async def test_non_ascii_digits_are_refused_without_exceptions(
        code: str, durable: DurableStore, totp_clock: FakeClock) -> None:
    totp = service(durable, MemoryStore(), totp_clock)
    await enrol(totp, ALICE, totp_clock)
    record = await totp.record(ALICE)
    assert record is not None
    assert not (await totp.verify(ALICE, record, code)).ok
    assert not (await totp.confirm(BOB, totp.new_enrolment("bob"), code)).ok
