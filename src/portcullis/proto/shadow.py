"""Secure shadowing's two wire formats, sans I/O: the hub's signed shadow request and the
channel the console proxy and the device proxy speak inside their mutual TLS connection.

The **signed request** (``sign_request`` / ``parse_signed_request``) is what the hub hands
an operator's console and what the device forwards back to the hub to be verified::

    "PSR1" | body_length u16 | body (canonical JSON) | algorithm u8 (1 = Ed25519)
           | signature_length u16 | signature

The Ed25519 signature covers ``SIGNATURE_CONTEXT + "PSR1" + body_length + body``; the
context keeps a signature made for anything else with the same key from ever passing as
a shadow request. The body is one canonical form only (sorted keys, no blanks, ASCII):
every field is typed and checked, unknown and missing fields are refused, and a body
that is not byte-for-byte the canonical encoding of what it says is refused, so a
request has exactly one encoding.

The **channel** (``ShadowChannel``) runs once per TLS connection between the proxies::

    console -> device   PREFACE "PSH1", then REQUEST(signed request)
    device -> console   ACCEPT({"session": id}) then raw RFB, or REFUSE(reason) and close

Each frame is ``type u8 | length u16 | payload`` with ``payload <= MAX_FRAME``. After
``Accepted`` / ``accept()`` the codec is finished and the I/O layer relays raw bytes.

Time is an argument, as in aioquic: the caller gives ``now`` at construction and to
``handle_timer``, asks ``get_timer()`` when to call it next. Specified in
docs/protocol/shadow.md.

This module never does I/O, never reads a clock, never logs and never raises on bytes
from a peer: malformed input becomes one ``ChannelFailed`` event (the channel), or one
``ShadowProtocolError`` with a reason (``parse_signed_request``). A local misuse (answering
twice, a console calling ``accept``) raises ``ShadowProtocolError``; a bad argument
``ValueError``. Signature checks return a bool and never raise.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections import deque
from dataclasses import asdict, dataclass, fields
from enum import IntEnum
from typing import Literal, TypeAlias

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from portcullis.errors import ProtocolError

__all__ = [
    "ALGORITHM_ED25519",
    "MAGIC",
    "MAX_FRAME",
    "MAX_REASON",
    "MAX_REQUEST_BODY",
    "MAX_SIGNED_REQUEST",
    "PREFACE",
    "REQUEST_LIFETIME_MAX",
    "SIGNATURE_CONTEXT",
    "Accepted",
    "ChannelFailed",
    "ChannelState",
    "FrameType",
    "Refused",
    "RequestReceived",
    "ShadowChannel",
    "ShadowEvent",
    "ShadowProtocolError",
    "ShadowRequest",
    "SignedRequest",
    "displayable_reason",
    "key_id_of",
    "parse_signed_request",
    "sign_request",
    "valid_device_name",
    "valid_session_id",
]

# --- limits and constants ---------------------------------------------------------------

#: Largest channel frame payload, in bytes.
MAX_FRAME = 8192
#: What the console proxy writes before its first frame.
PREFACE = b"PSH1"
#: Longest lifetime of a signed request (expires_at - issued_at), in seconds.
REQUEST_LIFETIME_MAX = 60
#: Longest REFUSE reason, in UTF-8 bytes (longer ones are cut on a character boundary).
MAX_REASON = 1024

#: The signed request's first bytes ("Portcullis Shadow Request", format 1).
MAGIC = b"PSR1"
#: Signed before the request's bytes, so that no other message signed by the hub's key
#: (now or later) can be replayed as a shadow request.
SIGNATURE_CONTEXT = b"portcullis shadow request v1\0"
ALGORITHM_ED25519 = 1
_ED25519_SIGNATURE_SIZE = 64
#: A canonical body is under 3.5 KiB even with a 256-character operator name all
#: escaped as \\uXXXX surrogate pairs; 4 KiB leaves no room for anything else.
MAX_REQUEST_BODY = 4096
_U16 = struct.Struct("!H")
_REQUEST_HEAD = len(MAGIC) + _U16.size
#: The longest well-formed signed request: it always fits one REQUEST frame.
MAX_SIGNED_REQUEST = _REQUEST_HEAD + MAX_REQUEST_BODY + 1 + _U16.size + _ED25519_SIGNATURE_SIZE

# Field checks of the request body.
_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_KEY_ID = re.compile(r"[0-9a-f]{16}\Z")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}\Z")
# A device name is its certificate's common name and DNS subject alternative name: letters,
# digits, '.', '_', '-', starting and ending with a letter or digit, at most 253 characters.
_DEVICE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?\Z")
_MAX_OPERATOR = 256  # characters, as portcullis.identity.names.MAX_USERNAME
# C0 and C1 controls, DEL, and what some terminal or log takes as a line break.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Unix seconds: non-negative and within a signed 64-bit integer, like every peer's clock.
_MAX_TIME = 2**63 - 1
# A session id travels in the ACCEPT frame, URLs of the hub's API and log lines.
_SESSION_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}\Z")


class ShadowProtocolError(ProtocolError):
    """A shadow request or channel frame breaks docs/protocol/shadow.md, or the codec was
    used out of turn; the message says which and why."""


# --- the signed request -----------------------------------------------------------------


@dataclass(frozen=True)
class ShadowRequest:
    """The hub's permission for one operator's console to shadow one device, once, soon."""

    request_id: str  # 32 lowercase hex: the single-use key at the hub
    device: str  # the device's registered name
    device_fingerprint: str  # "sha256:" + 64 lowercase hex of the device certificate's DER
    operator: str  # who shadows (the gateway's user name)
    console_fingerprint: str  # the console proxy's ephemeral certificate, same form
    nonce: str  # 32 lowercase hex
    issued_at: int  # Unix seconds
    expires_at: int  # issued_at < expires_at <= issued_at + REQUEST_LIFETIME_MAX
    key_id: str  # 16 lowercase hex: key_id_of(the hub's public key)


_FIELDS = tuple(field.name for field in fields(ShadowRequest))
_INTEGER_FIELDS = frozenset({"issued_at", "expires_at"})


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of SHA-256 over the raw 32-byte Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def valid_device_name(name: str) -> bool:
    """Whether `name` can be a device's name (and its certificate's DNS name)."""
    return bool(_DEVICE_NAME.match(name))


def valid_session_id(session_id: str) -> bool:
    """Whether `session_id` can travel in an ACCEPT frame: 1-128 of A-Z a-z 0-9 . _ ~ : -"""
    return bool(_SESSION_ID.match(session_id))


def _request_problem(request: ShadowRequest) -> str | None:
    """What is wrong with `request`'s values, or None (types included: the dataclass does
    not check them)."""
    for name in _FIELDS:
        value = getattr(request, name)
        if name in _INTEGER_FIELDS:
            # bool is an int subclass; JSON's true must never pass as 1.
            if type(value) is not int:
                return f"{name} must be an integer (Unix seconds)"
            if not 0 <= value <= _MAX_TIME:
                return f"{name} is out of range (0 to 2^63 - 1)"
        elif type(value) is not str:
            return f"{name} must be a string"
    if not _HEX32.match(request.request_id):
        return "request_id must be 32 lowercase hex digits"
    if not _DEVICE_NAME.match(request.device):
        return ("device must be 1-253 letters, digits, '.', '_' or '-', starting and "
                "ending with a letter or digit")
    if not _FINGERPRINT.match(request.device_fingerprint):
        return "device_fingerprint must be 'sha256:' and 64 lowercase hex digits"
    operator = request.operator
    if not operator or len(operator) > _MAX_OPERATOR:
        return f"operator must be 1-{_MAX_OPERATOR} characters"
    if _CONTROL.search(operator) or _SURROGATE.search(operator):
        return "operator must not contain control characters or lone surrogates"
    if not _FINGERPRINT.match(request.console_fingerprint):
        return "console_fingerprint must be 'sha256:' and 64 lowercase hex digits"
    if not _HEX32.match(request.nonce):
        return "nonce must be 32 lowercase hex digits"
    lifetime = request.expires_at - request.issued_at
    if lifetime <= 0:
        return "expires_at must be after issued_at"
    if lifetime > REQUEST_LIFETIME_MAX:
        return (f"the request lives {lifetime} s; a shadow request lives at most "
                f"{REQUEST_LIFETIME_MAX} s")
    if not _KEY_ID.match(request.key_id):
        return "key_id must be 16 lowercase hex digits"
    return None


def _canonical_body(request: ShadowRequest) -> bytes:
    return json.dumps(asdict(request), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def sign_request(request: ShadowRequest, key: Ed25519PrivateKey) -> bytes:
    """The wire bytes of `request` signed with the hub's `key`; ValueError if a field is
    invalid or `request.key_id` is not this key's id."""
    problem = _request_problem(request)
    if problem is not None:
        raise ValueError(f"cannot sign the shadow request: {problem}")
    if request.key_id != key_id_of(key.public_key()):
        raise ValueError("cannot sign the shadow request: key_id is not the signing key's id")
    body = _canonical_body(request)
    signed_part = MAGIC + _U16.pack(len(body)) + body
    signature = key.sign(SIGNATURE_CONTEXT + signed_part)
    return signed_part + bytes([ALGORITHM_ED25519]) + _U16.pack(len(signature)) + signature


