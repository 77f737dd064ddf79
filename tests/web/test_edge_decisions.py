"""The edge's decisions without sockets: connection admissions, the targets the portal
proxy forwards, and the count of unfinished sign-ins over both ephemeral stores."""

from __future__ import annotations

import pytest

from portcullis.config.auth import ThrottleSettings
from portcullis.config.model import LimitSettings
from portcullis.gateway.proxy import MAX_TARGET, forwardable_target
from portcullis.identity.throttle import Throttle
from portcullis.store import EphemeralStore
from portcullis.web.edge import Admissions


def test_admissions_refuse_over_the_per_address_limit_and_say_which_limit() -> None:
    admissions = Admissions(max_total=10, max_per_address=2)
    assert [admissions.admit("192.0.2.1").admitted for _ in range(3)] == [True, True, False]
    refusal = admissions.admit("192.0.2.1")
    assert "limits.max_connections_per_address" in refusal.reason
    assert admissions.admit("192.0.2.2").admitted   # another address has its own count


def test_admissions_refuse_over_the_global_limit_whatever_the_address() -> None:
    admissions = Admissions(max_total=3, max_per_address=3)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        assert admissions.admit(address).admitted
    refusal = admissions.admit("192.0.2.4")
    assert not refusal.admitted and "(limits.max_connections)" in refusal.reason


def test_a_released_connection_frees_its_place_and_extra_releases_change_nothing() -> None:
    admissions = Admissions(max_total=1, max_per_address=1)
    assert admissions.admit("192.0.2.1").admitted
    admissions.release("192.0.2.1")
    admissions.release("192.0.2.1")
    admissions.release("192.0.2.9")
    assert admissions.total == 0
    assert admissions.admit("192.0.2.1").admitted
    assert not admissions.admit("192.0.2.2").admitted


def test_the_per_address_limit_may_not_exceed_the_global_one() -> None:
    with pytest.raises(ValueError, match="max_connections_per_address"):
        LimitSettings(max_connections=100, max_connections_per_address=101)


@pytest.mark.parametrize(("raw_path", "query", "path", "status"), [
    (b"/login", b"next=%2F", "/login", 200),
    (b"/%7Ealice", b"", "/~alice", 200),
    (b"/%00", b"", "/\x00", 400),
    (b"/a%0d%0ab", b"", "/a\r\nb", 400),
    (b"/\xc3\xa9", b"", "/é", 400),
    (b"/a b", b"", "/a b", 400),
    (b"/x", b"q=\x7f", "/x", 400),
    (b"relative", b"", "relative", 400),
    (b"/" + b"a" * MAX_TARGET, b"", "/" + "a" * MAX_TARGET, 414),
])
def test_the_proxy_forwards_a_target_only_as_it_was_sent(
        raw_path: bytes, query: bytes, path: str, status: int) -> None:
    target, answer = forwardable_target(raw_path, query, path)
    assert answer == status
    assert target == (raw_path + (b"?" + query if query else b"") if status == 200 else None)


async def test_unfinished_sign_ins_are_counted_per_address_until_they_finish_or_expire(
        ephemeral_store: EphemeralStore) -> None:
    throttle = Throttle(ephemeral_store, ThrottleSettings(address_unfinished=2))
    now, window = 1_000_000.0, 300.0
    assert await throttle.start_unfinished("192.0.2.1", now, now, window)
    assert await throttle.start_unfinished("192.0.2.1", now + 1, now + 1, window)
    assert not await throttle.start_unfinished("192.0.2.1", now + 2, now + 2, window)
    assert await throttle.start_unfinished("192.0.2.2", now + 2, now + 2, window)
    await throttle.finish_unfinished("192.0.2.1", now)
    assert await throttle.start_unfinished("192.0.2.1", now + 3, now + 3, window)
    # Abandoned sign-ins stop counting `window` after they began.
    assert await throttle.start_unfinished("192.0.2.1", now + 302, now + 302, window)
