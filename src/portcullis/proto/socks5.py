"""The server side of SOCKS5 (RFC 1928, RFC 1929), sans I/O, for the client's local
SOCKS5 port and for the relay's classic mode (SOCKS5 inside mutual TLS).

The Portcullis client listens on 127.0.0.1 so that applications (``curl
--socks5-hostname``, browsers) send their connections through the tunnel. One
``Socks5Connection`` per accepted connection turns the application's bytes into one
``Request`` and the shell's answer into bytes, like h11's ``Connection``::

    try:
        conn.receive_data(chunk)        # any split: message boundaries do not matter
    except ProtocolError:
        transport.write(conn.data_to_send())  # the refusal, if the RFC has one
        transport.close()
    transport.write(conn.data_to_send())      # the method selection
    request = conn.next_request()       # once; then open a mux stream to request.host
    conn.reply(Reply.SUCCEEDED)         # or reply_for(refusal reason)
    early = conn.take_payload()         # bytes the application sent ahead of the reply

Without ``credentials`` only "no authentication" (method 0) is offered; with them only
user name and password (method 2, RFC 1929), checked here in constant time, so that
other users of the machine cannot use the port. CONNECT and UDP ASSOCIATE are handed
to the shell; BIND is refused here with COMMAND_NOT_SUPPORTED. The UDP ASSOCIATE
datagram header is the pair of pure functions ``parse_udp_datagram`` /
``build_udp_datagram``.

With ``extensions=True`` (the relay only) two Portcullis commands are accepted too:
0x83 UDP_IN_STREAM (datagrams to DST, framed on the same stream by
``proto/streamdatagrams.py`` after the reply) and 0x81 ICMP_ECHO_IN_STREAM (echoes to DST,
an IP address, port 0). Without it they are refused with COMMAND_NOT_SUPPORTED, as a stock
server does; docs/protocol/relay.md has them byte by byte.

Errors are exceptions, as in h11: bytes that break the protocol raise ``ProtocolError``
once, after queueing the reply the RFC has for the fault (``05 FF`` for no acceptable
method, ``01 01`` for a wrong user name or password, a SOCKS reply for a bad request);
the connection is then ``FAILED`` and every later ``receive_data`` raises again. The
allowed state changes are ``_TRANSITIONS``.

This module never does I/O, never awaits, never reads a clock, never logs and never
resolves a name. Between calls it keeps at most one incomplete handshake message (under
514 bytes: RFC 1929's largest) before the request is parsed, and at most
``max_early_data`` bytes of pipelined data while the reply is pending.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from enum import IntEnum

from portcullis.errors import ProtocolError
from portcullis.proto.handshake import ProxyHandshake
from portcullis.proto.mux import Reason
from portcullis.proto.proxyauth import ProxyCredentials

__all__ = [
    "EXTENSION_COMMANDS",
    "MAX_EARLY_DATA",
    "VERSION",
    "Command",
    "Reply",
    "Request",
    "Socks5Connection",
    "State",
    "UdpDatagram",
    "build_udp_datagram",
    "parse_udp_datagram",
    "reason_for",
    "reply_for",
]

VERSION = 5
#: Bytes the client may send after its request while the reply is pending (pipelined
#: early data); the shell should pause reading meanwhile, so this only stops a flood.
MAX_EARLY_DATA = 64 * 1024

_NO_AUTHENTICATION = 0x00
_USER_PASSWORD = 0x02
_USER_PASSWORD_VERSION = 0x01  # RFC 1929's subnegotiation version
_AUTHENTICATED = bytes([_USER_PASSWORD_VERSION, 0x00])
_NOT_AUTHENTICATED = bytes([_USER_PASSWORD_VERSION, 0x01])
_NO_ACCEPTABLE_METHODS = 0xFF
_PORT = struct.Struct("!H")
# A name as DNS can carry it, once IDNA-encoded: labels of 1..63 letters, digits, '-'
# or '_' (used by internal names), an optional final dot. No blanks or controls, so a
# name can never smuggle anything into a mux OPEN or a log line.
_ASCII_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?\Z")


class Command(IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3
    # Portcullis extensions (the relay): UDP and ICMP echo inside the TLS stream.
    ICMP_ECHO_IN_STREAM = 0x81
    UDP_IN_STREAM = 0x83


EXTENSION_COMMANDS = frozenset({Command.ICMP_ECHO_IN_STREAM, Command.UDP_IN_STREAM})
_STANDARD_COMMANDS = frozenset(Command) - EXTENSION_COMMANDS


class Reply(IntEnum):
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class _AddressType(IntEnum):
    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class State(IntEnum):
    GREETING = 0  # waiting for VER NMETHODS METHODS
    AUTHENTICATION = 1  # user/password chosen, waiting for VER ULEN UNAME PLEN PASSWD
    REQUEST = 2  # method chosen, waiting for VER CMD RSV ATYP DST.ADDR DST.PORT
    REPLY_PENDING = 3  # request parsed, the shell has not replied yet
    RELAY = 4  # replied SUCCEEDED: a plain byte stream (or, for UDP, a live association)
    CLOSED = 5  # replied with an error: the shell closes after sending it
    FAILED = 6  # the client broke the protocol, or did not know the password


class _Step(IntEnum):
    GREETING_ACCEPTED = 0
    PASSWORD_CHOSEN = 1
    AUTHENTICATED = 2
    REQUEST_PARSED = 3
    REPLY_SUCCEEDED = 4
    REPLY_REFUSED = 5
    VIOLATION = 6


_T = State
# (state, step) -> next state. Anything not listed cannot happen: a reply outside
# REPLY_PENDING is a local misuse (ProtocolError, nothing changes).
_TRANSITIONS: dict[tuple[State, _Step], State] = {
    (_T.GREETING, _Step.GREETING_ACCEPTED): _T.REQUEST,
    (_T.GREETING, _Step.PASSWORD_CHOSEN): _T.AUTHENTICATION,
    (_T.AUTHENTICATION, _Step.AUTHENTICATED): _T.REQUEST,
    (_T.REQUEST, _Step.REQUEST_PARSED): _T.REPLY_PENDING,
    (_T.REPLY_PENDING, _Step.REPLY_SUCCEEDED): _T.RELAY,
    (_T.REPLY_PENDING, _Step.REPLY_REFUSED): _T.CLOSED,
    # Too much early data, or any byte on the TCP side of a UDP association.
    **{
        (state, _Step.VIOLATION): _T.FAILED
        for state in (_T.GREETING, _T.AUTHENTICATION, _T.REQUEST, _T.REPLY_PENDING, _T.RELAY)
    },
}


@dataclass(frozen=True)
class Request:
    """What the client asked for. ``host`` is dotted IPv4, IPv6 text without brackets,
    or a domain name exactly as the client sent it (validated, never resolved)."""

    command: Command
    host: str
    port: int


@dataclass(frozen=True)
class UdpDatagram:
    """One UDP ASSOCIATE datagram: the far end's address and the payload."""

    host: str
    port: int
    payload: bytes


