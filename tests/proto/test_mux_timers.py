"""The mux codec's clock: keep-alive PINGs, the end of a silent peer and the idle expiry
of datagram streams, specified by the bytes out and the events, with time as an
argument (no test here sleeps)."""

from __future__ import annotations

import gc
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portcullis.proto.mux import (
    FrameType,
    MuxConnection,
    PeerTimedOut,
    Protocol,
    Reason,
    StreamExpired,
    StreamRefused,
    StreamReset,
    Timers,
)

F = FrameType
TIMERS = Timers(keepalive_interval=10.0, dead_peer_timeout=30.0, datagram_idle_timeout=60.0)


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each frame in `data`."""
    found, pos = [], 0
    while pos < len(data):
        kind, _flags, stream_id, length = struct.unpack_from("!BBII", data, pos)
        found.append((kind, stream_id, data[pos + 10: pos + 10 + length]))
        pos += 10 + length
    return found


def out(conn: MuxConnection) -> bytes:
    return b"".join(conn.data_to_send())


def pipe(sender: MuxConnection, receiver: MuxConnection, now: float) -> None:
    receiver.receive_data(out(sender), now)


def connected(timers: Timers = TIMERS) -> tuple[MuxConnection, MuxConnection]:
    """A client and a gateway that exchanged HELLOs at time 0."""
    client = MuxConnection("client", timers=timers)
    gateway = MuxConnection("gateway", timers=timers)
    client.send_hello({})
    gateway.send_hello({})
    pipe(client, gateway, 0.0)
    pipe(gateway, client, 0.0)
    client.events_received()
    gateway.events_received()
    return client, gateway


# --- keep-alive -----------------------------------------------------------------------


def test_a_connection_quiet_for_the_keepalive_interval_sends_one_ping() -> None:
    client, _ = connected()
    assert client.get_timer() == 10.0
    client.handle_timer(9.9)
    assert out(client) == b""
    client.handle_timer(10.0)
    sent = frames(out(client))
    assert [(kind, stream) for kind, stream, _ in sent] == [(F.PING, 0)]
    assert len(sent[0][2]) == 8
    # One PING per interval, not one per call.
    client.handle_timer(10.5)
    assert out(client) == b""
    assert client.get_timer() == 20.0


def test_the_peer_answers_a_keepalive_ping_and_the_round_trip_is_measured() -> None:
    client, gateway = connected()
    client.handle_timer(10.0)
    gateway.receive_data(out(client), 10.01)
    pong = out(gateway)
    assert [kind for kind, _, _ in frames(pong)] == [F.PONG]
    client.receive_data(pong, 10.04)
    assert client.round_trip == pytest.approx(0.04)
    assert client.get_timer() == pytest.approx(20.04)
    assert not client.closed


def test_anything_received_moves_the_keepalive_and_the_dead_peer_deadline() -> None:
    client, gateway = connected()
    stream_id = client.open_stream(Protocol.TCP, "db", 5432)
    pipe(client, gateway, 8.0)
    gateway.accept_stream(stream_id)
    pipe(gateway, client, 8.0)
    assert client.get_timer() == 18.0
    client.handle_timer(18.0)
    assert [kind for kind, _, _ in frames(out(client))] == [F.PING]
    gateway.send_data(stream_id, b"still here")
    pipe(gateway, client, 37.0)    # 29 s after the last frame: not yet dead
    client.handle_timer(37.0)
    assert not client.closed
    assert client.get_timer() == 47.0


def test_no_ping_is_sent_before_our_hello() -> None:
    gateway = MuxConnection("gateway", timers=TIMERS)
    client = MuxConnection("client", timers=TIMERS)
    client.send_hello({})
    pipe(client, gateway, 0.0)
    assert gateway.get_timer() == 30.0          # only the dead-peer deadline
    gateway.handle_timer(15.0)
    assert out(gateway) == b""
    gateway.send_hello({})
    assert gateway.get_timer() == 10.0           # due already: the next call sends it
    gateway.handle_timer(15.0)
    assert [kind for kind, _, _ in frames(out(gateway))] == [F.HELLO, F.PING]


def test_a_codec_never_given_a_time_has_no_timer() -> None:
    client = MuxConnection("client", timers=TIMERS)
    client.send_hello({})
    assert client.get_timer() is None
    client.handle_timer(100.0)                   # starts the clock
    assert client.get_timer() == 110.0


# --- dead peer ------------------------------------------------------------------------


def test_a_peer_silent_for_the_dead_peer_timeout_is_sent_goaway_timed_out() -> None:
    client, _ = connected()
    for now in (10.0, 20.0):
        client.handle_timer(now)
        assert [kind for kind, _, _ in frames(out(client))] == [F.PING]
    assert client.get_timer() == 30.0
    client.handle_timer(30.0)
    (goaway,) = frames(out(client))
    assert goaway[0] == F.GOAWAY and goaway[1] == 0
    assert goaway[2][0] == Reason.TIMED_OUT
    assert goaway[2][1:] == b"nothing received for 30.0 s"
    assert client.events_received() == [PeerTimedOut(30.0)]
    assert client.closed
    assert client.get_timer() is None
    client.handle_timer(40.0)                    # nothing more, ever
    assert out(client) == b"" and client.events_received() == []


def test_the_peer_reads_the_timeout_goaway_as_timed_out() -> None:
    client, gateway = connected()
    gateway.handle_timer(30.0)
    pipe(gateway, client, 30.0)
    (event,) = client.events_received()
    assert event.reason == Reason.TIMED_OUT     # type: ignore[union-attr]


def test_a_timer_call_late_after_a_long_silence_ends_the_connection_at_once() -> None:
    # A machine that slept: the first timer call comes long after every deadline.
    client, _ = connected()
    client.handle_timer(500.0)
    assert [kind for kind, _, _ in frames(out(client))] == [F.GOAWAY]
    assert client.events_received() == [PeerTimedOut(500.0)]


def test_timers_are_validated() -> None:
    with pytest.raises(ValueError, match="dead_peer_timeout"):
        Timers(keepalive_interval=10, dead_peer_timeout=10)
    with pytest.raises(ValueError, match="keepalive_interval"):
        Timers(keepalive_interval=0)
    with pytest.raises(ValueError, match="datagram_idle_timeout"):
        Timers(datagram_idle_timeout=0)


def test_new_timers_apply_from_the_next_timer() -> None:
    client, _ = connected()
    client.timers = Timers(keepalive_interval=1.0, dead_peer_timeout=3.0)
    assert client.get_timer() == 1.0
    client.handle_timer(3.0)
    assert client.closed


# --- datagram streams -----------------------------------------------------------------


def udp_stream(client: MuxConnection, gateway: MuxConnection, now: float,
               idle_timeout: float | None = None) -> int:
    stream_id = client.open_stream(Protocol.UDP, "dns", 53)
    pipe(client, gateway, now)
    gateway.accept_stream(stream_id, idle_timeout=idle_timeout)
    pipe(gateway, client, now)
    client.events_received()
    gateway.events_received()
    return stream_id


def keep_peer_alive(conn: MuxConnection, peer: MuxConnection, now: float) -> None:
    """Both ping, so only the datagram stream's own idleness matters."""
    for sender, receiver in ((peer, conn), (conn, peer)):
        sender.send_ping(b"12345678")
        pipe(sender, receiver, now)
    for side in (conn, peer):
        side.events_received()


