"""The two pieces of RFB (VNC, RFC 6143) the device proxy speaks itself, sans I/O.

`classify_first_bytes` tells the secure channel (TLS) from a plain VNC viewer on the one
port both use (5900). `RfbRefusal` is the server side of the RFB handshake up to a
security failure: it answers a plain viewer, when secure shadowing is mandatory, with a
reason the viewer shows its user, instead of a silent close::

    server: "RFB 003.008\\n"
    client: "RFB 003.00x\\n"
    server: 3.3: security-type u32 = 0, reason-length u32, reason
            3.7 and 3.8: number-of-security-types u8 = 0, reason-length u32, reason

Never does I/O, never reads a clock; any bytes from the viewer end in `finished`.
Specified in docs/protocol/shadow.md, section "Plain viewers".
"""

from __future__ import annotations

import struct
from typing import Literal

__all__ = [
    "MAX_REASON",
    "SECURE_SHADOWING_REQUIRED",
    "SERVER_VERSION",
    "RfbRefusal",
    "classify_first_bytes",
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
        encoded = reason.encode("utf-8", "replace")
        if len(encoded) > MAX_REASON:
            encoded = encoded[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
        self._reason = encoded
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
        failure = _U32.pack(len(self._reason)) + self._reason
        if minor in (7, 8):
            # An empty list of security types, then the reason.
            self._output += b"\x00" + failure
        else:
            # RFC 6143 7.1.1: any other version (3.3, 3.5, Apple's 3.889...) is spoken as
            # 3.3, where the server picks the security type; 0 is "invalid", then the reason.
            self._output += _U32.pack(0) + failure
