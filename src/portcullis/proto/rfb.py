"""The pieces of RFB (VNC, RFC 6143) that Portcullis speaks itself, sans I/O.

The device proxy of shadowing: `classify_first_bytes` tells the secure channel (TLS)
from a plain VNC viewer on the one port both use (5900). `RfbRefusal` is the server
side of the RFB handshake up to a security failure: it answers a plain viewer, when
secure shadowing is mandatory, with a reason the viewer shows its user, instead of a
silent close::

    server: "RFB 003.008\\n"
    client: "RFB 003.00x\\n"
    server: 3.3: security-type u32 = 0, reason-length u32, reason
            3.7 and 3.8: number-of-security-types u8 = 0, reason-length u32, reason

Never does I/O, never reads a clock; any bytes from the viewer end in `finished`.
Specified in docs/protocol/shadow.md, section "Plain viewers".

The gateway of VNC in the browser: `RfbPasswordBridge` stands between a viewer (noVNC)
and a server that asks for a VNC password. It answers the server's VNC authentication
(security type 2, DES challenge-response) with the password, and offers the viewer only
security type None, so the password never reaches the browser; then it steps aside and
the bytes are relayed as they are. Specified in docs/webvnc.md, "The password".
"""

from __future__ import annotations

import struct
from collections.abc import Generator
from typing import Literal

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

__all__ = [
    "MAX_REASON",
    "SECURE_SHADOWING_REQUIRED",
    "SERVER_VERSION",
    "RfbPasswordBridge",
    "RfbRefusal",
    "classify_first_bytes",
    "vnc_authentication_response",
]

#: The version this server offers; a client answers with the one it will speak.
SERVER_VERSION = b"RFB 003.008\n"
_VERSION_LENGTH = len(SERVER_VERSION)
#: Longest reason written, in UTF-8 bytes (a longer one is cut on a character boundary).
MAX_REASON = 1024
#: What a plain viewer's user reads when the device accepts only secure shadowing.
SECURE_SHADOWING_REQUIRED = (
    "secure shadowing is required on this device: plain VNC is refused. "
    "Connect with `portcullis shadow DEVICE` through your Portcullis gateway.")

_TLS_HANDSHAKE = b"\x16\x03"  # record type handshake, protocol version major 3
_RFB = b"RFB "
_U32 = struct.Struct("!I")


def classify_first_bytes(data: bytes | bytearray | memoryview) -> Literal[
        "tls", "rfb-client", "garbage"]:
    """What the first bytes a client sent on the VNC port are. With fewer bytes than a
    signature, a prefix of it counts: a TLS ClientHello and "RFB " cannot share one."""
    head = bytes(data[:4])
    if not head:
        raise ValueError("classify_first_bytes needs at least one byte")
    if _starts_like(head, _TLS_HANDSHAKE):
        return "tls"
    if _starts_like(head, _RFB):
        return "rfb-client"
    return "garbage"


def _starts_like(head: bytes, signature: bytes) -> bool:
    return head.startswith(signature) or signature.startswith(head)


# A ProtocolVersion is "RFB xxx.yyy\n" with decimal digits: checked position by position,
# so a wrong byte ends the handshake as soon as it arrives.
_TEMPLATE = "RFB ddd.ddd\n"


def _byte_fits(index: int, byte: int) -> bool:
    expected = _TEMPLATE[index]
    if expected == "d":
        return 0x30 <= byte <= 0x39
    return byte == ord(expected)