def test_a_udp_stream_without_datagrams_for_its_idle_timeout_is_reset() -> None:
    client, gateway = connected(Timers(keepalive_interval=10.0, dead_peer_timeout=300.0,
                                       datagram_idle_timeout=60.0))
    stream_id = udp_stream(client, gateway, 1.0, idle_timeout=25.0)
    out(gateway)
    gateway.handle_timer(20.0)
    gateway.send_datagram(stream_id, b"answer", 20.0)    # activity: 25 s from here
    out(gateway)
    assert gateway.get_timer() is not None
    gateway.handle_timer(44.9)
    assert gateway.is_open(stream_id)
    gateway.handle_timer(45.0)
    data = out(gateway)
    assert (F.RESET, stream_id, bytes([Reason.TIMED_OUT]) + b"idle for 25 s") in frames(data)
    assert StreamExpired(stream_id, 25.0) in gateway.events_received()
    assert not gateway.is_open(stream_id)
    # The client sees a plain RESET and forgets the stream too.
    client.receive_data(data, 45.0)
    assert StreamReset(stream_id, Reason.TIMED_OUT, "idle for 25 s") in client.events_received()
    assert not client.is_open(stream_id)


def test_a_datagram_received_restarts_the_idle_clock() -> None:
    client, gateway = connected(Timers(keepalive_interval=10.0, dead_peer_timeout=300.0,
                                       datagram_idle_timeout=60.0))
    stream_id = udp_stream(client, gateway, 0.0)
    client.send_datagram(stream_id, b"query", 50.0)
    pipe(client, gateway, 50.0)
    gateway.handle_timer(60.0)
    assert gateway.is_open(stream_id)
    gateway.handle_timer(110.0)
    assert [e for e in gateway.events_received() if isinstance(e, StreamExpired)] == [
        StreamExpired(stream_id, 60.0)]


