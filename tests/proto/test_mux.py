"""The mux codec, specified by the bytes it reads and writes (see docs/protocol/mux.md)."""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portcullis.errors import ProtocolError
from portcullis.proto.mux import (
    ConfigReceived,
    CreditAvailable,
    DatagramReceived,
    DataReceived,
    Event,
    FrameType,
    GoAwayReceived,
    HelloReceived,
    Limits,
    MuxConnection,
    PingReceived,
    PongReceived,
    Protocol,
    Reason,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
)

F = FrameType
DEFAULT_WINDOW = Limits().initial_window
SMALL = Limits(max_frame_payload=1024, initial_window=4096, max_streams=4)


# --- helpers: frames by hand -------------------------------------------------------


def frame(kind: int, stream_id: int = 0, payload: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack("!BBII", kind, flags, stream_id, len(payload)) + payload


def hello(fields: dict[str, object] | None = None) -> bytes:
    body = {"version": 1, **(fields or {})}
    return frame(F.HELLO, 0, json.dumps(body, separators=(",", ":")).encode())


def open_frame(
    stream_id: int,
    host: str = "db.internal",
    port: int = 5432,
    window: int = 65536,
    protocol: int = Protocol.TCP,
) -> bytes:
    encoded = host.encode()
    payload = struct.pack("!BHB", protocol, port, len(encoded)) + encoded + u32(window)
    return frame(F.OPEN, stream_id, payload)


def u32(n: int) -> bytes:
    return struct.pack("!I", n)


def reason_payload(reason: int, message: bytes = b"") -> bytes:
    return bytes([reason]) + message


def output(conn: MuxConnection) -> bytes:
    return b"".join(conn.data_to_send())


def split_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    pos = 0
    while pos < len(data):
        kind, flags, stream_id, length = struct.unpack_from("!BBII", data, pos)
        frames.append((kind, flags, stream_id, data[pos + 10 : pos + 10 + length]))
        pos += 10 + length
    return frames


def normalized(events: list[Event]) -> list[Event]:
    """Events with memoryview payloads turned into bytes, to compare across runs."""
    return [
        DataReceived(e.stream_id, bytes(e.data)) if isinstance(e, DataReceived) else e
        for e in events
    ]


# --- helpers: connections -------------------------------------------------------------


def pipe(sender: MuxConnection, receiver: MuxConnection) -> list[Event]:
    receiver.receive_data(output(sender), 0.0)
    return receiver.events_received()


DEFAULT_LIMITS = Limits()


def connected(limits: Limits = DEFAULT_LIMITS) -> tuple[MuxConnection, MuxConnection]:
    client = MuxConnection("client", limits)
    gateway = MuxConnection("gateway", limits)
    client.send_hello({"ticket": "t"})
    gateway.send_hello({})
    pipe(client, gateway)
    pipe(gateway, client)
    return client, gateway


def accepted_stream(client: MuxConnection, gateway: MuxConnection) -> int:
    stream_id = client.open_stream(Protocol.TCP, "db.internal", 5432)
    pipe(client, gateway)
    gateway.accept_stream(stream_id)
    pipe(gateway, client)
    return stream_id


def gateway_with_streams() -> MuxConnection:
    """A gateway that got the client's HELLO, stream 1 accepted, stream 3 not yet answered.

    The client granted 65536 bytes of credit on both streams.
    """
    gateway = MuxConnection("gateway")
    gateway.send_hello({})
    gateway.receive_data(hello() + open_frame(1) + open_frame(3), 0.0)
    gateway.accept_stream(1)
    gateway.events_received()
    gateway.data_to_send()
    return gateway


# --- bytes on the wire: what each action writes -------------------------------------------


def test_hello_is_a_json_object_with_version_1_on_stream_0() -> None:
    client = MuxConnection("client")
    client.send_hello({"ticket": "abc"})
    assert output(client) == frame(F.HELLO, 0, b'{"version":1,"ticket":"abc"}')


def test_open_carries_protocol_port_host_and_the_openers_window() -> None:
    client, _ = connected()
    assert client.open_stream(Protocol.TCP, "db.internal", 5432) == 1
    assert output(client) == frame(F.OPEN, 1, b"\x06\x15\x38\x0bdb.internal" + u32(DEFAULT_WINDOW))


def test_open_with_an_empty_host_means_the_pinned_destination() -> None:
    client, _ = connected()
    client.open_stream(Protocol.UDP, "", 53)
    assert output(client) == frame(F.OPEN, 1, b"\x11\x00\x35\x00" + u32(DEFAULT_WINDOW))


def test_client_streams_are_odd_and_gateway_streams_are_even() -> None:
    client, gateway = connected()
    assert [client.open_stream(Protocol.TCP, "h", 1) for _ in range(3)] == [1, 3, 5]
    assert [gateway.open_stream(Protocol.TCP, "h", 1) for _ in range(2)] == [2, 4]


def test_accept_grants_the_acceptors_initial_window() -> None:
    client, gateway = connected()
    stream_id = client.open_stream(Protocol.TCP, "h", 1)
    pipe(client, gateway)
    gateway.accept_stream(stream_id)
    assert output(gateway) == frame(F.ACCEPT, 1, u32(DEFAULT_WINDOW))


def test_refuse_carries_a_reason_and_a_message() -> None:
    client, gateway = connected()
    client.open_stream(Protocol.TCP, "h", 1)
    pipe(client, gateway)
    gateway.refuse_stream(1, Reason.DENIED, "not allowed")
    assert output(gateway) == frame(F.REFUSE, 1, b"\x01not allowed")
    assert gateway.stream_ids() == []


def test_a_long_message_is_cut_to_512_bytes_on_a_character_boundary() -> None:
    client, gateway = connected()
    stream_id = accepted_stream(client, gateway)
    client.reset_stream(stream_id, Reason.CANCELLED, "é" * 300)
    (sent,) = split_frames(output(client))
    assert sent[3] == b"\x08" + "é".encode() * 256


def test_data_is_a_header_followed_by_the_callers_bytes_uncopied() -> None:
    client, gateway = connected()
    stream_id = accepted_stream(client, gateway)
    payload = b"hello"
    client.send_data(stream_id, payload)
    chunks = client.data_to_send()
    assert chunks[0] == struct.pack("!BBII", F.DATA, 0, 1, 5)
    assert isinstance(chunks[1], memoryview) and chunks[1].obj is payload


def test_data_with_fin_sets_the_fin_flag_on_the_last_frame() -> None:
    client, gateway = connected(SMALL)
    stream_id = accepted_stream(client, gateway)
    client.send_data(stream_id, b"a" * 1500, fin=True)
    frames = split_frames(output(client))
    assert [(kind, flags, len(body)) for kind, flags, _, body in frames] == [
        (F.DATA, 0, 1024),
        (F.DATA, 0x01, 476),
    ]


def test_fin_without_data_is_a_fin_frame() -> None:
    client, gateway = connected()
    stream_id = accepted_stream(client, gateway)
    client.send_fin(stream_id)
    assert output(client) == frame(F.FIN, 1)


def test_reset_carries_a_reason_and_forgets_the_stream() -> None:
    client, gateway = connected()
    stream_id = accepted_stream(client, gateway)
    client.reset_stream(stream_id, Reason.TIMED_OUT, "idle")
    assert output(client) == frame(F.RESET, 1, b"\x04idle")
    assert client.stream_ids() == []


def test_ping_is_answered_by_pong_with_the_same_payload() -> None:
    client, gateway = connected()
    client.send_ping(b"12345678")
    assert output(client) == frame(F.PING, 0, b"12345678")
    gateway.receive_data(frame(F.PING, 0, b"12345678"), 0.0)
    assert gateway.events_received() == [PingReceived(b"12345678")]
    assert output(gateway) == frame(F.PONG, 0, b"12345678")


def test_config_is_a_json_object_from_the_gateway() -> None:
    _, gateway = connected()
    gateway.send_config({"idle_timeout": 300})
    assert output(gateway) == frame(F.CONFIG, 0, b'{"idle_timeout":300}')


def test_goaway_carries_a_reason_and_closes_the_connection() -> None:
    client, gateway = connected()
    accepted_stream(client, gateway)
    gateway.send_goaway(Reason.ADMIN_ENDED, "ended by admin")
    assert output(gateway) == frame(F.GOAWAY, 0, b"\x0aended by admin")
    assert gateway.closed
    assert gateway.stream_ids() == []


def test_a_datagram_is_one_frame_on_a_udp_stream() -> None:
    client, gateway = connected()
    stream_id = client.open_stream(Protocol.UDP, "dns", 53)
    pipe(client, gateway)
    gateway.accept_stream(stream_id)
    pipe(gateway, client)
    client.send_datagram(stream_id, b"query", 0.0)
    assert output(client) == frame(F.DATAGRAM, 1, b"query")


# --- bytes on the wire: what each frame means -----------------------------------------------


def test_a_received_hello_exposes_its_fields() -> None:
    gateway = MuxConnection("gateway")
    gateway.receive_data(hello({"ticket": "abc"}), 0.0)
    assert gateway.events_received() == [HelloReceived({"version": 1, "ticket": "abc"})]


def test_a_received_open_reports_protocol_host_and_port() -> None:
    gateway = MuxConnection("gateway")
    gateway.receive_data(hello() + open_frame(1, "db.internal", 5432), 0.0)
    assert gateway.events_received()[1] == StreamOpened(1, Protocol.TCP, "db.internal", 5432)
    assert gateway.stream_ids() == [1]


def test_a_received_accept_refuse_data_fin_and_reset_become_events() -> None:
    client, _ = connected()
    client.open_stream(Protocol.TCP, "h", 1)
    client.open_stream(Protocol.TCP, "h", 2)
    client.receive_data(
        frame(F.ACCEPT, 1, u32(100))
        + frame(F.REFUSE, 3, b"\x02connection refused")
        + frame(F.DATA, 1, b"abc")
        + frame(F.DATA, 1, b"de", flags=0x01),
        0.0,
    )
    assert normalized(client.events_received()) == [
        StreamAccepted(1),
        StreamRefused(3, Reason.REFUSED, "connection refused"),
        DataReceived(1, b"abc"),
        DataReceived(1, b"de"),
        StreamEnded(1),
    ]
    client.receive_data(frame(F.RESET, 1, b"\x09boom"), 0.0)
    assert client.events_received() == [StreamReset(1, Reason.INTERNAL_ERROR, "boom")]
    assert client.stream_ids() == []


def test_a_received_config_pong_goaway_and_datagram_become_events() -> None:
    client, _ = connected()
    stream_id = client.open_stream(Protocol.UDP, "dns", 53)
    client.receive_data(
        frame(F.ACCEPT, stream_id, u32(100))
        + frame(F.DATAGRAM, stream_id, b"answer")
        + frame(F.CONFIG, 0, b'{"a":1}')
        + frame(F.PONG, 0, b"abcdefgh")
        + frame(F.GOAWAY, 0, b"\x0bbye"),
        0.0,
    )
    assert client.events_received() == [
        StreamAccepted(1),
        DatagramReceived(1, b"answer"),
        ConfigReceived({"a": 1}),
        PongReceived(b"abcdefgh"),
        GoAwayReceived(Reason.SHUTDOWN, "bye"),
    ]
    assert client.closed


def test_data_received_in_one_chunk_is_a_view_of_that_chunk() -> None:
    gateway = gateway_with_streams()
    chunk = frame(F.DATA, 1, b"x" * 100)
    gateway.receive_data(chunk, 0.0)
    (event,) = gateway.events_received()
    assert isinstance(event, DataReceived)
    assert isinstance(event.data, memoryview) and event.data.obj is chunk


def test_an_empty_data_frame_with_fin_ends_the_stream_like_a_fin_frame() -> None:
    gateway = gateway_with_streams()
    gateway.receive_data(frame(F.DATA, 1, b"", flags=0x01), 0.0)
    assert gateway.events_received() == [StreamEnded(1)]


def test_a_stream_ended_both_ways_is_forgotten() -> None:
    client, gateway = connected()
    stream_id = accepted_stream(client, gateway)
    client.send_fin(stream_id)
    gateway.send_fin(stream_id)
    assert pipe(client, gateway) == [StreamEnded(stream_id)]
    assert pipe(gateway, client) == [StreamEnded(stream_id)]
    assert client.stream_ids() == gateway.stream_ids() == []


def test_after_receiving_goaway_further_input_is_ignored() -> None:
    client, _ = connected()
    client.receive_data(frame(F.GOAWAY, 0, b"\x0b") + b"\xff garbage", 0.0)
    client.receive_data(b"more garbage", 0.0)
    assert client.events_received() == [GoAwayReceived(Reason.SHUTDOWN, "")]


# --- byte stream: message boundaries do not matter ---------------------------------------


STREAM_AFTER_ACCEPT = (
    frame(F.DATA, 1, b"first")
    + frame(F.PING, 0, b"pingpong")
    + frame(F.DATA, 1, b"y" * 3000)
    + open_frame(5, "other", 443)
    + frame(F.WINDOW, 1, u32(10))
    + frame(F.RESET, 3, b"\x08")
    + frame(F.DATA, 1, b"last", flags=0x01)
    + frame(F.PONG, 0, b"12345678")
)


def events_for_chunks(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    gateway = gateway_with_streams()
    events: list[Event] = []
    for chunk in chunks:
        gateway.receive_data(chunk, 0.0)
        events += normalized(gateway.events_received())
    return events, output(gateway)


def test_feeding_one_byte_at_a_time_gives_the_same_events_as_all_at_once() -> None:
    whole = events_for_chunks([STREAM_AFTER_ACCEPT])
    one_by_one = events_for_chunks(
        [STREAM_AFTER_ACCEPT[i : i + 1] for i in range(len(STREAM_AFTER_ACCEPT))]
    )
    assert one_by_one == whole
    assert whole[0] == [
        DataReceived(1, b"first"),
        PingReceived(b"pingpong"),
        DataReceived(1, b"y" * 3000),
        StreamOpened(5, Protocol.TCP, "other", 443),
        StreamReset(3, Reason.CANCELLED, ""),
        DataReceived(1, b"last"),
        StreamEnded(1),
        PongReceived(b"12345678"),
    ]
    assert whole[1] == frame(F.PONG, 0, b"pingpong")


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM_AFTER_ACCEPT))))
def test_any_split_of_the_byte_stream_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM_AFTER_ACCEPT)]
    chunks = [STREAM_AFTER_ACCEPT[a:b] for a, b in itertools.pairwise(bounds)]
    assert events_for_chunks(chunks) == events_for_chunks([STREAM_AFTER_ACCEPT])