class RfbRefusal:
    """The server side of an RFB handshake that ends in a security failure with `reason`.

    Write `data_to_send()` at once (the server speaks first), feed what the viewer sends
    to `receive_data`, write `data_to_send()` again, and close once `finished`.
    """

    def __init__(self, reason: str) -> None:
        self._reason = _bounded_reason(reason)
        self._output = bytearray(SERVER_VERSION)
        self._received = bytearray()  # the client's ProtocolVersion so far
        self._finished = False
        self._client_version: tuple[int, int] | None = None

    @property
    def finished(self) -> bool:
        """True once the failure is queued, or the client's version was not RFB: write
        what is left of `data_to_send()`, then close."""
        return self._finished

    @property
    def client_version(self) -> tuple[int, int] | None:
        """(major, minor) the client answered, once read; None for an invalid one."""
        return self._client_version

    def data_to_send(self) -> bytes:
        """Take the bytes to write: the server's version first, the failure once the
        client's version is read."""
        output = bytes(self._output)
        self._output.clear()
        return output

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Read the client's 12-byte ProtocolVersion (any split); what follows it, and
        anything once finished, is ignored."""
        if self._finished:
            return
        for byte in bytes(data[: _VERSION_LENGTH - len(self._received)]):
            if not _byte_fits(len(self._received), byte):
                self._finished = True  # not an RFB client: nothing to tell it
                return
            self._received.append(byte)
        if len(self._received) == _VERSION_LENGTH:
            self._answer(int(self._received[4:7]), int(self._received[8:11]))

    def _answer(self, major: int, minor: int) -> None:
        self._finished = True
        if major != 3:
            return  # not a version of RFB 3, the only one there is: nothing to tell it
        self._client_version = (major, minor)
        self._output += _security_failure(minor, self._reason)


def _security_failure(minor: int, reason: bytes) -> bytes:
    """What a server sends a viewer of RFB 3.`minor` to refuse it with `reason`."""
    failure = _U32.pack(len(reason)) + reason
    if minor in (7, 8):
        # An empty list of security types, then the reason.
        return b"\x00" + failure
    # RFC 6143 7.1.1: any other version (3.3, 3.5, Apple's 3.889...) is spoken as 3.3,
    # where the server picks the security type; 0 is "invalid", then the reason.
    return _U32.pack(0) + failure


def _bounded_reason(reason: str) -> bytes:
    encoded = reason.encode("utf-8", "replace")
    if len(encoded) > MAX_REASON:
        encoded = encoded[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return encoded


def _parse_version(version: bytes) -> tuple[int, int] | None:
    """(major, minor) of a 12-byte ProtocolVersion, None if it is not one."""
    if len(version) != _VERSION_LENGTH or not all(
            _byte_fits(index, byte) for index, byte in enumerate(version)):
        return None
    return int(version[4:7]), int(version[8:11])


# -- the gateway between noVNC and a server that asks for a password --------------------

SECURITY_NONE = 1
SECURITY_VNC = 2
_CHALLENGE_LENGTH = 16
#: A server's failure reason longer than this is not read (nor shown) in full.
MAX_SERVER_REASON = 4096

# A handshake step asks for this many bytes and is sent them, whatever the split.
_Steps = Generator[int, bytes, None]


def vnc_authentication_response(password: bytes, challenge: bytes) -> bytes:
    """RFC 6143 7.2.2: the challenge encrypted with DES (ECB), keyed by the password's
    first 8 bytes (zero-padded) with the bits of each byte reversed, as every VNC
    implementation does. Triple DES with the same key three times is single DES."""
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in password[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(challenge) + encryptor.finalize()


class _Side:
    """One side's incoming bytes, handed to that side's step generator in the sizes it
    asks for; whatever arrives past the last step is kept for the relay."""

    def __init__(self, steps: _Steps) -> None:
        self._steps: _Steps | None = steps
        self._buffer = bytearray()
        self._wanted = next(steps)

    @property
    def done(self) -> bool:
        return self._steps is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data
        while self._steps is not None and len(self._buffer) >= self._wanted:
            piece = bytes(self._buffer[: self._wanted])
            del self._buffer[: self._wanted]
            try:
                self._wanted = self._steps.send(piece)
            except StopIteration:
                self._steps = None

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def leftover(self) -> bytes:
        left = bytes(self._buffer)
        self._buffer.clear()
        return left


class RfbPasswordBridge:
    """Between a viewer and a VNC server whose password the gateway knows.

    Towards the server it is the client of RFB up to the SecurityResult: it speaks the
    server's version (3.3, 3.7 or 3.8), picks VNC authentication (or None, if the server
    offers it) and answers the challenge. Only once the server accepted does it greet
    the viewer as a server offering security type None; a server's refusal reaches the
    viewer as an RFB security failure with the server's reason.

    A failure of the server's side (its refusal, or a version or security type the
    gateway cannot speak) reaches the viewer the same way, so the user reads why.

    Feed each side's bytes to `receive_from_server` / `receive_from_viewer`; write
    `data_to_server()` / `data_to_viewer()` after each. When `relaying`, the handshake
    is over and everything is relayed as is (bytes that came past it are already in
    `data_to_*`); when `failure` is set, write what is left to the viewer and close
    both. Never does I/O; a malformed or hostile input ends in `failure`, never raises.
    """

    def __init__(self, password: bytes) -> None:
        self._password = password
        self._to_server = bytearray()
        self._to_viewer = bytearray()
        self._server_reason: bytes | None = None   # the server refused, with this
        self._viewer: _Side | None = None   # greeted once the server's side is done
        self._early_viewer = bytearray()    # what the viewer sent before its greeting
        self.failure: str | None = None
        self.relaying = False
        self._server = _Side(self._server_steps())

    @property
    def viewer_greeted(self) -> bool:
        """The server's side is over (accepted or refused) and the viewer's has begun:
        the server is no longer needed to finish the handshake with the viewer."""
        return self._viewer is not None

    def data_to_server(self) -> bytes:
        output = bytes(self._to_server)
        self._to_server.clear()
        return output

    def data_to_viewer(self) -> bytes:
        output = bytes(self._to_viewer)
        self._to_viewer.clear()
        return output

    def receive_from_server(self, data: bytes | bytearray | memoryview) -> None:
        if self.failure is not None:
            return
        if self.relaying:
            self._to_viewer += data
            return
        self._server.feed(data)
        if not self._server.done:
            return
        if self._viewer is None:
            self._greet_viewer()
        elif self._server.buffered > MAX_SERVER_REASON:
            # A server speaks after the handshake only when asked (ClientInit).
            self._fail("the VNC server sent too much before the viewer was ready")

    def receive_from_viewer(self, data: bytes | bytearray | memoryview) -> None:
        if self.failure is not None:
            return
        if self.relaying:
            self._to_server += data
            return
        if self._viewer is None:
            # A viewer waits for the server's version before it says anything; what
            # one sends early is kept, within reason, for its greeting.
            self._early_viewer += data
            if len(self._early_viewer) > _VERSION_LENGTH:
                self._fail("the viewer spoke before the server's version")
            return
        self._viewer.feed(data)
        self._after_viewer_step()

    def _fail(self, why: str) -> None:
        self.failure = why

    # -- towards the server ------------------------------------------------------------
    def _server_steps(self) -> _Steps:
        version = _parse_version((yield _VERSION_LENGTH))
        if version is None or version[0] != 3:
            self._server_reason = b"the VNC server does not speak RFB 3"
            return
        minor = 8 if version[1] >= 8 else 7 if version[1] == 7 else 3
        self._to_server += f"RFB 003.00{minor}\n".encode()
        if minor == 3:
            # The server picks the type: 0 (refused, with a reason), 1 or 2.
            (chosen,) = _U32.unpack((yield 4))
            if chosen == 0:
                yield from self._server_refusal()
                return
        else:
            (count,) = yield 1
            if count == 0:
                yield from self._server_refusal()
                return
            offered = yield count
            # The password is what the gateway holds; None, if offered, needs nothing.
            chosen = (SECURITY_VNC if SECURITY_VNC in offered
                      else SECURITY_NONE if SECURITY_NONE in offered else 0)
            if chosen:
                self._to_server.append(chosen)
        if chosen == SECURITY_VNC:
            challenge = yield _CHALLENGE_LENGTH
            self._to_server += vnc_authentication_response(self._password, challenge)
        elif chosen != SECURITY_NONE:
            self._server_reason = (b"the VNC server offers no security type the gateway "
                                   b"answers (None or VNC authentication)")
            return
        if chosen == SECURITY_NONE and minor != 8:
            return   # 3.3 and 3.7 send no SecurityResult after None
        (result,) = _U32.unpack((yield 4))
        if result == 0:
            return
        if minor == 8:
            yield from self._server_refusal()
        else:
            self._server_reason = b"authentication failed"

    def _server_refusal(self) -> _Steps:
        (length,) = _U32.unpack((yield 4))
        if length > MAX_SERVER_REASON:
            self._server_reason = b"the VNC server refused (its reason is too long to show)"
            return
        self._server_reason = (yield length) if length else b"refused"

    # -- towards the viewer ------------------------------------------------------------
    def _greet_viewer(self) -> None:
        self._to_viewer += SERVER_VERSION
        self._viewer = _Side(self._viewer_steps())
        early, self._early_viewer = bytes(self._early_viewer), bytearray()
        self._viewer.feed(early)
        self._after_viewer_step()

    def _viewer_steps(self) -> _Steps:
        version = _parse_version((yield _VERSION_LENGTH))
        if version is None or version[0] != 3:
            self._fail("the viewer does not speak RFB 3")
            return
        minor = version[1]
        if self._server_reason is not None:
            self._to_viewer += _security_failure(minor, _bounded_reason(
                self._server_reason.decode("utf-8", "replace")))
            self._fail("the VNC server refused: "
                       + self._server_reason.decode("utf-8", "replace"))
            return
        if minor not in (7, 8):
            self._to_viewer += _U32.pack(SECURITY_NONE)   # 3.3: no result follows
            return
        self._to_viewer += bytes([1, SECURITY_NONE])
        (picked,) = yield 1
        if picked != SECURITY_NONE:
            self._fail("the viewer picked a security type that was not offered")
            return
        if minor == 8:
            self._to_viewer += _U32.pack(0)   # 3.8 confirms even None

    def _after_viewer_step(self) -> None:
        viewer = self._viewer
        if viewer is not None and viewer.done and self.failure is None:
            self.relaying = True
            self._to_server += viewer.leftover()
            self._to_viewer += self._server.leftover()
