"""The forwarding half of the client's local HTTP proxy, sans I/O: requests in absolute
form (``GET http://host:port/path HTTP/1.1``), as browsers, pip, apt and curl send them
for ``http://`` URLs, each carried to its server over a tunnel stream.

One ``HttpForwarder`` per client connection, for as many requests as keep-alive allows,
to one server after another. It reads the client with an h11 server connection and the
current upstream with an h11 client connection (h11 does all the HTTP/1.1 parsing and
framing: Content-Length, chunked, close-delimited, HEAD, 1xx), and says what to do in
order as commands::

    forwarder.receive_client(chunk)       # b"": the client closed its side
    forwarder.receive_upstream(chunk)     # b"": the upstream closed its side
    forwarder.upstream_failed(status, text)   # refused (403/502), lost (502), timed out (504)
    forwarder.idle_expired()              # the shell's idle timer: 408, 504 or a quiet close
    for command in forwarder.commands():  # OpenUpstream, SendUpstream, DropUpstream,
        ...                               # SendClient, CloseClient
    forwarder.wants_client_data           # False: pause reading the client

An upstream connection is kept for the next request to the same host and port while
both sides of it allow keep-alive; a request elsewhere drops it and opens another. The
decisions and rewritings are pure functions beside the class: ``forward_target`` (where a
request goes, or why not), ``upstream_headers`` and ``downstream_headers`` (hop-by-hop
headers out, ``Host`` from the URL). Proxy authentication is ``proto.proxyauth``'s rule,
checked on every request as for CONNECT.

Every failure before a response head has gone to the client is answered with a short
plain-text status (400, 403, 405, 407, 408, 431, 501, 502, 504) and the connection
closes; after it, the connection just closes (the client sees a truncated body).

Never does I/O, never awaits, never reads a clock, never logs, never resolves a name.
Holds at most ``max_head`` bytes of an unfinished head from either side; bodies pass
through chunk by chunk as h11 frames them, so memory is bounded by what the shell reads
before it pauses (``wants_client_data``, and the tunnel's credit).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from portcullis.proto.httpconnect import MAX_HEAD, parse_host, plain_response
from portcullis.proto.proxyauth import ProxyCredentials, request_admitted

__all__ = [
    "CloseClient",
    "Command",
    "DropUpstream",
    "ForwardTarget",
    "HttpForwarder",
    "OpenUpstream",
    "Refusal",
    "SendClient",
    "SendUpstream",
    "downstream_headers",
    "forward_target",
    "upstream_headers",
]

# Headers that describe one connection, not the message (RFC 9110 section 7.6.1), and
# the proxy's own: none of them crosses the proxy in either direction.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te",
                        b"trailer", b"upgrade", b"proxy-authorization",
                        b"proxy-authenticate"})
# How a body is framed: kept as they are, so that h11 frames the body the same way on
# the other side; never dropped, even when a Connection header names them.
FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# Methods sent again, without a body, when a kept connection turns out closed.
_REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})
_NO_ANSWER = "the server closed the connection without an answer"


@dataclass(frozen=True)
class ForwardTarget:
    """Where a request goes: ``host`` as the tunnel takes it (a name, dotted IPv4, IPv6
    without brackets), the ``Host`` header for it, and the request target in origin
    form (``/path?query``)."""

    host: str
    port: int
    authority: bytes
    target: bytes


@dataclass(frozen=True)
class Refusal:
    """Why a request is not forwarded: the status and the short text the client gets."""

    status: int
    reason: str


@dataclass(frozen=True)
class OpenUpstream:
    """Open a tunnel stream to host:port; the SendUpstream commands after it go there."""

    host: str
    port: int


@dataclass(frozen=True)
class SendUpstream:
    data: bytes


@dataclass(frozen=True)
class DropUpstream:
    """End the current upstream connection (its stream is reset); ignore what it sends."""


@dataclass(frozen=True)
class SendClient:
    data: bytes


@dataclass(frozen=True)
class CloseClient:
    """Close the client's connection once what was sent has gone; the forwarder is done."""


