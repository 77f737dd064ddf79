"""The signed shadow request and the console<->device channel (docs/protocol/shadow.md),
specified by the bytes they read and write, with time as an argument."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from portcullis.errors import ProtocolError
from portcullis.proto.shadow import (
    MAX_FRAME,
    MAX_REASON,
    MAX_SIGNED_REQUEST,
    PREFACE,
    REQUEST_LIFETIME_MAX,
    SIGNATURE_CONTEXT,
    Accepted,
    ChannelFailed,
    ChannelState,
    Refused,
    RequestReceived,
    ShadowChannel,
    ShadowEvent,
    ShadowProtocolError,
    ShadowRequest,
    SignedRequest,
    displayable_reason,
    key_id_of,
    parse_signed_request,
    sign_request,
)

HUB_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
KEY_ID = "56475aa75463474c"
REQUEST = ShadowRequest(
    request_id="0123456789abcdef0123456789abcdef",
    device="pc-042",
    device_fingerprint="sha256:" + "a" * 64,
    operator="alice",
    console_fingerprint="sha256:" + "b" * 64,
    nonce="fedcba9876543210fedcba9876543210",
    issued_at=1_800_000_000,
    expires_at=1_800_000_060,
    key_id=KEY_ID,
)
BODY = (
    b'{"console_fingerprint":"sha256:' + b"b" * 64 + b'","device":"pc-042",'
    b'"device_fingerprint":"sha256:' + b"a" * 64 + b'","expires_at":1800000060,'
    b'"issued_at":1800000000,"key_id":"56475aa75463474c",'
    b'"nonce":"fedcba9876543210fedcba9876543210","operator":"alice",'
    b'"request_id":"0123456789abcdef0123456789abcdef"}'
)
# Ed25519 (RFC 8032) is deterministic: this is the hub key's signature of the request.
SIGNATURE = bytes.fromhex(
    "372d32c7b802ef301f02be947be51a1540c4d83ef8d87c3f0f943a4e8139fb05"
    "e76b34174bdf519ccbf1d10105b3d427524860ad692bb413fcd7411a32015d0c")
SIGNED = sign_request(REQUEST, HUB_KEY)


def wire(body: bytes, signature: bytes = SIGNATURE, algorithm: int = 1) -> bytes:
    """A signed request's bytes by hand: any body, any signature."""
    return (b"PSR1" + struct.pack("!H", len(body)) + body + bytes([algorithm])
            + struct.pack("!H", len(signature)) + signature)


