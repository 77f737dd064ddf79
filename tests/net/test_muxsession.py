"""MuxSession's stream lifecycle against a real loopback server, with the peer played
by a codec in the test (events in, frames out)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator, Sequence

import pytest

from conftest import Deployment, Process, run_cli
from portcullis.errors import DialError
from portcullis.net.dialer import DirectDialer
from portcullis.net.muxsession import (
    MuxSession,
    StreamBridge,
    keepalive_fields,
    pushed_timers,
)
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason, Timers


class Wire:
    """The carrier: what the gateway session sends goes to the client codec."""

    def __init__(self, client: MuxConnection) -> None:
        self.client = client
        self.events: list[mux.Event] = []

    def send_message(self, chunks: Sequence[bytes | memoryview]) -> None:
        self.client.receive_data(b"".join(chunks), 0.0)
        self.events += self.client.events_received()

    def close(self, code: int, reason: str) -> None:
        pass


async def answered_by_the_test(session: MuxSession, event: mux.StreamOpened) -> None:
    """The test itself calls connect_stream for each OPEN."""


def pair() -> tuple[MuxConnection, MuxSession, Wire]:
    client = MuxConnection("client")
    gateway = MuxSession(MuxConnection("gateway"), on_open=answered_by_the_test)
    wire = Wire(client)
    gateway.attach(wire)
    client.send_hello({"version": 1})
    gateway.receive_message(b"".join(client.data_to_send()))
    gateway.mux.send_hello({"version": 1})
    return client, gateway, wire


class SlowDialer:
    """Connects for real, but only once the test says so."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def connect(self, host, port, protocol_factory, source=None):  # type: ignore[no-untyped-def]
        await self.go.wait()
        return await DirectDialer().connect(host, port, protocol_factory, source=source)


async def test_a_reset_during_the_dial_drops_the_new_socket() -> None:
    accepted: list[asyncio.StreamWriter] = []
    closed = asyncio.Event()

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()   # until the gateway side hangs up
        closed.set()

    listener = await asyncio.start_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client, gateway, wire = pair()
    stream_id = client.open_stream(mux.Protocol.TCP, "127.0.0.1", port)
    gateway.receive_message(b"".join(client.data_to_send()))
    dialer = SlowDialer()
    dialing = asyncio.ensure_future(gateway.connect_stream(stream_id, dialer, "127.0.0.1", port))
    await asyncio.sleep(0)
    client.reset_stream(stream_id, Reason.CANCELLED, "changed my mind")
    gateway.receive_message(b"".join(client.data_to_send()))
    dialer.go.set()
    assert await dialing is None
    await asyncio.wait_for(closed.wait(), 5)   # the server saw the socket close
    assert gateway.open_streams == 0
    assert not any(isinstance(e, mux.StreamAccepted) for e in wire.events)
    listener.close()


async def test_a_failed_dial_refuses_with_its_reason() -> None:
    client, gateway, wire = pair()
    stream_id = client.open_stream(mux.Protocol.TCP, "127.0.0.1", 9)
    gateway.receive_message(b"".join(client.data_to_send()))

    class Refusing:
        async def connect(self, host, port, protocol_factory, source=None):  # type: ignore[no-untyped-def]
            raise DialError("127.0.0.1:9 refused the connection", Reason.REFUSED)

    failed = await gateway.connect_stream(stream_id, Refusing(), "127.0.0.1", 9,
                                          refusal="not available")
    await asyncio.sleep(0)
    assert failed is not None
    refused = [e for e in wire.events if isinstance(e, mux.StreamRefused)]
    assert [(e.reason, e.message) for e in refused] == [(Reason.REFUSED, "not available")]
    assert gateway.open_streams == 0