Command = OpenUpstream | SendUpstream | DropUpstream | SendClient | CloseClient

USE_CONNECT = ("https:// URLs go through CONNECT (curl, pip and browsers do that by "
               "themselves); this proxy forwards only http:// in absolute form")


def forward_target(method: bytes, target: bytes) -> ForwardTarget | Refusal:
    """Where a request with this method and request target goes, or why not."""
    if method == b"CONNECT":
        return Refusal(405, "CONNECT must be the first request on its own connection")
    text = target.decode("ascii")   # h11 admits only visible ASCII in a target
    if not text.lower().startswith(("http://", "https://")):
        return Refusal(400, "this is a proxy: send the absolute URL "
                            "(GET http://host:port/path)")
    try:
        parts = urlsplit(text)
    except ValueError:   # an unbalanced "[" or "]"
        return Refusal(400, "the URL's host is not a name or an IP address")
    if parts.scheme.lower() == "https":
        return Refusal(400, USE_CONNECT)
    if "@" in parts.netloc:
        return Refusal(400, "user information in a proxied URL is not forwarded")
    try:
        port = 80 if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        return Refusal(400, "the URL's port is not 1-65535")
    host = parse_host(parts.hostname or "")
    if host is None:
        return Refusal(400, "the URL's host is not a name or an IP address")
    # The origin form is the URL's own bytes after the authority (not re-quoted).
    origin = text[len(parts.scheme) + 3 + len(parts.netloc):].partition("#")[0]
    if not origin.startswith("/"):
        origin = "/" + origin
    shown = f"[{host}]" if ":" in host else host
    authority = shown if port == 80 else f"{shown}:{port}"
    return ForwardTarget(host, port, authority.encode("ascii"), origin.encode("ascii"))