def test_the_first_frame_may_arrive_in_pieces_smaller_than_a_header() -> None:
    gateway = MuxConnection("gateway")
    data = hello({"ticket": "abc"})
    for piece in (data[:3], data[3:7], data[7:12], data[12:]):
        gateway.receive_data(piece, 0.0)
    assert gateway.events_received() == [HelloReceived({"version": 1, "ticket": "abc"})]


# --- flow control -----------------------------------------------------------------


def test_the_sender_stops_at_the_peers_credit_and_keeps_the_rest_pending() -> None:
    client, gateway = connected(SMALL)
    stream_id = accepted_stream(client, gateway)
    client.send_data(stream_id, b"z" * 10_000)
    frames = split_frames(output(client))
    assert sum(len(body) for *_, body in frames) == 4096
    assert max(len(body) for *_, body in frames) == 1024
    assert client.pending(stream_id) == 10_000 - 4096


def test_pending_data_is_sent_when_a_window_arrives() -> None:
    client, _ = connected(SMALL)
    client.open_stream(Protocol.TCP, "h", 1)
    client.receive_data(frame(F.ACCEPT, 1, u32(0)), 0.0)
    client.data_to_send()
    client.send_data(1, b"abcdef")
    assert output(client) == b""
    client.receive_data(frame(F.WINDOW, 1, u32(4)), 0.0)
    assert output(client) == frame(F.DATA, 1, b"abcd")
    assert client.pending(1) == 2
    assert client.events_received() == [StreamAccepted(1)]