@dataclass(frozen=True)
class SignedRequest:
    """A parsed signed request. Parsing checks the form only: call `signature_valid` with
    the hub's key before believing a word of it."""

    request: ShadowRequest
    signed_part: bytes  # MAGIC + body_length + body, as received (the context is not in it)
    signature: bytes

    def signature_valid(self, public_key: Ed25519PublicKey) -> bool:
        """True if `public_key` has the request's key id and signed exactly these bytes."""
        if not isinstance(public_key, Ed25519PublicKey):
            return False
        if key_id_of(public_key) != self.request.key_id:
            return False
        try:
            public_key.verify(self.signature, SIGNATURE_CONTEXT + self.signed_part)
        except InvalidSignature:
            return False
        return True


def parse_signed_request(data: bytes | bytearray | memoryview) -> SignedRequest:
    """Read a signed request's bytes; ShadowProtocolError saying what is wrong."""
    data = bytes(data)
    if len(data) > MAX_SIGNED_REQUEST:
        raise ShadowProtocolError(
            f"the shadow request is {len(data)} bytes; the limit is {MAX_SIGNED_REQUEST}")
    if not data.startswith(MAGIC) and not MAGIC.startswith(data):
        raise ShadowProtocolError(
            "not a Portcullis shadow request (it does not start with 'PSR1'): ask the hub "
            "for a new one with `portcullis shadow DEVICE`")
    if len(data) < _REQUEST_HEAD:
        raise ShadowProtocolError("the shadow request is truncated in its header")
    (body_length,) = _U16.unpack_from(data, len(MAGIC))
    if body_length > MAX_REQUEST_BODY:
        raise ShadowProtocolError(
            f"the shadow request's body is {body_length} bytes; the limit is {MAX_REQUEST_BODY}")
    body_end = _REQUEST_HEAD + body_length
    if len(data) < body_end + 1 + _U16.size:
        raise ShadowProtocolError("the shadow request is truncated before its signature")
    algorithm = data[body_end]
    if algorithm != ALGORITHM_ED25519:
        raise ShadowProtocolError(
            f"signature algorithm {algorithm} is not supported (only 1, Ed25519)")
    (signature_length,) = _U16.unpack_from(data, body_end + 1)
    if signature_length != _ED25519_SIGNATURE_SIZE:
        raise ShadowProtocolError(
            f"an Ed25519 signature is {_ED25519_SIGNATURE_SIZE} bytes, not {signature_length}")
    signature_start = body_end + 1 + _U16.size
    expected = signature_start + signature_length
    if len(data) != expected:
        raise ShadowProtocolError(
            f"the shadow request is {len(data)} bytes; its lengths say {expected}")
    request = _parse_body(data[_REQUEST_HEAD:body_end])
    return SignedRequest(request, data[:body_end], data[signature_start:])


