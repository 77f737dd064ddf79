"""MuxSession's stream lifecycle against a real loopback server, with the peer played
by a codec in the test (events in, frames out)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from portcullis.errors import DialError
from portcullis.net.dialer import DirectDialer
from portcullis.net.muxsession import MuxSession
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason


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
            raise DialError("127.0.0.1:9 refused the connection", "refused")

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