def test_credit_available_is_reported_when_the_pending_data_is_all_sent() -> None:
    client, _ = connected(SMALL)
    client.open_stream(Protocol.TCP, "h", 1)
    client.receive_data(frame(F.ACCEPT, 1, u32(2)), 0.0)
    client.send_data(1, b"abcdef")
    client.send_data(1, b"gh")
    client.events_received()
    assert split_frames(output(client))[-1] == (F.DATA, 0, 1, b"ab")
    client.receive_data(frame(F.WINDOW, 1, u32(100)), 0.0)
    assert output(client) == frame(F.DATA, 1, b"cdef") + frame(F.DATA, 1, b"gh")
    assert client.pending(1) == 0
    assert client.events_received() == [CreditAvailable(1)]


def test_a_fin_given_while_data_is_pending_is_sent_after_that_data() -> None:
    client, _ = connected(SMALL)
    client.open_stream(Protocol.TCP, "h", 1)
    client.receive_data(frame(F.ACCEPT, 1, u32(3)), 0.0)
    client.data_to_send()
    client.send_data(1, b"abcdef", fin=True)
    assert output(client) == frame(F.DATA, 1, b"abc")
    client.receive_data(frame(F.WINDOW, 1, u32(3)), 0.0)
    assert output(client) == frame(F.DATA, 1, b"def", flags=0x01)