class _BadAddress(Exception):
    """An address field is wrong; ``reply`` is the SOCKS answer for it."""

    def __init__(self, message: str, reply: Reply) -> None:
        super().__init__(message)
        self.reply = reply


class Socks5Connection(ProxyHandshake[Request]):
    """One accepted SOCKS5 connection: feed it bytes, take the request and bytes to send.

    With ``credentials``, the client must authenticate with them (RFC 1929) first. With
    ``extensions``, the relay's commands 0x81 and 0x83 are accepted."""

    def __init__(self, *, max_early_data: int = MAX_EARLY_DATA,
                 credentials: ProxyCredentials | None = None,
                 extensions: bool = False) -> None:
        if max_early_data < 0:
            raise ValueError("max_early_data must not be negative")
        super().__init__()
        self._max_early_data = max_early_data
        self._credentials = credentials
        self._commands = _STANDARD_COMMANDS | (EXTENSION_COMMANDS if extensions
                                               else frozenset())
        self._state = State.GREETING
        self._buffer = bytearray()  # the start of a greeting or request split across chunks

    # --- state -----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """True once the connection is over: an error reply was given or the client failed."""
        return self._state in (State.CLOSED, State.FAILED)

    # --- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Parse what the client sent; any split of the same bytes has the same outcome.

        Raises ``ProtocolError`` if the client broke the protocol, after queueing the
        answer the RFC has for the fault; every later call raises again. Bytes after the
        request are kept for ``take_payload`` (in RELAY too, so a chunk that was in flight
        when the shell switched to relaying is not lost). Input after an error reply
        (state CLOSED) is ignored: the shell is closing the connection.
        """
        if self._failure is not None:
            raise ProtocolError(f"the SOCKS5 connection already failed: {self._failure}")
        if self._state is State.CLOSED or not data:
            return
        if self._state in (State.GREETING, State.AUTHENTICATION, State.REQUEST):
            self._buffer += data
            self._parse_handshake()
        else:
            self._receive_payload(data)

    # --- output ----------------------------------------------------------------------

    def reply(self, code: Reply, bound_host: str = "0.0.0.0", bound_port: int = 0) -> None:
        """Answer the request. SUCCEEDED makes the connection a relay; any other code
        leaves it CLOSED. ``bound_host``/``bound_port`` are BND.ADDR and BND.PORT: for
        UDP ASSOCIATE, where the client must send its datagrams.

        ``ProtocolError`` if no request is waiting for a reply, ``ValueError`` for a bad
        argument; neither changes anything.
        """
        code = Reply(code)
        message = _reply_message(code, bound_host, bound_port)  # ValueError first
        if self._state is not State.REPLY_PENDING:
            raise ProtocolError(f"cannot reply to a SOCKS5 request in state {self._state.name}")
        self._output += message
        if code is Reply.SUCCEEDED:
            self._advance(_Step.REPLY_SUCCEEDED)
        else:
            self._payload.clear()  # nothing will carry it
            self._advance(_Step.REPLY_REFUSED)

    # --- parsing ---------------------------------------------------------------------

    def _parse_handshake(self) -> None:
        # Each field is checked as soon as its byte is here, in byte order, so a fault
        # is reported identically however the bytes were split.
        if self._state is State.GREETING and not self._parse_greeting():
            return
        if self._state is State.AUTHENTICATION and not self._parse_authentication():
            return
        if self._state is State.REQUEST and not self._parse_request():
            return
        if self._buffer:
            rest = bytes(self._buffer)
            self._buffer.clear()
            self._receive_payload(rest)

    def _parse_greeting(self) -> bool:
        buffer = self._buffer
        if not buffer:
            return False
        if buffer[0] != VERSION:
            raise self._fail(f"greeting has version {buffer[0]}, not 5: not a SOCKS5 client")
        if len(buffer) < 2 or len(buffer) < 2 + buffer[1]:
            return False
        size = 2 + buffer[1]
        methods = buffer[2:size]
        del buffer[:size]
        if self._credentials is not None:
            if _USER_PASSWORD not in methods:
                raise self._fail(
                    "the client does not offer SOCKS5 user name and password, which this "
                    "local port requires",
                    bytes([VERSION, _NO_ACCEPTABLE_METHODS]),
                )
            self._output += bytes([VERSION, _USER_PASSWORD])
            self._advance(_Step.PASSWORD_CHOSEN)
            return True
        if _NO_AUTHENTICATION not in methods:
            raise self._fail(
                "the client does not offer SOCKS5 without authentication, the only method "
                "this local port accepts",
                bytes([VERSION, _NO_ACCEPTABLE_METHODS]),
            )
        self._output += bytes([VERSION, _NO_AUTHENTICATION])
        self._advance(_Step.GREETING_ACCEPTED)
        return True

    def _parse_authentication(self) -> bool:
        """RFC 1929: VER(1) ULEN UNAME PLEN PASSWD, answered 01 00 or 01 01."""
        buffer = self._buffer
        if not buffer:
            return False
        if buffer[0] != _USER_PASSWORD_VERSION:
            raise self._fail(
                f"user/password negotiation has version {buffer[0]}, not 1", _NOT_AUTHENTICATED
            )
        if len(buffer) < 2 or len(buffer) < 3 + buffer[1]:
            return False
        user_end = 2 + buffer[1]
        size = user_end + 1 + buffer[user_end]
        if len(buffer) < size:
            return False
        user = bytes(buffer[2:user_end])
        password = bytes(buffer[user_end + 1 : size])
        del buffer[:size]
        assert self._credentials is not None  # only in this state with credentials
        if not self._credentials.admits(user, password):
            raise self._fail("wrong user name or password", _NOT_AUTHENTICATED)
        self._output += _AUTHENTICATED
        self._advance(_Step.AUTHENTICATED)
        return True

    def _parse_request(self) -> bool:
        buffer = self._buffer
        if not buffer:
            return False
        if buffer[0] != VERSION:
            raise self._refuse(f"request has version {buffer[0]}, not 5", Reply.GENERAL_FAILURE)
        if len(buffer) < 2:
            return False
        if buffer[1] not in self._commands:
            raise self._refuse(f"unknown command {buffer[1]}", Reply.COMMAND_NOT_SUPPORTED)
        command = Command(buffer[1])
        if command is Command.BIND:
            raise self._refuse("BIND is not supported", Reply.COMMAND_NOT_SUPPORTED)
        if len(buffer) < 3:
            return False
        if buffer[2] != 0:
            raise self._refuse(
                f"request has reserved byte {buffer[2]}, not 0", Reply.GENERAL_FAILURE
            )
        try:
            address_size = _address_size(buffer, 3)
            if address_size is None or len(buffer) < 3 + address_size + 2:
                return False
            host = _decode_address(bytes(buffer[3 : 3 + address_size]))
        except _BadAddress as error:
            raise self._refuse(f"request {error}", error.reply) from None
        end = 3 + address_size + 2
        (port,) = _PORT.unpack_from(buffer, end - 2)
        # Port 0 is how UDP ASSOCIATE says "not known yet"; nothing can CONNECT to it.
        if port == 0 and command in (Command.CONNECT, Command.UDP_IN_STREAM):
            raise self._refuse(f"{command.name} to port 0", Reply.GENERAL_FAILURE)
        if command is Command.ICMP_ECHO_IN_STREAM and (
                buffer[3] == _AddressType.DOMAIN or port != 0):
            raise self._refuse("ICMP echo asks for an IP address and port 0",
                               Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        del buffer[:end]
        self._request = Request(command, host, port)
        self._advance(_Step.REQUEST_PARSED)
        return True

    def _receive_payload(self, data: bytes | bytearray | memoryview) -> None:
        request = self._request
        assert request is not None  # only called once the request is parsed
        pending = self._state is State.REPLY_PENDING
        if request.command is Command.UDP_ASSOCIATE:
            # The TCP connection of an association only keeps it alive; datagrams go
            # to the UDP relay. A byte here is not a SOCKS5 client talking.
            message = "data on the TCP connection of a UDP association"
            if pending:
                raise self._refuse(message, Reply.GENERAL_FAILURE)
            raise self._fail(message)
        if pending and len(self._payload) + len(data) > self._max_early_data:
            raise self._refuse(
                f"more than {self._max_early_data} bytes sent before the reply",
                Reply.GENERAL_FAILURE,
            )
        self._payload += data

    # --- state changes ---------------------------------------------------------------

    def _advance(self, step: _Step) -> None:
        self._state = _TRANSITIONS[self._state, step]

    def _refuse(self, message: str, code: Reply) -> ProtocolError:
        return self._fail(message, _reply_message(code, "0.0.0.0", 0))

    def _fail(self, message: str, answer: bytes = b"") -> ProtocolError:
        """Queue ``answer``, mark the connection failed; the caller raises the result."""
        self._output += answer
        self._buffer.clear()
        self._payload.clear()
        self._advance(_Step.VIOLATION)
        self._failure = message
        return ProtocolError(f"SOCKS5: {message}")


# --- addresses -------------------------------------------------------------------------


def _address_size(data: bytes | bytearray | memoryview, offset: int) -> int | None:
    """Size of ATYP + ADDR starting at ``offset``; None until enough bytes are there."""
    if len(data) <= offset:
        return None
    kind = data[offset]
    if kind == _AddressType.IPV4:
        return 1 + 4
    if kind == _AddressType.IPV6:
        return 1 + 16
    if kind != _AddressType.DOMAIN:
        raise _BadAddress(f"has unknown address type {kind}", Reply.ADDRESS_TYPE_NOT_SUPPORTED)
    if len(data) <= offset + 1:
        return None
    if data[offset + 1] == 0:
        raise _BadAddress("has an empty domain name", Reply.HOST_UNREACHABLE)
    return 2 + data[offset + 1]


def _decode_address(field: bytes | memoryview) -> str:
    """The host text of a whole ATYP + ADDR field (its size from ``_address_size``)."""
    kind = field[0]
    if kind == _AddressType.IPV4:
        return str(ipaddress.IPv4Address(bytes(field[1:])))
    if kind == _AddressType.IPV6:
        return str(ipaddress.IPv6Address(bytes(field[1:])))
    problem, host = _domain_problem(bytes(field[2:]))
    if problem is not None:
        raise _BadAddress(f"domain name {problem}", Reply.HOST_UNREACHABLE)
    return host


def _domain_problem(raw: bytes) -> tuple[str | None, str]:
    """(what is wrong with the name or None, the name as text)."""
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "is not UTF-8", ""
    if ":" in name:
        # Some clients send an IPv6 literal as a name. A scope (%eth0) is refused: it
        # names an interface of this host, and its text is free-form.
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return "has a ':' but is not an IPv6 address", name
        return ("has an IPv6 scope" if "%" in name else None), name
    try:
        ascii_name = name.encode("idna")
    except UnicodeError:
        return "is not a valid IDNA name", name
    if not _ASCII_NAME.match(ascii_name.decode("ascii")):
        return "is not a host name (labels of letters, digits, '-' or '_')", name
    return None, name


def _encode_address(host: str) -> bytes:
    """ATYP + ADDR for ``host``: an IP address as such, anything else as a domain name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        kind = _AddressType.IPV4 if address.version == 4 else _AddressType.IPV6
        return bytes([kind]) + address.packed
    try:
        raw = host.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"host {host!r} holds a lone surrogate") from None
    if not 1 <= len(raw) <= 255:
        raise ValueError(f"host name must be 1..255 bytes of UTF-8, not {len(raw)}")
    problem, _ = _domain_problem(raw)
    if problem is not None:
        raise ValueError(f"host {host!r} {problem}")
    return bytes([_AddressType.DOMAIN, len(raw)]) + raw


