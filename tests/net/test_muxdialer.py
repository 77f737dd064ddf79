"""The dial-out Dialer against a relay session in the same process: two MuxSessions
joined by an in-memory carrier, the relay side dialling real loopback servers."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import cast

import pytest

from portcullis.errors import DialError
from portcullis.net.dialer import DirectDialer
from portcullis.net.muxdialer import MuxDialer
from portcullis.net.muxsession import MuxSession
from portcullis.proto import mux
from portcullis.proto.mux import Limits, MuxConnection, Reason

WINDOW = 64 * 1024


class Carrier:
    """Delivers one side's messages to the other on the next loop turn, as a socket
    would (never re-entrantly)."""

    def __init__(self) -> None:
        self.peer: MuxSession | None = None
        self.closed = False

    def send_message(self, chunks: Sequence[bytes | memoryview]) -> None:
        message = b"".join(chunks)
        if not self.closed:
            asyncio.get_running_loop().call_soon(self._deliver, message)

    def _deliver(self, message: bytes) -> None:
        if self.peer is not None and not self.closed:
            self.peer.receive_message(message)

    def close(self, code: int, reason: str) -> None:
        self.closed = True


async def relay_answers(session: MuxSession, event: mux.StreamOpened) -> None:
    """The relay's part, minus its allow-list: refuse port 9, dial everything else."""
    dialer = DirectDialer(timeout=5)
    if event.port == 9:
        session.refuse(event.stream_id, Reason.DENIED, "the relay does not allow it")
    elif event.protocol == mux.Protocol.UDP:
        await session.connect_flow(event.stream_id, dialer, event.host, event.port,
                                   idle_timeout=30)
    elif event.protocol == mux.Protocol.ICMP:
        await session.connect_echo(event.stream_id, dialer, event.host, idle_timeout=30)
    else:
        await session.connect_stream(event.stream_id, dialer, event.host, event.port)


class OneRelay:
    def __init__(self, session: MuxSession) -> None:
        self.current = session

    async def session(self) -> MuxSession:
        return self.current


@pytest.fixture
async def joined() -> AsyncIterator[tuple[MuxSession, MuxSession]]:
    limits = Limits(initial_window=WINDOW)
    edge = MuxSession(MuxConnection("gateway", limits))
    relay = MuxSession(MuxConnection("client", limits), on_open=relay_answers)
    to_relay, to_edge = Carrier(), Carrier()
    to_relay.peer, to_edge.peer = relay, edge
    edge.mux.send_hello({})
    relay.mux.send_hello({})
    edge.attach(to_relay)
    relay.attach(to_edge)
    await edge.hello_within(5)
    yield edge, relay
    edge.carrier_closed()
    relay.carrier_closed()


async def echo_server() -> asyncio.Server:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
    return await asyncio.start_server(echo, "127.0.0.1", 0)


class Collector(asyncio.Protocol):
    """Reads everything; pauses reading after each chunk when `slow`, to push back."""

    def __init__(self, slow: bool = False) -> None:
        self.received = bytearray()
        self.done: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.eof = False
        self.writes_paused = 0
        self.slow = slow
        self.transport: asyncio.Transport | None = None
        self.most_held = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.received += data
        if self.slow and self.transport is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.001, self.transport.resume_reading)

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def pause_writing(self) -> None:
        self.writes_paused += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)


async def test_a_stream_through_the_relay_carries_bytes_intact_both_ways_under_credit(
        joined: tuple[MuxSession, MuxSession]) -> None:
    edge, _ = joined
    server = await echo_server()
    port = server.sockets[0].getsockname()[1]
    payload = os.urandom(3 * 1024 * 1024)   # many windows: credit must flow back
    transport, protocol = await MuxDialer(OneRelay(edge)).connect(
        "127.0.0.1", port, lambda: Collector(slow=True))
    transport.write(payload)
    transport.write_eof()   # the echo server closes after our FIN: FIN comes back
    async with asyncio.timeout(30):
        while not protocol.eof:
            await asyncio.sleep(0.01)
    assert hashlib.sha256(protocol.received).digest() == hashlib.sha256(payload).digest()
    assert protocol.writes_paused > 0   # the relay's window held our writes back
    transport.close()
    assert await asyncio.wait_for(protocol.done, 5) is None
    await asyncio.sleep(0.05)
    assert edge.open_streams == 0
    server.close()


