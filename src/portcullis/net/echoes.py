"""ICMP echo carried as datagrams, answered by the host that can ping: the gateway for a
tunnel's ICMP flow, the relay for a dial-out ICMP flow or a classic 0x81 stream.

One format everywhere (docs/protocol/mux.md, docs/protocol/relay.md): a request is
`u16 sequence + data`, a reply `u16 sequence + u32 round trip in microseconds + data`;
an echo that times out gets no reply.

`EchoResponder` performs the requests of one flow on an `EchoChannel` and sends each
reply back by the callable it is given, whatever carries them; `EchoRequests` is the
asking side of a flow (the relay dialers' EchoChannels): each echo waits for the reply
with its sequence. Echoes are never queued: beyond `MAX_ECHOES_IN_FLIGHT` waiting, or
beyond `MAX_ECHO_DATA` of data, a request is dropped, as a router would drop it. Never
logs payload.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import structlog

from portcullis.errors import DialError
from portcullis.net.dialer import EchoChannel

__all__ = ["MAX_ECHOES_IN_FLIGHT", "MAX_ECHO_DATA", "EchoRequests", "EchoResponder"]

MAX_ECHO_DATA = 1024
MAX_ECHOES_IN_FLIGHT = 16   # per flow
_SEQUENCE = struct.Struct("!H")
_REPLY_HEAD = struct.Struct("!HI")
log = structlog.get_logger("portcullis.echo")


class EchoResponder:
    """Performs the echo requests of one flow; `send_reply(datagram)` sends a reply."""

    def __init__(self, channel: EchoChannel, send_reply: Callable[[bytes], None]) -> None:
        self._channel = channel
        self._send_reply = send_reply
        self._in_flight: set[asyncio.Task[None]] = set()

    def request(self, datagram: bytes) -> None:
        """One request from the flow: echoed, or dropped (malformed, or too many waiting)."""
        if (len(datagram) < _SEQUENCE.size or len(datagram) > _SEQUENCE.size + MAX_ECHO_DATA
                or len(self._in_flight) >= MAX_ECHOES_IN_FLIGHT):
            return
        task = asyncio.ensure_future(self._echo(datagram))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def close(self) -> None:
        """The flow is over: echoes waiting are abandoned and the channel closed."""
        for task in list(self._in_flight):
            task.cancel()
        self._channel.close()

    async def _echo(self, datagram: bytes) -> None:
        (sequence,) = _SEQUENCE.unpack_from(datagram)
        try:
            answer = await self._channel.echo(sequence, bytes(datagram[_SEQUENCE.size:]))
        except DialError as exc:
            log.warning("ICMP echo failed", error=str(exc))
            return
        if answer is not None:
            data, seconds = answer
            rtt = min(int(seconds * 1e6), 0xFFFFFFFF)
            self._send_reply(_REPLY_HEAD.pack(sequence, rtt) + data)


class EchoRequests:
    """The asking side of one flow: `echo` sends a request by `send_request(datagram)`;
    `replied` takes each reply datagram; `end` answers every waiting echo with None."""

    def __init__(self, send_request: Callable[[bytes], None], *, timeout: float) -> None:
        self._send_request = send_request
        self._timeout = timeout
        self._waiting: dict[int, asyncio.Future[tuple[bytes, float] | None]] = {}
        self._over = False

    async def echo(self, sequence: int, data: bytes) -> tuple[bytes, float] | None:
        """(the reply's data, round trip in seconds), or None: no reply in time, the flow
        is over, or the echo was dropped (a sequence already waiting, or too many)."""
        sequence &= 0xFFFF
        if (self._over or sequence in self._waiting
                or len(self._waiting) >= MAX_ECHOES_IN_FLIGHT):
            return None
        reply: asyncio.Future[tuple[bytes, float] | None] = (
            asyncio.get_running_loop().create_future())
        self._waiting[sequence] = reply
        self._send_request(_SEQUENCE.pack(sequence) + data)
        try:
            async with asyncio.timeout(self._timeout):
                return await reply
        except TimeoutError:
            return None
        finally:
            if self._waiting.get(sequence) is reply:
                del self._waiting[sequence]

    def replied(self, datagram: bytes | memoryview) -> None:
        if len(datagram) < _REPLY_HEAD.size:
            return
        sequence, rtt = _REPLY_HEAD.unpack_from(datagram)
        reply = self._waiting.pop(sequence, None)
        if reply is not None and not reply.done():
            reply.set_result((bytes(datagram[_REPLY_HEAD.size:]), rtt / 1e6))

    def end(self) -> None:
        self._over = True
        for reply in self._waiting.values():
            if not reply.done():
                reply.set_result(None)   # no reply will come
        self._waiting.clear()
