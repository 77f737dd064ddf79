"""The byte bridge between two transports: bytes both ways in order, pending bytes first,
either side ending ends both with the counts, and back-pressure (a reader that does not
read stops the other side's reading instead of filling memory). Real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from portcullis.shadow.bridge import Bridge


class _Plain(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()   # type: ignore[attr-defined]


@dataclass
class Pair:
    """Two bridged transports (`bridge`) and the far ends of both (client sockets)."""

    bridge: Bridge
    left: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    right: tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _accepted_pair() -> tuple[asyncio.Transport, tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]]:
    """A server-side transport (reading paused) and the client's streams."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    client = asyncio.ensure_future(asyncio.open_connection("127.0.0.1", port))
    sock, _ = await loop.sock_accept(listener)
    listener.close()
    transport, _ = await loop.connect_accepted_socket(_Plain, sock)
    return transport, await client


async def _bridged(first_pending: bytes = b"", second_pending: bytes = b"",
                   linger: float = 30.0) -> Pair:
    first, left = await _accepted_pair()
    second, right = await _accepted_pair()
    bridge = Bridge(first, second, first_pending=first_pending, second_pending=second_pending,
                    linger=linger)
    return Pair(bridge, left, right)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    made = await _bridged()
    yield made
    made.bridge.close()
    for _, writer in (made.left, made.right):
        writer.close()


async def test_bytes_cross_both_ways_in_order(pair: Pair) -> None:
    (left_reader, left_writer), (right_reader, right_writer) = pair.left, pair.right
    payload = os.urandom(300_000)
    left_writer.write(payload)
    right_writer.write(b"RFB 003.008\n")
    assert await right_reader.readexactly(len(payload)) == payload
    assert await left_reader.readexactly(12) == b"RFB 003.008\n"
    assert pair.bridge.first_to_second == len(payload)
    assert pair.bridge.second_to_first == 12


async def test_pending_bytes_are_delivered_before_anything_else() -> None:
    made = await _bridged(first_pending=b"early-from-first", second_pending=b"early-from-second")
    (left_reader, left_writer), (right_reader, _) = made.left, made.right
    left_writer.write(b"-later")
    assert await right_reader.readexactly(22) == b"early-from-first-later"
    assert await left_reader.readexactly(17) == b"early-from-second"
    made.bridge.close()
    result = await made.bridge.closed
    assert result.first_to_second == 22 and result.second_to_first == 17


async def test_one_side_closing_ends_both_after_flushing(pair: Pair) -> None:
    (left_reader, _), (right_reader, right_writer) = pair.left, pair.right
    right_writer.write(b"last words")
    right_writer.close()
    assert await left_reader.read() == b"last words"   # then EOF: the left side was closed
    assert await right_reader.read() == b""
    result = await asyncio.wait_for(pair.bridge.closed, 10)
    assert result.ended_by == "second"
    assert result.second_to_first == 10


async def test_reset_of_one_side_ends_the_other(pair: Pair) -> None:
    left_writer = pair.left[1]
    sock = left_writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    left_writer.transport.abort()
    right_reader = pair.right[0]
    assert await right_reader.read() == b""
    await asyncio.wait_for(pair.bridge.closed, 10)


async def test_a_side_that_does_not_read_stops_the_other_side_reading(pair: Pair) -> None:
    (_, left_writer), (right_reader, _) = pair.left, pair.right
    # The right client never reads: the bridge's write buffer towards it fills, the
    # bridge pauses reading the left side, and the left client's own buffer fills.
    chunk = b"x" * 65536
    sent = 0
    for _ in range(2000):   # up to 128 MiB if nothing pushed back
        left_writer.write(chunk)
        sent += len(chunk)
        if left_writer.transport.get_write_buffer_size() > 4 * 1024 * 1024:
            break
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    # Push-back reached the sender: the bridge holds far less than was sent.
    assert left_writer.transport.get_write_buffer_size() > 4 * 1024 * 1024
    assert pair.bridge.first_to_second < sent
    # What the bridge itself queues for the slow side stays near the transport's limit.
    bridged_towards_right = pair.bridge._second.transport.get_write_buffer_size()
    assert bridged_towards_right < 2 * 1024 * 1024
    # And once the reader reads, everything arrives.
    received = 0
    while received < sent:
        received += len(await right_reader.read(1 << 20))
    assert received == sent


async def test_a_side_that_never_drains_is_aborted_after_the_linger() -> None:
    made = await _bridged(linger=0.2)
    (_, left_writer), (right_reader, right_writer) = made.left, made.right
    left_writer.write(b"y" * (8 << 20))   # more than the kernel buffers hold
    await asyncio.sleep(0.3)
    made.bridge.close()
    # The right client never reads; the bridge gives up on flushing it.
    result = await asyncio.wait_for(made.bridge.closed, 10)
    assert result.first_to_second > 0
    right_writer.close()
    _ = right_reader
