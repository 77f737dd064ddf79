"""The gateway's RFB bridge for a VNC server with a password (RFC 6143 7.1-7.2): it
answers the server's VNC authentication and offers the viewer only None, byte by byte,
whatever the split; a refusal reaches the viewer with the server's reason."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vncdotool.rfb import _vnc_des, des_encrypt

from portcullis.proto.rfb import RfbPasswordBridge, vnc_authentication_response

PASSWORD = b"s3cret!x"
CHALLENGE = bytes(range(16))
V38 = b"RFB 003.008\n"
U32 = struct.Struct("!I")
OK = U32.pack(0)

# One exchange as each side writes it: (from, bytes).
Exchange = list[tuple[str, bytes]]

EXCHANGE_38: Exchange = [
    ("server", V38), ("server", b"\x02\x01\x02"), ("server", CHALLENGE), ("server", OK),
    ("viewer", V38), ("viewer", b"\x01"), ("viewer", b"\x01"),   # ClientInit: shared
]


def run(exchange: Exchange, chunk: int = 0,
        password: bytes = PASSWORD) -> tuple[bytes, bytes, RfbPasswordBridge]:
    """Feed the exchange (each piece split into `chunk`-byte pieces, 0: whole); return
    what the bridge wrote to the server and to the viewer."""
    bridge = RfbPasswordBridge(password)
    to_server, to_viewer = bytearray(), bytearray()
    for side, data in exchange:
        pieces = [data] if not chunk else [data[i:i + chunk]
                                           for i in range(0, len(data), chunk)]
        for piece in pieces:
            if side == "server":
                bridge.receive_from_server(piece)
            else:
                bridge.receive_from_viewer(piece)
            to_server += bridge.data_to_server()
            to_viewer += bridge.data_to_viewer()
    return bytes(to_server), bytes(to_viewer), bridge


def test_the_response_is_what_vncdotool_computes() -> None:
    assert vnc_authentication_response(PASSWORD, CHALLENGE) == des_encrypt(
        _vnc_des(PASSWORD.decode()), CHALLENGE)


def test_a_short_password_is_zero_padded_and_a_long_one_cut_at_8_bytes() -> None:
    assert vnc_authentication_response(b"abc", CHALLENGE) == des_encrypt(
        _vnc_des("abc"), CHALLENGE)
    assert vnc_authentication_response(b"abcdefghXYZ", CHALLENGE) == \
        vnc_authentication_response(b"abcdefgh", CHALLENGE)


@pytest.mark.parametrize("chunk", [0, 1])
def test_a_3_8_server_is_answered_and_the_viewer_offered_none(chunk: int) -> None:
    to_server, to_viewer, bridge = run(EXCHANGE_38, chunk)
    response = vnc_authentication_response(PASSWORD, CHALLENGE)
    assert to_server == V38 + b"\x02" + response + b"\x01"   # ClientInit relayed
    assert to_viewer == V38 + b"\x01\x01" + OK
    assert bridge.relaying and bridge.failure is None


def test_the_viewer_is_greeted_only_once_the_server_accepted() -> None:
    bridge = RfbPasswordBridge(PASSWORD)
    for data in (V38, b"\x01\x02", CHALLENGE):
        bridge.receive_from_server(data)
        assert bridge.data_to_viewer() == b""
    bridge.receive_from_server(OK)
    assert bridge.data_to_viewer() == V38


def test_after_the_handshake_bytes_pass_as_they_are() -> None:
    _, _, bridge = run(EXCHANGE_38)
    bridge.receive_from_server(b"ServerInit")
    bridge.receive_from_viewer(b"\x00keys")
    assert (bridge.data_to_viewer(), bridge.data_to_server()) == (b"ServerInit", b"\x00keys")


def test_a_server_offering_none_gets_none_and_no_password() -> None:
    exchange: Exchange = [("server", V38), ("server", b"\x01\x01"), ("server", OK),
                          ("viewer", V38), ("viewer", b"\x01")]
    to_server, to_viewer, bridge = run(exchange)
    assert to_server == V38 + b"\x01"
    assert to_viewer == V38 + b"\x01\x01" + OK
    assert bridge.relaying


def test_a_wrong_password_reaches_the_viewer_as_the_servers_reason() -> None:
    exchange: Exchange = [("server", V38), ("server", b"\x01\x02"), ("server", CHALLENGE),
                          ("server", U32.pack(1) + U32.pack(21) + b"Authentication failed"),
                          ("viewer", V38)]
    _, to_viewer, bridge = run(exchange, 1)
    assert to_viewer == V38 + b"\x00" + U32.pack(21) + b"Authentication failed"
    assert bridge.failure == "the VNC server refused: Authentication failed"
    assert not bridge.relaying


def test_a_server_refusing_every_client_is_shown_to_a_3_3_viewer() -> None:
    exchange: Exchange = [("server", V38), ("server", b"\x00" + U32.pack(4) + b"busy"),
                          ("viewer", b"RFB 003.003\n")]
    _, to_viewer, bridge = run(exchange)
    assert to_viewer == V38 + U32.pack(0) + U32.pack(4) + b"busy"
    assert bridge.failure == "the VNC server refused: busy"


def test_a_3_3_server_picks_vnc_authentication_itself() -> None:
    exchange: Exchange = [("server", b"RFB 003.003\n"), ("server", U32.pack(2)),
                          ("server", CHALLENGE), ("server", OK),
                          ("viewer", V38), ("viewer", b"\x01")]
    to_server, to_viewer, bridge = run(exchange, 1)
    assert to_server == b"RFB 003.003\n" + vnc_authentication_response(PASSWORD, CHALLENGE)
    assert to_viewer == V38 + b"\x01\x01" + OK
    assert bridge.relaying


def test_a_3_3_viewer_is_told_none_without_a_result() -> None:
    exchange = [*EXCHANGE_38[:4], ("viewer", b"RFB 003.003\n"), ("viewer", b"\x01")]
    to_server, to_viewer, bridge = run(exchange)
    assert to_viewer == V38 + U32.pack(1)
    assert to_server.endswith(b"\x01")   # its ClientInit went on
    assert bridge.relaying


def test_a_server_without_none_or_vnc_authentication_is_refused() -> None:
    exchange: Exchange = [("server", V38), ("server", b"\x02\x05\x10"), ("viewer", V38)]
    to_server, to_viewer, bridge = run(exchange)
    assert to_server == V38
    assert b"offers no security type" in to_viewer
    assert bridge.failure is not None


def test_a_server_that_is_not_rfb_is_refused_with_a_reason() -> None:
    _, to_viewer, bridge = run([("server", b"HTTP/1.1 400\r\n"), ("viewer", V38)])
    assert b"does not speak RFB 3" in to_viewer
    assert bridge.failure is not None


def test_a_servers_huge_reason_is_not_read() -> None:
    exchange: Exchange = [("server", V38), ("server", b"\x00" + U32.pack(2**31)),
                          ("viewer", V38)]
    _, to_viewer, bridge = run(exchange)
    assert b"too long" in to_viewer
    assert bridge.failure is not None


def test_a_viewer_choosing_another_type_is_refused() -> None:
    exchange = [*EXCHANGE_38[:4], ("viewer", V38), ("viewer", b"\x02")]
    _, _, bridge = run(exchange)
    assert bridge.failure == "the viewer picked a security type that was not offered"
    assert not bridge.relaying


def test_a_viewer_speaking_first_is_refused() -> None:
    bridge = RfbPasswordBridge(PASSWORD)
    bridge.receive_from_viewer(b"x" * 13)
    assert bridge.failure == "the viewer spoke before the server's version"


def test_a_viewer_that_is_not_rfb_is_refused() -> None:
    _, _, bridge = run([*EXCHANGE_38[:4], ("viewer", b"GET / HTTP/1.1\n")])
    assert bridge.failure == "the viewer does not speak RFB 3"


def test_the_password_never_reaches_the_viewer() -> None:
    _, to_viewer, _ = run(EXCHANGE_38)
    assert PASSWORD not in to_viewer
    assert vnc_authentication_response(PASSWORD, CHALLENGE) not in to_viewer


@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_split_gives_the_same_bytes(sizes: list[int]) -> None:
    whole = run(EXCHANGE_38)
    bridge = RfbPasswordBridge(PASSWORD)
    to_server, to_viewer = bytearray(), bytearray()
    turn = 0
    for side, data in EXCHANGE_38:
        start = 0
        while start < len(data):
            size = sizes[turn % len(sizes)]
            turn += 1
            piece = data[start:start + size]
            start += size
            if side == "server":
                bridge.receive_from_server(piece)
            else:
                bridge.receive_from_viewer(piece)
            to_server += bridge.data_to_server()
            to_viewer += bridge.data_to_viewer()
    assert (bytes(to_server), bytes(to_viewer)) == whole[:2]
    assert bridge.relaying


@given(st.binary(max_size=200), st.binary(max_size=60))
def test_arbitrary_bytes_never_raise(server: bytes, viewer: bytes) -> None:
    _, to_viewer, bridge = run([("server", server), ("viewer", viewer)], 3)
    assert PASSWORD not in to_viewer
    assert bridge.failure is None or not bridge.relaying
