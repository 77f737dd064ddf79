"""The STA over both ephemeral backends (memory and a real Redis)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from peers.stores import FakeClock
from portcullis.audit import AuditTrail
from portcullis.errors import TicketError
from portcullis.sta.authority import TicketAuthority, TicketRequest, sta_id_of
from portcullis.store import EphemeralStore
from portcullis.tokens import TokenHasher

REQUEST = TicketRequest(user="alice", resource="wiki", address="10.0.0.5:80",
                        client_address="192.0.2.7")


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


def authority(store: EphemeralStore, audit_path: Path, *, clock: FakeClock | None = None,
              bind: bool = False, sta_id: str = "STA01",
              key: bytes = b"k" * 32) -> TicketAuthority:
    return TicketAuthority(sta_id, store, TokenHasher(key), AuditTrail(audit_path),
                           lifetime=100, bind_client_address=bind, clock=clock or FakeClock())


def audit_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_ticket_names_its_sta_and_carries_at_least_128_random_bits(
        ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    issued = await authority(ephemeral_store, audit_path).issue(REQUEST)
    sta_id, _, secret = issued.ticket.partition(";")
    assert sta_id == "STA01" == sta_id_of(issued.ticket)
    assert len(secret) * 6 >= 128
    assert "10.0.0.5" not in issued.ticket


async def test_ticket_redeems_to_its_server_once(ephemeral_store: EphemeralStore,
                                                 audit_path: Path) -> None:
    sta = authority(ephemeral_store, audit_path)
    issued = await sta.issue(REQUEST)
    grant = await sta.redeem(issued.ticket, "192.0.2.7")
    assert (grant.address, grant.user, grant.resource) == ("10.0.0.5:80", "alice", "wiki")
    with pytest.raises(TicketError):
        await sta.redeem(issued.ticket, "192.0.2.7")


async def test_ticket_redeems_once_under_20_concurrent_redemptions(
        ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    sta = authority(ephemeral_store, audit_path)
    issued = await sta.issue(REQUEST)
    results = await asyncio.gather(*(sta.redeem(issued.ticket, None) for _ in range(20)),
                                   return_exceptions=True)
    assert sum(1 for result in results if not isinstance(result, BaseException)) == 1
    assert sum(1 for result in results if isinstance(result, TicketError)) == 19


async def test_expired_ticket_is_refused(ephemeral_store: EphemeralStore, audit_path: Path,
                                         clock) -> None:  # type: ignore[no-untyped-def]
    sta_clock = FakeClock()
    sta = authority(ephemeral_store, audit_path, clock=sta_clock)
    issued = await sta.issue(REQUEST)
    # Past the lifetime on the STA's clock (and on the memory store's, which expires it).
    sta_clock.now += 101
    clock.advance(101)
    with pytest.raises(TicketError):
        await sta.redeem(issued.ticket, None)


async def test_redis_expires_tickets_by_itself(redis_url: str, audit_path: Path) -> None:
    from portcullis.store import open_ephemeral

    store = open_ephemeral(redis_url, prefix="pc-test-expiry:")
    sta = TicketAuthority("STA01", store, TokenHasher(b"k" * 32), AuditTrail(audit_path),
                          lifetime=0.2, bind_client_address=False)
    issued = await sta.issue(REQUEST)
    for _ in range(100):  # bounded: at most 5 s
        await asyncio.sleep(0.05)
        if await store.get(sta._key(issued.ticket)) is None:
            break
    with pytest.raises(TicketError):
        await sta.redeem(issued.ticket, None)
    await store.close()


@pytest.mark.parametrize("garbled", [
    "", "STA01", "STA01;", ";abc", "STA01;" + "A" * 80, "STA-01;abc", "STA01;doesnotexist",
])
async def test_garbled_and_unknown_tickets_are_refused(
        ephemeral_store: EphemeralStore, audit_path: Path, garbled: str) -> None:
    sta = authority(ephemeral_store, audit_path)
    await sta.issue(REQUEST)
    with pytest.raises(TicketError):
        await sta.redeem(garbled, None)


async def test_ticket_of_another_sta_is_refused(ephemeral_store: EphemeralStore,
                                                audit_path: Path) -> None:
    issued = await authority(ephemeral_store, audit_path, sta_id="STA02").issue(REQUEST)
    with pytest.raises(TicketError):
        await authority(ephemeral_store, audit_path).redeem(issued.ticket, None)


async def test_bound_ticket_is_useless_from_another_address(
        ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    sta = authority(ephemeral_store, audit_path, bind=True)
    issued = await sta.issue(REQUEST)
    with pytest.raises(TicketError):
        await sta.redeem(issued.ticket, "203.0.113.9")
    bound = await sta.issue(REQUEST)
    assert (await sta.redeem(bound.ticket, "192.0.2.7")).user == "alice"


async def test_store_holds_no_usable_ticket(ephemeral_store: EphemeralStore,
                                            audit_path: Path) -> None:
    sta = authority(ephemeral_store, audit_path)
    issued = await sta.issue(REQUEST)
    secret = issued.ticket.split(";")[1]
    assert await ephemeral_store.get(f"ticket:{secret}") is None
    # Under another deployment key the same ticket maps to nothing.
    other = authority(ephemeral_store, audit_path, key=b"x" * 32)
    with pytest.raises(TicketError):
        await other.redeem(issued.ticket, None)


async def test_audit_trail_records_issue_redeem_refusal_without_full_tickets(
        ephemeral_store: EphemeralStore, audit_path: Path) -> None:
    sta = authority(ephemeral_store, audit_path)
    issued = await sta.issue(REQUEST)
    await sta.redeem(issued.ticket, None)
    with pytest.raises(TicketError):
        await sta.redeem(issued.ticket, None)
    events = audit_events(audit_path)
    assert [event["event"] for event in events] == [
        "ticket.issued", "ticket.redeemed", "ticket.refused"]
    assert issued.ticket.split(";")[1] not in audit_path.read_text()