def test_data_after_fin_is_a_local_error() -> None:
    client, _ = connected(SMALL)
    client.open_stream(Protocol.TCP, "h", 1)
    client.receive_data(frame(F.ACCEPT, 1, u32(3)), 0.0)
    client.send_data(1, b"abcdef", fin=True)
    with pytest.raises(ProtocolError):
        client.send_data(1, b"more")
    with pytest.raises(ProtocolError):
        client.send_fin(1)


def test_consumed_returns_credit_in_one_window_per_half_initial_window() -> None:
    client, gateway = connected(SMALL)
    stream_id = accepted_stream(client, gateway)
    gateway.receive_data(frame(F.DATA, stream_id, b"q" * 1000) * 3, 0.0)
    gateway.consumed(stream_id, 1000)
    assert output(gateway) == b""
    gateway.consumed(stream_id, 1048)
    assert output(gateway) == frame(F.WINDOW, stream_id, u32(2048))


def test_no_window_is_sent_after_the_peer_has_ended_its_direction() -> None:
    client, gateway = connected(SMALL)
    stream_id = accepted_stream(client, gateway)
    gateway.receive_data(frame(F.DATA, stream_id, b"q" * 1000) * 3 + frame(F.FIN, stream_id), 0.0)
    gateway.consumed(stream_id, 3000)
    assert output(gateway) == b""


def test_consumed_on_a_forgotten_stream_does_nothing() -> None:
    client, gateway = connected(SMALL)
    stream_id = accepted_stream(client, gateway)
    gateway.receive_data(frame(F.DATA, stream_id, b"q" * 1000) * 3, 0.0)
    gateway.receive_data(frame(F.RESET, stream_id, b"\x08"), 0.0)
    gateway.consumed(stream_id, 3000)
    assert output(gateway) == b""


def test_data_beyond_granted_credit_is_a_protocol_error() -> None:
    client, gateway = connected(SMALL)
    stream_id = accepted_stream(client, gateway)
    gateway.receive_data(frame(F.DATA, stream_id, b"q" * 1024) * 4, 0.0)
    with pytest.raises(ProtocolError, match="credit"):
        gateway.receive_data(frame(F.DATA, stream_id, b"q"), 0.0)


