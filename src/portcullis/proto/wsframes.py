"""Where frames end in a WebSocket byte stream (RFC 6455 §5.2), without parsing them.

The web proxy relays a WebSocket's bytes as they are; to end one with a proper close
frame, it must know that what it has written so far ends exactly at a frame's end, or
the close frame would land inside a frame's payload. `FrameBoundaries` follows the
frame headers and skips the payloads (never held); `close_frame` is a server's close.
"""

from __future__ import annotations

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