def body_of(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def request_fields(**changes: object) -> dict[str, object]:
    return {**dataclasses.asdict(REQUEST), **changes}


def rejected(data: bytes) -> str:
    with pytest.raises(ShadowProtocolError) as caught:
        parse_signed_request(data)
    return str(caught.value)


# --- the signed request: exact bytes ---------------------------------------------------


def test_the_key_id_is_sha256_of_the_raw_public_key_cut_to_16_hex_digits() -> None:
    assert key_id_of(HUB_KEY.public_key()) == KEY_ID


def test_a_known_request_signs_to_known_bytes() -> None:
    assert SIGNED == (b"PSR1" + b"\x01\x8b" + BODY + b"\x01" + b"\x00\x40" + SIGNATURE)
    assert len(BODY) == 0x18B


def test_the_signature_covers_the_context_the_magic_the_length_and_the_body() -> None:
    public = HUB_KEY.public_key()
    public.verify(SIGNATURE, SIGNATURE_CONTEXT + b"PSR1\x01\x8b" + BODY)
    assert SIGNATURE_CONTEXT == b"portcullis shadow request v1\x00"
    # Without the context the same bytes do not verify: a signature for anything else
    # made with the hub's key is no shadow request.
    assert not SignedRequest(REQUEST, BODY, HUB_KEY.sign(b"PSR1\x01\x8b" + BODY)) \
        .signature_valid(public)


def test_a_signed_request_parses_back_and_its_signature_is_valid() -> None:
    parsed = parse_signed_request(SIGNED)
    assert parsed.request == REQUEST
    assert parsed.signed_part == b"PSR1\x01\x8b" + BODY
    assert parsed.signature == SIGNATURE
    assert parsed.signature_valid(HUB_KEY.public_key())


def test_a_non_ascii_operator_is_escaped_in_the_body_and_read_back() -> None:
    request = dataclasses.replace(REQUEST, operator="jörg 😀")
    signed = sign_request(request, HUB_KEY)
    assert b'"operator":"j\\u00f6rg \\ud83d\\ude00"' in signed
    assert parse_signed_request(signed).request == request


# --- the signed request: signatures that fail ------------------------------------------


def test_another_keys_signature_is_not_valid() -> None:
    parsed = parse_signed_request(SIGNED)
    assert not parsed.signature_valid(OTHER_KEY.public_key())


def test_a_request_signed_by_another_key_under_our_key_id_is_not_valid() -> None:
    forged = wire(BODY, OTHER_KEY.sign(SIGNATURE_CONTEXT + b"PSR1\x01\x8b" + BODY))
    assert not parse_signed_request(forged).signature_valid(HUB_KEY.public_key())


def test_a_request_naming_another_key_id_is_not_valid_even_for_that_key() -> None:
    other_id = key_id_of(OTHER_KEY.public_key())
    signed = sign_request(dataclasses.replace(REQUEST, key_id=other_id), OTHER_KEY)
    parsed = parse_signed_request(signed)
    assert parsed.signature_valid(OTHER_KEY.public_key())
    assert not parsed.signature_valid(HUB_KEY.public_key())


@pytest.mark.parametrize("index", range(64))
def test_a_signature_with_one_bit_flipped_is_not_valid(index: int) -> None:
    tampered = bytearray(SIGNATURE)
    tampered[index] ^= 0x01
    assert not parse_signed_request(wire(BODY, bytes(tampered))) \
        .signature_valid(HUB_KEY.public_key())


TAMPERED_VALUES = {
    "request_id": "1123456789abcdef0123456789abcdef",
    "device": "pc-043",
    "device_fingerprint": "sha256:" + "c" * 64,
    "operator": "mallory",
    "console_fingerprint": "sha256:" + "d" * 64,
    "nonce": "0edcba9876543210fedcba9876543210",
    "issued_at": 1_800_000_001,
    "expires_at": 1_800_000_059,
    "key_id": "0000000000000000",
}


@pytest.mark.parametrize("name", sorted(TAMPERED_VALUES))
def test_every_field_changed_under_the_same_signature_is_not_valid(name: str) -> None:
    assert set(TAMPERED_VALUES) == {field.name for field in dataclasses.fields(ShadowRequest)}
    parsed = parse_signed_request(wire(body_of(request_fields(**{name: TAMPERED_VALUES[name]}))))
    assert getattr(parsed.request, name) == TAMPERED_VALUES[name]
    assert not parsed.signature_valid(HUB_KEY.public_key())


@given(st.binary(min_size=64, max_size=64))
def test_signature_valid_never_raises_on_any_signature(signature: bytes) -> None:
    parsed = SignedRequest(REQUEST, SIGNED[:-67], signature)
    assert parsed.signature_valid(HUB_KEY.public_key()) is (signature == SIGNATURE)


def test_signature_valid_is_false_for_a_signature_of_the_wrong_size() -> None:
    assert not SignedRequest(REQUEST, SIGNED[:-67], SIGNATURE[:63]) \
        .signature_valid(HUB_KEY.public_key())


# --- the signed request: refused forms -------------------------------------------------


def test_a_lifetime_over_60_seconds_is_refused_when_read() -> None:
    body = body_of(request_fields(expires_at=1_800_000_061))
    assert rejected(wire(body)) == (
        "invalid shadow request: the request lives 61 s; a shadow request lives at most 60 s")


def test_a_lifetime_over_60_seconds_is_never_signed() -> None:
    late = dataclasses.replace(REQUEST, expires_at=REQUEST.issued_at + REQUEST_LIFETIME_MAX + 1)
    with pytest.raises(ValueError, match="at most 60 s"):
        sign_request(late, HUB_KEY)


@pytest.mark.parametrize("expires_at", [1_800_000_000, 1_799_999_999])
def test_a_request_that_expires_when_or_before_it_is_issued_is_refused(expires_at: int) -> None:
    assert "expires_at must be after issued_at" in rejected(
        wire(body_of(request_fields(expires_at=expires_at))))


def test_signing_with_a_key_that_is_not_the_request_key_id_is_refused() -> None:
    with pytest.raises(ValueError, match="key_id is not the signing key's id"):
        sign_request(REQUEST, OTHER_KEY)


BAD_FIELDS: list[tuple[str, object, str]] = [
    ("request_id", "0123456789ABCDEF0123456789ABCDEF", "request_id must be 32 lowercase hex"),
    ("request_id", "0123", "request_id must be 32 lowercase hex"),
    ("device", "", "device must be 1-253"),
    ("device", "-pc", "device must be 1-253"),
    ("device", "pc 42", "device must be 1-253"),
    ("device", "a" * 254, "device must be 1-253"),
    ("device_fingerprint", "a" * 64, "device_fingerprint must be 'sha256:'"),
    ("device_fingerprint", "sha256:" + "A" * 64, "device_fingerprint must be 'sha256:'"),
    ("device_fingerprint", "sha1:" + "a" * 40, "device_fingerprint must be 'sha256:'"),
    ("console_fingerprint", "sha256:" + "b" * 63, "console_fingerprint must be 'sha256:'"),
    ("operator", "", "operator must be 1-256 characters"),
    ("operator", "x" * 257, "operator must be 1-256 characters"),
    ("operator", "alice\nadmin", "operator must not contain control characters"),
    ("operator", "alice\u2028admin", "operator must not contain control characters"),
    ("operator", "\ud800", "operator must not contain control characters or lone surrogates"),
    ("nonce", "f" * 31, "nonce must be 32 lowercase hex"),
    ("key_id", "56475AA75463474C", "key_id must be 16 lowercase hex"),
    ("issued_at", "1800000000", "issued_at must be an integer"),
    ("issued_at", True, "issued_at must be an integer"),
    ("expires_at", 1_800_000_060.0, "expires_at must be an integer"),
    ("issued_at", -1, "issued_at is out of range"),
    ("expires_at", 2**63, "expires_at is out of range"),
    ("device", 42, "device must be a string"),
    ("operator", None, "operator must be a string"),
    ("nonce", ["f" * 32], "nonce must be a string"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_FIELDS,
                         ids=[f"{name}-{index}" for index, (name, _, _) in enumerate(BAD_FIELDS)])
def test_an_invalid_field_is_refused_with_its_name(name: str, value: object,
                                                   message: str) -> None:
    assert message in rejected(wire(body_of(request_fields(**{name: value}))))


@pytest.mark.parametrize("name", sorted(TAMPERED_VALUES))
def test_a_missing_field_is_refused(name: str) -> None:
    fields = request_fields()
    del fields[name]
    assert rejected(wire(body_of(fields))) == f"the shadow request lacks {name}"


def test_an_unknown_field_is_refused() -> None:
    assert rejected(wire(body_of(request_fields(admin=True)))) == (
        "the shadow request has unknown fields: 'admin'")


@pytest.mark.parametrize("body", [
    BODY.replace(b'","device":', b'", "device":'),  # a blank
    BODY.replace(b"{", b'{"operator":"mallory",', 1),  # a duplicate key (the last wins)
    b'{"device":"pc-042",' + BODY[1:].replace(b',"device":"pc-042"', b""),  # key order
    BODY.replace(b'"alice"', b'"\\u0061lice"'),  # an escape where none is needed
], ids=["blank", "duplicate", "order", "escape"])
def test_a_body_not_in_canonical_form_is_refused(body: bytes) -> None:
    assert rejected(wire(body)) == "the shadow request's body is not in canonical form"


@pytest.mark.parametrize("number", [b"1.80000006e9", b"1800000060.0"])
def test_a_time_written_as_a_json_float_is_refused(number: bytes) -> None:
    assert rejected(wire(BODY.replace(b"1800000060", number))) == (
        "invalid shadow request: expires_at must be an integer (Unix seconds)")


def test_a_time_with_a_leading_zero_is_not_json() -> None:
    assert rejected(wire(BODY.replace(b"1800000060", b"01800000060"))) == (
        "the shadow request's body is not valid JSON")


def test_a_raw_utf8_body_is_refused_as_not_printable_ascii() -> None:
    body = BODY.replace(b'"alice"', '"jörg"'.encode())
    assert rejected(wire(body)) == "the shadow request's body is not printable ASCII JSON"


@pytest.mark.parametrize(("data", "message"), [
    (b"PSR2" + SIGNED[4:], "not a Portcullis shadow request"),
    (b"GET / HTTP/1.1\r\n", "not a Portcullis shadow request"),
    (wire(BODY, algorithm=2), "signature algorithm 2 is not supported"),
    (wire(BODY, SIGNATURE + b"\x00"), "an Ed25519 signature is 64 bytes, not 65"),
    (SIGNED + b"\x00", "its lengths say"),
    (b"PSR1\x10\x01" + bytes(0x1001), "the limit is 4096"),
    (b"PSR1\x00\x02[]\x01\x00\x40" + SIGNATURE, "not a JSON object"),
    (b"PSR1\x00\x02{]\x01\x00\x40" + SIGNATURE, "not valid JSON"),
    (bytes(MAX_SIGNED_REQUEST + 1), "the limit is"),
])
def test_malformed_bytes_are_refused_with_a_reason(data: bytes, message: str) -> None:
    assert message in rejected(data)


def test_every_truncation_of_a_signed_request_is_refused() -> None:
    for length in range(len(SIGNED)):
        rejected(SIGNED[:length])


def test_deeply_nested_json_is_refused_not_a_recursion_crash() -> None:
    body = b"[" * 4000 + b"]" * 96
    assert "not valid JSON" in rejected(wire(body))


# --- the signed request: properties ----------------------------------------------------

HEX32 = st.text("0123456789abcdef", min_size=32, max_size=32)
FINGERPRINTS = st.text("0123456789abcdef", min_size=64, max_size=64).map("sha256:".__add__)
DEVICES = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,40}[A-Za-z0-9])?", fullmatch=True)
OPERATORS = st.text(st.characters(exclude_categories=("Cc", "Cs"),
                                  exclude_characters="\u2028\u2029"), min_size=1, max_size=256)