def test_a_sender_respecting_windows_never_overruns_the_receiver() -> None:
    client, gateway = connected(SMALL)
    stream_id = accepted_stream(client, gateway)
    payload = bytes(range(256)) * 200
    client.send_data(stream_id, payload, fin=True)
    received = bytearray()
    ended = False
    for _ in range(100):
        for event in pipe(client, gateway):
            if isinstance(event, DataReceived):
                received += event.data
                gateway.consumed(stream_id, len(event.data))
            ended = ended or isinstance(event, StreamEnded)
        pipe(gateway, client)
        if ended:
            break
    assert bytes(received) == payload and ended


# --- protocol errors: every one is fatal and answered with GOAWAY(PROTOCOL_ERROR) ------------


def assert_fatal(conn: MuxConnection, data: bytes) -> None:
    conn.data_to_send()
    with pytest.raises(ProtocolError):
        conn.receive_data(data, 0.0)
    kind, _, stream_id, payload = split_frames(output(conn))[-1]
    assert (kind, stream_id, payload[0]) == (F.GOAWAY, 0, Reason.PROTOCOL_ERROR)
    assert conn.closed
    with pytest.raises(ProtocolError):
        conn.receive_data(hello(), 0.0)


FATAL_AFTER_SETUP: dict[str, bytes] = {
    "an oversized data frame": struct.pack("!BBII", F.DATA, 0, 1, 256 * 1024 + 1),
    "an oversized control frame": struct.pack("!BBII", F.RESET, 0, 1, 64 * 1024 + 1),
    "an unknown frame type": frame(99, 1, b""),
    "frame type 0": frame(0, 0, b""),
    "an unknown flag on data": frame(F.DATA, 1, b"x", flags=0x02),
    "a flag on window": frame(F.WINDOW, 1, u32(1), flags=0x01),
    "a second hello": hello(),
    "an open with the wrong parity": open_frame(2),
    "an open reusing an id": open_frame(3),
    "an open with a lower id": open_frame(5) + open_frame(1),
    "an open with an unknown protocol": open_frame(5, protocol=99),
    "an open whose host length does not match": frame(F.OPEN, 5, b"\x06\x00\x16\x05ab" + u32(1)),
    "an open with a window above 2**31-1": open_frame(5, window=2**31),
    "an open with a host that is not utf-8": open_frame(5, host="ab").replace(b"ab", b"\xff\xfe"),
    "data on a stream never opened": frame(F.DATA, 7, b"x"),
    "data on a gateway stream never opened": frame(F.DATA, 2, b"x"),
    "window on a stream never opened": frame(F.WINDOW, 9, u32(1)),
    "fin on a stream never opened": frame(F.FIN, 9),
    "data before accept": frame(F.DATA, 3, b"x"),
    "data after the peer's fin": frame(F.FIN, 1) + frame(F.DATA, 1, b"x"),
    "a second fin": frame(F.FIN, 1) + frame(F.FIN, 1),
    "a zero window increment": frame(F.WINDOW, 1, u32(0)),
    "a window overflowing 2**31-1": frame(F.WINDOW, 1, u32(2**31 - 1 - 65536 + 1)),
    "a window on stream 0": frame(F.WINDOW, 0, u32(1)),
    "data on stream 0": frame(F.DATA, 0, b"x"),
    "a ping on stream 1": frame(F.PING, 1, b"12345678"),
    "a config sent by a client": frame(F.CONFIG, 0, b"{}"),
    "a ping of 7 bytes": frame(F.PING, 0, b"1234567"),
    "a pong of 9 bytes": frame(F.PONG, 0, b"123456789"),
    "an accept from the opener": frame(F.ACCEPT, 1, u32(1)),
    "an accept of 3 bytes": frame(F.ACCEPT, 1, b"\x00\x00\x01"),
    "a refuse with an unknown reason": frame(F.REFUSE, 3, b"\xc8"),
    "a refuse with a message over 512 bytes": frame(F.REFUSE, 3, b"\x01" + b"m" * 513),
    "a reset whose message is not utf-8": frame(F.RESET, 1, b"\x01\xff"),
    "a goaway with an unknown reason": frame(F.GOAWAY, 0, b"\x63"),
    "a datagram on a tcp stream": frame(F.DATAGRAM, 1, b"x"),
}


@pytest.mark.parametrize("data", FATAL_AFTER_SETUP.values(), ids=FATAL_AFTER_SETUP.keys())
def test_a_malformed_or_forbidden_frame_is_a_protocol_error(data: bytes) -> None:
    assert_fatal(gateway_with_streams(), data)


