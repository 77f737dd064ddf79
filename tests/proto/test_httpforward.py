"""The forwarding HTTP proxy codec, specified by the bytes it reads and the commands it
gives: where a request goes, how it is rewritten, keep-alive, and every failure answered."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.proto.httpforward import (
    USE_CONNECT,
    CloseClient,
    Command,
    DropUpstream,
    ForwardTarget,
    HttpForwarder,
    OpenUpstream,
    Refusal,
    SendClient,
    SendUpstream,
    downstream_headers,
    forward_target,
    upstream_headers,
)
from portcullis.proto.proxyauth import ProxyCredentials

SECRET = ProxyCredentials("portcullis", "s3cret")
AUTH = b"Proxy-Authorization: Basic " + base64.b64encode(b"portcullis:s3cret") + b"\r\n"
GET = (b"GET http://wiki.corp.example/page?x=1 HTTP/1.1\r\nHost: elsewhere\r\n"
       b"User-Agent: curl\r\nProxy-Connection: keep-alive\r\n\r\n")
GET_UPSTREAM = (b"GET /page?x=1 HTTP/1.1\r\nhost: wiki.corp.example\r\n"
                b"user-agent: curl\r\n\r\n")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\nhello"
OK_CLIENT = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


def run(forwarder: HttpForwarder, *, client: bytes = b"", upstream: bytes = b"",
        split: int = 0) -> list[Command]:
    """Feed the client's, then the upstream's bytes (in pieces of ``split``), and take the
    commands; consecutive sends to one side are joined (the split does not matter)."""
    for data, receive in ((client, forwarder.receive_client),
                          (upstream, forwarder.receive_upstream)):
        step = split or len(data) or 1
        for start in range(0, len(data), step):
            receive(data[start:start + step])
    joined: list[Command] = []
    for command in forwarder.commands():
        if joined and type(command) is type(joined[-1]) in (SendClient, SendUpstream):
            joined[-1] = type(command)(joined[-1].data + command.data)  # type: ignore[union-attr]
        else:
            joined.append(command)
    return joined


# --- where a request goes -------------------------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [
    (b"http://wiki.corp.example/a/b?c=d", ForwardTarget("wiki.corp.example", 80,
                                                        b"wiki.corp.example", b"/a/b?c=d")),
    (b"HTTP://Wiki:8080", ForwardTarget("wiki", 8080, b"wiki:8080", b"/")),
    (b"http://10.0.0.1:80?q", ForwardTarget("10.0.0.1", 80, b"10.0.0.1", b"/?q")),
    (b"http://[2001:db8::1]:81/x#frag", ForwardTarget("2001:db8::1", 81, b"[2001:db8::1]:81",
                                                       b"/x")),
    (b"http://h/%2e%2e/a%20b", ForwardTarget("h", 80, b"h", b"/%2e%2e/a%20b")),
])
def test_an_absolute_url_names_the_destination_and_the_origin_form(
        target: bytes, expected: ForwardTarget) -> None:
    assert forward_target(b"GET", target) == expected


@pytest.mark.parametrize(("method", "target", "status", "words"), [
    (b"GET", b"https://wiki/", 400, USE_CONNECT),
    (b"GET", b"/index.html", 400, "send the absolute URL"),
    (b"OPTIONS", b"*", 400, "send the absolute URL"),
    (b"GET", b"ftp://wiki/", 400, "send the absolute URL"),
    (b"GET", b"http://user:pw@wiki/", 400, "user information"),
    (b"GET", b"http://wiki:0/", 400, "port"),
    (b"GET", b"http://wiki:99999/", 400, "port"),
    (b"GET", b"http://wiki:x/", 400, "port"),
    (b"GET", b"http://wi;ki/", 400, "host"),
    (b"GET", b"http:///path", 400, "host"),
    (b"GET", b"http://[fe80::1%25eth0]/", 400, "host"),
    (b"GET", b"http://cc]cc.example/", 400, "host"),   # found by the fuzzer
    (b"GET", b"http://[::1/", 400, "host"),
    (b"CONNECT", b"wiki:443", 405, "first request"),
])
def test_what_cannot_be_forwarded_is_refused_with_what_to_do(
        method: bytes, target: bytes, status: int, words: str) -> None:
    refusal = forward_target(method, target)
    assert isinstance(refusal, Refusal) and refusal.status == status
    assert words in refusal.reason


# --- rewriting -----------------------------------------------------------------------


def test_the_request_gets_host_from_the_url_and_loses_hop_by_hop_and_proxy_headers() -> None:
    headers = [(b"host", b"evil"), (b"accept", b"*/*"), (b"connection", b"keep-alive, X-Mine"),
               (b"x-mine", b"1"), (b"proxy-authorization", b"Basic eA=="),
               (b"proxy-connection", b"keep-alive"), (b"te", b"trailers"),
               (b"upgrade", b"websocket"), (b"keep-alive", b"300"), (b"trailer", b"x"),
               (b"content-length", b"3"), (b"cookie", b"a=b")]
    assert upstream_headers(headers, b"wiki:8080") == [
        (b"host", b"wiki:8080"), (b"accept", b"*/*"), (b"content-length", b"3"),
        (b"cookie", b"a=b")]


def test_a_connection_header_never_takes_the_body_framing_away() -> None:
    headers = [(b"connection", b"transfer-encoding, content-length"),
               (b"transfer-encoding", b"chunked")]
    assert upstream_headers(headers, b"h") == [(b"host", b"h"),
                                                (b"transfer-encoding", b"chunked")]
    assert downstream_headers(headers) == [(b"transfer-encoding", b"chunked")]


def test_the_response_loses_hop_by_hop_headers_and_keeps_the_rest_in_order() -> None:
    headers = [(b"content-type", b"text/html"), (b"connection", b"close, x-hop"),
               (b"x-hop", b"1"), (b"proxy-authenticate", b"Basic"), (b"set-cookie", b"a=1"),
               (b"set-cookie", b"b=2")]
    assert downstream_headers(headers) == [(b"content-type", b"text/html"),
                                           (b"set-cookie", b"a=1"), (b"set-cookie", b"b=2")]


# --- exchanges -----------------------------------------------------------------------


@pytest.mark.parametrize("split", [0, 1, 7])
def test_a_get_is_forwarded_in_origin_form_and_its_response_comes_back(split: int) -> None:
    forwarder = HttpForwarder()
    assert run(forwarder, client=GET, split=split) == [
        OpenUpstream("wiki.corp.example", 80), SendUpstream(GET_UPSTREAM)]
    assert not forwarder.wants_client_data   # the whole request is in: wait for the answer
    assert run(forwarder, upstream=OK, split=split) == [SendClient(OK_CLIENT)]
    assert forwarder.wants_client_data


def test_keep_alive_reuses_the_upstream_for_the_same_host_and_opens_another_elsewhere() -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET, upstream=OK)
    assert run(forwarder, client=GET, upstream=OK) == [SendUpstream(GET_UPSTREAM),
                                                       SendClient(OK_CLIENT)]
    other = b"GET http://wiki.corp.example:8080/ HTTP/1.1\r\nHost: x\r\n\r\n"
    assert run(forwarder, client=other) == [
        DropUpstream(), OpenUpstream("wiki.corp.example", 8080),
        SendUpstream(b"GET / HTTP/1.1\r\nhost: wiki.corp.example:8080\r\n\r\n")]


def test_an_upstream_that_closes_after_its_answer_is_replaced_for_the_next_request() -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET)
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    assert run(forwarder, upstream=closing) == [
        SendClient(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"), DropUpstream()]
    assert run(forwarder, client=GET) == [OpenUpstream("wiki.corp.example", 80),
                                          SendUpstream(GET_UPSTREAM)]


def test_a_get_on_a_kept_connection_the_server_closed_unheard_is_sent_once_more() -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET, upstream=OK)
    assert run(forwarder, client=GET) == [SendUpstream(GET_UPSTREAM)]
    forwarder.receive_upstream(b"")   # the server had closed it meanwhile
    assert run(forwarder) == [DropUpstream(), OpenUpstream("wiki.corp.example", 80),
                              SendUpstream(GET_UPSTREAM)]
    assert run(forwarder, upstream=OK) == [SendClient(OK_CLIENT)]
    # Once only: the new connection closing unheard is a 502.
    run(forwarder, client=GET)
    forwarder.receive_upstream(b"")
    run(forwarder)
    forwarder.receive_upstream(b"")
    assert status_of(forwarder.commands()) == b"HTTP/1.1 502 Bad Gateway"


@pytest.mark.parametrize("second", [
    b"POST http://wiki.corp.example/ HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\n\r\nx",
    GET.replace(b"wiki.corp.example/", b"other.example/")])   # a new connection
def test_a_request_with_a_body_or_on_a_new_connection_is_never_sent_twice(
        second: bytes) -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET, upstream=OK)
    run(forwarder, client=second)
    forwarder.receive_upstream(b"")
    commands = forwarder.commands()
    assert not any(isinstance(c, OpenUpstream) for c in commands)
    assert status_of(commands) == b"HTTP/1.1 502 Bad Gateway"


def test_bodies_keep_their_framing_both_ways() -> None:
    forwarder = HttpForwarder()
    post = (b"POST http://h/up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
    assert run(forwarder, client=post) == [
        OpenUpstream("h", 80),
        SendUpstream(b"POST /up HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")]
    # HTTP/1.0, no length: the body ends with the connection; the client gets it chunked.
    forwarder.receive_upstream(b"HTTP/1.0 200 OK\r\n\r\nstre")
    forwarder.receive_upstream(b"am")
    forwarder.receive_upstream(b"")
    assert run(forwarder) == [
        SendClient(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"4\r\nstre\r\n2\r\nam\r\n0\r\n\r\n"), DropUpstream()]


def test_a_pipelined_request_waits_for_the_answer_before_it() -> None:
    forwarder = HttpForwarder()
    assert run(forwarder, client=GET + GET) == [OpenUpstream("wiki.corp.example", 80),
                                                SendUpstream(GET_UPSTREAM)]
    assert run(forwarder, upstream=OK) == [SendClient(OK_CLIENT), SendUpstream(GET_UPSTREAM)]


def test_100_continue_is_passed_on_and_a_head_response_has_no_body() -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=b"PUT http://h/ HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 2\r\n\r\n")
    assert run(forwarder, upstream=b"HTTP/1.1 100 Continue\r\n\r\n") == [
        SendClient(b"HTTP/1.1 100 Continue\r\n\r\n")]
    assert run(forwarder, client=b"ok", upstream=b"HTTP/1.1 204 No Content\r\n\r\n") == [
        SendUpstream(b"ok"), SendClient(b"HTTP/1.1 204 No Content\r\n\r\n")]
    run(forwarder, client=b"HEAD http://h/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert run(forwarder, upstream=b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n") == [
        SendClient(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n")]


def test_an_answer_before_the_whole_body_closes_both_connections_after_it() -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nab")
    assert run(forwarder, upstream=b"HTTP/1.1 413 Too Big\r\nContent-Length: 0\r\n\r\n") == [
        SendClient(b"HTTP/1.1 413 Too Big\r\ncontent-length: 0\r\n\r\n"), DropUpstream(),
        CloseClient()]


# --- failures ------------------------------------------------------------------------


def status_of(commands: list[Command]) -> bytes:
    assert commands[-1] == CloseClient()
    sent = b"".join(c.data for c in commands if isinstance(c, SendClient))
    return sent.split(b"\r\n", 1)[0]


def test_every_request_needs_the_proxy_secret_when_one_is_set() -> None:
    forwarder = HttpForwarder(credentials=SECRET)
    with_secret = GET[:-2] + AUTH + b"\r\n"
    run(forwarder, client=with_secret, upstream=OK)
    assert status_of(run(forwarder, client=GET)) == \
        b"HTTP/1.1 407 Proxy Authentication Required"
    wrong = GET[:-2] + b"Proxy-Authorization: Basic " + \
        base64.b64encode(b"portcullis:wrong") + b"\r\n\r\n"
    assert status_of(run(HttpForwarder(credentials=SECRET), client=wrong)).startswith(
        b"HTTP/1.1 407 ")
    assert forwarder.closed and not forwarder.wants_client_data


@pytest.mark.parametrize(("data", "status"), [
    (b"GET http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", b"400 Bad Request"),
    (b"GET http://h/ HTTP/1.1\r\n\r\n", b"400 Bad Request"),   # HTTP/1.1 needs Host
    (b"\x16\x03\x01\x00\x05hello\r\n\r\n", b"400 Bad Request"),
    (b"GET http://h/ HTTP/1.1\r\nX: " + b"a" * 20_000, b"431 Request Header Fields Too Large"),
    (b"GET http://h/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
     b"501 Not Implemented"),
    (b"GET https://h/ HTTP/1.1\r\nHost: h\r\n\r\n", b"400 Bad Request"),
])
def test_a_request_that_is_not_forwardable_is_answered_and_the_connection_closes(
        data: bytes, status: bytes) -> None:
    for split in (0, 1):
        commands = run(HttpForwarder(), client=data, split=split)
        assert status_of(commands) == b"HTTP/1.1 " + status
        assert not any(isinstance(c, OpenUpstream) for c in commands)


def test_a_refused_stream_is_told_to_the_client_in_a_few_words() -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET)
    forwarder.upstream_failed(403, 'denied: denied by rule "no-ssh"')
    commands = forwarder.commands()
    assert commands == [SendClient(
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b'Content-Length: 32\r\nConnection: close\r\n\r\ndenied: denied by rule "no-ssh"\n'),
        CloseClient()]


@pytest.mark.parametrize(("upstream", "status"), [
    (b"", b"502 Bad Gateway"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", b"502 Bad Gateway"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20_000, b"502 Bad Gateway"),
])
def test_an_upstream_that_does_not_answer_http_gives_502(upstream: bytes, status: bytes) -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET)
    forwarder.receive_upstream(upstream)
    forwarder.receive_upstream(b"")
    assert status_of(forwarder.commands()) == b"HTTP/1.1 " + status


def test_an_upstream_lost_mid_body_cuts_the_response_short() -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET)
    forwarder.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhal")
    forwarder.receive_upstream(b"")
    assert run(forwarder) == [
        SendClient(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhal"), DropUpstream(),
        CloseClient()]


@pytest.mark.parametrize(("client", "upstream", "expected"), [
    (b"", b"", []),                                           # idle keep-alive: just close
    (b"GET http://h/ HTT", b"", [b"HTTP/1.1 408 Request Timeout"]),
    (b"POST http://h/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab", b"",
     [b"HTTP/1.1 408 Request Timeout"]),
    (GET, b"", [b"HTTP/1.1 504 Gateway Timeout"]),
    (GET, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", []),   # mid-body: close
])
def test_an_idle_connection_is_answered_by_where_it_stands_and_closed(
        client: bytes, upstream: bytes, expected: list[bytes]) -> None:
    forwarder = HttpForwarder()
    run(forwarder, client=GET, upstream=OK)
    run(forwarder, client=client, upstream=upstream)
    forwarder.idle_expired()
    commands = forwarder.commands()
    assert commands[-1] == CloseClient()
    sent = [c.data[:len(e)] for c, e in zip(
        [c for c in commands if isinstance(c, SendClient)], expected, strict=False)]
    assert sent == expected
    assert len([c for c in commands if isinstance(c, SendClient)]) == len(expected)


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_any_split_of_an_exchange_gives_the_same_bytes_both_ways(cuts: list[int]) -> None:
    client = GET + (b"POST http://wiki.corp.example/f HTTP/1.1\r\nHost: w\r\n"
                    b"Content-Length: 3\r\n\r\nabc") + GET
    # Lengths, not chunks: chunk boundaries follow how the bytes arrived.
    upstream = OK + b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok" + OK

    def exchange(pieces: list[bytes], answer: list[bytes]) -> tuple[bytes, bytes]:
        forwarder = HttpForwarder()
        for piece in pieces:
            forwarder.receive_client(piece)
        for piece in answer:
            forwarder.receive_upstream(piece)
        commands = forwarder.commands()
        assert sum(isinstance(c, OpenUpstream) for c in commands) == 1
        return (b"".join(c.data for c in commands if isinstance(c, SendUpstream)),
                b"".join(c.data for c in commands if isinstance(c, SendClient)))

    def split(data: bytes) -> list[bytes]:
        points = sorted({c % (len(data) + 1) for c in cuts})
        pieces = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
        return [piece for piece in pieces if piece]   # b"" would say the peer closed

    assert exchange(split(client), split(upstream)) == exchange([client], [upstream])