async def test_a_refusal_by_the_relay_is_a_dial_error_with_its_reason(
        joined: tuple[MuxSession, MuxSession]) -> None:
    edge, _ = joined
    with pytest.raises(DialError) as refused:
        await MuxDialer(OneRelay(edge)).connect("127.0.0.1", 9, Collector)
    assert refused.value.reason is Reason.DENIED
    assert "does not allow" in str(refused.value)


async def test_a_stream_in_flight_ends_with_the_reason_when_the_relay_connection_ends(
        joined: tuple[MuxSession, MuxSession]) -> None:
    edge, _ = joined
    server = await echo_server()
    port = server.sockets[0].getsockname()[1]
    _, protocol = await MuxDialer(OneRelay(edge)).connect("127.0.0.1", port, Collector)
    edge.carrier_closed()
    lost = await asyncio.wait_for(protocol.done, 5)
    assert isinstance(lost, ConnectionError) and "relay connection ended" in str(lost)
    server.close()


async def test_a_udp_flow_through_the_relay_answers_from_the_destination(
        joined: tuple[MuxSession, MuxSession]) -> None:
    edge, _ = joined
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(data[::-1], addr)

    server, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    port = server.get_extra_info("sockname")[1]
    answers: asyncio.Queue[bytes] = asyncio.Queue()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            answers.put_nowait(data)

    transport, _ = await MuxDialer(OneRelay(edge)).connect_udp("127.0.0.1", port, Client)
    transport.sendto(b"hello relay")
    assert await asyncio.wait_for(answers.get(), 5) == b"yaler olleh"
    transport.close()
    server.close()


async def test_a_protocol_that_closes_on_the_relay_s_fin_after_its_own_leaves_the_session_up(
        joined: tuple[MuxSession, MuxSession]) -> None:
    """As the tunnel's bridge does: FIN sent, then the relay's FIN, then close()."""
    edge, _ = joined
    server = await echo_server()
    port = server.sockets[0].getsockname()[1]

    class ClosesAtEof(Collector):
        def eof_received(self) -> bool:
            assert self.transport is not None
            self.transport.close()
            return True

    dialer = MuxDialer(OneRelay(edge))
    for _ in range(3):
        transport, protocol = await dialer.connect("127.0.0.1", port, ClosesAtEof)
        transport.write(b"ping")
        transport.write_eof()
        assert await asyncio.wait_for(protocol.done, 5) is None
        assert bytes(protocol.received) == b"ping"
    await asyncio.sleep(0.05)
    assert not edge.closed.is_set() and edge.open_streams == 0
    server.close()


async def test_an_echo_channel_through_the_relay_gets_the_reply_and_its_round_trip(
        joined: tuple[MuxSession, MuxSession]) -> None:
    edge, _ = joined
    channel = await MuxDialer(OneRelay(edge)).open_echo("127.0.0.1")
    answer = await channel.echo(7, b"ping data")
    assert answer is not None
    data, seconds = answer
    assert data == b"ping data" and 0 <= seconds < 5
    channel.close()
    assert await channel.echo(8, b"after close") is None


async def test_what_arrived_before_the_relays_fin_is_read_after_both_ends_closed(
        joined: tuple[MuxSession, MuxSession]) -> None:
    """A protocol that resumes reading only while its transport is not closing (as the
    tunnel's bridge does) still reads everything held when the relay's FIN ends a stream
    whose own FIN went first: the stream is over, the bytes are not lost."""
    edge, _ = joined
    server = await echo_server()
    port = server.sockets[0].getsockname()[1]

    class ResumesWhileOpen(Collector):
        def data_received(self, data: bytes) -> None:
            self.received += data
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.001, self._resume)

        def _resume(self) -> None:
            assert self.transport is not None
            if not self.transport.is_closing():
                self.transport.resume_reading()

    payload = os.urandom(3 * 1024 * 1024)
    transport, protocol = await MuxDialer(OneRelay(edge)).connect(
        "127.0.0.1", port, ResumesWhileOpen)
    transport.write(payload)
    transport.write_eof()
    async with asyncio.timeout(30):
        while not protocol.eof:
            await asyncio.sleep(0.01)
    assert hashlib.sha256(protocol.received).digest() == hashlib.sha256(payload).digest()
    server.close()
