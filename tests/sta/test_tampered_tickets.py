"""A ticket record edited in the ephemeral store (another server, another user, a later
expiry) or copied from another ticket is refused and audited; over memory and Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from peers.stores import FakeClock
from portcullis.audit import AuditTrail
from portcullis.errors import TicketError
from portcullis.sta.authority import TicketAuthority, TicketRequest
from portcullis.store import EphemeralStore, RecordSeal
from portcullis.tokens import TokenHasher

HASHER = TokenHasher(b"k" * 32)
ATTACKER = TokenHasher(b"m" * 32)
WIKI = TicketRequest(user="alice", resource="wiki", address="10.0.0.5:80", client_address=None)
DATABASE = TicketRequest(user="root", resource="db", address="10.0.0.9:5432",
                         client_address=None)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


@pytest.fixture
def sta_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sta(ephemeral_store: EphemeralStore, audit_path: Path,
        sta_clock: FakeClock) -> TicketAuthority:
    return TicketAuthority("STA01", ephemeral_store, HASHER, AuditTrail(audit_path),
                           lifetime=100, bind_client_address=False, clock=sta_clock)


def events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ticket_key(ticket: str) -> str:
    return f"ticket:{HASHER.digest('ticket', ticket)}"


def record(request: TicketRequest, expires_at: float) -> bytes:
    return json.dumps({"user": request.user, "resource": request.resource,
                       "address": request.address, "client_address": None,
                       "expires_at": expires_at}).encode()


@pytest.mark.parametrize("forge", ["in clear", "under another key"])
async def test_a_ticket_record_pointed_at_another_server_is_refused_and_audited(
        sta: TicketAuthority, ephemeral_store: EphemeralStore, sta_clock: FakeClock,
        audit_path: Path, forge: str) -> None:
    issued = await sta.issue(WIKI)
    key = ticket_key(issued.ticket)
    forged = record(DATABASE, sta_clock.now + 100)
    if forge == "under another key":
        forged = RecordSeal.for_kind(ATTACKER, "ticket").seal(key, forged)
    await ephemeral_store.put(key, forged, 100)
    with pytest.raises(TicketError):
        await sta.redeem(issued.ticket, None)
    tampered, refused = events(audit_path)[-2:]
    assert (tampered["event"], tampered["kind"], tampered["namespace"]) == (
        "store.tampered", "ticket", "ticket")
    assert tampered["record"] == key.partition(":")[2][:12]
    assert refused["event"] == "ticket.refused"
    assert issued.ticket.split(";")[1] not in audit_path.read_text()


async def test_a_valid_ticket_record_copied_under_another_ticket_is_refused(
        sta: TicketAuthority, ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    mine = await sta.issue(WIKI)
    roots = await sta.issue(DATABASE)
    copied = await ephemeral_store.get(ticket_key(roots.ticket))
    assert copied is not None
    await ephemeral_store.put(ticket_key(mine.ticket), copied, 100)
    with pytest.raises(TicketError):
        await sta.redeem(mine.ticket, None)
    assert (await sta.redeem(roots.ticket, None)).address == "10.0.0.9:5432"
    assert [e["event"] for e in events(audit_path)].count("store.tampered") == 1


async def test_a_ticket_record_sealed_with_the_deployments_key_is_believed(
        sta: TicketAuthority, ephemeral_store: EphemeralStore, sta_clock: FakeClock) -> None:
    """The control of the two tests above: the refusal comes from the seal."""
    issued = await sta.issue(WIKI)
    key = ticket_key(issued.ticket)
    await ephemeral_store.put(key, RecordSeal.for_kind(HASHER, "ticket").seal(
        key, record(DATABASE, sta_clock.now + 100)), 100)
    assert (await sta.redeem(issued.ticket, None)).address == "10.0.0.9:5432"


async def test_a_longer_store_ttl_does_not_make_an_expired_ticket_redeemable(
        sta: TicketAuthority, ephemeral_store: EphemeralStore, sta_clock: FakeClock,
        audit_path: Path) -> None:
    issued = await sta.issue(WIKI)
    assert await ephemeral_store.touch(ticket_key(issued.ticket), 100_000)
    sta_clock.advance(101)
    with pytest.raises(TicketError):
        await sta.redeem(issued.ticket, None)
    assert events(audit_path)[-1]["reason"] == "expired ticket"
