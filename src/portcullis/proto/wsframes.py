"""WebSocket frames (RFC 6455 §5.2): where they end in a byte stream, and reading them
fast out of a buffer.

The web proxy relays a WebSocket's bytes as they are; to end one with a proper close
frame, it must know that what it has written so far ends exactly at a frame's end, or
the close frame would land inside a frame's payload. `FrameBoundaries` follows the
frame headers and skips the payloads (never held); `close_frame` is a server's close.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

MAX_CLOSE_REASON = 123   # a control frame's payload is at most 125 bytes, 2 for the code


def header_length(head: bytes | bytearray) -> int | None:
    """The length of the frame header that starts `head`, once its first two bytes are
    known."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    extended = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extended + (4 if head[1] & 0x80 else 0)


def payload_length(head: bytes | bytearray) -> int:
    """The payload length a complete frame header gives."""
    length = head[1] & 0x7F
    if length == 126:
        return int.from_bytes(head[2:4], "big")
    if length == 127:
        return int.from_bytes(head[2:10], "big")
    return length


class FrameBoundaries:
    def __init__(self) -> None:
        self._head = bytearray()     # a header not yet complete
        self._payload_left = 0

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._payload_left:
                skipped = min(self._payload_left, len(data) - at)
                self._payload_left -= skipped
                at += skipped
                continue
            self._head.append(data[at])
            at += 1
            if len(self._head) == header_length(self._head):
                self._payload_left = payload_length(self._head)
                self._head.clear()

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes fed so far end where a frame ends."""
        return not self._head and not self._payload_left


def close_frame(code: int, reason: str) -> bytes:
    """A close frame as a server sends it (unmasked, final)."""
    payload = code.to_bytes(2, "big") + \
        reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore").encode()
    return bytes([0x88, len(payload)]) + payload


# -- reading a WebSocket's frames out of a buffer of its own ------------------------------
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CONTROL_OPCODES = frozenset({CLOSE, PING, PONG})
OPCODES = CONTROL_OPCODES | {CONTINUATION, TEXT, BINARY}
MAX_CONTROL_PAYLOAD = 125
# Room offered for the next read: what the transport says it has (uvloop's TLS: the TLS
# bytes it holds + 256; uvloop's plain TCP: libuv's 64 KiB), at least MIN_READ, at most
# MAX_READ; MIN_FREE when it gives no size (-1: asyncio's own transports). Below it the
# buffer is compacted (or grown).
MIN_FREE = 64 * 1024
MIN_READ = 1024
MAX_READ = 1024 * 1024
# The buffer a WebSocket starts with, and returns to once large frames are over: room for
# what uvloop asks for a full TLS record (16 KiB of data, up to 29 bytes of record
# overhead, + 256). An idle tunnel holds this much, not what its busiest moment needed.
INITIAL_BUFFER = 17 * 1024
# Frames one message may come in: our peers send one frame per message (browsers too).
MAX_FRAGMENTS = 1024

Unmask = Callable[[memoryview, bytes], bytes]


class FrameError(Exception):
    """The peer broke RFC 6455 (or sent what we do not take): close with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class ControlFrame:
    """A whole control frame as it came (header, mask and payload), for the library."""

    raw: bytes


