"""Datagrams carried on a byte stream: each one a 2-byte big-endian length and its bytes.

The relay's SOCKS5 extensions (docs/protocol/relay.md) carry UDP and ICMP echo inside
the mutual-TLS connection instead of as plain UDP beside it: after the SOCKS reply, each
side writes datagrams framed this way. `StreamDatagrams` is the decoder (feed it bytes
in any split, take whole datagrams); `frame_datagram` the encoder.

Sans I/O: never reads a socket or a clock. An empty datagram is legal (UDP allows it).
A length above the decoder's limit ends the stream: `receive_data` still returns every
datagram that came before it (so the outcome never depends on how the bytes were split),
sets `failure`, and returns nothing from then on; the caller checks `failure` after
delivering what it got.
"""

from __future__ import annotations

import struct

__all__ = ["MAX_DATAGRAM", "StreamDatagrams", "frame_datagram"]

_LENGTH = struct.Struct("!H")
#: The largest datagram a 2-byte length can frame (UDP's own limit is a little lower).
MAX_DATAGRAM = 0xFFFF


def frame_datagram(payload: bytes | bytearray | memoryview) -> bytes:
    """The bytes that carry `payload` as one datagram."""
    if len(payload) > MAX_DATAGRAM:
        raise ValueError(f"a datagram of {len(payload)} bytes is over {MAX_DATAGRAM}")
    return _LENGTH.pack(len(payload)) + bytes(payload)


class StreamDatagrams:
    """Splits a byte stream back into the datagrams `frame_datagram` made."""

    def __init__(self, max_datagram: int = MAX_DATAGRAM) -> None:
        if not 0 <= max_datagram <= MAX_DATAGRAM:
            raise ValueError(f"max_datagram must be 0..{MAX_DATAGRAM}")
        self._max = max_datagram
        self._buffer = bytearray()
        self._failure: str | None = None

    @property
    def failure(self) -> str | None:
        """Why the stream broke the framing (None while it has not)."""
        return self._failure

    @property
    def buffered(self) -> int:
        """Bytes held of a datagram not yet complete (at most max_datagram + 1)."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed bytes; return every datagram they complete, in order (those before a
        framing fault too; then `failure` is set)."""
        if self._failure is not None:
            return []
        buffer = self._buffer
        buffer += data
        datagrams: list[bytes] = []
        offset = 0
        while len(buffer) - offset >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            if size > self._max:
                self._failure = f"a datagram of {size} bytes is over the limit of {self._max}"
                buffer.clear()
                return datagrams
            end = offset + _LENGTH.size + size
            if len(buffer) < end:
                break
            datagrams.append(bytes(buffer[offset + _LENGTH.size:end]))
            offset = end
        del buffer[:offset]
        return datagrams
