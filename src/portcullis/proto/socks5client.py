"""The client side of one SOCKS5 handshake (RFC 1928), sans I/O, on the `socksio` codec.

The edge speaks it to a classic-mode relay inside mutual TLS: offer only "no
authentication" (mutual TLS is the authentication), send one command, read the reply::

    handshake = Socks5ClientHandshake(Command.CONNECT, "10.0.0.5", 443)
    transport.write(handshake.data_to_send())      # the greeting and the request
    reply = handshake.receive_data(chunk)          # None until the reply is whole
    early = handshake.take_payload()               # bytes the relay sent after its reply

The request follows the greeting without waiting for the method reply: only "no
authentication" is offered, so the relay has nothing else to choose, and one round trip
between the DMZs is saved per connection (dante and our relay both read it so).

socksio encodes the messages and parses them, but it parses only whole messages and has
no command codes beyond RFC 1928's; this module adds the two things it lacks: the length
of a message in a byte stream (any split of the same bytes gives the same outcome), and
the relay's extension commands (`Command.UDP_IN_STREAM`, `Command.ICMP_ECHO_IN_STREAM`,
docs/protocol/relay.md), whose request differs from a CONNECT's only in the CMD byte.

Never does I/O, never awaits, never reads a clock, never logs.
"""

from __future__ import annotations

import socksio

from portcullis.errors import ProtocolError
from portcullis.proto.socks5 import Command, Reply

__all__ = ["Socks5ClientHandshake"]

_IPV4, _DOMAIN, _IPV6 = 1, 3, 4
_ADDRESS_SIZES = {_IPV4: 4, _IPV6: 16}
_REPLY_HEAD = 4     # VER REP RSV ATYP
_METHOD_REPLY = 2   # VER METHOD


class Socks5ClientHandshake:
    """One SOCKS5 handshake as the client: greeting, one request, one reply."""

    def __init__(self, command: Command, host: str, port: int) -> None:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port must be between 0 and 65535, not {port}")
        self._socks = socksio.SOCKS5Connection()
        self._socks.send(socksio.SOCKS5AuthMethodsRequest(
            [socksio.SOCKS5AuthMethod.NO_AUTH_REQUIRED]))
        self._output = bytearray(self._socks.data_to_send())
        self._output += _request_bytes(command, host, port)
        self._buffer = bytearray()
        self._method_chosen = False
        self._reply: Reply | None = None

    def data_to_send(self) -> bytes:
        output = bytes(self._output)
        self._output.clear()
        return output

    def receive_data(self, data: bytes | bytearray | memoryview) -> Reply | None:
        """Feed what the relay sent; the reply's code once it is whole (then again on
        every later call), None before. ProtocolError if the relay breaks the protocol."""
        if self._reply is not None:
            self._buffer += data   # after the reply: the relayed stream's first bytes
            return self._reply
        self._buffer += data
        if not self._method_chosen:
            if len(self._buffer) < _METHOD_REPLY:
                return None
            self._choose_method(bytes(self._buffer[:_METHOD_REPLY]))
            del self._buffer[:_METHOD_REPLY]
        size = _reply_size(self._buffer)
        if size is None:
            return None
        message = bytes(self._buffer[:size])
        del self._buffer[:size]
        try:
            reply = self._socks.receive_data(message)
        except socksio.ProtocolError as exc:
            raise ProtocolError(f"SOCKS5: the relay's reply is malformed ({exc})") from None
        assert isinstance(reply, socksio.SOCKS5Reply)   # the state after the method reply
        self._reply = Reply(reply.reply_code[0])
        return self._reply

    def take_payload(self) -> bytes:
        """Bytes that came after the reply (the start of the relayed stream)."""
        payload = bytes(self._buffer)
        self._buffer.clear()
        return payload

    def _choose_method(self, message: bytes) -> None:
        if message[0] != 5:
            raise ProtocolError(f"SOCKS5: the relay answered with version {message[0]}, "
                                "not 5: it is not a SOCKS5 server")
        try:
            answer = self._socks.receive_data(message)
        except socksio.ProtocolError:
            answer = None
        if (not isinstance(answer, socksio.SOCKS5AuthReply)
                or answer.method is not socksio.SOCKS5AuthMethod.NO_AUTH_REQUIRED):
            raise ProtocolError(
                f"SOCKS5: the relay does not accept 'no authentication' (it chose method "
                f"{message[1]:#04x}); mutual TLS is how the edge authenticates: configure "
                "the SOCKS server with method none")
        self._method_chosen = True


def _request_bytes(command: Command, host: str, port: int) -> bytes:
    """VER CMD RSV ATYP DST.ADDR DST.PORT. socksio's request encodes the address and
    port; its command type knows only RFC 1928's codes, so the CMD byte is set here."""
    if not 1 <= len(host.encode()) <= 255:
        raise ValueError(f"host must be 1..255 bytes of UTF-8, not {len(host.encode())}")
    request = socksio.SOCKS5CommandRequest.from_address(
        socksio.SOCKS5Command.CONNECT, (host, port)).dumps()
    return request[:1] + bytes([command]) + request[2:]


def _reply_size(buffer: bytearray) -> int | None:
    """The size of the reply at the start of `buffer`, None until it can be known."""
    if len(buffer) < _REPLY_HEAD:
        return None
    kind = buffer[3]
    if kind == _DOMAIN:
        if len(buffer) < _REPLY_HEAD + 1:
            return None
        size = _REPLY_HEAD + 1 + buffer[_REPLY_HEAD] + 2
    elif kind in _ADDRESS_SIZES:
        size = _REPLY_HEAD + _ADDRESS_SIZES[kind] + 2
    else:
        raise ProtocolError(f"SOCKS5: the relay's reply has unknown address type {kind}")
    return size if len(buffer) >= size else None