class FrameReader:
    """A WebSocket's incoming frames, read straight out of a buffer this object owns.

    The data path's receiving half: the transport reads (or decrypts) into
    `get_buffer()`, `buffer_updated(n)` returns the complete binary messages and control
    frames found. Each message is one fresh `bytes` (unmasking is that copy), so nothing
    handed out refers to the buffer, which is reused. Control frames are returned raw, for
    the websockets library's protocol object to answer (PING, close handshake); the data
    frames, which are nearly every byte, never go through its generator-based parser and
    its two copies. Checks what the library checks of a data frame: no RSV bits (no
    extension is negotiated), the masking rule of our side, known opcodes, control frames
    final and short, continuation order, the message size limit.
    """

    def __init__(self, *, masked: bool, max_message: int, unmask: Unmask,
                 initial: int = INITIAL_BUFFER) -> None:
        self._masked = masked
        self._max_message = max_message
        self._unmask = unmask
        self._initial = initial
        self._wanted = 0   # the room the last read asked for
        self._buffer = bytearray(initial)
        self._start = 0   # the first byte not parsed yet
        self._end = 0     # the end of what was read
        self._fragments: bytearray | None = None
        self._fragment_count = 0
        self.failure: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes read but not yet parsed (the start of a frame)."""
        return self._end - self._start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the transport may write what it reads next (never empty): room for
        `sizehint` bytes, what the transport says it has (MIN_FREE if it does not say)."""
        wanted = min(max(sizehint, MIN_READ), MAX_READ) if sizehint >= 0 else MIN_FREE
        self._wanted = wanted
        if len(self._buffer) - self._end < wanted:
            self._make_room(wanted)
        return memoryview(self._buffer)[self._end:]

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | ControlFrame]:
        """`get_buffer` and `buffer_updated` for bytes that arrived some other way."""
        view = memoryview(data)
        if len(self._buffer) - self._end < len(view):
            self._make_room(len(view))
        self._buffer[self._end:self._end + len(view)] = view
        return self.buffer_updated(len(view))

    def buffer_updated(self, nbytes: int) -> list[bytes | ControlFrame]:
        """Every complete frame's message or control frame, up to the first bad frame,
        which sets `failure` (and nothing is read after it)."""
        self._end += nbytes
        found: list[bytes | ControlFrame] = []
        if self.failure is not None:
            return found
        try:
            self._parse(found)
        except FrameError as exc:
            self.failure = exc
        return found

    def _parse(self, found: list[bytes | ControlFrame]) -> None:
        buffer = self._buffer
        pos, end = self._start, self._end
        last_frame = 0
        with memoryview(buffer) as view:
            while end - pos >= 2:
                first, second = buffer[pos], buffer[pos + 1]
                opcode = first & 0x0F
                length = second & 0x7F
                header = 2
                if length == 126:
                    header = 4
                    if end - pos < header:
                        break
                    length = int.from_bytes(view[pos + 2:pos + 4], "big")
                elif length == 127:
                    header = 10
                    if end - pos < header:
                        break
                    length = int.from_bytes(view[pos + 2:pos + 10], "big")
                self._check_header(second, opcode, length)
                mask_at = pos + header
                if second & 0x80:
                    header += 4
                stop = pos + header + length
                if stop > end:
                    # Wait for the rest. The buffer grows as bytes arrive (get_buffer),
                    # never ahead of them: a header announcing a large frame that never
                    # comes must not make us hold its size.
                    self._start = pos
                    return
                payload = view[pos + header:stop]
                self._check_frame(first, opcode, length)
                if opcode in CONTROL_OPCODES:
                    found.append(ControlFrame(bytes(view[pos:stop])))
                else:
                    data = (self._unmask(payload, bytes(view[mask_at:mask_at + 4]))
                            if self._masked else bytes(payload))
                    message = self._assemble(opcode, bool(first & 0x80), data)
                    if message is not None:
                        found.append(message)
                pos = stop
                last_frame = header + length
        if pos == end:
            self._start = self._end = 0
            if (len(self._buffer) > max(self._initial, 4 * self._wanted)
                    and last_frame < self._initial // 2):
                # Small frames again: the large ones are over, give their room back. (Not
                # after every large frame, nor while reads ask for a good part of it, as
                # libuv's fixed 64 KiB on plain TCP does: each read would allocate afresh.)
                self._buffer = bytearray(self._initial)
        else:
            self._start = pos

    # The checks in the library's order (websockets' Frame.parse, then Frame.check once
    # the payload is in, then Protocol.recv_frame), so that a broken frame fails with the
    # code the library would give it.
    def _check_header(self, second: int, opcode: int, length: int) -> None:
        if opcode not in OPCODES:
            raise FrameError(1002, "invalid opcode")
        if bool(second & 0x80) != self._masked:
            raise FrameError(1002, "incorrect masking")
        if length > self._max_message - self._fragmented_size:
            raise FrameError(1009, f"message over {self._max_message} bytes")

    def _check_frame(self, first: int, opcode: int, length: int) -> None:
        if first & 0x70:
            raise FrameError(1002, "reserved bits must be 0")
        if opcode in CONTROL_OPCODES:
            if length > MAX_CONTROL_PAYLOAD:
                raise FrameError(1002, "control frame too long")
            if not first & 0x80:
                raise FrameError(1002, "fragmented control frame")
        elif opcode == TEXT:
            # Ours, not the library's: our WebSockets carry binary messages only.
            raise FrameError(1003, "binary messages only")

    def _assemble(self, opcode: int, fin: bool, data: bytes) -> bytes | None:
        fragments = self._fragments
        if opcode == BINARY:
            if fragments is not None:
                raise FrameError(1002, "expected a continuation frame")
            if fin:
                return data
            self._fragments = bytearray(data)
            self._fragment_count = 1
            return None
        if fragments is None:
            raise FrameError(1002, "unexpected continuation frame")
        # Joined as they come, so that a flood of empty fragments holds nothing; and
        # counted, so that it ends.
        self._fragment_count += 1
        if self._fragment_count > MAX_FRAGMENTS:
            raise FrameError(1009, f"message in over {MAX_FRAGMENTS} fragments")
        fragments += data
        if not fin:
            return None
        self._fragments = None
        return bytes(fragments)

    @property
    def _fragmented_size(self) -> int:
        return 0 if self._fragments is None else len(self._fragments)

    def _make_room(self, free: int) -> None:
        """At least `free` bytes after what is buffered: move it to the front, or into a
        larger buffer (a new one: the transport may still hold a view of the old)."""
        held = self._end - self._start
        if len(self._buffer) - held < free:
            larger = bytearray(max(held + free, 2 * len(self._buffer)))
            larger[:held] = memoryview(self._buffer)[self._start:self._end]
            self._buffer = larger
        elif held:
            with memoryview(self._buffer) as view:
                view[:held] = view[self._start:self._end]
        self._start, self._end = 0, held
