"""Fuzz targets for the parsers that read bytes from someone else: one function per
target, taking one input. A target returns normally for any input the parser handles
as specified (a result, or ``ProtocolError`` with a reason); anything else it raises is
a finding: another exception from the parser, or an ``AssertionError`` from a property
checked here (the same bytes split differently give the same outcome; what a parser
accepts, the next layer can carry; a parsed launch file writes and reads back the same).

Inputs of the mux, SOCKS5, SOCKS5 client, stream datagram, HTTP CONNECT, HTTP forward,
shadow channel and RFB refusal targets start with a small header: byte 0, options (bit 0:
the proxies require credentials ``fuzz``/``secret``, the shadow device accepts a request
that parses; for SOCKS5, bit 1: the relay's extension commands are accepted);
byte 1, how to split the rest into chunks (0: one chunk, n: chunks of n bytes).
``fuzz_run.py`` drives these under atheris; ``test_fuzz.py`` replays the corpus and runs a
bounded fuzzing session per target.
"""

from __future__ import annotations

import base64
import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jws
from joserfc.errors import JoseError

from portcullis.errors import FederationError, ProtocolError
from portcullis.federation.http import parse_json
from portcullis.federation.oidc import ClaimExpectations, check_claims, check_header
from portcullis.federation.saml import SAMLP, Refused, SamlMessage, read_saml_message
from portcullis.proto import mux
from portcullis.proto.httpconnect import HttpConnectConnection
from portcullis.proto.httpforward import (
    CloseClient,
    HttpForwarder,
    OpenUpstream,
    SendClient,
    SendUpstream,
)
from portcullis.proto.launchfile import (
    format_launch_file,
    format_launch_url,
    parse_launch_file,
    parse_launch_url,
)
from portcullis.proto.proxyauth import ProxyCredentials
from portcullis.proto.rfb import RfbPasswordBridge, RfbRefusal, classify_first_bytes
from portcullis.proto.shadow import (
    MAX_FRAME,
    Accepted,
    ChannelState,
    RequestReceived,
    ShadowChannel,
    ShadowEvent,
    ShadowProtocolError,
    key_id_of,
    parse_signed_request,
    sign_request,
)
from portcullis.proto.socks5 import (
    Command,
    Reply,
    Socks5Connection,
    build_udp_datagram,
    parse_udp_datagram,
)
from portcullis.proto.socks5client import Socks5ClientHandshake
from portcullis.proto.streamdatagrams import StreamDatagrams, frame_datagram

CREDENTIALS = ProxyCredentials("fuzz", "secret")
Target = Callable[[bytes], None]


def _header(data: bytes) -> tuple[int, int, bytes]:
    options = data[0] if data else 0
    chunk = data[1] if len(data) > 1 else 0
    return options, chunk, data[2:]


def _chunks(body: bytes, size: int) -> Iterator[bytes]:
    if size == 0:
        yield body
        return
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _openable(host: str, port: int) -> None:
    """What a proxy accepted, the tunnel can carry (else the shell closes silently)."""
    conn = mux.MuxConnection("client")
    conn.send_hello({})
    conn.open_stream(mux.Protocol.TCP, host, port)


# --- mux -------------------------------------------------------------------------------


def _receive(conn: mux.MuxConnection, chunk: bytes) -> None:
    # Time stands still here: the timers have their own tests (tests/proto/test_mux_timers.py).
    conn.receive_data(chunk, 0.0)


def _event_value(event: mux.Event) -> tuple[object, ...]:
    values: list[object] = [type(event).__name__]
    for field in fields(event):
        value = getattr(event, field.name)
        values.append(bytes(value) if isinstance(value, memoryview) else value)
    return tuple(values)


def _codec(role: str, *, open_streams: int = 0) -> mux.MuxConnection:
    conn = mux.MuxConnection("client" if role == "client" else "gateway")
    conn.send_hello({"fuzz": True})
    for _ in range(open_streams):
        conn.open_stream(mux.Protocol.TCP, "fuzz.example", 443)
    return conn


def _mux_outcome(conn: mux.MuxConnection, chunks: Iterator[bytes],
                 react: bool) -> tuple[object, ...]:
    events: list[tuple[object, ...]] = []
    sent: list[bytes] = []
    error = None
    for chunk in chunks:
        try:
            _receive(conn, chunk)
        except ProtocolError as exc:
            error = str(exc)
        for event in conn.events_received():
            events.append(_event_value(event))
            if react:
                _react(conn, event)
        sent.extend(bytes(part) for part in conn.data_to_send())
        if error is not None:
            break
    sent.extend(bytes(part) for part in conn.data_to_send())  # our HELLO, for no input
    return error, tuple(events), b"".join(sent)