@st.composite
def requests(draw: st.DrawFn) -> ShadowRequest:
    issued_at = draw(st.integers(0, 2**62))
    return ShadowRequest(
        request_id=draw(HEX32), device=draw(DEVICES), device_fingerprint=draw(FINGERPRINTS),
        operator=draw(OPERATORS), console_fingerprint=draw(FINGERPRINTS), nonce=draw(HEX32),
        issued_at=issued_at,
        expires_at=issued_at + draw(st.integers(1, REQUEST_LIFETIME_MAX)), key_id=KEY_ID)


@given(requests())
def test_any_valid_request_round_trips_and_fits_one_frame(request: ShadowRequest) -> None:
    signed = sign_request(request, HUB_KEY)
    assert len(signed) <= MAX_SIGNED_REQUEST <= MAX_FRAME
    parsed = parse_signed_request(signed)
    assert parsed.request == request
    assert parsed.signature_valid(HUB_KEY.public_key())


@given(st.binary(max_size=600))
def test_arbitrary_bytes_are_a_request_or_one_protocol_error(data: bytes) -> None:
    try:
        parsed = parse_signed_request(data)
    except ShadowProtocolError as error:
        assert str(error)
        return
    assert parse_signed_request(parsed.signed_part + data[len(parsed.signed_part):]) == parsed


