"""The server side of an HTTP ``CONNECT`` proxy, sans I/O, for the client's local HTTP port.

Browsers and curl open tunnels with ``CONNECT host:port HTTP/1.1``. A first request with
any other method is handed over (state FORWARD, ``take_forward``) to
``proto.httpforward``, which forwards requests in absolute form. One
``HttpConnectConnection`` per accepted connection turns the application's bytes into one
``ConnectRequest`` and the shell's answer into bytes, like ``proto.socks5``::

    try:
        conn.receive_data(chunk)        # any split: the request head may arrive in pieces
    except ProtocolError:
        transport.write(conn.data_to_send())  # 400, 405 or 407, then close
        transport.close()
    request = conn.next_request()       # once; then open a mux stream to request.host
    conn.accept()                       # 200, or conn.refuse(status_for(reason), message)
    conn.time_out()                     # the shell's handshake timer: 408 if unfinished
    transport.write(conn.data_to_send())
    early = conn.take_payload()         # bytes the application sent after the head
    if conn.state is State.FORWARD:     # not a CONNECT: proto.httpforward takes over
        connection, request = conn.take_forward()

HTTP/1.1 framing and header syntax are h11's (itself sans-I/O); this module adds what a
CONNECT-only proxy needs: the method, the authority-form target (``host:port``,
``[v6]:port``), and, with ``credentials``, ``Proxy-Authorization: Basic`` checked in
constant time (``407`` with ``Proxy-Authenticate`` when missing or wrong).

Errors are exceptions: bytes that break the protocol raise ``ProtocolError`` once, after
queueing the HTTP answer for the fault; every later ``receive_data`` raises again.
Never does I/O, never awaits, never reads a clock, never logs, never resolves a name;
it keeps at most ``max_head`` bytes of an unfinished request head and ``max_early_data``
bytes sent after it while the answer is pending.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import IntEnum
from http import HTTPStatus

import h11

from portcullis.errors import ProtocolError
from portcullis.proto.handshake import ProxyHandshake
from portcullis.proto.mux import Reason
from portcullis.proto.proxyauth import ProxyCredentials, request_admitted

__all__ = [
    "MAX_EARLY_DATA",
    "MAX_HEAD",
    "REALM",
    "ConnectRequest",
    "HttpConnectConnection",
    "State",
    "parse_host",
    "plain_response",
    "status_for",
]

#: The longest request head accepted (request line and headers).
MAX_HEAD = 16 * 1024
#: Bytes the client may send after its head while the answer is pending.
MAX_EARLY_DATA = 64 * 1024
REALM = "portcullis connect"

# A host name as DNS carries it once IDNA-encoded (as proto.socks5 accepts it).
_ASCII_NAME = re.compile(r"(?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_STATUS_TEXT = {
    200: "Connection established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    501: "Not Implemented",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


class State(IntEnum):
    REQUEST = 0  # waiting for the request head
    REPLY_PENDING = 1  # CONNECT parsed, the shell has not answered yet
    RELAY = 2  # answered 200: a plain byte stream
    CLOSED = 3  # answered with an error: the shell closes after sending it
    FAILED = 4  # the client broke the protocol or did not authenticate
    FORWARD = 5  # not a CONNECT: the connection is handed to proto.httpforward


@dataclass(frozen=True)
class ConnectRequest:
    """Where the client wants to go: dotted IPv4, IPv6 text without brackets, or a name
    exactly as sent (validated, never resolved); port 1..65535."""

    host: str
    port: int


class HttpConnectConnection(ProxyHandshake[ConnectRequest]):
    """One accepted HTTP proxy connection: feed it bytes, take the request and answers."""

    def __init__(self, *, credentials: ProxyCredentials | None = None,
                 max_head: int = MAX_HEAD, max_early_data: int = MAX_EARLY_DATA) -> None:
        if max_head < 1 or max_early_data < 0:
            raise ValueError("max_head must be positive and max_early_data not negative")
        self._credentials = credentials
        super().__init__()
        self._max_early_data = max_early_data
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self._state = State.REQUEST
        self._forward: h11.Request | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state in (State.CLOSED, State.FAILED)

    # --- input -----------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Parse what the client sent; any split of the same bytes has the same outcome.

        Raises ``ProtocolError`` (after queueing 400, 405 or 407) if the request cannot
        be carried; every later call raises again. Input after an error answer (state
        CLOSED) is ignored.
        """
        if self._failure is not None:
            raise ProtocolError(f"the HTTP proxy connection already failed: {self._failure}")
        if self._state is State.CLOSED or not data:
            return
        if self._state is State.FORWARD:   # not taken over yet: h11 keeps it for the forwarder
            self._http.receive_data(bytes(data))
            return
        if self._state is not State.REQUEST:
            self._receive_payload(bytes(data))
            return
        self._http.receive_data(bytes(data))
        try:
            event = self._http.next_event()
        except h11.RemoteProtocolError as exc:
            # Not h11's words: they quote the client's bytes, and differ with the split.
            if exc.error_status_hint == 431:
                raise self._fail(431, "request head too large",
                                 "request header fields too large") from None
            raise self._fail(400, "malformed request head", "bad request") from None
        if event is h11.NEED_DATA:
            return
        if not isinstance(event, h11.Request):
            # A request head always comes first; anything else would be a bug in h11.
            raise self._fail(400, "no request head", "bad request")
        if event.method != b"CONNECT":
            # Authentication and the target are the forwarder's to check, per request.
            self._forward = event
            self._state = State.FORWARD
            return
        if self._credentials is not None and not request_admitted(event.headers,
                                                                  self._credentials):
            raise self._fail(407, "no or wrong Proxy-Authorization",
                             "proxy authentication required")
        target = _parse_target(event.target)
        if target is None:
            raise self._fail(400, "target is not HOST:PORT", "CONNECT needs HOST:PORT")
        self._request = target
        self._state = State.REPLY_PENDING
        # After the head the bytes belong to the tunnelled stream.
        early, _ = self._http.trailing_data
        self._receive_payload(early)

    # --- output ----------------------------------------------------------------------

    def take_forward(self) -> tuple[h11.Connection, h11.Request]:
        """Hand over a connection whose first request is not a CONNECT: the h11
        connection (holding whatever the client sent after that head) and the request."""
        if self._forward is None:
            raise ProtocolError(f"no request to forward in state {self._state.name}")
        request, self._forward = self._forward, None
        self._state = State.CLOSED
        return self._http, request

    def accept(self) -> None:
        """Answer 200: from now on the connection is the stream's bytes."""
        self._require_pending()
        self._output += b"HTTP/1.1 200 Connection established\r\n\r\n"
        self._state = State.RELAY

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (403, 502: see ``status_for``) with ``message`` as the body."""
        if status not in (403, 502):
            raise ValueError(f"status {status} is not a refusal this proxy answers")
        self._require_pending()
        self._state = State.CLOSED
        self._payload.clear()
        self._output += plain_response(status, message)

    def time_out(self) -> None:
        """The shell's handshake timer fired: answer 408 if the head is still unfinished."""
        if self._state is State.REQUEST:
            self._state = State.CLOSED
            self._output += plain_response(408, "the request head took too long")

    # --- internals -------------------------------------------------------------------

    def _receive_payload(self, data: bytes) -> None:
        if self._state is State.REPLY_PENDING and (
                len(self._payload) + len(data) > self._max_early_data):
            raise self._fail(400, f"more than {self._max_early_data} bytes before the answer",
                             "too much data before the answer")
        self._payload += data

    def _require_pending(self) -> None:
        if self._state is not State.REPLY_PENDING:
            raise ProtocolError(f"cannot answer a CONNECT in state {self._state.name}")

    def _fail(self, status: int, message: str, answer: str) -> ProtocolError:
        self._output += plain_response(status, answer)
        self._payload.clear()
        self._state = State.FAILED
        self._failure = message
        return ProtocolError(f"HTTP CONNECT: {message}")


