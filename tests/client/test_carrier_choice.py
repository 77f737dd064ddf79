"""Which carrier of a tunnel a new TCP stream goes to (`client.tunnel.choose_carrier`)."""

from __future__ import annotations

import pytest

from portcullis.client.tunnel import SPREAD_TRIES, choose_carrier, land_elsewhere


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


def test_a_carrier_on_a_process_another_carrier_uses_is_opened_again_while_others_are_free(
) -> None:
    assert land_elsewhere("b", ["b"], 2, tries=0)
    assert not land_elsewhere("a", ["b"], 2, tries=0)          # landed elsewhere: kept
    assert not land_elsewhere("b", ["b"], 1, tries=0)          # one process: nowhere else
    assert not land_elsewhere("b", ["a", "b"], 2, tries=0)     # every process is used
    assert land_elsewhere("b", ["a", "b"], 3, tries=0)
    assert not land_elsewhere("b", ["b"], 2, tries=SPREAD_TRIES)   # tries are bounded
    assert not land_elsewhere("b", ["b"], None, tries=0)       # a gateway that says nothing