def _react(conn: mux.MuxConnection, event: mux.Event) -> None:
    """Answer as a shell would, so that later frames meet open streams."""
    try:
        if isinstance(event, mux.StreamOpened):
            if event.stream_id % 4 < 2:
                conn.accept_stream(event.stream_id)
                conn.send_data(event.stream_id, b"answer")
            else:
                conn.refuse_stream(event.stream_id, mux.Reason.DENIED, "fuzz says no")
        elif isinstance(event, mux.DataReceived):
            conn.consumed(event.stream_id, len(event.data))
        elif isinstance(event, mux.StreamEnded):
            conn.send_fin(event.stream_id)
    except ProtocolError:
        pass  # the stream is gone or the connection ended meanwhile: a shell ignores it


def _mux(role: str, data: bytes) -> None:
    _, chunk, body = _header(data)
    whole = _mux_outcome(_codec(role), _chunks(body, 0), react=False)
    split = _mux_outcome(_codec(role), _chunks(body, chunk or 1), react=False)
    if any(event[0] == "GoAwayReceived" for event in whole[1]):
        # A GOAWAY drops what is still queued (the peer reads no more), so how much went
        # out before it depends on when the shell took it: compare what was received.
        whole, split = whole[:2], split[:2]
    assert whole == split, f"mux ({role}) outcome depends on the split:\n{whole}\n{split}"
    # This side opens streams and answers the peer's, so that ACCEPT, DATA, WINDOW,
    # FIN and RESET meet streams in every state.
    _mux_outcome(_codec(role, open_streams=3), _chunks(body, chunk), react=True)


def mux_client(data: bytes) -> None:
    """The client's codec reading what a gateway sent."""
    _mux("client", data)


def mux_gateway(data: bytes) -> None:
    """The gateway's codec reading what a client sent."""
    _mux("gateway", data)


# --- SOCKS5 ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _ProxyOutcome:
    error: str | None
    sent: bytes
    request: object
    payload: bytes
    state: object


def _proxy_outcome(conn: Socks5Connection | HttpConnectConnection,
                   chunks: Iterator[bytes]) -> _ProxyOutcome:
    error = None
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except ProtocolError as exc:
            error = str(exc)
            break
    return _ProxyOutcome(error, conn.data_to_send(), conn.next_request(),
                         conn.take_payload(), conn.state)


def socks5(data: bytes) -> None:
    """The local SOCKS5 server reading an application's greeting, password and request;
    or, with option bit 1, the relay's (which also takes the extension commands)."""
    options, chunk, body = _header(data)
    credentials = CREDENTIALS if options & 1 else None
    extensions = bool(options & 2)
    whole = _proxy_outcome(Socks5Connection(credentials=credentials, extensions=extensions),
                           _chunks(body, 0))
    conn = Socks5Connection(credentials=credentials, extensions=extensions)
    split = _proxy_outcome(conn, _chunks(body, chunk or 1))
    assert whole == split, f"SOCKS5 outcome depends on the split:\n{whole}\n{split}"
    request = split.request
    if request is not None:
        # Never a request without the password.
        assert credentials is None or CREDENTIALS.password.encode() in body
        host, port = request.host, request.port  # type: ignore[attr-defined]
        if port:
            _openable(host, port)
        conn.reply(Reply(options >> 4 if options >> 4 <= 8 else 0))
        conn.data_to_send()
        with contextlib.suppress(ProtocolError):
            conn.receive_data(body[:64])


def socks5_udp(data: bytes) -> None:
    """The SOCKS5 UDP relay reading a datagram; a parsed one is rebuilt the same."""
    try:
        first = parse_udp_datagram(data)
    except ProtocolError:
        return
    second = parse_udp_datagram(build_udp_datagram(first))
    assert (second.port, second.payload) == (first.port, first.payload)
    assert parse_udp_datagram(build_udp_datagram(second)) == second