@given(st.integers(0, len(SIGNED) - 1), st.integers(1, 255))
def test_any_changed_byte_is_refused_or_fails_the_signature(index: int, xor: int) -> None:
    tampered = bytearray(SIGNED)
    tampered[index] ^= xor
    try:
        parsed = parse_signed_request(bytes(tampered))
    except ShadowProtocolError:
        return
    assert not parsed.signature_valid(HUB_KEY.public_key())


def test_the_protocol_error_is_a_portcullis_protocol_error() -> None:
    assert issubclass(ShadowProtocolError, ProtocolError)


# --- the channel: helpers --------------------------------------------------------------


def events(channel: ShadowChannel) -> list[ShadowEvent]:
    found = []
    while (event := channel.next_event()) is not None:
        found.append(event)
    return found


def frame(kind: int, payload: bytes) -> bytes:
    return struct.pack("!BH", kind, len(payload)) + payload


def refuse_frame(reason: str) -> bytes:
    return frame(3, reason.encode())


def deciding_device() -> ShadowChannel:
    device = ShadowChannel("device", now=100.0)
    device.receive_data(PREFACE + frame(1, SIGNED))
    assert events(device) == [RequestReceived(SIGNED)]
    return device


# --- the channel: exact bytes ----------------------------------------------------------