def _reply_message(code: Reply, host: str, port: int) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be between 0 and 65535, not {port}")
    return bytes([VERSION, code, 0]) + _encode_address(host) + _PORT.pack(port)


# --- UDP ASSOCIATE datagrams (RFC 1928 section 7) ---------------------------------------

_UDP_HEADER_START = 3  # RSV(2) FRAG(1), then ATYP


def parse_udp_datagram(data: bytes | bytearray | memoryview) -> UdpDatagram:
    """Read one datagram the client sent to the UDP relay; ``ProtocolError`` if malformed.

    Fragments are refused (FRAG != 0): RFC 1928 lets a relay that does not reassemble
    drop them, and no common client sends them.
    """
    view = memoryview(data).cast("B")
    if len(view) < _UDP_HEADER_START + 1:
        raise ProtocolError(f"SOCKS5 UDP datagram of {len(view)} bytes is truncated")
    if view[0] != 0 or view[1] != 0:
        raise ProtocolError("SOCKS5 UDP datagram has non-zero reserved bytes")
    if view[2] != 0:
        raise ProtocolError("SOCKS5 UDP datagram: fragmentation not supported")
    try:
        size = _address_size(view, _UDP_HEADER_START)
        end = _UDP_HEADER_START + (size or 0) + 2
        if size is None or len(view) < end:
            raise ProtocolError("SOCKS5 UDP datagram is truncated")
        host = _decode_address(view[_UDP_HEADER_START : end - 2])
    except _BadAddress as error:
        raise ProtocolError(f"SOCKS5 UDP datagram {error}") from None
    (port,) = _PORT.unpack_from(view, end - 2)
    if port == 0:
        raise ProtocolError("SOCKS5 UDP datagram is addressed to port 0")
    return UdpDatagram(host, port, bytes(view[end:]))