def socks5_client(data: bytes) -> None:
    """The edge's SOCKS5 client reading a relay's method reply, reply and first bytes."""
    options, chunk, body = _header(data)
    command = (Command.CONNECT, Command.UDP_IN_STREAM, Command.ICMP_ECHO_IN_STREAM)[options % 3]

    def outcome(chunks: Iterator[bytes]) -> tuple[object, ...]:
        handshake = Socks5ClientHandshake(command, "10.0.0.5", 443)
        handshake.data_to_send()
        reply = None
        for piece in chunks:
            try:
                reply = handshake.receive_data(piece)
            except ProtocolError as exc:
                return ("error", str(exc))
        return ("reply", reply, handshake.take_payload())

    whole, split = outcome(_chunks(body, 0)), outcome(_chunks(body, chunk or 1))
    assert whole == split, f"SOCKS5 client outcome depends on the split:\n{whole}\n{split}"


def stream_datagrams(data: bytes) -> None:
    """The relay or the edge reading datagrams framed on the TLS stream; what is read
    frames back to the same bytes."""
    options, chunk, body = _header(data)
    limit = 0xFFFF if options & 1 else 512

    def outcome(chunks: Iterator[bytes]) -> tuple[list[bytes], str | None]:
        decoder, got = StreamDatagrams(limit), []
        for piece in chunks:
            try:
                got += decoder.receive_data(piece)
            except ProtocolError as exc:
                return got, str(exc)
        return got, None

    whole, split = outcome(_chunks(body, 0)), outcome(_chunks(body, chunk or 1))
    assert whole == split, f"datagrams depend on the split:\n{whole}\n{split}"
    framed = b"".join(frame_datagram(datagram) for datagram in whole[0])
    assert body.startswith(framed)


# --- HTTP CONNECT ----------------------------------------------------------------------


def http_connect(data: bytes) -> None:
    """The local HTTP proxy reading an application's CONNECT request head."""
    options, chunk, body = _header(data)
    credentials = CREDENTIALS if options & 1 else None
    whole = _proxy_outcome(HttpConnectConnection(credentials=credentials), _chunks(body, 0))
    conn = HttpConnectConnection(credentials=credentials)
    split = _proxy_outcome(conn, _chunks(body, chunk or 1))
    assert whole == split, f"HTTP CONNECT outcome depends on the split:\n{whole}\n{split}"
    request = split.request
    if request is not None:
        _openable(request.host, request.port)  # type: ignore[attr-defined]
        if options & 2:
            conn.accept()
        else:
            conn.refuse(403 if options & 4 else 502, body[:40].decode("utf-8", "replace"))
        assert conn.data_to_send().startswith(b"HTTP/1.1 ")
    else:
        conn.time_out()
        conn.data_to_send()


# What separates the client's bytes from the upstream's in an http_forward input.
UPSTREAM_SAYS = b"\n--upstream--\n"


def http_forward(data: bytes) -> None:
    """The local HTTP proxy forwarding requests in absolute form: the client's bytes,
    then the upstream's (after UPSTREAM_SAYS), then the shell's timers."""
    options, chunk, body = _header(data)
    credentials = CREDENTIALS if options & 1 else None
    client, _, upstream = body.partition(UPSTREAM_SAYS)

    def outcome(size: int) -> tuple[object, ...]:
        forwarder = HttpForwarder(credentials=credentials)
        for piece in _chunks(client, size):
            if piece:   # b"" says the peer closed
                forwarder.receive_client(piece)
        for piece in _chunks(upstream, size):
            if piece:
                forwarder.receive_upstream(piece)
        if options & 2:
            forwarder.receive_upstream(b"")
        if options & 4:
            forwarder.upstream_failed(403 if options & 8 else 502, "refused")
        forwarder.idle_expired()
        commands = forwarder.commands()
        assert commands[-1] == CloseClient() and forwarder.closed
        assert CloseClient() not in commands[:-1]
        opened = [c for c in commands if isinstance(c, OpenUpstream)]
        for command in opened:
            _openable(command.host, command.port)
        to_client = b"".join(c.data for c in commands if isinstance(c, SendClient))
        assert not to_client or to_client.startswith(b"HTTP/1.1 ")
        # Never bytes for an upstream before one was opened.
        first_send = next((i for i, c in enumerate(commands) if isinstance(c, SendUpstream)),
                          None)
        assert first_send is None or any(isinstance(c, OpenUpstream)
                                         for c in commands[:first_send])
        # Chunked bodies are re-chunked as the bytes arrived: compare what does not move.
        return tuple(opened), to_client.split(b"\r\n", 1)[0]

    whole, split = outcome(0), outcome(chunk or 1)
    assert whole == split, f"HTTP forward outcome depends on the split:\n{whole}\n{split}"