def test_the_console_writes_the_preface_then_one_request_frame() -> None:
    console = ShadowChannel("console", now=0.0)
    console.send_request(SIGNED)
    assert console.data_to_send() == b"PSH1" + b"\x01" + struct.pack("!H", 468) + SIGNED
    assert console.state is ChannelState.ANSWER


def test_the_device_reads_the_request_and_writes_accept_with_the_session() -> None:
    device = deciding_device()
    assert device.data_to_send() == b""
    device.accept("s-7f3a")
    assert device.data_to_send() == b'\x02\x00\x14{"session":"s-7f3a"}'
    assert device.state is ChannelState.ACCEPTED
    assert device.get_timer() is None


def test_the_device_refuses_with_a_reason() -> None:
    device = deciding_device()
    device.refuse("the hub says: request replayed")
    assert device.data_to_send() == b"\x03\x00\x1ethe hub says: request replayed"
    assert device.state is ChannelState.REFUSED


def test_the_console_gets_the_session_and_the_rfb_bytes_that_followed_accept() -> None:
    console = ShadowChannel("console", now=0.0)
    console.send_request(SIGNED)
    console.receive_data(b'\x02\x00\x10{"session":"s1"}RFB 003.008\n')
    assert events(console) == [Accepted("s1", b"RFB 003.008\n")]
    assert console.get_timer() is None
    with pytest.raises(ShadowProtocolError, match="relay these bytes"):
        console.receive_data(b"more")


def test_the_console_hears_a_refusal() -> None:
    console = ShadowChannel("console", now=0.0)
    console.send_request(SIGNED)
    console.receive_data(refuse_frame("request expired") + b"ignored")
    assert events(console) == [Refused("request expired")]
    console.receive_data(b"after the refusal")
    assert events(console) == []
    assert console.data_to_send().startswith(PREFACE)


def test_the_console_hears_a_refusal_sent_before_it_asked() -> None:
    console = ShadowChannel("console", now=0.0)
    console.receive_data(refuse_frame("no shadow request within 10 s"))
    assert events(console) == [Refused("no shadow request within 10 s")]
    with pytest.raises(ShadowProtocolError, match="send_request\\(\\) in state REFUSED"):
        console.send_request(SIGNED)


def test_both_ends_agree_one_byte_at_a_time() -> None:
    console = ShadowChannel("console", now=0.0)
    device = ShadowChannel("device", now=0.0)
    console.send_request(SIGNED)
    for byte in console.data_to_send():
        device.receive_data(bytes([byte]))
    assert events(device) == [RequestReceived(SIGNED)]
    device.accept("s1")
    wire_bytes = device.data_to_send() + b"RFB"
    got: list[ShadowEvent] = []
    relayed = b""
    for index in range(len(wire_bytes)):
        if console.state is ChannelState.ACCEPTED:
            relayed += wire_bytes[index:index + 1]
            continue
        console.receive_data(wire_bytes[index:index + 1])
        got += events(console)
    assert got == [Accepted("s1", b"")]
    assert relayed == b"RFB"


# --- the channel: failures on the device side ------------------------------------------


def test_garbage_instead_of_the_preface_fails_at_the_first_wrong_byte() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(b"P")
    assert events(device) == []
    device.receive_data(b"X")
    reason = ("the console did not open the channel with the preface PSH1 (got bytes "
              "50 58): it is not a Portcullis console proxy, or speaks another version")
    assert events(device) == [ChannelFailed(reason)]
    assert device.data_to_send() == refuse_frame(reason)
    assert device.state is ChannelState.FAILED
    device.receive_data(b"more garbage")  # ignored
    assert events(device) == [] and device.data_to_send() == b""


def test_a_plain_vnc_viewer_speaking_inside_tls_is_refused() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(b"RFB 003.008\n")
    [event] = events(device)
    assert isinstance(event, ChannelFailed)
    assert "got bytes 52" in event.reason


def test_a_frame_other_than_request_first_is_refused() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(PREFACE + frame(2, b'{"session":"x"}'))
    assert events(device) == [ChannelFailed("the console sent ACCEPT where REQUEST was expected")]