def _dropped(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named = {token.strip().lower() for name, value in headers if name == b"connection"
             for token in value.split(b",")}
    return HOP_BY_HOP | (frozenset(named) - FRAMING)


def upstream_headers(headers: Iterable[tuple[bytes, bytes]],
                     authority: bytes) -> list[tuple[bytes, bytes]]:
    """A client's request headers (lower-case names, as h11 gives them) as they go to the
    server: ``Host`` from the URL first (RFC 9112 section 3.2.2: the client's Host is
    ignored), hop-by-hop and proxy headers out, the rest in order."""
    headers = list(headers)
    dropped = _dropped(headers) | {b"host"}
    return [(b"host", authority)] + [(name, value) for name, value in headers
                                     if name not in dropped]


def downstream_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A server's response headers as they go to the client: hop-by-hop headers out."""
    headers = list(headers)
    dropped = _dropped(headers)
    return [(name, value) for name, value in headers if name not in dropped]


class HttpForwarder:
    """One client connection of the local HTTP proxy, forwarding its requests."""

    def __init__(self, *, credentials: ProxyCredentials | None = None,
                 max_head: int = MAX_HEAD, client: h11.Connection | None = None) -> None:
        self._credentials = credentials
        self._max_head = max_head
        self._client = client or h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self._upstream: h11.Connection | None = None
        self._upstream_at: tuple[str, int] | None = None
        self._commands: list[Command] = []
        self._closed = False
        # A bodiless GET/HEAD/OPTIONS sent on a kept connection: sent once more on a new
        # one if the server turns out to have closed the kept one before it heard it (the
        # race every keep-alive client has; RFC 9110 section 9.2.2 allows the retry).
        self._replay: h11.Request | None = None
        self._heard = False   # bytes came from the upstream since the request went out

    @classmethod
    def taking_over(cls, client: h11.Connection, request: h11.Request, *,
                    credentials: ProxyCredentials | None = None,
                    max_head: int = MAX_HEAD) -> HttpForwarder:
        """Continue a connection whose first request head ``proto.httpconnect`` read."""
        forwarder = cls(credentials=credentials, max_head=max_head, client=client)
        forwarder._on_request(request)
        forwarder._pump_client()
        return forwarder

    # --- what the shell reads -----------------------------------------------------------

    def commands(self) -> list[Command]:
        """Take what to do, in order."""
        commands, self._commands = self._commands, []
        return commands

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def wants_client_data(self) -> bool:
        """False while a whole request waits for its response (a pipelined one stays in
        the client's socket, not here) and once closed."""
        return not self._closed and self._client.their_state in (h11.IDLE, h11.SEND_BODY)

    # --- input --------------------------------------------------------------------------

    def receive_client(self, data: bytes) -> None:
        """Bytes from the client; b"" when it closed its side."""
        if self._closed or self._client.their_state is h11.CLOSED:
            return
        self._client.receive_data(data)
        self._pump_client()

    def receive_upstream(self, data: bytes) -> None:
        """Bytes from the current upstream; b"" when it closed its side."""
        upstream = self._upstream
        if self._closed or upstream is None or upstream.their_state is h11.CLOSED:
            return
        self._heard = self._heard or bool(data)
        upstream.receive_data(data)
        self._pump_upstream(upstream)

    def upstream_failed(self, status: int, reason: str) -> None:
        """The current upstream's stream was refused, lost or timed out: the shell has
        dropped it. A client still waiting for its response is told ``status``."""
        if self._closed or self._upstream is None:
            return
        self._upstream = None
        if not self._retried():   # a kept connection lost before it answered: once more
            self._upstream_at = None
            self._upstream_gone(status, reason)

    def idle_expired(self) -> None:
        """Nothing moved either way for the shell's idle time."""
        if self._closed:
            return
        client = self._client
        if client.their_state is h11.SEND_BODY:
            self._fail(408, "the request body stopped coming")
        elif client.our_state is h11.SEND_RESPONSE:
            self._fail(504, "the server did not answer in time")
        elif client.their_state is h11.IDLE and client.trailing_data[0]:
            self._fail(408, "the request head took too long")
        else:
            self._close_client()   # an idle keep-alive connection (or a stalled answer)

    # --- the client's side --------------------------------------------------------------

    def _pump_client(self) -> None:
        client = self._client
        while not self._closed:
            try:
                event = client.next_event()
            except h11.RemoteProtocolError as exc:
                # Not h11's words: they quote the client's bytes.
                self._fail(exc.error_status_hint, "request header fields too large"
                           if exc.error_status_hint == 431 else "malformed request")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                self._replay = None
                self._send_upstream(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                # Trailers are hop-by-hop here: TE is not forwarded, so none are asked for.
                self._send_upstream(h11.EndOfMessage())
            elif isinstance(event, h11.ConnectionClosed):
                if client.our_state not in (h11.SEND_RESPONSE, h11.SEND_BODY):
                    self._close_client()
                return   # a half-closed client still gets the response it waits for

    def _on_request(self, request: h11.Request) -> None:
        if self._credentials is not None and not request_admitted(request.headers,
                                                                  self._credentials):
            self._fail(407, "proxy authentication required")
            return
        where = forward_target(request.method, request.target)
        if isinstance(where, Refusal):
            self._fail(where.status, where.reason)
            return
        at = (where.host, where.port)
        upstream = self._upstream
        kept = (upstream is not None and self._upstream_at == at
                and upstream.our_state is h11.IDLE and upstream.their_state is h11.IDLE)
        if not kept:
            self._open_upstream(at)
        outgoing = h11.Request(method=request.method, target=where.target,
                               headers=upstream_headers(request.headers, where.authority))
        self._replay = outgoing if kept and request.method in _REPLAYABLE else None
        # Bytes a kept connection sent after its last answer count as heard.
        self._heard = self._upstream is not None and bool(self._upstream.trailing_data[0])
        self._send_upstream(outgoing)

    def _open_upstream(self, at: tuple[str, int]) -> None:
        if self._upstream is not None:
            self._commands.append(DropUpstream())
        self._upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        self._upstream_at = at
        self._commands.append(OpenUpstream(*at))

    def _send_upstream(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        upstream = self._upstream
        if upstream is None:
            return   # the upstream failed mid-request: the client was told, or will be
        try:
            data = upstream.send(event)
        except h11.LocalProtocolError:
            # What h11 read from the client, it can write; a request it cannot is refused.
            self._fail(400, "the request cannot be forwarded")
            return
        if data:
            self._commands.append(SendUpstream(data))

    # --- the upstream's side ------------------------------------------------------------

    def _pump_upstream(self, upstream: h11.Connection) -> None:
        while upstream is self._upstream and not self._closed:
            try:
                event = upstream.next_event()
            except h11.RemoteProtocolError:
                if not self._retried():
                    self._drop_upstream()
                    self._upstream_gone(502, "the server's answer is not valid HTTP/1.1"
                                        if self._heard else _NO_ANSWER)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.InformationalResponse):
                # 100 Continue and the like, to a client that can take them (101 cannot
                # come: Upgrade is not forwarded).
                if self._client.their_http_version == b"1.1" and event.status_code != 101:
                    self._send_client(h11.InformationalResponse(
                        status_code=event.status_code,
                        headers=downstream_headers(event.headers), reason=event.reason))
            elif isinstance(event, h11.Response):
                self._send_client(h11.Response(status_code=event.status_code,
                                               headers=downstream_headers(event.headers),
                                               reason=event.reason))
            elif isinstance(event, h11.Data):
                self._send_client(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._send_client(h11.EndOfMessage())
                self._exchange_done(upstream)
            elif isinstance(event, h11.ConnectionClosed) and not self._retried():
                self._drop_upstream()
                self._upstream_gone(502, _NO_ANSWER)

    def _retried(self) -> bool:
        """Send the request again on a new connection if the kept one closed unheard."""
        replay, self._replay = self._replay, None
        if replay is None or self._heard or self._upstream_at is None:
            return False
        self._open_upstream(self._upstream_at)
        self._send_upstream(replay)
        if self._client.their_state is not h11.SEND_BODY:   # its end went out already
            self._send_upstream(h11.EndOfMessage())
        return True

    def _exchange_done(self, upstream: h11.Connection) -> None:
        """A response went out whole: keep what keep-alive allows, close the rest."""
        self._replay = None
        if upstream.our_state is h11.DONE and upstream.their_state is h11.DONE:
            upstream.start_next_cycle()
        else:
            self._drop_upstream()   # the server closes, or answered before the body ended
        client = self._client
        if client.our_state is h11.DONE and client.their_state is h11.DONE:
            client.start_next_cycle()
            self._pump_client()   # a pipelined request may be waiting in h11's buffer
        elif not self._closed:
            self._close_client()

    def _upstream_gone(self, status: int, reason: str) -> None:
        our_state = self._client.our_state
        if our_state is h11.SEND_RESPONSE:
            self._fail(status, reason)
        elif our_state is h11.SEND_BODY:
            self._close_client()   # mid-response: the client sees the body cut short
        # else idle: a kept upstream closed between requests; the next one opens another

    # --- output -------------------------------------------------------------------------

    def _send_client(self, event: h11.InformationalResponse | h11.Response | h11.Data
                     | h11.EndOfMessage) -> None:
        try:
            data = self._client.send(event)
        except h11.LocalProtocolError:
            # h11 checks a response against the request (e.g. a 1xx to HTTP/1.0, a body
            # too long for its Content-Length): one it cannot send ends the connection.
            self._fail(502, "the server's answer cannot be forwarded")
            return
        if data:
            self._commands.append(SendClient(data))

    def _fail(self, status: int, reason: str) -> None:
        """Answer ``status`` unless a response has started, then close."""
        if self._closed:
            return
        if self._client.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._commands.append(SendClient(plain_response(status, reason)))
        self._close_client()

    def _drop_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream = self._upstream_at = None
            self._commands.append(DropUpstream())

    def _close_client(self) -> None:
        self._drop_upstream()
        self._commands.append(CloseClient())
        self._closed = True