def _parse_target(raw: bytes) -> ConnectRequest | None:
    """``host:port`` or ``[v6]:port`` (authority form, RFC 9110 section 9.3.6)."""
    target = raw.decode("ascii")  # h11 admits only visible ASCII in a target
    host, colon, port_text = target.rpartition(":")
    if not colon or not _PORT.match(port_text) or not 0 < int(port_text) < 65536:
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    address = parse_host(host[1:-1] if bracketed else host)
    # Brackets around an IPv6 address, and only around one.
    if address is None or (":" in address) != bracketed:
        return None
    return ConnectRequest(address, int(port_text))


def parse_host(host: str) -> str | None:
    """``host`` if the tunnel can carry it as a destination: dotted IPv4, IPv6 text
    (without brackets and without a zone), or an ASCII name; never resolved."""
    if ":" in host:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return None if address.scope_id is not None else host  # a zone: an interface here
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if len(host) > 253 or not _ASCII_NAME.match(host):
            return None
    return host


def plain_response(status: int, text: str) -> bytes:
    """A whole error response with ``text`` as its body, closing the connection."""
    body = (text + "\n").encode("utf-8", "replace")
    extra = (b'Proxy-Authenticate: Basic realm="%s"\r\n' % REALM.encode()
             if status == 407 else b"")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n%s"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, (_STATUS_TEXT.get(status) or HTTPStatus(status).phrase).encode(),
               extra, len(body), body))


def status_for(reason_name: str) -> int:
    """The HTTP status for a tunnel refusal reason (``Reason.X.name.lower()``)."""
    return 403 if reason_name.upper() == Reason.DENIED.name else 502