FATAL_FIRST: dict[str, bytes] = {
    "a frame before hello": frame(F.PING, 0, b"12345678"),
    "a hello with version 2": frame(F.HELLO, 0, b'{"version":2}'),
    "a hello with version true": frame(F.HELLO, 0, b'{"version":true}'),
    "a hello without version": frame(F.HELLO, 0, b'{"ticket":"x"}'),
    "a hello that is not json": frame(F.HELLO, 0, b"hello"),
    "a hello that is a json array": frame(F.HELLO, 0, b"[1]"),
    "a hello that is not utf-8": frame(F.HELLO, 0, b'{"version":1,"x":"\xff"}'),
    "a deeply nested hello": frame(F.HELLO, 0, b"[" * 60000),
}


@pytest.mark.parametrize("data", FATAL_FIRST.values(), ids=FATAL_FIRST.keys())
def test_a_bad_first_frame_is_a_protocol_error(data: bytes) -> None:
    assert_fatal(MuxConnection("gateway"), data)


def test_a_config_that_is_not_json_is_a_protocol_error() -> None:
    client, _ = connected()
    assert_fatal(client, frame(F.CONFIG, 0, b"{nope"))


def test_events_before_a_protocol_error_are_kept() -> None:
    gateway = gateway_with_streams()
    with pytest.raises(ProtocolError):
        gateway.receive_data(frame(F.DATA, 1, b"ok") + frame(99), 0.0)
    assert normalized(gateway.events_received()) == [DataReceived(1, b"ok")]


# --- closed streams, limits and other tolerated cases ----------------------------------------


def test_frames_in_flight_on_a_stream_we_reset_are_ignored() -> None:
    gateway = gateway_with_streams()
    gateway.reset_stream(1, Reason.CANCELLED)
    gateway.receive_data(
        frame(F.DATA, 1, b"late")
        + frame(F.WINDOW, 1, u32(5))
        + frame(F.FIN, 1)
        + frame(F.RESET, 1, b"\x08"),
        0.0,
    )
    assert gateway.events_received() == []
    assert not gateway.closed


def test_an_accept_for_a_stream_we_already_reset_is_ignored() -> None:
    client, _ = connected()
    stream_id = client.open_stream(Protocol.TCP, "h", 1)
    client.reset_stream(stream_id, Reason.CANCELLED)
    client.receive_data(frame(F.ACCEPT, stream_id, u32(10)), 0.0)
    assert client.events_received() == []


def test_an_open_beyond_max_streams_is_refused_without_ending_the_connection() -> None:
    gateway = MuxConnection("gateway", SMALL)
    gateway.send_hello({})
    gateway.receive_data(hello() + b"".join(open_frame(i) for i in (1, 3, 5, 7, 9)), 0.0)
    assert len(gateway.events_received()) == 5  # HELLO and four streams
    assert output(gateway) == hello() + frame(F.REFUSE, 9, b"\x07too many streams")
    assert gateway.stream_ids() == [1, 3, 5, 7]
    gateway.reset_stream(1, Reason.CANCELLED)
    gateway.receive_data(open_frame(11), 0.0)
    assert gateway.events_received() == [StreamOpened(11, Protocol.TCP, "db.internal", 5432)]


def test_a_peer_that_keeps_opening_beyond_the_limit_is_a_protocol_error() -> None:
    gateway = MuxConnection("gateway", SMALL)
    gateway.send_hello({})
    gateway.receive_data(hello() + b"".join(open_frame(i) for i in range(1, 17, 2)), 0.0)
    with pytest.raises(ProtocolError, match="too many streams"):
        gateway.receive_data(open_frame(17), 0.0)   # the fifth refusal in a row, limit 4


def test_a_ping_received_before_our_hello_is_answered_after_it() -> None:
    gateway = MuxConnection("gateway")
    gateway.receive_data(hello() + frame(F.PING, 0, b"abcdefgh"), 0.0)
    assert output(gateway) == b""
    gateway.send_hello({"session": "s"})
    assert output(gateway) == (
        frame(F.HELLO, 0, b'{"version":1,"session":"s"}') + frame(F.PONG, 0, b"abcdefgh")
    )


def test_goaway_may_be_the_first_frame_either_way() -> None:
    gateway = MuxConnection("gateway")
    gateway.send_goaway(Reason.AUTH_FAILED, "denied")
    client = MuxConnection("client")
    client.receive_data(output(gateway), 0.0)
    assert client.events_received() == [GoAwayReceived(Reason.AUTH_FAILED, "denied")]


# --- local misuse: an error for the caller, nothing sent, connection intact ---------------


def test_actions_before_hello_are_refused() -> None:
    client = MuxConnection("client")
    with pytest.raises(ProtocolError):
        client.open_stream(Protocol.TCP, "h", 1)
    with pytest.raises(ProtocolError):
        client.send_ping(b"12345678")
    assert output(client) == b""


def test_the_opener_cannot_send_data_before_accept() -> None:
    client, _ = connected()
    stream_id = client.open_stream(Protocol.TCP, "h", 1)
    client.data_to_send()
    with pytest.raises(ProtocolError):
        client.send_data(stream_id, b"early")
    assert output(client) == b""
    assert not client.closed