def test_a_frame_of_unknown_type_is_refused() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(PREFACE + b"\x09\x00\x00")
    assert events(device) == [ChannelFailed(
        "the console sent a frame of unknown type 9 where REQUEST was expected")]


def test_an_empty_request_frame_is_refused() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(PREFACE + b"\x01\x00\x00")
    assert events(device) == [ChannelFailed(
        "the console's REQUEST frame is 0 bytes; it may be 1 to 8192")]


def test_a_request_of_1_mib_is_refused_after_its_header_without_buffering_it() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(PREFACE + b"\x01\xff\xff")  # the largest a u16 can announce
    assert events(device) == [ChannelFailed(
        "the console's REQUEST frame is 65535 bytes; it may be 1 to 8192")]
    assert device.buffered == 0
    device.receive_data(bytes(1 << 20))  # the rest of the megabyte: ignored, not kept
    assert device.buffered == 0
    assert events(device) == []
    assert device.data_to_send() == refuse_frame(
        "the console's REQUEST frame is 65535 bytes; it may be 1 to 8192")


def test_a_megabyte_in_one_read_is_refused_from_the_header() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(PREFACE + b"\x01\x20\x01" + bytes(1 << 20))
    assert events(device) == [ChannelFailed(
        "the console's REQUEST frame is 8193 bytes; it may be 1 to 8192")]
    assert device.buffered == 0


def test_the_largest_request_frame_is_read() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(PREFACE + frame(1, bytes(MAX_FRAME)))
    assert events(device) == [RequestReceived(bytes(MAX_FRAME))]


def test_data_after_the_request_before_the_answer_fails_the_channel() -> None:
    device = deciding_device()
    device.receive_data(b"RFB 003.008\n")
    reason = ("the console sent data before the device answered its request (a console "
              "must wait for ACCEPT)")
    assert events(device) == [ChannelFailed(reason)]
    assert device.data_to_send() == refuse_frame(reason)
    with pytest.raises(ShadowProtocolError, match="accept\\(\\) in state FAILED"):
        device.accept("s1")
    device.refuse("the hub said no")  # too late, and harmless: the REFUSE is out
    assert device.data_to_send() == b""


def test_data_in_the_same_read_as_the_request_gives_the_request_then_the_failure() -> None:
    device = ShadowChannel("device", now=0.0)
    device.receive_data(PREFACE + frame(1, SIGNED) + b"x")
    got = events(device)
    assert got[0] == RequestReceived(SIGNED)
    assert isinstance(got[1], ChannelFailed) and len(got) == 2


# --- the channel: timers ---------------------------------------------------------------


def test_the_device_waits_request_timeout_for_preface_and_request() -> None:
    device = ShadowChannel("device", now=100.0, request_timeout=10.0)
    assert device.get_timer() == 110.0
    device.receive_data(PREFACE + b"\x01")  # a slow sender does not move the deadline
    assert device.get_timer() == 110.0
    device.handle_timer(109.5)
    assert events(device) == [] and device.data_to_send() == b""
    device.handle_timer(110.0)
    assert events(device) == [ChannelFailed("no shadow request within 10 s")]
    assert device.data_to_send() == b"\x03\x00\x1dno shadow request within 10 s"
    assert device.get_timer() is None


def test_the_device_timer_stops_once_the_request_is_in() -> None:
    device = deciding_device()
    assert device.get_timer() is None
    device.handle_timer(10_000.0)
    assert events(device) == []


def test_the_console_waits_answer_timeout_from_its_request() -> None:
    console = ShadowChannel("console", now=5.0, answer_timeout=30.0)
    assert console.get_timer() is None
    console.send_request(SIGNED, now=7.0)
    assert console.get_timer() == 37.0
    console.handle_timer(36.9)
    assert events(console) == []
    console.handle_timer(37.0)
    assert events(console) == [ChannelFailed("no answer from the device within 30 s")]
    assert console.data_to_send() == PREFACE + frame(1, SIGNED)  # nothing more: no REFUSE
    assert console.get_timer() is None