async def test_a_failing_stream_handler_refuses_the_stream_instead_of_hanging() -> None:
    async def broken(session: MuxSession, event: mux.StreamOpened) -> None:
        raise KeyError("bug")

    client = MuxConnection("client")
    gateway = MuxSession(MuxConnection("gateway"), on_open=broken)
    wire = Wire(client)
    gateway.attach(wire)
    client.send_hello({"version": 1})
    gateway.mux.send_hello({"version": 1})
    client.open_stream(mux.Protocol.TCP, "x", 1)
    gateway.receive_message(b"".join(client.data_to_send()))
    for _ in range(10):
        await asyncio.sleep(0)
    refused = [e for e in wire.events if isinstance(e, mux.StreamRefused)]
    assert refused and refused[0].reason == Reason.INTERNAL_ERROR


async def test_a_reset_before_the_dial_starts_leaves_no_socket() -> None:
    closed = asyncio.Event()

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        closed.set()

    listener = await asyncio.start_server(server, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client, gateway, _wire = pair()
    stream_id = client.open_stream(mux.Protocol.TCP, "127.0.0.1", port)
    gateway.receive_message(b"".join(client.data_to_send()))
    # The reset arrives while the gateway is still resolving, before any bridge exists.
    client.reset_stream(stream_id, Reason.CANCELLED, "gone")
    gateway.receive_message(b"".join(client.data_to_send()))
    assert await gateway.connect_stream(stream_id, DirectDialer(), "127.0.0.1", port) is None
    await asyncio.wait_for(closed.wait(), 5)
    assert gateway.open_streams == 0
    listener.close()


# --- the codec's timers, run by the session's one timer handle -------------------------

FAST = Timers(keepalive_interval=0.05, dead_peer_timeout=0.3, datagram_idle_timeout=0.2)


def timed_pair(timers: Timers = FAST) -> tuple[MuxConnection, MuxSession, Wire]:
    """A gateway session and a client codec whose answers go back only when the test
    pipes them (so by default the client has stopped answering)."""
    client = MuxConnection("client")
    gateway = MuxSession(MuxConnection("gateway", timers=timers), on_open=answered_by_the_test)
    wire = Wire(client)
    gateway.attach(wire)
    client.send_hello({"version": 1})
    gateway.receive_message(b"".join(client.data_to_send()))
    gateway.mux.send_hello({"version": 1})
    gateway.flush_soon()
    return client, gateway, wire


async def test_a_session_whose_peer_stops_answering_ends_within_the_dead_peer_time() -> None:
    _client, gateway, wire = timed_pair()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(gateway.closed.wait(), 5)
    elapsed = asyncio.get_running_loop().time() - started
    print(f"silent peer ended after {elapsed:.3f} s (dead-peer time {FAST.dead_peer_timeout} s)")
    assert FAST.dead_peer_timeout * 0.9 <= elapsed < FAST.dead_peer_timeout + 1.0
    assert "timed_out" in gateway.end_reason()
    assert sum(isinstance(e, mux.PingReceived) for e in wire.events) >= 3   # it did ask
    goaway = [e for e in wire.events if isinstance(e, mux.GoAwayReceived)]
    assert [g.reason for g in goaway] == [Reason.TIMED_OUT]


async def test_a_session_whose_peer_answers_pings_stays_up() -> None:
    client, gateway, wire = timed_pair()
    pongs = asyncio.Event()
    answered = 0

    def answer(chunks: Sequence[bytes | memoryview]) -> None:
        nonlocal answered
        client.receive_data(b"".join(chunks), 0.0)
        wire.events += client.events_received()
        gateway.receive_message(b"".join(client.data_to_send()))   # the PONGs go back
        answered += 1
        if answered >= 20:
            pongs.set()

    wire.send_message = answer   # type: ignore[method-assign]
    await asyncio.wait_for(pongs.wait(), 10)   # 20 pings: 1 s, over 3 dead-peer times
    assert not gateway.closed.is_set()
    assert gateway.rtt is not None


async def test_an_idle_udp_flow_is_ended_by_the_codec_timer() -> None:
    client, gateway, wire = timed_pair(Timers(keepalive_interval=5.0, dead_peer_timeout=10.0))
    stream_id = client.open_stream(mux.Protocol.UDP, "127.0.0.1", 53)
    gateway.receive_message(b"".join(client.data_to_send()))
    ended = asyncio.Event()
    flow = gateway.accept_flow(stream_id, lambda data: None, idle_timeout=0.2)
    flow.on_closed = lambda flow: ended.set()
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(ended.wait(), 5)
    elapsed = asyncio.get_running_loop().time() - started
    assert 0.18 <= elapsed < 2.0
    assert gateway.open_streams == 0
    await asyncio.sleep(0)   # the RESET goes out with the next flush
    resets = [e for e in wire.events if isinstance(e, mux.StreamReset)]
    assert [(r.stream_id, r.reason) for r in resets] == [(stream_id, Reason.TIMED_OUT)]
    assert not gateway.closed.is_set()


async def test_the_client_applies_the_timers_its_gateway_pushes() -> None:
    class Nowhere:
        def send_message(self, chunks: Sequence[bytes | memoryview]) -> None:
            pass

        def close(self, code: int, reason: str) -> None:
            pass

    gateway = MuxConnection("gateway")
    client = MuxSession(MuxConnection("client"))
    client.attach(Nowhere())
    gateway.send_hello({})
    gateway.send_config({"keepalive": keepalive_fields(Timers(2.0, 7.0))})
    client.receive_message(b"".join(gateway.data_to_send()))
    assert (client.mux.timers.keepalive_interval, client.mux.timers.dead_peer_timeout) == (
        2.0, 7.0)
    # Nonsense (or nothing) keeps what the client had.
    assert pushed_timers({"keepalive": {"interval": 9, "dead_peer_timeout": 3}},
                         client.mux.timers) == client.mux.timers
    assert pushed_timers({}, Timers()) == Timers()


# --- a real tunnel: `portcullis up` and `portcullis connect`, one of them stopped ---------

PASSWORD = "correct horse battery staple"
KEEPALIVE, DEAD_PEER = 0.2, 1.0


@pytest.fixture
def quick_keepalive(deployment: Deployment, start_process):  # type: ignore[no-untyped-def]
    """A gateway that pings after 0.2 s of quiet and gives up on a peer after 1 s, with
    alice signed in and `portcullis connect` running as her."""
    deployment.set("vpn", "keepalive_interval", str(KEEPALIVE))
    deployment.set("vpn", "dead_peer_timeout", str(DEAD_PEER))
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    home = deployment.directory.parent / "alice"
    result = run_cli("login", deployment.url, "--user", "alice", "--password-stdin",
                     "--ca", str(deployment.ca), input=PASSWORD + "\n",
                     env={"PORTCULLIS_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    client = start_process("connect", "--socks", "127.0.0.1:0", name="connect",
                           env={"PORTCULLIS_HOME": str(home)})
    client.wait_for(r"SOCKS5 proxy: listening on")
    return gateway, client


def audit_events(deployment: Deployment, name: str) -> list[dict[str, object]]:
    lines = (deployment.directory / "audit.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == name]


@contextlib.contextmanager
def stopped(process: Process) -> Iterator[float]:
    """SIGSTOP the process (it neither reads nor answers, its kernel still ACKs), and
    SIGCONT it whatever happens; yields when it was stopped."""
    process.popen.send_signal(signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        process.popen.send_signal(signal.SIGCONT)


def test_a_tunnel_whose_client_stops_answering_is_ended_within_the_dead_peer_time(
        deployment: Deployment, quick_keepalive) -> None:  # type: ignore[no-untyped-def]
    _gateway, client = quick_keepalive
    def tunnel_ended() -> list[dict[str, object]]:
        # Carrier 0's end is the tunnel's (the client's other carriers went silent too).
        return [event for event in audit_events(deployment, "tunnel.ended")
                if event["carrier"] == 0]

    with stopped(client) as since:
        deadline = since + 15
        while not tunnel_ended() and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.monotonic() - since
    (ended,) = tunnel_ended()
    print(f"a stopped client's tunnel was ended after {elapsed:.2f} s "
          f"(dead_peer_timeout {DEAD_PEER} s): {ended['reason']}")
    assert "timed_out (nothing received for" in str(ended["reason"])
    assert elapsed < DEAD_PEER + 2.0
    # Resumed, the client finds its tunnel gone and opens a new one.
    client.wait_for(r"tunnel lost[^\n]*reconnecting")
    client.wait_for(r"tunnel up as alice[^\n]*\n(.|\n)*tunnel up as alice", timeout=20)


def test_the_client_reconnects_when_the_gateway_stops_answering(
        deployment: Deployment, quick_keepalive) -> None:  # type: ignore[no-untyped-def]
    gateway, client = quick_keepalive
    with stopped(gateway) as since:
        lost = client.wait_for(r"tunnel lost \(the gateway stopped answering[^\n]*", timeout=15)
        elapsed = time.monotonic() - since
    print(f"the client gave up on a stopped gateway after {elapsed:.2f} s "
          f"(dead_peer_timeout {DEAD_PEER} s) and said: {lost.group(0)}")
    assert elapsed < DEAD_PEER + 2.0
    # The gateway answers again: the same client process is back on a new tunnel.
    client.wait_for(r"tunnel up as alice[^\n]*\n(.|\n)*tunnel up as alice", timeout=30)
    assert client.popen.poll() is None


@pytest.fixture
def quick_launch(deployment: Deployment, echo_server, client_home, start_process):  # type: ignore[no-untyped-def]
    """The quick keep-alive gateway, and `portcullis launch echo` running as alice."""
    deployment.set("vpn", "keepalive_interval", str(KEEPALIVE))
    deployment.set("vpn", "dead_peer_timeout", str(DEAD_PEER))
    deployment.add_resource("echo", echo_server.address, ["staff"], "Echo")
    deployment.add_user("alice", PASSWORD, ["staff"])
    gateway = start_process("up", "--dir", str(deployment.directory), name="up")
    gateway.wait_for(r"Portal: https://")
    result = run_cli("login", deployment.url, "--user", "alice", "--password-stdin",
                     "--ca", str(deployment.ca), input=PASSWORD + "\n")
    assert result.returncode == 0, result.stderr
    launch = start_process("launch", "echo", "--listen", "127.0.0.1:0", name="launch")
    launch.wait_for(r"listening on ([\d.]+):(\d+)")
    return gateway, launch


def test_a_launch_whose_client_stops_answering_is_ended_within_the_dead_peer_time(
        deployment: Deployment, quick_launch) -> None:  # type: ignore[no-untyped-def]
    _gateway, launch = quick_launch
    with stopped(launch) as since:
        deadline = since + 15
        while not audit_events(deployment, "launch.ended") and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.monotonic() - since
    (ended,) = audit_events(deployment, "launch.ended")
    print(f"a stopped launch client was ended after {elapsed:.2f} s: {ended['reason']}")
    assert "timed_out (nothing received for" in str(ended["reason"])
    assert elapsed < DEAD_PEER + 2.0


# --- memory: nothing is kept for streams that ended ----------------------------------------


async def wait_until(condition, seconds: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_streams_that_end_or_are_reset_leave_nothing_in_the_session_or_codec() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())   # until EOF, then back and close
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client, gateway, wire = pair()
    wire.send_message = lambda chunks: deliver(b"".join(chunks))   # type: ignore[method-assign]

    def deliver(data: bytes) -> None:
        client.receive_data(data, 0.0)
        for event in client.events_received():
            wire.events.append(event)
            if isinstance(event, mux.DataReceived):
                client.consumed(event.stream_id, len(event.data))
        gateway.receive_message(b"".join(client.data_to_send()))

    for round_ in range(100):
        stream_id = client.open_stream(mux.Protocol.TCP, "127.0.0.1", port)
        gateway.receive_message(b"".join(client.data_to_send()))
        assert await gateway.connect_stream(stream_id, DirectDialer(), "127.0.0.1", port) is None
        await wait_until(lambda: any(isinstance(e, mux.StreamAccepted)
                                     and e.stream_id == stream_id for e in wire.events))  # noqa: B023
        if round_ % 2:
            # 5 MiB: more than the gateway's window, so part of it waits; then a reset.
            client.send_data(stream_id, bytes(5 * 1024 * 1024))
            gateway.receive_message(b"".join(client.data_to_send()))
            client.reset_stream(stream_id, Reason.CANCELLED, "gone")
        else:
            client.send_data(stream_id, b"ping", fin=True)
        gateway.receive_message(b"".join(client.data_to_send()))
    await wait_until(lambda: gateway.open_streams == 0 and not gateway.mux.stream_ids())
    await wait_until(lambda: not client.stream_ids())
    ended = [e.stream_id for e in wire.events if isinstance(e, mux.StreamEnded)]
    assert len(ended) == 50   # the echoed ones came back whole and ended
    listener.close()


async def test_a_tunnel_that_ends_drops_its_streams_and_their_pending_data() -> None:
    received, gone = asyncio.Event(), asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set()
        with contextlib.suppress(ConnectionError):
            await reader.read()
        gone.set()

    listener = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client, gateway, _wire = pair()
    stream_id = client.open_stream(mux.Protocol.TCP, "127.0.0.1", port)
    gateway.receive_message(b"".join(client.data_to_send()))
    await gateway.connect_stream(stream_id, DirectDialer(), "127.0.0.1", port)
    await received.wait()
    # The gateway has data for the client beyond the client's window: it waits.
    gateway.mux.send_data(stream_id, bytes(6 * 1024 * 1024))
    assert gateway.mux.pending(stream_id) > 0
    gateway.carrier_closed()
    assert gateway.open_streams == 0 and gateway.mux.stream_ids() == []
    assert gateway.mux.pending(stream_id) == 0 and gateway.mux.data_to_send() == []
    await asyncio.wait_for(gone.wait(), 5)   # and the server's socket was dropped
    listener.close()


def test_a_launch_whose_gateway_stops_answering_ends_and_says_why(
        quick_launch) -> None:  # type: ignore[no-untyped-def]
    gateway, launch = quick_launch
    with stopped(gateway) as since:
        status = launch.popen.wait(15)
        elapsed = time.monotonic() - since
    print(f"the launch gave up on a stopped gateway after {elapsed:.2f} s")
    assert status == 1 and elapsed < DEAD_PEER + 2.0
    assert "the gateway stopped answering (nothing received for" in launch.output()


async def test_an_end_of_file_told_again_once_reading_resumes_sends_one_fin() -> None:
    """uvloop may report a socket's end while reading is paused before its stream is
    accepted (a read under way), and again when reading resumes after the accept: the
    stream sends one FIN and still carries the other direction."""
    gateway = MuxConnection("gateway")
    wire = Wire(gateway)
    session = MuxSession(MuxConnection("client"))
    session.mux.send_hello({"version": 1})
    session.attach(wire)
    gateway.send_hello({"version": 1})
    session.receive_message(b"".join(gateway.data_to_send()))
    bridges: list[StreamBridge] = []

    def local_connection() -> StreamBridge:
        bridges.append(session.open_local(mux.Protocol.TCP, "", 0))
        return bridges[-1]

    listener = await asyncio.get_running_loop().create_server(local_connection,
                                                              "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
    writer.write_eof()
    await wait_until(lambda: bridges and bridges[0].transport is not None)
    bridge = bridges[0]
    bridge.eof_received()   # as uvloop tells it, early; the socket tells it again later
    await wait_until(lambda: any(isinstance(e, mux.StreamOpened) for e in wire.events))
    gateway.accept_stream(bridge.stream_id)
    session.receive_message(b"".join(gateway.data_to_send()))
    await wait_until(lambda: any(isinstance(e, mux.StreamEnded) for e in wire.events))
    gateway.send_data(bridge.stream_id, b"the answer", fin=True)
    session.receive_message(b"".join(gateway.data_to_send()))
    assert await asyncio.wait_for(reader.read(), 10) == b"the answer"
    assert [e for e in wire.events if isinstance(e, mux.StreamEnded)] == [
        mux.StreamEnded(bridge.stream_id)]
    writer.close()
    listener.close()