def test_a_client_cannot_send_config() -> None:
    client, _ = connected()
    with pytest.raises(ProtocolError):
        client.send_config({"a": 1})


def test_bad_arguments_are_value_errors() -> None:
    client, gateway = connected()
    with pytest.raises(ValueError):
        client.send_ping(b"short")
    with pytest.raises(ValueError):
        client.open_stream(Protocol.TCP, "h", 70000)
    with pytest.raises(ValueError):
        client.open_stream(Protocol.TCP, "h" * 256, 1)
    with pytest.raises(ValueError):
        gateway.send_config({"x": object()})
    with pytest.raises(ValueError):
        MuxConnection("server")  # type: ignore[arg-type]


def test_resetting_a_stream_that_already_ended_both_ways_does_nothing() -> None:
    client, gateway = connected()
    stream_id = accepted_stream(client, gateway)
    client.send_fin(stream_id)
    gateway.send_fin(stream_id)
    pipe(gateway, client)
    client.data_to_send()
    client.reset_stream(stream_id, Reason.CANCELLED)
    assert output(client) == b""


def test_resetting_a_stream_that_was_never_opened_is_a_local_error() -> None:
    client, _ = connected()
    with pytest.raises(ProtocolError):
        client.reset_stream(7, Reason.CANCELLED)


def test_actions_after_goaway_are_refused_but_cleanup_calls_are_harmless() -> None:
    client, gateway = connected()
    stream_id = accepted_stream(client, gateway)
    client.send_goaway(Reason.SHUTDOWN)
    client.reset_stream(stream_id, Reason.CANCELLED)
    client.consumed(stream_id, 10)
    client.send_goaway(Reason.SHUTDOWN)
    assert output(client) == frame(F.GOAWAY, 0, b"\x0b")
    with pytest.raises(ProtocolError):
        client.send_data(stream_id, b"x")


# --- hypothesis: two connections piped together agree on everything -------------------------


PATTERN = bytes(range(251))


@dataclass
class StreamModel:
    accepted: bool = False
    fin_given: bool = False
    unconsumed: int = 0


@dataclass
class Side:
    conn: MuxConnection
    streams: dict[int, StreamModel] = field(default_factory=dict)
    unanswered: list[int] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)


