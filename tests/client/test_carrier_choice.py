"""Which carrier of a tunnel a new TCP stream goes to (`client.tunnel.choose_carrier`)."""

from __future__ import annotations

import pytest

from portcullis.client.tunnel import choose_carrier


def test_the_carrier_with_the_fewest_open_streams_is_chosen() -> None:
    assert choose_carrier([3, 1, 2]) == 1
    assert choose_carrier([0, 5]) == 0


def test_a_tie_goes_to_the_lowest_index_so_streams_opened_together_alternate() -> None:
    loads = [0, 0, 0]
    chosen = []
    for _ in range(6):
        index = choose_carrier(loads)
        assert index is not None
        chosen.append(index)
        loads[index] += 1   # the stream is open on it from now on
    assert chosen == [0, 1, 2, 0, 1, 2]


def test_a_carrier_that_is_down_is_never_chosen() -> None:
    assert choose_carrier([4, None]) == 0
    assert choose_carrier([None, 9, 2]) == 2
    assert choose_carrier([None, 0]) == 1


@pytest.mark.parametrize("loads", [[], [None], [None, None, None]])
def test_no_live_carrier_means_no_choice(loads: list[int | None]) -> None:
    assert choose_carrier(loads) is None


def test_one_carrier_takes_every_stream() -> None:
    assert choose_carrier([1000]) == 0