def build_udp_datagram(datagram: UdpDatagram) -> bytes:
    """The bytes of ``datagram`` as the relay sends it to the client (FRAG 0).

    ``ValueError`` for a port outside 1..65535 or a host that is neither an IP address
    nor a valid host name.
    """
    if not 1 <= datagram.port <= 0xFFFF:
        raise ValueError(f"port must be between 1 and 65535, not {datagram.port}")
    header = b"\x00\x00\x00" + _encode_address(datagram.host) + _PORT.pack(datagram.port)
    return header + datagram.payload


# --- tunnel refusals --------------------------------------------------------------------

_REPLY_FOR_REASON: dict[Reason, Reply] = {
    Reason.DENIED: Reply.NOT_ALLOWED,
    Reason.REFUSED: Reply.CONNECTION_REFUSED,
    Reason.UNREACHABLE: Reply.NETWORK_UNREACHABLE,
    Reason.NAME_NOT_FOUND: Reply.HOST_UNREACHABLE,
    Reason.TIMED_OUT: Reply.TTL_EXPIRED,
}


_REASON_FOR_REPLY: dict[Reply, Reason] = {reply: reason
                                          for reason, reply in _REPLY_FOR_REASON.items()}


def reply_for(reason_name: str) -> Reply:
    """The SOCKS reply for a tunnel refusal reason, named as ``Reason.X.name.lower()``
    (or ``DialError.reason``); GENERAL_FAILURE for any other name."""
    reason = Reason.__members__.get(reason_name.upper())
    if reason is None:
        return Reply.GENERAL_FAILURE
    return _REPLY_FOR_REASON.get(reason, Reply.GENERAL_FAILURE)


def reason_for(code: int) -> Reason:
    """The refusal Reason of a SOCKS reply code (the same table read backwards):
    NOT_ALLOWED is DENIED, HOST_UNREACHABLE is NAME_NOT_FOUND, ...; any other failure
    (GENERAL_FAILURE, COMMAND_NOT_SUPPORTED, an unknown code) is REFUSED."""
    try:
        return _REASON_FOR_REPLY.get(Reply(code), Reason.REFUSED)
    except ValueError:
        return Reason.REFUSED
