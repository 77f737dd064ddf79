"""The edge's SOCKS5 client handshake (on socksio), fed bytes as a relay would send them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.errors import ProtocolError
from portcullis.proto.mux import Reason
from portcullis.proto.socks5 import Command, Reply, Socks5Connection, reason_for, reply_for
from portcullis.proto.socks5client import Socks5ClientHandshake

SUCCESS_V4 = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90"
SUCCESS_V6 = b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x00"
SUCCESS_NAME = b"\x05\x00\x00\x03\x09localhost\x00\x50"


def test_the_greeting_offers_only_no_authentication_and_the_request_follows_it() -> None:
    handshake = Socks5ClientHandshake(Command.CONNECT, "10.0.0.5", 443)
    assert handshake.data_to_send() == (
        b"\x05\x01\x00" + b"\x05\x01\x00\x01\x0a\x00\x00\x05\x01\xbb")
    assert handshake.data_to_send() == b""


@pytest.mark.parametrize(("command", "host", "expected"), [
    (Command.UDP_IN_STREAM, "10.0.0.53", b"\x05\x83\x00\x01\x0a\x00\x00\x35\x00\x35"),
    (Command.ICMP_ECHO_IN_STREAM, "::1", b"\x05\x81\x00\x04" + bytes(15) + b"\x01\x00\x35"),
    (Command.CONNECT, "intranet.example", b"\x05\x01\x00\x03\x10intranet.example\x00\x35"),
])
def test_each_command_carries_its_code_and_address(command: Command, host: str,
                                                    expected: bytes) -> None:
    handshake = Socks5ClientHandshake(command, host, 53)
    assert handshake.data_to_send() == b"\x05\x01\x00" + expected


def test_our_relays_codec_reads_the_request_the_edge_writes() -> None:
    relay = Socks5Connection()
    handshake = Socks5ClientHandshake(Command.CONNECT, "intranet.example", 8443)
    relay.receive_data(handshake.data_to_send())   # greeting and request in one piece
    assert handshake.receive_data(relay.data_to_send()) is None
    request = relay.next_request()
    assert (request.host, request.port) == ("intranet.example", 8443)


@given(st.sampled_from([SUCCESS_V4, SUCCESS_V6, SUCCESS_NAME]), st.binary(max_size=64),
       st.integers(min_value=1, max_value=20))
def test_any_split_of_the_replies_gives_the_same_outcome(reply: bytes, early: bytes,
                                                         step: int) -> None:
    handshake = Socks5ClientHandshake(Command.CONNECT, "10.0.0.5", 443)
    wire = b"\x05\x00" + reply + early
    outcomes = [handshake.receive_data(wire[i:i + step]) for i in range(0, len(wire), step)]
    assert outcomes[-1] is Reply.SUCCEEDED
    assert handshake.take_payload() == early


@pytest.mark.parametrize("reason", [Reason.DENIED, Reason.REFUSED, Reason.UNREACHABLE,
                                    Reason.NAME_NOT_FOUND, Reason.TIMED_OUT])
def test_a_refusal_reads_back_as_the_reason_the_relay_refused_with(reason: Reason) -> None:
    reply = reply_for(reason.name.lower())
    handshake = Socks5ClientHandshake(Command.CONNECT, "10.0.0.5", 443)
    handshake.receive_data(b"\x05\x00")
    outcome = handshake.receive_data(bytes([5, reply, 0, 1, 0, 0, 0, 0, 0, 0]))
    assert outcome is reply
    assert reason_for(outcome) is reason


def test_a_relay_that_wants_a_password_is_refused_with_what_to_configure() -> None:
    handshake = Socks5ClientHandshake(Command.CONNECT, "10.0.0.5", 443)
    with pytest.raises(ProtocolError, match="configure the SOCKS server with method none"):
        handshake.receive_data(b"\x05\x02")


@pytest.mark.parametrize("wire", [b"\x04\x5a", b"\x05\x00\x05\x00\x00\x07"])
def test_a_peer_that_is_not_a_socks5_relay_is_a_protocol_error(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        Socks5ClientHandshake(Command.CONNECT, "10.0.0.5", 443).receive_data(wire)