# --- launch file -----------------------------------------------------------------------


def launch_file(data: bytes) -> None:
    """The client reading a launch file; what it reads, it writes back the same."""
    try:
        parsed = parse_launch_file(data)
    except ProtocolError:
        return
    assert parse_launch_file(format_launch_file(parsed)) == parsed


def launch_url(data: bytes) -> None:
    """The client opening a portcullis:// link from any web page; what it accepts, it
    writes back the same. The URL arrives as a command-line argument, which Python
    decodes with surrogateescape."""
    try:
        parsed = parse_launch_url(data.decode("utf-8", "surrogateescape"))
    except ProtocolError:
        return
    assert parse_launch_url(format_launch_url(parsed)) == parsed


def saml_message(data: bytes) -> None:
    """The SAML gate reading what a browser posted (or an IdP redirected): base64, for
    the HTTP-Redirect binding deflated, then one defusedxml parse. Byte 0, bit 0: deflate
    the rest first; bit 1: take the rest as the (unencoded) form field itself."""
    options = data[0] if data else 0
    body = data[1:]
    deflated = bool(options & 1)
    if options & 2:
        encoded = body.decode("latin-1")
    else:
        if deflated:
            packer = zlib.compressobj(wbits=-15)
            body = packer.compress(body) + packer.flush()
        encoded = base64.b64encode(body).decode()
    outcome = read_saml_message(encoded, 64 * 1024, (f"{{{SAMLP}}}Response",),
                                deflated=deflated)
    assert isinstance(outcome, SamlMessage | Refused)
    if isinstance(outcome, SamlMessage):
        assert outcome.root.tag == f"{{{SAMLP}}}Response"


# --- secure shadowing --------------------------------------------------------------------

#: The hub key the shadow seeds are signed with (seeds.py), so the signature check runs.
SHADOW_HUB_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
SHADOW_KEY_ID = key_id_of(SHADOW_HUB_KEY.public_key())


def shadow_request(data: bytes) -> None:
    """The device proxy (and the hub) reading a signed shadow request: what parses is
    exactly the bytes it was read from, its signature check answers a bool, and the
    request it carries can be signed again."""
    try:
        parsed = parse_signed_request(data)
    except ShadowProtocolError:
        return
    assert parsed.signed_part + b"\x01\x00\x40" + parsed.signature == data
    valid = parsed.signature_valid(SHADOW_HUB_KEY.public_key())
    assert isinstance(valid, bool)
    if parsed.request.key_id == SHADOW_KEY_ID:
        resigned = sign_request(parsed.request, SHADOW_HUB_KEY)
        assert parse_signed_request(resigned).request == parsed.request
        assert (resigned == data) is valid  # Ed25519 signatures are deterministic


def _shadow_outcome(role: str, chunks: Iterator[bytes],
                    accept: bool | None) -> tuple[object, ...]:
    channel = ShadowChannel("device" if role == "device" else "console", now=0.0)
    if role == "console":
        channel.send_request(b"signed request")
    events: list[ShadowEvent] = []
    relayed = b""
    for chunk in chunks:
        if channel.state is ChannelState.ACCEPTED:
            relayed += chunk  # the shell relays raw bytes once the channel is up
            continue
        channel.receive_data(chunk)
        assert channel.buffered <= 3 + MAX_FRAME
        while (event := channel.next_event()) is not None:
            if isinstance(event, Accepted):
                relayed += event.leftover
                event = Accepted(event.session_id, b"")
            events.append(event)
            if (isinstance(event, RequestReceived) and accept is not None
                    and channel.state is ChannelState.DECIDING):
                # As the device proxy does: read the request, then answer, unless the
                # console's early bytes failed the channel meanwhile (the proxy has
                # closed it then, and answers nothing).
                try:
                    parse_signed_request(event.signed)
                except ShadowProtocolError as error:
                    channel.refuse(str(error))
                else:
                    if accept:
                        channel.accept("fuzz-session")
                    else:
                        channel.refuse("the hub says no")
    timer = channel.get_timer()
    if timer is not None:
        channel.handle_timer(timer)
        events.extend(iter(channel.next_event, None))
    return tuple(events), channel.data_to_send(), relayed, channel.state


