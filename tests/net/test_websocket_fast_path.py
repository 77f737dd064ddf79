"""The data path's frame reader (`proto.wsframes.FrameReader`, used by `WebSocketMux`
once open) must behave exactly as the websockets library's own parser would: the same
messages delivered, the same bytes answered (PONGs, close frames, with the same codes),
whatever the frames (valid, broken, fragmented, interleaved with control frames) and
however the bytes are split into reads. Each case runs twice, the fast path on and off."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from portcullis.net import websocket as websocket_module
from portcullis.net.websocket import WebSocketMux
from portcullis.proto.wsframes import ControlFrame, FrameReader

MAX_MESSAGE = 4096


class Wire:
    """A transport that records what is written."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.written += chunk

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.ended = False

    def attach(self, carrier: object) -> None:
        pass

    def receive_message(self, message: bytes) -> None:
        self.messages.append(bytes(message))

    def carrier_closed(self) -> None:
        self.ended = True

    def pause_sources(self) -> None:
        pass

    def resume_sources(self) -> None:
        pass


def opened_server() -> tuple[WebSocketMux, Wire, Recorder]:
    """A server-side WebSocketMux after a real handshake, its session attached."""
    client = ClientProtocol(parse_uri("ws://gateway.test/mux"))
    client.send_request(client.connect())
    server = ServerProtocol(max_size=MAX_MESSAGE)
    wire, recorder = Wire(), Recorder()

    def route(carrier: WebSocketMux, request: Any) -> None:
        websocket_module.accept(carrier, request, lambda c, r: c.attach(recorder))  # type: ignore[arg-type]

    carrier = WebSocketMux(server, on_request=route)
    carrier.connection_made(wire)  # type: ignore[arg-type]
    carrier.data_received(b"".join(client.data_to_send()))
    wire.written.clear()
    return carrier, wire, recorder


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
          mask: bytes | None = b"\x01\x02\x03\x04", length_form: int = 0) -> bytes:
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if length_form == 2 or (not length_form and size > 65535):
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    elif length_form == 1 or (not length_form and size > 125):
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BB", first, mask_bit | size)
    if mask is None:
        return head + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def run(data: bytes, cuts: list[int], *, fast: bool,
        monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], bytes, bool, bool]:
    """What the server side delivers, writes and does, fed `data` cut at `cuts` (a
    WebSocketMux wants a running loop: each run has its own)."""
    async def fed() -> tuple[list[bytes], bytes, bool, bool]:
        return feed(data, cuts, fast=fast, monkeypatch=monkeypatch)

    return asyncio.run(fed())


def feed(data: bytes, cuts: list[int], *, fast: bool,
         monkeypatch: pytest.MonkeyPatch) -> tuple[list[bytes], bytes, bool, bool]:
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(websocket_module, "_at_frame_boundary", lambda websocket: False)
        carrier, wire, recorder = opened_server()
        assert (carrier._reader is not None) == fast
        at = 0
        for cut in [*sorted({min(cut, len(data)) for cut in cuts}), len(data)]:
            piece = data[at:cut]
            at = max(at, cut)
            while piece:
                buffer = carrier.get_buffer(len(piece))
                taken = min(len(buffer), len(piece))
                buffer[:taken] = piece[:taken]
                carrier.buffer_updated(taken)
                piece = piece[taken:]
    return recorder.messages, bytes(wire.written), wire.closed, recorder.ended


def answered(written: bytes) -> list[tuple[int, bytes]]:
    """The frames a server wrote (unmasked), a close frame's payload cut to its code:
    the reason's wording may differ, the code may not."""
    frames, at = [], 0
    while at < len(written):
        opcode, size = written[at] & 0x0F, written[at + 1] & 0x7F
        payload = written[at + 2:at + 2 + size]
        frames.append((opcode, payload[:2] if opcode == 8 else payload))
        at += 2 + size
    return frames


