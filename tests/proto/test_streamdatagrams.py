"""The datagram framing the relay's SOCKS5 extensions use inside TLS."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.proto.streamdatagrams import StreamDatagrams, frame_datagram


def test_a_datagram_is_its_length_then_its_bytes() -> None:
    assert frame_datagram(b"abc") == b"\x00\x03abc"
    assert frame_datagram(b"") == b"\x00\x00"


def test_one_byte_at_a_time_gives_the_same_datagrams() -> None:
    wire = frame_datagram(b"one") + frame_datagram(b"") + frame_datagram(b"three")
    decoder = StreamDatagrams()
    got: list[bytes] = []
    for index in range(len(wire)):
        got += decoder.receive_data(wire[index:index + 1])
    assert got == [b"one", b"", b"three"]
    assert decoder.buffered == 0


def test_a_length_over_the_limit_ends_the_stream_after_what_came_before_it() -> None:
    decoder = StreamDatagrams(max_datagram=4)
    assert decoder.receive_data(frame_datagram(b"ok") + b"\x00\x05hello") == [b"ok"]
    assert decoder.failure == "a datagram of 5 bytes is over the limit of 4"
    assert decoder.receive_data(frame_datagram(b"x")) == []


def test_an_oversized_payload_cannot_be_framed() -> None:
    with pytest.raises(ValueError, match="over 65535"):
        frame_datagram(bytes(65536))


@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(1, 50))
def test_any_split_gives_back_what_was_framed(payloads: list[bytes], step: int) -> None:
    wire = b"".join(frame_datagram(payload) for payload in payloads)
    decoder = StreamDatagrams()
    got: list[bytes] = []
    for index in range(0, len(wire), step):
        got += decoder.receive_data(wire[index:index + step])
    assert got == payloads
