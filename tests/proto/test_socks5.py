"""The SOCKS5 server codec, specified by the bytes it reads and writes (RFC 1928)."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.errors import ProtocolError
from portcullis.proto.mux import Reason
from portcullis.proto.proxyauth import ProxyCredentials
from portcullis.proto.socks5 import (
    MAX_EARLY_DATA,
    Command,
    Reply,
    Request,
    Socks5Connection,
    State,
    UdpDatagram,
    build_udp_datagram,
    parse_udp_datagram,
    reason_for,
    reply_for,
)

# --- helpers: messages by hand -----------------------------------------------------

GREETING = b"\x05\x01\x00"
METHOD_CHOSEN = b"\x05\x00"
NO_ACCEPTABLE_METHOD = b"\x05\xff"


def port(n: int) -> bytes:
    return struct.pack("!H", n)


def ipv4(text: str) -> bytes:
    return b"\x01" + ipaddress.IPv4Address(text).packed


def ipv6(text: str) -> bytes:
    return b"\x04" + ipaddress.IPv6Address(text).packed


def domain(name: bytes) -> bytes:
    return b"\x03" + bytes([len(name)]) + name


def request(address: bytes, dst_port: int = 80, command: int = Command.CONNECT) -> bytes:
    return bytes([5, command, 0]) + address + port(dst_port)


def reply_bytes(code: int, address: bytes = b"\x01\x00\x00\x00\x00", bnd_port: int = 0) -> bytes:
    return bytes([5, code, 0]) + address + port(bnd_port)


def connected(address: bytes = ipv4("10.0.0.1"), dst_port: int = 80) -> Socks5Connection:
    """A connection whose CONNECT request was parsed (and taken)."""
    conn = Socks5Connection()
    conn.receive_data(GREETING + request(address, dst_port))
    conn.data_to_send()
    assert conn.next_request() is not None
    return conn


@dataclass(frozen=True)
class Outcome:
    """Everything the shell can observe after feeding some bytes."""

    error: str | None
    sent: bytes
    request: Request | None
    payload: bytes
    state: State


def feed(chunks: list[bytes], credentials: ProxyCredentials | None = None, *,
         extensions: bool = False) -> Outcome:
    conn = Socks5Connection(credentials=credentials, extensions=extensions)
    error = None
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except ProtocolError as exc:
            error = str(exc)
            break
    return Outcome(error, conn.data_to_send(), conn.next_request(), conn.take_payload(),
                   conn.state)


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- greeting --------------------------------------------------------------------------


def test_greeting_offering_no_authentication_is_answered_with_method_0() -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING)
    assert conn.data_to_send() == METHOD_CHOSEN
    assert conn.state is State.REQUEST
    assert conn.next_request() is None


def test_greeting_offering_several_methods_selects_no_authentication() -> None:
    conn = Socks5Connection()
    conn.receive_data(b"\x05\x03\x02\x01\x00")
    assert conn.data_to_send() == METHOD_CHOSEN


def test_greeting_with_255_methods_is_accepted() -> None:
    conn = Socks5Connection()
    conn.receive_data(b"\x05\xff" + bytes(range(1, 255)) + b"\x00")
    assert conn.data_to_send() == METHOD_CHOSEN


@pytest.mark.parametrize("greeting", [b"\x05\x01\x02", b"\x05\x02\x01\x02", b"\x05\x00"],
                         ids=["password-only", "gssapi-and-password", "no-methods"])
def test_greeting_without_no_authentication_is_answered_ff_and_fails(greeting: bytes) -> None:
    conn = Socks5Connection()
    with pytest.raises(ProtocolError, match="without authentication"):
        conn.receive_data(greeting)
    assert conn.data_to_send() == NO_ACCEPTABLE_METHOD
    assert conn.state is State.FAILED
    assert conn.closed


def test_greeting_with_version_4_fails_at_once_without_reply() -> None:
    conn = Socks5Connection()
    with pytest.raises(ProtocolError, match="version 4"):
        conn.receive_data(b"\x04")
    assert conn.data_to_send() == b""
    assert conn.state is State.FAILED


def test_incomplete_greeting_waits_for_its_methods() -> None:
    conn = Socks5Connection()
    conn.receive_data(b"\x05\x02\x01")
    assert conn.data_to_send() == b""
    assert conn.state is State.GREETING


# --- requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "host"),
    [
        (ipv4("192.0.2.7"), "192.0.2.7"),
        (ipv6("2001:db8::1"), "2001:db8::1"),
        (domain(b"intranet.example.com"), "intranet.example.com"),
        (domain(b"Wiki.Example.COM."), "Wiki.Example.COM."),
        (domain(b"_ldap._tcp.corp"), "_ldap._tcp.corp"),
        (domain("bücher.example".encode()), "bücher.example"),
        (domain(b"10.1.2.3"), "10.1.2.3"),
        (domain(b"fd00::5"), "fd00::5"),
    ],
    ids=["ipv4", "ipv6", "domain", "domain-case-and-dot-kept", "underscores", "unicode-domain",
         "ipv4-as-domain", "ipv6-as-domain"],
)
def test_connect_request_is_parsed_with_its_host_as_given(address: bytes, host: str) -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING)
    conn.receive_data(request(address, 8443))
    assert conn.next_request() == Request(Command.CONNECT, host, 8443)
    assert conn.state is State.REPLY_PENDING
    assert conn.data_to_send() == METHOD_CHOSEN  # nothing more until the shell replies


def test_domain_of_255_bytes_is_accepted() -> None:
    name = b".".join([b"a" * 63] * 4)[:255]
    assert len(name) == 255
    conn = Socks5Connection()
    conn.receive_data(GREETING + request(domain(name)))
    request_ = conn.next_request()
    assert request_ is not None and request_.host == name.decode()


def test_request_is_returned_exactly_once() -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING + request(ipv4("10.0.0.1")))
    assert conn.next_request() is not None
    assert conn.next_request() is None


def test_udp_associate_with_unknown_client_address_is_handed_to_the_shell() -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING + request(ipv4("0.0.0.0"), 0, Command.UDP_ASSOCIATE))
    assert conn.next_request() == Request(Command.UDP_ASSOCIATE, "0.0.0.0", 0)


def test_greeting_and_request_pipelined_in_one_chunk_are_both_answered() -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING + request(domain(b"db.internal"), 5432))
    assert conn.data_to_send() == METHOD_CHOSEN
    assert conn.next_request() == Request(Command.CONNECT, "db.internal", 5432)


# --- replies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bound_host", "bound_port", "expected"),
    [
        ("0.0.0.0", 0, reply_bytes(0)),
        ("127.0.0.1", 1080, reply_bytes(0, b"\x01\x7f\x00\x00\x01", 1080)),
        ("::1", 40000, reply_bytes(0, b"\x04" + bytes(15) + b"\x01", 40000)),
        ("relay.local", 9, reply_bytes(0, b"\x03\x0brelay.local", 9)),
    ],
    ids=["default", "ipv4", "ipv6", "domain"],
)
def test_success_reply_encodes_the_bound_address_and_starts_the_relay(
    bound_host: str, bound_port: int, expected: bytes
) -> None:
    conn = connected()
    conn.reply(Reply.SUCCEEDED, bound_host, bound_port)
    assert conn.data_to_send() == expected
    assert conn.state is State.RELAY
    assert not conn.closed


@pytest.mark.parametrize("code", [code for code in Reply if code is not Reply.SUCCEEDED])
def test_error_reply_is_sent_and_leaves_the_connection_closed(code: Reply) -> None:
    conn = connected()
    conn.reply(code)
    assert conn.data_to_send() == reply_bytes(code)
    assert conn.state is State.CLOSED
    assert conn.closed


def test_input_after_an_error_reply_is_ignored() -> None:
    conn = connected()
    conn.receive_data(b"early")
    conn.reply(Reply.CONNECTION_REFUSED)
    conn.data_to_send()
    conn.receive_data(b"more")
    assert conn.take_payload() == b""
    assert conn.data_to_send() == b""


@pytest.mark.parametrize("when", ["greeting", "request", "relay", "closed"])
def test_reply_when_no_request_is_pending_is_refused_and_changes_nothing(when: str) -> None:
    conn = Socks5Connection()
    if when != "greeting":
        conn.receive_data(GREETING)
    if when in ("relay", "closed"):
        conn.receive_data(request(ipv4("10.0.0.1")))
        conn.reply(Reply.SUCCEEDED if when == "relay" else Reply.NOT_ALLOWED)
    state = conn.state
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="cannot reply"):
        conn.reply(Reply.SUCCEEDED)
    assert conn.state is state
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    ("host", "bound_port"),
    [("127.0.0.1", 65536), ("127.0.0.1", -1), ("bad host", 80), ("", 80), ("a" * 256, 80)],
)
def test_reply_with_a_bad_bound_address_raises_value_error_and_changes_nothing(
    host: str, bound_port: int
) -> None:
    conn = connected()
    with pytest.raises(ValueError):
        conn.reply(Reply.SUCCEEDED, host, bound_port)
    assert conn.state is State.REPLY_PENDING
    assert conn.data_to_send() == b""


# --- pipelined early data --------------------------------------------------------------


def test_bytes_after_the_request_are_kept_for_take_payload() -> None:
    http = b"GET / HTTP/1.1\r\nHost: wiki\r\n\r\n"
    conn = Socks5Connection()
    conn.receive_data(GREETING + request(domain(b"wiki"), 80) + http)
    assert conn.next_request() == Request(Command.CONNECT, "wiki", 80)
    assert conn.take_payload() == http
    assert conn.take_payload() == b""


def test_early_data_arriving_before_the_reply_is_kept_in_order() -> None:
    conn = connected()
    conn.receive_data(b"one ")
    conn.receive_data(b"two")
    conn.reply(Reply.SUCCEEDED)
    assert conn.take_payload() == b"one two"


def test_bytes_received_while_relaying_are_handed_back_by_take_payload() -> None:
    conn = connected()
    conn.reply(Reply.SUCCEEDED)
    conn.receive_data(b"in flight")
    assert conn.take_payload() == b"in flight"


def test_early_data_beyond_the_limit_fails_with_general_failure() -> None:
    conn = Socks5Connection(max_early_data=10)
    conn.receive_data(GREETING + request(ipv4("10.0.0.1")) + b"0123456789")
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="before the reply"):
        conn.receive_data(b"!")
    assert conn.data_to_send() == reply_bytes(Reply.GENERAL_FAILURE)
    assert conn.state is State.FAILED
    assert conn.take_payload() == b""


def test_default_early_data_limit_is_64_kib() -> None:
    conn = connected()
    conn.receive_data(bytes(MAX_EARLY_DATA))
    with pytest.raises(ProtocolError):
        conn.receive_data(b"x")
    assert MAX_EARLY_DATA == 64 * 1024


def test_negative_early_data_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Socks5Connection(max_early_data=-1)


# --- malformed requests ----------------------------------------------------------------

MALFORMED_REQUESTS = [
    # (id, bytes after the greeting, reply code queued, words of the error)
    ("wrong-version", b"\x04\x01\x00" + ipv4("10.0.0.1") + port(80), Reply.GENERAL_FAILURE,
     "version 4"),
    ("bind", request(ipv4("10.0.0.1"), 80, Command.BIND), Reply.COMMAND_NOT_SUPPORTED, "BIND"),
    ("unknown-command", request(ipv4("10.0.0.1"), 80, 9), Reply.COMMAND_NOT_SUPPORTED,
     "unknown command 9"),
    ("command-0", request(ipv4("10.0.0.1"), 80, 0), Reply.COMMAND_NOT_SUPPORTED,
     "unknown command 0"),
    ("reserved-byte", b"\x05\x01\x01" + ipv4("10.0.0.1") + port(80), Reply.GENERAL_FAILURE,
     "reserved"),
    ("address-type-9", b"\x05\x01\x00\x09" + bytes(6), Reply.ADDRESS_TYPE_NOT_SUPPORTED,
     "address type 9"),
    ("address-type-0", b"\x05\x01\x00\x00", Reply.ADDRESS_TYPE_NOT_SUPPORTED, "address type 0"),
    ("empty-domain", b"\x05\x01\x00\x03\x00" + port(80), Reply.HOST_UNREACHABLE, "empty"),
    ("non-utf8-domain", request(domain(b"caf\xe9.example")), Reply.HOST_UNREACHABLE, "UTF-8"),
    ("empty-label", request(domain(b"a..example")), Reply.HOST_UNREACHABLE, "IDNA"),
    ("label-of-64", request(domain(b"a" * 64 + b".example")), Reply.HOST_UNREACHABLE, "IDNA"),
    ("blank-in-domain", request(domain(b"wiki example")), Reply.HOST_UNREACHABLE, "host name"),
    ("nul-in-domain", request(domain(b"wiki\x00.evil")), Reply.HOST_UNREACHABLE, "host name"),
    ("newline-in-domain", request(domain(b"wiki\r\nevil")), Reply.HOST_UNREACHABLE, "host name"),
    ("slash-in-domain", request(domain(b"wiki/x.example")), Reply.HOST_UNREACHABLE, "host name"),
    ("colon-not-ipv6", request(domain(b"wiki:80")), Reply.HOST_UNREACHABLE, "IPv6"),
    ("ipv6-with-scope", request(domain(b"fe80::1%eth0")), Reply.HOST_UNREACHABLE, "scope"),
    ("connect-port-0", request(ipv4("10.0.0.1"), 0), Reply.GENERAL_FAILURE, "port 0"),
    ("bytes-after-udp-associate",
     request(ipv4("0.0.0.0"), 0, Command.UDP_ASSOCIATE) + b"x", Reply.GENERAL_FAILURE,
     "UDP association"),
]


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [case[1:] for case in MALFORMED_REQUESTS],
    ids=[case[0] for case in MALFORMED_REQUESTS],
)
def test_malformed_request_raises_protocol_error_after_queueing_its_reply(
    data: bytes, code: Reply, words: str
) -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING)
    assert conn.data_to_send() == METHOD_CHOSEN
    with pytest.raises(ProtocolError, match=words):
        conn.receive_data(data)
    assert conn.data_to_send() == reply_bytes(code)
    assert conn.state is State.FAILED
    assert conn.closed
    assert conn.next_request() is None


@pytest.mark.parametrize(
    "data", [case[1] for case in MALFORMED_REQUESTS], ids=[case[0] for case in MALFORMED_REQUESTS]
)
def test_malformed_request_fed_one_byte_at_a_time_fails_the_same_way(data: bytes) -> None:
    whole = feed([GREETING + data])
    assert whole.error is not None
    assert feed(one_byte_at_a_time(GREETING + data)) == whole


def test_unknown_address_type_fails_without_waiting_for_more_bytes() -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING)
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x05\x01\x00\x07")


def test_data_on_the_tcp_side_of_a_live_udp_association_fails_without_reply() -> None:
    conn = Socks5Connection()
    conn.receive_data(GREETING + request(ipv4("0.0.0.0"), 0, Command.UDP_ASSOCIATE))
    conn.reply(Reply.SUCCEEDED, "127.0.0.1", 40000)
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="UDP association"):
        conn.receive_data(b"x")
    assert conn.data_to_send() == b""
    assert conn.state is State.FAILED


def test_anything_after_a_failure_raises_again_and_sends_nothing() -> None:
    conn = Socks5Connection()
    with pytest.raises(ProtocolError):
        conn.receive_data(b"\x05\x01\x02")
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive_data(GREETING)
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive_data(b"")
    assert conn.data_to_send() == b""
    assert conn.state is State.FAILED


# --- any split, same outcome -----------------------------------------------------------

hosts = st.one_of(
    st.ip_addresses(v=4).map(lambda a: (ipv4(str(a)), str(a))),
    st.ip_addresses(v=6).map(lambda a: (ipv6(str(a)), str(a))),
    st.from_regex(r"[a-z0-9_-]{1,20}(\.[a-z0-9_-]{1,20}){0,4}", fullmatch=True).map(
        lambda n: (domain(n.encode()), n)
    ),
)


@given(
    host=hosts,
    dst_port=st.integers(1, 65535),
    payload=st.binary(max_size=64),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_a_session_split_anywhere_gives_the_same_request_and_payload(
    host: tuple[bytes, str], dst_port: int, payload: bytes, cuts: list[int]
) -> None:
    address, text = host
    data = GREETING + request(address, dst_port) + payload
    whole = feed([data])
    assert whole == Outcome(None, METHOD_CHOSEN, Request(Command.CONNECT, text, dst_port),
                            payload, State.REPLY_PENDING)
    assert feed(split_at(data, cuts)) == whole
    assert feed(one_byte_at_a_time(data)) == whole


@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_raise_only_protocol_error_with_the_same_outcome_for_any_split(
    data: bytes, cuts: list[int]
) -> None:
    whole = feed([data])  # anything but ProtocolError escapes and fails the test
    assert feed(split_at(data, cuts)) == whole


@given(rest=st.binary(max_size=300), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_after_a_valid_greeting_raise_only_protocol_error(
    rest: bytes, cuts: list[int]
) -> None:
    data = GREETING + b"\x05\x01\x00" + rest  # reach the address parsing quickly
    whole = feed([data])
    assert feed(split_at(data, cuts)) == whole


@given(name=st.binary(min_size=1, max_size=255))
def test_arbitrary_domain_bytes_are_a_request_or_a_host_unreachable_refusal(name: bytes) -> None:
    outcome = feed([GREETING + request(domain(name))])
    if outcome.error is None:
        assert outcome.request is not None
        assert outcome.request.host.encode("utf-8") == name
    else:
        assert outcome.sent == METHOD_CHOSEN + reply_bytes(Reply.HOST_UNREACHABLE)


# --- UDP ASSOCIATE datagrams -----------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"\x00\x00\x00" + ipv4("10.0.0.53") + port(53) + b"query",
         UdpDatagram("10.0.0.53", 53, b"query")),
        (b"\x00\x00\x00" + ipv6("fd00::53") + port(53) + b"",
         UdpDatagram("fd00::53", 53, b"")),
        (b"\x00\x00\x00" + domain(b"ntp.internal") + port(123) + b"\x1b",
         UdpDatagram("ntp.internal", 123, b"\x1b")),
    ],
    ids=["ipv4", "ipv6", "domain"],
)
def test_udp_datagram_bytes_are_exact_both_ways(wire: bytes, expected: UdpDatagram) -> None:
    assert parse_udp_datagram(wire) == expected
    assert build_udp_datagram(expected) == wire


@given(host=hosts, dst_port=st.integers(1, 65535), payload=st.binary(max_size=512))
def test_udp_datagram_round_trips(host: tuple[bytes, str], dst_port: int, payload: bytes) -> None:
    datagram = UdpDatagram(host[1], dst_port, payload)
    assert parse_udp_datagram(build_udp_datagram(datagram)) == datagram


@pytest.mark.parametrize("frag", [1, 0x7F, 0x80, 0xFF])
def test_udp_fragment_is_refused(frag: int) -> None:
    wire = bytes([0, 0, frag]) + ipv4("10.0.0.1") + port(53) + b"x"
    with pytest.raises(ProtocolError, match="fragmentation not supported"):
        parse_udp_datagram(wire)


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (b"", "truncated"),
        (b"\x00\x00\x00", "truncated"),
        (b"\x00\x01\x00" + ipv4("10.0.0.1") + port(53), "reserved"),
        (b"\x01\x00\x00" + ipv4("10.0.0.1") + port(53), "reserved"),
        (b"\x00\x00\x00" + ipv4("10.0.0.1") + b"\x00", "truncated"),
        (b"\x00\x00\x00\x03", "truncated"),
        (b"\x00\x00\x00" + domain(b"abc")[:-1], "truncated"),
        (b"\x00\x00\x00\x02" + bytes(8), "address type 2"),
        (b"\x00\x00\x00\x03\x00" + port(53), "empty"),
        (b"\x00\x00\x00" + domain(b"a b") + port(53), "host name"),
        (b"\x00\x00\x00" + ipv4("10.0.0.1") + port(0), "port 0"),
    ],
    ids=["empty", "header-only", "rsv-low", "rsv-high", "short-port", "no-domain-length",
         "short-domain", "unknown-atyp", "empty-domain", "bad-domain", "port-0"],
)
def test_malformed_udp_datagram_raises_protocol_error(wire: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        parse_udp_datagram(wire)


@given(data=st.binary(max_size=300))
def test_arbitrary_udp_bytes_raise_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_udp_datagram(data)


@pytest.mark.parametrize(
    "datagram",
    [UdpDatagram("10.0.0.1", 0, b""), UdpDatagram("10.0.0.1", 65536, b""),
     UdpDatagram("a b", 53, b""), UdpDatagram("", 53, b""), UdpDatagram("x" * 256, 53, b"")],
    ids=["port-0", "port-too-big", "blank-in-name", "empty-name", "name-too-long"],
)
def test_building_an_unsendable_udp_datagram_is_a_value_error(datagram: UdpDatagram) -> None:
    with pytest.raises(ValueError):
        build_udp_datagram(datagram)


# --- tunnel refusal reasons --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "reply"),
    [
        ("denied", Reply.NOT_ALLOWED),
        ("refused", Reply.CONNECTION_REFUSED),
        ("unreachable", Reply.NETWORK_UNREACHABLE),
        ("name_not_found", Reply.HOST_UNREACHABLE),
        ("timed_out", Reply.TTL_EXPIRED),
        ("limit_exceeded", Reply.GENERAL_FAILURE),
        ("internal_error", Reply.GENERAL_FAILURE),
        ("no such reason", Reply.GENERAL_FAILURE),
        ("", Reply.GENERAL_FAILURE),
    ],
)
def test_tunnel_refusal_reason_maps_to_a_socks_reply(reason: str, reply: Reply) -> None:
    assert reply_for(reason) is reply


def test_every_mux_reason_name_has_a_socks_reply() -> None:
    replies = {reason: reply_for(reason.name.lower()) for reason in Reason}
    assert replies[Reason.DENIED] is Reply.NOT_ALLOWED
    assert all(isinstance(reply, Reply) and reply is not Reply.SUCCEEDED
               for reply in replies.values())


# --- user name and password (RFC 1929) ------------------------------------------------

SECRET = ProxyCredentials("portcullis", "s3cret-Token_x")
PASSWORD_GREETING = b"\x05\x01\x02"
PASSWORD_CHOSEN = b"\x05\x02"
AUTHENTICATED = b"\x01\x00"
NOT_AUTHENTICATED = b"\x01\x01"


def login(user: bytes, password: bytes) -> bytes:
    return bytes([1, len(user)]) + user + bytes([len(password)]) + password


RIGHT_LOGIN = login(b"portcullis", b"s3cret-Token_x")


def test_with_credentials_the_greeting_is_answered_with_method_2() -> None:
    conn = Socks5Connection(credentials=SECRET)
    conn.receive_data(b"\x05\x02\x00\x02")
    assert conn.data_to_send() == PASSWORD_CHOSEN
    assert conn.state is State.AUTHENTICATION


def test_with_credentials_a_client_offering_only_no_authentication_is_refused_ff() -> None:
    conn = Socks5Connection(credentials=SECRET)
    with pytest.raises(ProtocolError, match="user name and password"):
        conn.receive_data(GREETING)
    assert conn.data_to_send() == NO_ACCEPTABLE_METHOD
    assert conn.state is State.FAILED


def test_the_right_user_and_password_lead_to_the_request() -> None:
    data = PASSWORD_GREETING + RIGHT_LOGIN + request(ipv4("10.0.0.1"), 443) + b"early"
    outcome = feed([data], SECRET)
    assert outcome == Outcome(None, PASSWORD_CHOSEN + AUTHENTICATED,
                              Request(Command.CONNECT, "10.0.0.1", 443), b"early",
                              State.REPLY_PENDING)
    assert feed(one_byte_at_a_time(data), SECRET) == outcome


@pytest.mark.parametrize(
    "attempt",
    [login(b"portcullis", b"s3cret-Token_y"), login(b"portcullit", b"s3cret-Token_x"),
     login(b"portcullis", b"s3cret-Token_x!"), login(b"portcullis", b""), login(b"", b""),
     login(b"portcullis", b"S3CRET-TOKEN_X")],
    ids=["wrong-password", "wrong-user", "longer-password", "empty-password", "empty-both",
         "other-case"])
def test_a_wrong_user_or_password_is_answered_01_01_and_no_request_is_read(
        attempt: bytes) -> None:
    data = PASSWORD_GREETING + attempt + request(ipv4("10.0.0.1"), 443)
    outcome = feed([data], SECRET)
    assert outcome.error is not None and "wrong user name or password" in outcome.error
    assert outcome.sent == PASSWORD_CHOSEN + NOT_AUTHENTICATED
    assert outcome.request is None and outcome.state is State.FAILED
    assert feed(one_byte_at_a_time(data), SECRET) == outcome


def test_a_negotiation_version_other_than_1_fails_at_its_first_byte() -> None:
    conn = Socks5Connection(credentials=SECRET)
    conn.receive_data(PASSWORD_GREETING)
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="version 5, not 1"):
        conn.receive_data(b"\x05")
    assert conn.data_to_send() == NOT_AUTHENTICATED


def test_an_unfinished_login_waits_without_answering() -> None:
    conn = Socks5Connection(credentials=SECRET)
    conn.receive_data(PASSWORD_GREETING + RIGHT_LOGIN[:-1])
    assert conn.data_to_send() == PASSWORD_CHOSEN
    assert conn.state is State.AUTHENTICATION
    conn.receive_data(RIGHT_LOGIN[-1:])
    assert conn.data_to_send() == AUTHENTICATED
    assert conn.state is State.REQUEST


@given(user=st.binary(max_size=255), password=st.binary(max_size=255),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_only_the_exact_secret_reaches_the_request_however_it_is_split(
        user: bytes, password: bytes, cuts: list[int]) -> None:
    data = PASSWORD_GREETING + login(user, password) + request(domain(b"wiki.corp"), 80)
    outcome = feed(split_at(data, cuts), SECRET)
    if (user, password) == (b"portcullis", b"s3cret-Token_x"):
        assert outcome.request == Request(Command.CONNECT, "wiki.corp", 80)
    else:
        assert outcome.request is None and outcome.state is State.FAILED
        assert outcome.sent == PASSWORD_CHOSEN + NOT_AUTHENTICATED
    assert feed([data], SECRET) == outcome


@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_arbitrary_bytes_with_credentials_never_reach_a_request_without_the_secret(
        data: bytes, cuts: list[int]) -> None:
    whole = feed([data], SECRET)
    assert feed(split_at(data, cuts), SECRET) == whole
    if whole.request is not None:
        assert b"s3cret-Token_x" in data


# --- the relay's extension commands (docs/protocol/relay.md) -----------------------------

@pytest.mark.parametrize("command", [0x81, 0x83])
def test_the_extension_commands_are_refused_07_by_the_local_port(command: int) -> None:
    outcome = feed([GREETING + request(ipv4("10.0.0.1"), 53, command)])
    assert outcome.error is not None and outcome.request is None
    assert outcome.sent == METHOD_CHOSEN + reply_bytes(Reply.COMMAND_NOT_SUPPORTED)


@pytest.mark.parametrize(("wire", "expected"), [
    (request(ipv4("10.0.0.53"), 53, 0x83), Request(Command.UDP_IN_STREAM, "10.0.0.53", 53)),
    (request(domain(b"dns.corp"), 53, 0x83), Request(Command.UDP_IN_STREAM, "dns.corp", 53)),
    (request(ipv4("10.0.0.1"), 0, 0x81), Request(Command.ICMP_ECHO_IN_STREAM, "10.0.0.1", 0)),
    (request(ipv6("fd00::1"), 0, 0x81), Request(Command.ICMP_ECHO_IN_STREAM, "fd00::1", 0)),
])
def test_with_extensions_the_relay_commands_are_parsed_one_byte_at_a_time_too(
        wire: bytes, expected: Request) -> None:
    whole = feed([GREETING + wire], extensions=True)
    assert whole.request == expected
    assert whole.sent == METHOD_CHOSEN
    assert whole.state is State.REPLY_PENDING
    assert feed(one_byte_at_a_time(GREETING + wire), extensions=True) == whole


@pytest.mark.parametrize(("wire", "code"), [
    (request(ipv4("10.0.0.53"), 0, 0x83), Reply.GENERAL_FAILURE),
    (request(domain(b"host.corp"), 0, 0x81), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    (request(ipv4("10.0.0.1"), 7, 0x81), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    (request(ipv4("10.0.0.1"), 80, 0x82), Reply.COMMAND_NOT_SUPPORTED),
])
def test_a_malformed_extension_request_is_refused_with_its_reply(wire: bytes,
                                                                 code: Reply) -> None:
    outcome = feed([GREETING + wire], extensions=True)
    assert outcome.error is not None and outcome.request is None
    assert outcome.sent == METHOD_CHOSEN + reply_bytes(code)
    assert feed(one_byte_at_a_time(GREETING + wire), extensions=True) == outcome


def test_framed_datagrams_sent_ahead_of_the_reply_are_kept_for_the_stream() -> None:
    early = b"\x00\x03abc\x00\x01z"
    outcome = feed([GREETING + request(ipv4("10.0.0.53"), 53, 0x83) + early],
                   extensions=True)
    assert outcome.payload == early


@pytest.mark.parametrize("reason", list(Reason))
def test_a_socks_reply_reads_back_as_the_reason_it_was_made_from(reason: Reason) -> None:
    code = reply_for(reason.name.lower())
    assert reason_for(code) == (reason if code is not Reply.GENERAL_FAILURE
                                else Reason.REFUSED)


@pytest.mark.parametrize(("code", "reason"), [
    (Reply.NOT_ALLOWED, Reason.DENIED), (Reply.CONNECTION_REFUSED, Reason.REFUSED),
    (Reply.NETWORK_UNREACHABLE, Reason.UNREACHABLE),
    (Reply.HOST_UNREACHABLE, Reason.NAME_NOT_FOUND), (Reply.TTL_EXPIRED, Reason.TIMED_OUT),
    (Reply.COMMAND_NOT_SUPPORTED, Reason.REFUSED), (0x42, Reason.REFUSED),
])
def test_a_relay_reply_code_maps_to_a_reason(code: int, reason: Reason) -> None:
    assert reason_for(code) == reason