def test_a_flows_expiry_is_the_codecs_next_timer_when_it_comes_first() -> None:
    client, _ = connected(Timers(keepalive_interval=10.0, dead_peer_timeout=30.0,
                                 datagram_idle_timeout=60.0))
    stream_id = client.open_stream(Protocol.ICMP, "host", 0, idle_timeout=4.0)
    assert client.get_timer() == 4.0
    client.handle_timer(4.0)
    assert client.events_received() == [StreamExpired(stream_id, 4.0)]
    assert client.get_timer() == 10.0


def test_an_open_the_application_never_answers_expires_as_a_refusal() -> None:
    client, gateway = connected()
    stream_id = client.open_stream(Protocol.UDP, "dns", 53)
    pipe(client, gateway, 1.0)
    gateway.events_received()
    keep_peer_alive(gateway, client, 30.0)
    keep_peer_alive(gateway, client, 55.0)
    gateway.handle_timer(61.0)
    assert StreamExpired(stream_id, 60.0) in gateway.events_received()
    pipe(gateway, client, 61.0)
    assert [e for e in client.events_received() if isinstance(e, StreamRefused)] == [
        StreamRefused(stream_id, Reason.TIMED_OUT, "idle for 60 s")]


def test_tcp_streams_never_idle_out_in_the_codec() -> None:
    client, gateway = connected(Timers(keepalive_interval=10.0, dead_peer_timeout=30.0,
                                       datagram_idle_timeout=5.0))
    stream_id = client.open_stream(Protocol.TCP, "db", 5432)
    for now in range(0, 100, 5):
        keep_peer_alive(client, gateway, float(now))
    assert client.is_open(stream_id)
    with pytest.raises(ValueError, match="UDP and ICMP"):
        client.open_stream(Protocol.TCP, "db", 5432, idle_timeout=3.0)
    # A refused call changes nothing: the next stream gets the next id.
    assert client.open_stream(Protocol.UDP, "dns", 53) == stream_id + 2


# --- properties -----------------------------------------------------------------------

steps = st.lists(
    st.tuples(st.sampled_from(["receive", "timer", "ping"]),
              st.floats(min_value=0.0, max_value=40.0, allow_nan=False)),
    max_size=40)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_the_timer_is_never_in_the_past_and_only_a_silent_peer_ends_it(
        plan: list[tuple[str, float]]) -> None:
    client, gateway = connected()
    client.timers = Timers(keepalive_interval=10.0, dead_peer_timeout=1e9)  # it never gives up
    now, last_heard, silent_at_a_timer = 0.0, 0.0, False
    for action, step in plan:
        now += step
        if action == "timer":
            gateway.handle_timer(now)
            if now >= last_heard + TIMERS.dead_peer_timeout:
                silent_at_a_timer = True
            if not gateway.closed:
                timer = gateway.get_timer()
                assert timer is not None and timer > now
        elif not gateway.closed:
            if action == "ping":
                client.send_ping(b"abcdefgh")
            else:
                client.handle_timer(now)   # may add a PING, or nothing (an empty message)
            pipe(client, gateway, now)
            last_heard = now
            timer = gateway.get_timer()
            assert timer is not None and timer > now
        out(gateway)
    timed_out = [e for e in gateway.events_received() if isinstance(e, PeerTimedOut)]
    assert gateway.closed == silent_at_a_timer == bool(timed_out)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0.0, 30.0, allow_nan=False)),
                max_size=30))