def _parse_body(body: bytes) -> ShadowRequest:
    # Canonical JSON is printable ASCII: non-ASCII is escaped and control characters are
    # refused in every field. Checking that first keeps every later message about JSON.
    if any(not 0x20 <= byte <= 0x7E for byte in body):
        raise ShadowProtocolError("the shadow request's body is not printable ASCII JSON")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise ShadowProtocolError("the shadow request's body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ShadowProtocolError("the shadow request's body is not a JSON object")
    missing = sorted(set(_FIELDS) - value.keys())
    if missing:
        raise ShadowProtocolError(f"the shadow request lacks {', '.join(missing)}")
    unknown = sorted(value.keys() - set(_FIELDS))
    if unknown:
        shown = ", ".join(repr(name)[:40] for name in unknown[:5])
        raise ShadowProtocolError(f"the shadow request has unknown fields: {shown}")
    request = ShadowRequest(**value)
    problem = _request_problem(request)
    if problem is not None:
        raise ShadowProtocolError(f"invalid shadow request: {problem}")
    if _canonical_body(request) != body:
        # Duplicate keys, blanks, another key order, other escapes, 1e3 for 1000: one
        # request has one encoding, and a signature vouches for one byte string only.
        raise ShadowProtocolError("the shadow request's body is not in canonical form")
    return request


# --- the channel ------------------------------------------------------------------------


class FrameType(IntEnum):
    REQUEST = 1  # console -> device: a signed request
    ACCEPT = 2  # device -> console: JSON {"session": id}; raw RFB follows
    REFUSE = 3  # device -> console: UTF-8 reason; the device closes


class ChannelState(IntEnum):
    IDLE = 0  # console: nothing sent yet
    PREFACE = 1  # device: reading the console's preface
    REQUEST = 2  # device: reading the REQUEST frame
    DECIDING = 3  # device: RequestReceived given, waiting for accept() or refuse()
    ANSWER = 4  # console: request sent, reading the device's ACCEPT or REFUSE
    ACCEPTED = 5  # finished: raw bytes from now on
    REFUSED = 6  # finished: the device refused
    FAILED = 7  # finished: ChannelFailed given


_S = ChannelState
_F = FrameType
_HEADER = struct.Struct("!BH")  # type, payload length

# Which frames a side reads, in which state, and the payload lengths each may have: the
# whole protocol at a glance. Anything else from the peer is a ChannelFailed.
_RECEIVABLE: dict[tuple[str, ChannelState], dict[int, tuple[int, int]]] = {
    ("device", _S.REQUEST): {_F.REQUEST: (1, MAX_FRAME)},
    ("console", _S.IDLE): {_F.REFUSE: (0, MAX_REASON)},  # refused before we asked
    ("console", _S.ANSWER): {_F.ACCEPT: (2, MAX_FRAME), _F.REFUSE: (0, MAX_REASON)},
}


@dataclass(frozen=True)
class RequestReceived:
    """Device side: the console's signed request (unparsed: the device proxy parses it,
    checks the names it carries, and asks the hub)."""

    signed: bytes


@dataclass(frozen=True)
class Accepted:
    """Console side: the channel is up. `leftover` is what followed the ACCEPT frame in the
    same read (the start of the RFB stream): relay it first."""

    session_id: str
    leftover: bytes


@dataclass(frozen=True)
class Refused:
    """Console side: the device refused; `reason` is for the operator."""

    reason: str


@dataclass(frozen=True)
class ChannelFailed:
    """Either side: the peer broke the protocol or took too long. On the device side a
    REFUSE with the reason is queued: write `data_to_send()`, then close."""

    reason: str


ShadowEvent: TypeAlias = RequestReceived | Accepted | Refused | ChannelFailed


def displayable_reason(reason: str) -> str:
    """`reason` safe to show and to send in a REFUSE: controls (and lone surrogates)
    replaced by '?', then cut to MAX_REASON UTF-8 bytes on a character boundary."""
    cleaned = _SURROGATE.sub("?", _CONTROL.sub("?", reason))
    encoded = cleaned.encode("utf-8")
    if len(encoded) <= MAX_REASON:
        return cleaned
    # A prefix of valid UTF-8 is valid but for a last, cut character: "ignore" drops it.
    return encoded[:MAX_REASON].decode("utf-8", "ignore")


def _frame(kind: FrameType, payload: bytes) -> bytes:
    return _HEADER.pack(kind, len(payload)) + payload


def _show(data: bytes | bytearray) -> str:
    return " ".join(f"{byte:02x}" for byte in data)


class ShadowChannel:
    """One end of the channel on one TLS connection between a console and a device proxy.

    Feed `receive_data`, take `next_event()` until None and write `data_to_send()`; call
    `handle_timer(now)` at `get_timer()`. It never buffers more than one frame: a frame's
    length is checked from its 3-byte header, before any of its payload is kept.
    """

    def __init__(self, role: Literal["console", "device"], *, now: float,
                 request_timeout: float = 10.0, answer_timeout: float = 30.0) -> None:
        if role not in ("console", "device"):
            raise ValueError(f"role must be 'console' or 'device', not {role!r}")
        if not request_timeout > 0 or not answer_timeout > 0:
            raise ValueError("request_timeout and answer_timeout must be more than 0")
        self.role: Literal["console", "device"] = role
        self._request_timeout = request_timeout
        self._answer_timeout = answer_timeout
        # The latest time the caller gave: the console's answer timer runs from it.
        self._now = now
        self._state = _S.PREFACE if role == "device" else _S.IDLE
        # The device's whole PREFACE + REQUEST must arrive within request_timeout of the
        # connection (a slow sender holds a connection slot); the console's timer starts
        # with send_request.
        self._deadline: float | None = now + request_timeout if role == "device" else None
        self._buffer = bytearray()  # the part of the preface, header or payload read
        self._frame_type = 0
        self._payload_length: int | None = None  # None while reading a header
        self._accepted_session: str | None = None
        self._events: deque[ShadowEvent] = deque()
        self._output = bytearray()
        self._failure: str | None = None

    # --- state ------------------------------------------------------------------------

    @property
    def state(self) -> ChannelState:
        return self._state

    @property
    def failure(self) -> str | None:
        """Why the channel failed (None while it has not)."""
        return self._failure

    @property
    def buffered(self) -> int:
        """Bytes held of a preface, header or frame not yet complete (<= 3 + MAX_FRAME)."""
        return len(self._buffer)

    # --- local actions ------------------------------------------------------------------

    def send_request(self, signed: bytes, *, now: float | None = None) -> None:
        """Console: write PREFACE and the REQUEST frame, and start the answer timer (from
        `now`, or else the latest time this codec was given)."""
        self._require("console", _S.IDLE, "send_request")
        if not 1 <= len(signed) <= MAX_FRAME:
            raise ValueError(f"a signed request is 1 to {MAX_FRAME} bytes, not {len(signed)}")
        if now is not None:
            self._now = now
        self._output += PREFACE + _frame(_F.REQUEST, bytes(signed))
        self._state = _S.ANSWER
        self._deadline = self._now + self._answer_timeout

    def accept(self, session_id: str) -> None:
        """Device: the hub said yes and the local VNC server is connected; write ACCEPT.
        The codec is finished: relay raw bytes from now on."""
        self._require("device", _S.DECIDING, "accept")
        if not _SESSION_ID.match(session_id):
            raise ValueError("a session id is 1-128 characters of A-Z a-z 0-9 . _ ~ : -")
        payload = json.dumps({"session": session_id}, separators=(",", ":")).encode("ascii")
        self._output += _frame(_F.ACCEPT, payload)
        self._state = _S.ACCEPTED
        self._deadline = None

    def refuse(self, reason: str) -> None:
        """Device: write REFUSE with `reason` (made displayable and cut to MAX_REASON
        bytes), at any time before the answer; then close. Does nothing once the channel
        failed (a REFUSE is already queued)."""
        if self.role != "device":
            raise ShadowProtocolError("refuse() is the device's; the console only closes")
        if self._state is _S.FAILED:
            return
        if self._state not in (_S.PREFACE, _S.REQUEST, _S.DECIDING):
            raise ShadowProtocolError(
                f"refuse() in state {self._state.name}: the channel was already answered")
        self._queue_refuse(reason)
        self._state = _S.REFUSED
        self._deadline = None

    def _require(self, role: str, state: ChannelState, action: str) -> None:
        if self.role != role:
            raise ShadowProtocolError(f"{action}() is the {role}'s, not the {self.role}'s")
        if self._state is not state:
            detail = f": {self._failure}" if self._failure else ""
            raise ShadowProtocolError(
                f"{action}() in state {self._state.name}, not {state.name}{detail}")

    def _queue_refuse(self, reason: str) -> None:
        self._output += _frame(_F.REFUSE, displayable_reason(reason).encode("utf-8"))

    # --- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Read bytes from the peer, in any split. Once refused or failed, input is
        ignored; once accepted it is the relay's (ShadowProtocolError)."""
        state = self._state
        if state is _S.ACCEPTED:
            raise ShadowProtocolError("the channel is up: relay these bytes, do not parse them")
        if state in (_S.REFUSED, _S.FAILED):
            return
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            state = self._state
            if state is _S.PREFACE:
                pos = self._read_preface(view, pos)
            elif state is _S.DECIDING:
                # No byte count: it would depend on how the input was split.
                self._fail("the console sent data before the device answered its request "
                           "(a console must wait for ACCEPT)")
            elif state in (_S.ACCEPTED, _S.REFUSED, _S.FAILED):
                break
            else:
                pos = self._read_frame(view, pos)
        if self._accepted_session is not None:
            # The frame's end, not the chunk's, is where the RFB stream begins.
            self._events.append(Accepted(self._accepted_session, bytes(view[pos:])))
            self._accepted_session = None

    def _take(self, view: memoryview, pos: int, wanted: int) -> int:
        """Move up to `wanted` bytes from view[pos:] into the buffer; the new pos."""
        taken = view[pos: pos + wanted]
        self._buffer += taken
        return pos + len(taken)

    def _read_preface(self, view: memoryview, pos: int) -> int:
        # Byte by byte, so a wrong byte fails at once (never after waiting for more) and
        # the reason names the same bytes however the input was split.
        buffer = self._buffer
        while pos < len(view) and len(buffer) < len(PREFACE):
            buffer.append(view[pos])
            pos += 1
            if buffer[-1] != PREFACE[len(buffer) - 1]:
                self._fail(f"the console did not open the channel with the preface "
                           f"{PREFACE.decode()} (got bytes {_show(buffer)}): it is not a "
                           "Portcullis console proxy, or speaks another version")
                return pos
        if len(buffer) == len(PREFACE):
            buffer.clear()
            self._state = _S.REQUEST
        return pos

    def _read_frame(self, view: memoryview, pos: int) -> int:
        if self._payload_length is None:
            pos = self._take(view, pos, _HEADER.size - len(self._buffer))
            if len(self._buffer) < _HEADER.size:
                return pos
            kind, length = _HEADER.unpack(self._buffer)
            self._buffer.clear()
            problem = self._header_problem(kind, length)
            if problem is not None:
                self._fail(problem)
                return pos
            self._frame_type, self._payload_length = kind, length
        pos = self._take(view, pos, self._payload_length - len(self._buffer))
        if len(self._buffer) == self._payload_length:
            payload = bytes(self._buffer)
            self._buffer.clear()
            self._payload_length = None
            self._on_frame(self._frame_type, payload)
        return pos

    def _header_problem(self, kind: int, length: int) -> str | None:
        allowed = _RECEIVABLE[(self.role, self._state)]
        peer = "device" if self.role == "console" else "console"
        if kind not in allowed:
            try:
                name = _F(kind).name
            except ValueError:
                name = f"a frame of unknown type {kind}"
            expected = " or ".join(_F(k).name for k in allowed)
            return f"the {peer} sent {name} where {expected} was expected"
        low, high = allowed[kind]
        if not low <= length <= high:
            return (f"the {peer}'s {_F(kind).name} frame is {length} bytes; it may be "
                    f"{low} to {high}")
        return None

    def _on_frame(self, kind: int, payload: bytes) -> None:
        if kind == _F.REQUEST:
            self._state = _S.DECIDING
            self._deadline = None
            self._events.append(RequestReceived(payload))
        elif kind == _F.REFUSE:
            try:
                reason = payload.decode("utf-8")
            except UnicodeDecodeError:
                self._fail("the device's REFUSE reason is not UTF-8")
                return
            self._state = _S.REFUSED
            self._deadline = None
            self._events.append(Refused(displayable_reason(reason)))
        else:
            session_id = _session_of(payload)
            if session_id is None:
                self._fail('the device\'s ACCEPT is not {"session": "<id>"}')
                return
            self._state = _S.ACCEPTED
            self._deadline = None
            self._accepted_session = session_id  # receive_data adds the leftover bytes

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._state = _S.FAILED
        self._deadline = None
        self._buffer = bytearray()  # not clear(): the reason may have been built from it
        self._payload_length = None
        if self.role == "device":
            self._queue_refuse(reason)
        self._events.append(ChannelFailed(reason))

    # --- time ---------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` must next be called (absolute, on the caller's clock), or
        None when no timer runs."""
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Fail the channel if its timer is due at `now`; calling early does nothing."""
        self._now = now
        if self._deadline is None or now < self._deadline:
            return
        if self.role == "device":
            self._fail(f"no shadow request within {self._request_timeout:g} s")
        else:
            self._fail(f"no answer from the device within {self._answer_timeout:g} s")

    # --- output ---------------------------------------------------------------------------

    def next_event(self) -> ShadowEvent | None:
        """The oldest event not yet taken, or None."""
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Take the bytes to write to the peer."""
        output = bytes(self._output)
        self._output.clear()
        return output


def _session_of(payload: bytes) -> str | None:
    try:
        value = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or value.keys() != {"session"}:
        return None
    session_id = value["session"]
    if not isinstance(session_id, str) or not _SESSION_ID.match(session_id):
        return None
    return session_id