def same_either_way(data: bytes, cuts: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    fast = run(data, cuts, fast=True, monkeypatch=monkeypatch)
    library = run(data, cuts, fast=False, monkeypatch=monkeypatch)
    assert fast[0] == library[0]
    assert answered(fast[1]) == answered(library[1])
    assert fast[2:] == library[2:]


async def test_the_data_path_takes_over_after_the_handshake() -> None:
    carrier, _, recorder = opened_server()
    assert carrier._reader is not None
    data = frame(2, b"hello") + frame(9, b"ping?")
    buffer = carrier.get_buffer(-1)
    buffer[:len(data)] = data
    carrier.buffer_updated(len(data))
    assert recorder.messages == [b"hello"]


CASES = {
    "messages": frame(2, b"a" * 10) + frame(2, b"") + frame(2, b"b" * 300)
    + frame(2, b"c" * 70000 if MAX_MESSAGE > 70000 else b"c" * 4000),
    "fragments with a ping inside": frame(2, b"ab", fin=False) + frame(9, b"p")
    + frame(0, b"cd", fin=False) + frame(0, b"ef") + frame(2, b"after"),
    "close then more": frame(2, b"x") + frame(8, struct.pack("!H", 1000) + b"bye")
    + frame(2, b"ignored"),
    "text": frame(2, b"x") + frame(1, b"text"),
    "reserved bits": frame(2, b"x") + frame(2, b"y", rsv=4),
    "unmasked from a client": frame(2, b"x") + frame(2, b"y", mask=None),
    "unknown opcode": frame(3, b"?"),
    "long control frame": frame(9, b"p" * 126),
    "fragmented control frame": frame(9, b"p", fin=False),
    "continuation without a start": frame(0, b"x"),
    "new message inside a fragmented one": frame(2, b"x", fin=False) + frame(2, b"y"),
    "too big": frame(2, b"z" * (MAX_MESSAGE + 1)),
    "too big in fragments": frame(2, b"z" * 3000, fin=False) + frame(0, b"z" * 3000),
    "huge declared length": frame(2, b"", length_form=2)[:2] + struct.pack("!Q", 1 << 63)
    + b"\x01\x02\x03\x04",
    "long forms for short payloads": frame(2, b"q" * 5, length_form=1)
    + frame(2, b"r" * 5, length_form=2),
    "bad close code": frame(8, struct.pack("!H", 999)),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("split", ["whole", "bytewise", "odd"])
def test_cases_match_the_library(name: str, split: str,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = CASES[name]
    cuts = {"whole": [], "bytewise": list(range(len(data))) if len(data) < 5000 else
            list(range(0, len(data), 97)), "odd": [1, 3, 7, 200, 4001]}[split]
    same_either_way(data, cuts, monkeypatch)


# No text frames here (CASES has them): with the library's parser, our rule for them
# (1003, binary only) is asked only after the library parsed the whole read, so a later
# broken frame in the same read gives its code first; both fail the connection.
frames = st.builds(
    frame,
    opcode=st.sampled_from([0, 0, 2, 2, 2, 8, 9, 10, 3, 11]),
    payload=st.binary(max_size=300).map(lambda b: b.hex().encode())
    | st.binary(min_size=1500, max_size=2500).map(lambda b: b.hex().encode()),
    fin=st.booleans() | st.just(True),
    rsv=st.sampled_from([0, 0, 0, 0, 1]),
    mask=st.sampled_from([b"\x00\x00\x00\x00", b"\xff\x10\x20\x30", None, b"\x05\x06\x07\x08"]),
    length_form=st.sampled_from([0, 0, 0, 1, 2]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(frame_list=st.lists(frames, max_size=8),
       cuts=st.lists(st.integers(0, 12000), max_size=12))
def test_any_frames_any_reads_match_the_library(frame_list: list[bytes], cuts: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    same_either_way(b"".join(frame_list), cuts, monkeypatch)


def test_reader_grows_for_a_large_frame_and_gives_the_room_back() -> None:
    from websockets.speedups import apply_mask

    reader = FrameReader(masked=False, max_message=1 << 20, unmask=apply_mask, initial=65536)
    big = frame(2, b"B" * 300_000, mask=None)
    assert reader.feed(big[:100]) == []
    assert reader.feed(big[100:]) == [b"B" * 300_000]
    assert reader.buffered == 0
    assert reader.feed(frame(2, b"small", mask=None)) == [b"small"]
    assert len(reader.get_buffer()) <= 65536   # small frames again: back to the first size
    assert reader.feed(frame(2, b"x")) == []   # masked, towards a client
    assert reader.failure is not None and reader.failure.code == 1002


def test_the_reader_offers_what_the_transport_says_it_has() -> None:
    """uvloop's TLS asks for what it has decrypted or can (plus 256): an idle WebSocket's
    PINGs fit the small first buffer; a bulk read gets its room in one piece."""
    from websockets.speedups import apply_mask

    from portcullis.proto.wsframes import INITIAL_BUFFER, MAX_READ, MIN_FREE

    reader = FrameReader(masked=True, max_message=1 << 21, unmask=apply_mask)
    for _ in range(3):
        assert len(reader.get_buffer(6 + 256)) == INITIAL_BUFFER
        assert reader.feed(frame(9, b"ping")) == [ControlFrame(frame(9, b"ping"))]
    assert len(reader.get_buffer(16_384 + 29 + 256)) == INITIAL_BUFFER   # a full record fits
    assert len(reader.get_buffer(300_000)) >= 300_000
    assert len(reader.get_buffer(50 * MAX_READ)) < 2 * MAX_READ   # bounded, whatever it says
    assert len(reader.get_buffer()) >= MIN_FREE   # no hint (asyncio's transports): MIN_FREE


def test_the_reader_keeps_the_room_its_reads_ask_for() -> None:
    """uvloop's plain TCP always asks for 64 KiB: small frames must not shrink the buffer
    below that, or every read would allocate it afresh."""
    from websockets.speedups import apply_mask

    reader = FrameReader(masked=False, max_message=1 << 20, unmask=apply_mask)
    buffers = set()
    for _ in range(3):
        room = reader.get_buffer(65_536)
        buffers.add(id(room.obj))
        ping = frame(9, b"ping", mask=None)
        room[:len(ping)] = ping
        assert reader.buffer_updated(len(ping)) == [ControlFrame(ping)]
    assert len(buffers) == 1


def test_a_header_announcing_a_large_frame_holds_only_what_arrived() -> None:
    """A peer that announces a 1 MiB frame and sends nothing more must not make the
    reader set aside 1 MiB (that would be memory for nothing, per connection)."""
    from websockets.speedups import apply_mask

    reader = FrameReader(masked=True, max_message=1 << 21, unmask=apply_mask, initial=65536)
    announced = frame(2, b"\x00" * (1 << 20))
    assert reader.feed(announced[:14]) == []
    assert reader.buffered == 14
    assert len(reader._buffer) == 65536   # what is held is the point
    assert reader.feed(announced[14:]) == [b"\x00" * (1 << 20)]   # and it still arrives


def test_a_flood_of_empty_fragments_ends() -> None:
    from websockets.speedups import apply_mask

    from portcullis.proto.wsframes import MAX_FRAGMENTS

    reader = FrameReader(masked=True, max_message=1 << 20, unmask=apply_mask)
    found = reader.feed(frame(2, b"start", fin=False))
    for _ in range(MAX_FRAGMENTS - 2):
        found += reader.feed(frame(0, b"", fin=False))
    assert found == [] and reader.failure is None
    found += reader.feed(frame(0, b"", fin=False) + frame(0, b"end"))
    assert found == [] and reader.failure is not None and reader.failure.code == 1009