def test_every_flow_expires_once_and_only_after_its_idle_time(
        plan: list[tuple[int, float]]) -> None:
    timers = Timers(keepalive_interval=100.0, dead_peer_timeout=1000.0,
                    datagram_idle_timeout=20.0)
    client, gateway = connected(timers)
    streams = [udp_stream(client, gateway, 0.0) for _ in range(4)]
    active = dict.fromkeys(streams, 0.0)
    now = 0.0
    for index, step in plan:
        now += step
        stream_id = streams[index]
        gateway.handle_timer(now)
        for event in gateway.events_received():
            if isinstance(event, StreamExpired):
                assert now >= active.pop(event.stream_id) + timers.datagram_idle_timeout
        for since in active.values():
            assert since + timers.datagram_idle_timeout > now, "overdue and not expired"
        if stream_id in active:
            gateway.send_datagram(stream_id, b"x", now)
            active[stream_id] = now
        out(gateway)


# --- memory ---------------------------------------------------------------------------


def open_and_end(client: MuxConnection, gateway: MuxConnection, count: int) -> None:
    """Streams ended every way there is: FIN both ways, RESET from either side with
    data pending, REFUSE, and UDP flows that end or idle out."""
    for n in range(count):
        kind = n % 5
        protocol = Protocol.UDP if kind == 4 else Protocol.TCP
        stream_id = client.open_stream(protocol, "h", 1)
        pipe(client, gateway, float(n))
        if kind == 3:
            gateway.refuse_stream(stream_id, Reason.DENIED)
            pipe(gateway, client, float(n))
            continue
        gateway.accept_stream(stream_id)
        pipe(gateway, client, float(n))
        if kind == 0:
            client.send_data(stream_id, b"x" * 1000, fin=True)
            pipe(client, gateway, float(n))
            gateway.consumed(stream_id, 1000)
            gateway.send_fin(stream_id)
            pipe(gateway, client, float(n))
        elif kind in (1, 2):
            # More than the window: the rest waits in the sender until the reset.
            sender, receiver = (client, gateway) if kind == 1 else (gateway, client)
            sender.send_data(stream_id, bytes(300_000))
            receiver.reset_stream(stream_id, Reason.CANCELLED)
            pipe(receiver, sender, float(n))
            pipe(sender, receiver, float(n))
        else:
            client.send_datagram(stream_id, b"query", float(n))
            pipe(client, gateway, float(n))
        for conn in (client, gateway):   # the flows of 100 s ago idle out
            conn.handle_timer(float(n))
            conn.events_received()
        pipe(client, gateway, float(n))
        pipe(gateway, client, float(n))
        client.events_received()
        gateway.events_received()
    # The last UDP flows idle out on both sides.
    for conn in (client, gateway):
        conn.handle_timer(count + 1000.0)
        conn.handle_timer(count + 1000.0)
        conn.events_received()
        out(conn)


def test_a_codec_holds_nothing_for_streams_that_ended() -> None:
    timers = Timers(keepalive_interval=5000.0, dead_peer_timeout=100_000.0,
                    datagram_idle_timeout=100.0)
    client, gateway = connected(timers)
    open_and_end(client, gateway, 50)              # warm up caches and free lists
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        open_and_end(client, gateway, 2000)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"memory grown over 2000 streams opened and ended: {grown} bytes")
    assert client.stream_ids() == [] and gateway.stream_ids() == []
    assert client.pending(1) == 0
    # 300 kB was pending per reset stream; a leak of a few bytes per stream would show.
    assert grown < 16 * 1024


def test_a_codec_that_goes_away_drops_every_stream_and_its_pending_data() -> None:
    client, gateway = connected()
    for _ in range(20):
        stream_id = client.open_stream(Protocol.TCP, "h", 1)
        pipe(client, gateway, 1.0)
        gateway.accept_stream(stream_id)
        pipe(gateway, client, 1.0)
        gateway.send_data(stream_id, bytes(6 * 1024 * 1024))   # beyond the 4 MiB window
    assert gateway.pending(stream_id) > 0
    out(gateway)
    client.send_goaway(Reason.SHUTDOWN)
    pipe(client, gateway, 2.0)
    assert gateway.stream_ids() == [] and gateway.pending(stream_id) == 0
    assert gateway.data_to_send() == []