def test_the_console_answer_timer_runs_from_the_latest_time_it_was_given() -> None:
    console = ShadowChannel("console", now=5.0, answer_timeout=2.5)
    console.handle_timer(8.0)
    console.send_request(SIGNED)
    assert console.get_timer() == 10.5


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_timeouts_must_be_positive(timeout: float) -> None:
    with pytest.raises(ValueError):
        ShadowChannel("device", now=0.0, request_timeout=timeout)
    with pytest.raises(ValueError):
        ShadowChannel("console", now=0.0, answer_timeout=timeout)


# --- the channel: failures on the console side -----------------------------------------


def answering_console() -> ShadowChannel:
    console = ShadowChannel("console", now=0.0)
    console.send_request(SIGNED)
    console.data_to_send()
    return console


@pytest.mark.parametrize(("data", "reason"), [
    (b"HTTP/1.1 400 Bad Request\r\n", "the device sent a frame of unknown type 72 where "
                                       "ACCEPT or REFUSE was expected"),
    (frame(1, SIGNED), "the device sent REQUEST where ACCEPT or REFUSE was expected"),
    (frame(2, b'{"session":1}'), 'the device\'s ACCEPT is not {"session": "<id>"}'),
    (frame(2, b'{"session":"a b"}'), 'the device\'s ACCEPT is not {"session": "<id>"}'),
    (frame(2, b'{"session":"s","x":1}'), 'the device\'s ACCEPT is not {"session": "<id>"}'),
    (frame(2, b"\xff\xfe"), 'the device\'s ACCEPT is not {"session": "<id>"}'),
    (frame(2, b"[" * 8000), 'the device\'s ACCEPT is not {"session": "<id>"}'),
    (frame(3, b"\xff"), "the device's REFUSE reason is not UTF-8"),
    (frame(3, bytes(MAX_REASON + 1)), "the device's REFUSE frame is 1025 bytes; it may be "
                                      "0 to 1024"),
    (b"\x02\xff\xff", "the device's ACCEPT frame is 65535 bytes; it may be 2 to 8192"),
])
def test_the_console_fails_on_what_no_device_sends(data: bytes, reason: str) -> None:
    console = answering_console()
    console.receive_data(data)
    assert events(console) == [ChannelFailed(reason)]
    assert console.data_to_send() == b""
    assert console.failure == reason


def test_an_accept_before_the_request_fails_the_console() -> None:
    console = ShadowChannel("console", now=0.0)
    console.receive_data(frame(2, b'{"session":"s1"}'))
    assert events(console) == [ChannelFailed(
        "the device sent ACCEPT where REFUSE was expected")]


# --- the channel: reasons --------------------------------------------------------------


def test_a_long_reason_is_cut_to_1024_bytes_on_a_character_boundary() -> None:
    device = deciding_device()
    device.refuse("a" + "é" * 600)  # 1201 bytes; byte 1024 is inside an é
    sent = device.data_to_send()
    assert sent[:3] == b"\x03\x03\xff"  # 1023 bytes
    assert sent[3:].decode() == "a" + "é" * 511
    console = answering_console()
    console.receive_data(sent)
    assert events(console) == [Refused("a" + "é" * 511)]


def test_control_characters_in_a_reason_become_question_marks() -> None:
    assert displayable_reason("no\x1b[2J\r\nway\u2028") == "no?[2J??way?"
    console = answering_console()
    console.receive_data(refuse_frame("bad\x07bell"))
    assert events(console) == [Refused("bad?bell")]


@given(st.text(max_size=1500))
def test_any_reason_arrives_as_its_displayable_form(reason: str) -> None:
    device = ShadowChannel("device", now=0.0)
    device.refuse(reason)
    console = answering_console()
    console.receive_data(device.data_to_send())
    assert events(console) == [Refused(displayable_reason(reason))]
    assert len(displayable_reason(reason).encode()) <= MAX_REASON


# --- the channel: local misuse ---------------------------------------------------------


def test_each_side_has_its_own_actions() -> None:
    console = ShadowChannel("console", now=0.0)
    device = ShadowChannel("device", now=0.0)
    with pytest.raises(ShadowProtocolError, match="the device's, not the console's"):
        console.accept("s1")
    with pytest.raises(ShadowProtocolError, match="refuse\\(\\) is the device's"):
        console.refuse("no")
    with pytest.raises(ShadowProtocolError, match="the console's, not the device's"):
        device.send_request(SIGNED)
    with pytest.raises(ValueError):
        ShadowChannel("viewer", now=0.0)  # type: ignore[arg-type]


