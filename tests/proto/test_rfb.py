"""The device proxy's own RFB: telling TLS from a plain viewer, and the security failure
a plain viewer gets when secure shadowing is mandatory (RFC 6143, sections 7.1.1-7.1.2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.proto.rfb import (
    MAX_REASON,
    SECURE_SHADOWING_REQUIRED,
    SERVER_VERSION,
    RfbRefusal,
    classify_first_bytes,
)

TLS_CLIENT_HELLO = bytes.fromhex("16030100f8010000f40303") + bytes(32)


@pytest.mark.parametrize(("data", "kind"), [
    (TLS_CLIENT_HELLO, "tls"),
    (b"\x16\x03\x03", "tls"),
    (b"\x16", "tls"),  # a prefix is enough: nothing else starts with 0x16 here
    (b"RFB 003.008\n", "rfb-client"),
    (b"RFB", "rfb-client"),
    (b"R", "rfb-client"),
    (b"\x16\x01", "garbage"),
    (b"\x17\x03\x03", "garbage"),
    (b"RFB-", "garbage"),
    (b"GET / HTTP/1.1\r\n", "garbage"),
    (b"\x00", "garbage"),
])
def test_first_bytes_are_classified(data: bytes, kind: str) -> None:
    assert classify_first_bytes(data) == kind


def test_classifying_needs_a_byte() -> None:
    with pytest.raises(ValueError):
        classify_first_bytes(b"")


def refusal_for(client_version: bytes, reason: str = "no") -> tuple[bytes, RfbRefusal]:
    refusal = RfbRefusal(reason)
    sent = refusal.data_to_send()
    assert sent == b"RFB 003.008\n"
    assert not refusal.finished
    refusal.receive_data(client_version)
    return refusal.data_to_send(), refusal


def test_a_3_8_viewer_gets_an_empty_list_of_security_types_and_the_reason() -> None:
    answer, refusal = refusal_for(b"RFB 003.008\n", "secure shadowing is required")
    assert answer == b"\x00" + b"\x00\x00\x00\x1c" + b"secure shadowing is required"
    assert refusal.finished
    assert refusal.client_version == (3, 8)


def test_a_3_7_viewer_gets_the_same_form() -> None:
    answer, refusal = refusal_for(b"RFB 003.007\n", "no")
    assert answer == b"\x00\x00\x00\x00\x02no"
    assert refusal.finished


def test_a_3_3_viewer_gets_security_type_0_and_the_reason() -> None:
    answer, refusal = refusal_for(b"RFB 003.003\n", "no")
    assert answer == b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02no"
    assert refusal.finished


@pytest.mark.parametrize("version", [b"RFB 003.005\n", b"RFB 003.889\n", b"RFB 003.000\n"])
def test_any_other_3_x_is_answered_as_3_3(version: bytes) -> None:
    answer, _ = refusal_for(version, "no")
    assert answer == b"\x00\x00\x00\x00\x00\x00\x00\x02no"


@pytest.mark.parametrize("version", [
    b"RFB 004.001\n", b"RFB 000.000\n", b"RFB 003.008\r", b"RFB 3.8\n\n\n\n\n", b"GET / HTTP/1.1",
])
def test_an_invalid_client_version_ends_without_a_failure_message(version: bytes) -> None:
    answer, refusal = refusal_for(version)
    assert answer == b""
    assert refusal.finished
    assert refusal.client_version is None


def test_a_wrong_first_byte_ends_at_once() -> None:
    refusal = RfbRefusal("no")
    refusal.receive_data(b"\x16")
    assert refusal.finished


def test_a_partial_version_waits_for_the_rest() -> None:
    refusal = RfbRefusal("no")
    refusal.data_to_send()
    refusal.receive_data(b"RFB 003.00")
    assert not refusal.finished and refusal.data_to_send() == b""
    refusal.receive_data(b"8\nand more bytes that are ignored")
    assert refusal.finished
    assert refusal.data_to_send() == b"\x00\x00\x00\x00\x02no"
    refusal.receive_data(b"RFB 003.008\n")
    assert refusal.data_to_send() == b""


def test_a_viewer_that_speaks_first_gets_the_version_and_the_failure_together() -> None:
    refusal = RfbRefusal("no")
    refusal.receive_data(b"RFB 003.008\n")
    assert refusal.data_to_send() == SERVER_VERSION + b"\x00\x00\x00\x00\x02no"


def test_the_mandatory_reason_tells_the_operator_what_to_do() -> None:
    answer, _ = refusal_for(b"RFB 003.008\n", SECURE_SHADOWING_REQUIRED)
    assert answer[5:].decode() == SECURE_SHADOWING_REQUIRED
    assert "secure shadowing is required" in SECURE_SHADOWING_REQUIRED
    assert "portcullis shadow" in SECURE_SHADOWING_REQUIRED


def test_a_long_reason_is_cut_on_a_character_boundary() -> None:
    answer, _ = refusal_for(b"RFB 003.008\n", "x" + "é" * 600)
    length = int.from_bytes(answer[1:5], "big")
    assert length == MAX_REASON - 1
    assert answer[5:].decode() == "x" + "é" * 511


@given(st.binary(max_size=40), st.integers(1, 13))
def test_any_bytes_in_any_split_give_the_same_answer_and_never_raise(data: bytes,
                                                                      step: int) -> None:
    def answer(size: int) -> tuple[bytes, bool]:
        refusal = RfbRefusal("reason")
        for start in range(0, len(data), size):
            refusal.receive_data(data[start:start + size])
        return refusal.data_to_send(), refusal.finished

    whole = answer(max(1, len(data)))
    assert answer(step) == whole
    sent, finished = whole
    assert sent.startswith(SERVER_VERSION)
    # Finished once 12 bytes came or one of them broke the form; else still waiting.
    assert finished is (len(data) >= 12 or not looks_like_a_version_start(data))


def looks_like_a_version_start(data: bytes) -> bool:
    template = "RFB ddd.ddd\n"

    def fits(expected: str, byte: int) -> bool:
        return b"0" <= bytes([byte]) <= b"9" if expected == "d" else byte == ord(expected)

    return all(fits(template[index], byte) for index, byte in enumerate(data[:12]))