class Harness:
    def __init__(self) -> None:
        client, gateway = connected(SMALL)
        self.sides = [Side(client), Side(gateway)]
        self.sent: dict[tuple[int, int], bytearray] = {}
        self.received: dict[tuple[int, int], bytearray] = {}
        self.fins: set[tuple[int, int]] = set()
        self.ended: set[tuple[int, int]] = set()
        self.aborted: set[int] = set()
        self.sends = 0
        # Every script starts with one accepted stream opened by each side, so that even a
        # short script moves data; scripts open more, with handshakes in flight.
        self.act(("open", 0, 0, True))
        self.act(("open", 1, 0, True))

    def deliver(self, index: int, cuts: list[int]) -> bool:
        """Move side ``index``'s output to the other side in pieces; False if none."""
        data = output(self.sides[index].conn)
        bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
        receiver = self.sides[1 - index]
        for start, stop in itertools.pairwise(bounds):
            receiver.conn.receive_data(data[start:stop], 0.0)
            self.absorb(1 - index, receiver.conn.events_received())
        return bool(data)

    def absorb(self, index: int, events: list[Event]) -> None:
        side = self.sides[index]
        for event in events:
            if isinstance(event, StreamOpened):
                side.streams[event.stream_id] = StreamModel()
                side.unanswered.append(event.stream_id)
            elif isinstance(event, StreamAccepted):
                side.streams[event.stream_id].accepted = True
            elif isinstance(event, StreamRefused | StreamReset):
                side.streams.pop(event.stream_id, None)
                self.aborted.add(event.stream_id)
            elif isinstance(event, DataReceived):
                self.received.setdefault((index, event.stream_id), bytearray()).extend(event.data)
                side.streams[event.stream_id].unconsumed += len(event.data)
            elif isinstance(event, StreamEnded):
                self.ended.add((index, event.stream_id))
            elif isinstance(event, PingReceived):
                pass
            elif isinstance(event, PongReceived):
                side.pongs.append(event.payload)

    def act(self, action: tuple[str, int, int, bool]) -> None:
        """Apply one action a shell could take; streams are picked among those it fits."""
        name, pick, size, flag = action
        index = pick % 2
        conn = self.sides[index].conn
        if name == "open":
            stream_id = conn.open_stream(Protocol.TCP, "h", 1)
            self.sides[index].streams[stream_id] = StreamModel()
            if flag:  # the whole handshake at once, so that data flows in short scripts
                self.deliver(index, [])
                peer = self.sides[1 - index]
                if stream_id in peer.unanswered:
                    peer.unanswered.remove(stream_id)
                    peer.conn.accept_stream(stream_id)
                    peer.streams[stream_id].accepted = True
                    self.deliver(1 - index, [])
        elif name in ("accept", "refuse"):
            waiting = [(i, s) for i, side in enumerate(self.sides) for s in side.unanswered]
            if not waiting:
                return
            index, stream_id = waiting[pick % len(waiting)]
            side = self.sides[index]
            side.unanswered.remove(stream_id)
            if stream_id not in side.streams:
                return  # reset by the opener meanwhile
            if name == "accept":
                side.conn.accept_stream(stream_id)
                side.streams[stream_id].accepted = True
            else:
                side.conn.refuse_stream(stream_id, Reason.DENIED)
                del side.streams[stream_id]
                self.aborted.add(stream_id)
        elif name == "send":
            open_ = [
                (i, s)
                for i, side in enumerate(self.sides)
                for s, model in sorted(side.streams.items())
                if model.accepted and not model.fin_given
            ]
            if not open_:
                return
            index, stream_id = open_[pick % len(open_)]
            # A pattern that shifts with every send, so that lost or reordered bytes show.
            offset = self.sends % 251
            self.sends += 1
            blob = (PATTERN * (size // 251 + 2))[offset : offset + size]
            self.sides[index].conn.send_data(stream_id, blob, fin=flag)
            self.sent.setdefault((index, stream_id), bytearray()).extend(blob)
            if flag:
                self.sides[index].streams[stream_id].fin_given = True
                self.fins.add((index, stream_id))
        elif name == "reset":
            live = [(i, s) for i, side in enumerate(self.sides) for s in sorted(side.streams)]
            if not live:
                return
            index, stream_id = live[pick % len(live)]
            self.sides[index].conn.reset_stream(stream_id, Reason.CANCELLED)
            del self.sides[index].streams[stream_id]
            self.aborted.add(stream_id)
        elif name == "consume":
            self.consume(index)
        elif name == "ping":
            payload = (pick * 1_000_003 + size).to_bytes(8, "big")
            conn.send_ping(payload)
            self.sides[index].pings.append(payload)
        elif name == "deliver":
            self.deliver(index, [size, pick * 37, size // 3])

    def consume(self, index: int) -> None:
        for stream_id, model in self.sides[index].streams.items():
            if model.unconsumed:
                self.sides[index].conn.consumed(stream_id, model.unconsumed)
                model.unconsumed = 0

    def settle(self) -> None:
        for _ in range(1000):
            moved = False
            for index in (0, 1):
                self.consume(index)
                moved = self.deliver(index, []) or moved
            if not moved:
                return
        raise AssertionError("the connections never settled")


actions = st.tuples(
    st.sampled_from(
        [
            "open",
            "accept",
            "accept",
            "refuse",
            "send",
            "send",
            "send",
            "reset",
            "consume",
            "ping",
            "deliver",
            "deliver",
            "deliver",
        ]
    ),
    st.integers(min_value=0, max_value=50),
    st.one_of(st.integers(0, 100), st.integers(4000, 20_000)),  # within or beyond credit
    st.booleans(),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(actions, min_size=5, max_size=40))
def test_two_connections_piped_together_deliver_exactly_what_was_sent(
    script: list[tuple[str, int, int, bool]],
) -> None:
    harness = Harness()
    for action in script:
        harness.act(action)
    harness.settle()
    for (index, stream_id), data in harness.sent.items():
        got = bytes(harness.received.get((1 - index, stream_id), b""))
        if stream_id in harness.aborted:
            assert bytes(data).startswith(got)
        else:
            assert got == bytes(data)
            assert ((1 - index, stream_id) in harness.ended) == ((index, stream_id) in harness.fins)
    for side in harness.sides:
        assert side.pongs == side.pings
        assert not side.conn.closed
        assert all(side.conn.pending(s) == 0 for s in side.conn.stream_ids())


# --- hypothesis: garbage in, ProtocolError out, never anything else ------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_raise_nothing_but_protocol_error(data: bytes, after_setup: bool) -> None:
    conn = gateway_with_streams() if after_setup else MuxConnection("gateway")
    try:
        conn.receive_data(data, 0.0)
    except ProtocolError:
        assert conn.closed


frames = st.builds(
    frame,
    st.integers(min_value=0, max_value=14),
    st.integers(min_value=0, max_value=6),
    st.one_of(st.binary(max_size=40), st.sampled_from([u32(0), u32(1), u32(2**31), b"{}"])),
    st.sampled_from([0, 0, 0, 1, 2]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, max_size=12), st.sampled_from(["client", "gateway"]))
def test_arbitrary_well_framed_frames_raise_nothing_but_protocol_error(
    sequence: list[bytes], role: str
) -> None:
    conn = MuxConnection("client" if role == "client" else "gateway")
    conn.send_hello({})
    data = hello() + open_frame(2 if role == "client" else 1) + b"".join(sequence)
    try:
        conn.receive_data(data, 0.0)
    except ProtocolError:
        assert conn.closed