def test_the_device_answers_once() -> None:
    device = deciding_device()
    with pytest.raises(ValueError, match="session id"):
        device.accept("not a session id")
    device.accept("s1")
    with pytest.raises(ShadowProtocolError, match="already answered"):
        device.refuse("no")
    with pytest.raises(ShadowProtocolError, match="relay these bytes"):
        device.receive_data(b"RFB")


def test_the_device_may_refuse_before_any_request_arrives() -> None:
    device = ShadowChannel("device", now=0.0)
    device.refuse("the agent is shutting down")
    assert device.data_to_send() == refuse_frame("the agent is shutting down")
    assert device.get_timer() is None
    device.receive_data(PREFACE + frame(1, SIGNED))
    assert events(device) == []


def test_the_device_cannot_accept_before_the_request() -> None:
    device = ShadowChannel("device", now=0.0)
    with pytest.raises(ShadowProtocolError, match="accept\\(\\) in state PREFACE"):
        device.accept("s1")


@pytest.mark.parametrize("size", [0, MAX_FRAME + 1])
def test_the_console_sends_only_a_request_that_fits_a_frame(size: int) -> None:
    console = ShadowChannel("console", now=0.0)
    with pytest.raises(ValueError, match="a signed request is 1 to 8192 bytes"):
        console.send_request(bytes(size))
    assert console.data_to_send() == b""


# --- the channel: properties -----------------------------------------------------------


def outcome(role: str, data: bytes, step: int) -> tuple[list[ShadowEvent], bytes, bytes]:
    """Events, bytes sent, and bytes a shell would relay after Accepted, for `data` fed
    in pieces of `step` bytes."""
    channel = ShadowChannel(role, now=0.0)  # type: ignore[arg-type]
    if role == "console":
        channel.send_request(SIGNED)
        channel.data_to_send()
    got: list[ShadowEvent] = []
    relayed = b""
    for start in range(0, len(data), step):
        piece = data[start:start + step]
        if channel.state is ChannelState.ACCEPTED:
            relayed += piece
            continue
        channel.receive_data(piece)
        got += events(channel)
    merged: list[ShadowEvent] = []
    for event in got:
        if isinstance(event, Accepted):
            relayed = event.leftover + relayed
            event = Accepted(event.session_id, b"")
        merged.append(event)
    assert channel.buffered <= 3 + MAX_FRAME
    return merged, channel.data_to_send(), relayed


CHANNEL_BYTES = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda tail: PREFACE + tail),
    st.binary(max_size=200).map(lambda tail: PREFACE + frame(1, SIGNED) + tail),
    st.binary(max_size=200).map(lambda tail: frame(2, b'{"session":"s1"}') + tail),
    st.binary(max_size=200).map(lambda tail: frame(3, b"no") + tail),
)


@settings(max_examples=300)
@given(st.sampled_from(["console", "device"]), CHANNEL_BYTES, st.integers(1, 40))
def test_any_bytes_in_any_split_give_the_same_outcome_and_never_raise(
        role: str, data: bytes, step: int) -> None:
    whole = outcome(role, data, max(1, len(data)))
    assert outcome(role, data, step) == whole
    assert outcome(role, data, 1) == whole
    events_seen = whole[0]
    # At most one ending, and it is the last event.
    endings = [e for e in events_seen if isinstance(e, Accepted | Refused | ChannelFailed)]
    assert len(endings) <= 1
    if endings:
        assert events_seen[-1] == endings[0]


@given(st.binary(min_size=1, max_size=MAX_FRAME), st.from_regex(r"[A-Za-z0-9._~:-]{1,128}",
                                                                  fullmatch=True))
def test_any_request_and_session_cross_the_channel_unchanged(signed: bytes,
                                                             session: str) -> None:
    console = ShadowChannel("console", now=0.0)
    device = ShadowChannel("device", now=0.0)
    console.send_request(signed)
    device.receive_data(console.data_to_send())
    assert events(device) == [RequestReceived(signed)]
    device.accept(session)
    console.receive_data(device.data_to_send())
    assert events(console) == [Accepted(session, b"")]
