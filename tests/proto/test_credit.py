"""Flow-control credit arithmetic of one stream direction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portcullis.errors import ProtocolError
from portcullis.proto.credit import MAX_WINDOW, ReceiveCredit, SendCredit

# --- SendCredit --------------------------------------------------------------------


def test_send_credit_starts_at_the_granted_initial_window() -> None:
    assert SendCredit(1000).available == 1000


def test_send_credit_shrinks_as_bytes_are_sent() -> None:
    credit = SendCredit(1000)
    credit.consume(300)
    assert credit.available == 700


def test_sending_more_than_the_credit_is_a_local_error() -> None:
    credit = SendCredit(10)
    with pytest.raises(ValueError):
        credit.consume(11)
    assert credit.available == 10


def test_a_grant_adds_to_the_credit() -> None:
    credit = SendCredit(0)
    credit.grant(500)
    assert credit.available == 500


def test_a_zero_increment_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        SendCredit(10).grant(0)


def test_a_grant_beyond_2_31_minus_1_is_a_protocol_error() -> None:
    credit = SendCredit(MAX_WINDOW - 5)
    credit.grant(5)
    with pytest.raises(ProtocolError):
        credit.grant(1)
    assert credit.available == MAX_WINDOW


def test_an_initial_window_above_2_31_minus_1_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        SendCredit(MAX_WINDOW + 1)


# --- ReceiveCredit -----------------------------------------------------------------


def test_data_within_the_window_shrinks_it() -> None:
    credit = ReceiveCredit(1000)
    credit.on_received(400)
    assert credit.window == 600
    assert credit.unconsumed == 400


def test_data_beyond_the_window_is_a_protocol_error() -> None:
    credit = ReceiveCredit(1000)
    credit.on_received(1000)
    with pytest.raises(ProtocolError):
        credit.on_received(1)


def test_credit_is_not_returned_before_half_the_window_is_consumed() -> None:
    credit = ReceiveCredit(1000)
    credit.on_received(1000)
    assert credit.on_consumed(499) == 0
    assert credit.window == 0


def test_credit_is_returned_in_one_batch_once_half_the_window_is_consumed() -> None:
    credit = ReceiveCredit(1000)
    credit.on_received(1000)
    assert credit.on_consumed(300) == 0
    assert credit.on_consumed(200) == 500
    assert credit.window == 500
    assert credit.on_consumed(400) == 0


def test_consuming_more_than_was_received_is_a_local_error() -> None:
    credit = ReceiveCredit(1000)
    credit.on_received(10)
    with pytest.raises(ValueError):
        credit.on_consumed(11)


def test_a_window_of_one_byte_returns_credit_for_every_byte() -> None:
    credit = ReceiveCredit(1)
    credit.on_received(1)
    assert credit.on_consumed(1) == 1
    assert credit.window == 1


@settings(max_examples=200, deadline=None)
@given(
    initial=st.integers(min_value=1, max_value=10_000),
    steps=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=10_000))),
)
def test_window_plus_held_bytes_always_equals_the_initial_window(
    initial: int, steps: list[tuple[bool, int]]
) -> None:
    credit = ReceiveCredit(initial)
    announced_total = 0
    received_total = 0
    for receive, amount in steps:
        if receive:
            n = min(amount, credit.window)
            credit.on_received(n)
            received_total += n
        else:
            announced_total += credit.on_consumed(min(amount, credit.unconsumed))
        # The peer can never be owed more than the window it started with.
        assert 0 <= credit.window <= initial
        assert initial - credit.window - credit.unconsumed >= 0
        assert received_total - announced_total == initial - credit.window
