"""Frame boundaries in a relayed WebSocket stream, and the close frame the gateway
sends at a session's end."""

from __future__ import annotations

from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from portcullis.proto.wsframes import FrameBoundaries, close_frame


def frame(payload: bytes, *, mask: bool = False) -> bytes:
    return Frame(Opcode.BINARY, payload).serialize(mask=mask, extensions=[])


def test_boundaries_are_found_across_any_split_of_frames_of_every_length_form() -> None:
    stream = b"".join(frame(b"x" * size, mask=mask) for size, mask in
                      ((0, False), (5, True), (125, False), (126, False), (70_000, True)))
    ends = set()
    total = 0
    for size, mask in ((0, False), (5, True), (125, False), (126, False), (70_000, True)):
        total += len(frame(b"x" * size, mask=mask))
        ends.add(total)
    for piece in (1, 3, 7, 1000, len(stream)):
        boundaries = FrameBoundaries()
        for at in range(0, len(stream), piece):
            boundaries.feed(stream[at:at + piece])
            end = min(at + piece, len(stream))
            assert boundaries.at_boundary == (end in ends), (piece, end)


def test_the_close_frame_parses_with_its_code_and_a_bounded_reason() -> None:
    reader = StreamReader()
    reader.feed_data(close_frame(1008, "session ended: " + "é" * 100))
    parser = Frame.parse(reader.read_exact, mask=False, extensions=[])
    try:
        next(parser)
    except StopIteration as done:
        parsed = done.value
    assert parsed.opcode is Opcode.CLOSE and parsed.fin
    close = Close.parse(parsed.data)
    assert close.code == 1008 and close.reason.startswith("session ended: é")
    assert len(parsed.data) <= 125