def _shadow(role: str, data: bytes) -> None:
    options, chunk, body = _header(data)
    whole = _shadow_outcome(role, _chunks(body, 0), None)
    split = _shadow_outcome(role, _chunks(body, chunk or 1), None)
    assert whole == split, f"shadow {role} outcome depends on the split:\n{whole}\n{split}"
    # Answering depends on when the answer comes (bytes after the request are an error
    # only until it does), so that run is not compared with the others.
    _shadow_outcome(role, _chunks(body, chunk), bool(options & 1))


def shadow_device(data: bytes) -> None:
    """The device proxy's channel reading what came through TLS from a console; option
    bit 0: a request that parses is accepted (else refused)."""
    _shadow("device", data)


def shadow_console(data: bytes) -> None:
    """The console proxy's channel reading the device's answer to its request."""
    _shadow("console", data)


def rfb_refusal(data: bytes) -> None:
    """The device proxy answering a plain viewer with an RFB security failure: the same
    bytes however the viewer's are split, always starting with the server's version."""
    _, chunk, body = _header(data)
    if body:
        assert classify_first_bytes(body) in ("tls", "rfb-client", "garbage")

    def outcome(chunks: Iterator[bytes]) -> tuple[bytes, bool]:
        refusal = RfbRefusal("secure shadowing is required")
        sent = refusal.data_to_send()
        for piece in chunks:
            refusal.receive_data(piece)
            sent += refusal.data_to_send()
        return sent, refusal.finished

    whole, split = outcome(_chunks(body, 0)), outcome(_chunks(body, chunk or 1))
    assert whole == split, f"RFB refusal depends on the split:\n{whole}\n{split}"
    assert whole[0].startswith(b"RFB 003.008\n")


FUZZ_PASSWORD = b"fuzzpass"


def rfb_password_bridge(data: bytes) -> None:
    """The gateway between noVNC and a VNC server with a password: byte 0 of the header
    says how many bytes of the body the server sends (all of them first), the rest is
    the viewer's. The same bytes come out however both are split; the password never
    reaches the viewer; a bridge never both relays and fails."""
    server_length, chunk, body = _header(data)
    server, viewer = body[:server_length], body[server_length:]

    def outcome(size: int) -> tuple[bytes, bytes, bool, str | None]:
        bridge = RfbPasswordBridge(FUZZ_PASSWORD)
        to_server, to_viewer = b"", b""
        for piece in _chunks(server, size):
            bridge.receive_from_server(piece)
            to_server += bridge.data_to_server()
            to_viewer += bridge.data_to_viewer()
        for piece in _chunks(viewer, size):
            bridge.receive_from_viewer(piece)
            to_server += bridge.data_to_server()
            to_viewer += bridge.data_to_viewer()
        assert not (bridge.relaying and bridge.failure is not None)
        return to_server, to_viewer, bridge.relaying, bridge.failure

    whole, split = outcome(0), outcome(chunk or 1)
    assert whole == split, f"the RFB bridge depends on the split:\n{whole}\n{split}"
    assert FUZZ_PASSWORD not in whole[1]


FUZZ_EXPECTATIONS = ClaimExpectations("https://idp.example", "portcullis", "n-0S6_WzA2Mj", 60)


def id_token(data: bytes) -> None:
    """An ID token's header and claims, as the OIDC factor reads them before and after
    the signature check; a refusal is a reason, never an exception."""
    try:
        unverified = jws.extract_compact(data)
        header = unverified.headers()
    except (JoseError, ValueError, TypeError):
        return
    reason = check_header(header, ("RS256", "ES256"))
    assert reason is None or isinstance(reason, str)
    try:
        claims = parse_json(unverified.payload, "ID token")
    except FederationError:
        return
    assert isinstance(check_claims(claims, FUZZ_EXPECTATIONS, 1_800_000_000.0), str | None)


TARGETS: dict[str, Target] = {
    "mux_client": mux_client,
    "mux_gateway": mux_gateway,
    "socks5": socks5,
    "socks5_udp": socks5_udp,
    "socks5_client": socks5_client,
    "stream_datagrams": stream_datagrams,
    "http_connect": http_connect,
    "http_forward": http_forward,
    "launch_file": launch_file,
    "launch_url": launch_url,
    "saml_message": saml_message,
    "id_token": id_token,
    "shadow_request": shadow_request,
    "shadow_device": shadow_device,
    "shadow_console": shadow_console,
    "rfb_refusal": rfb_refusal,
    "rfb_password_bridge": rfb_password_bridge,
}
