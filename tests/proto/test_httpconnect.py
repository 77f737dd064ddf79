"""The HTTP CONNECT proxy codec, specified by the bytes it reads and writes."""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.errors import ProtocolError
from portcullis.proto.httpconnect import (
    MAX_EARLY_DATA,
    ConnectRequest,
    HttpConnectConnection,
    State,
    status_for,
)
from portcullis.proto.proxyauth import ProxyCredentials

SECRET = ProxyCredentials("portcullis", "s3cret")
HEAD = b"CONNECT wiki.corp.example:443 HTTP/1.1\r\nHost: wiki.corp.example:443\r\n"
REQUEST = HEAD + b"\r\n"


def authorization(user: bytes, password: bytes, scheme: bytes = b"Basic") -> bytes:
    return b"Proxy-Authorization: " + scheme + b" " + base64.b64encode(user + b":" + password)


@dataclass(frozen=True)
class Outcome:
    error: str | None
    sent: bytes
    request: ConnectRequest | None
    payload: bytes
    state: State


def feed(chunks: list[bytes], credentials: ProxyCredentials | None = None) -> Outcome:
    conn = HttpConnectConnection(credentials=credentials)
    error = None
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except ProtocolError as exc:
            error = str(exc)
            break
    return Outcome(error, conn.data_to_send(), conn.next_request(), conn.take_payload(),
                   conn.state)


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


def status_line(sent: bytes) -> bytes:
    return sent.split(b"\r\n", 1)[0]


# --- requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [(b"wiki.corp.example:443", ConnectRequest("wiki.corp.example", 443)),
     (b"10.0.0.1:22", ConnectRequest("10.0.0.1", 22)),
     (b"[2001:db8::1]:8443", ConnectRequest("2001:db8::1", 8443)),
     (b"xn--bcher-kva.example:1", ConnectRequest("xn--bcher-kva.example", 1)),
     (b"host:65535", ConnectRequest("host", 65535))])
def test_a_connect_request_is_parsed_byte_by_byte_like_in_one_chunk(
        target: bytes, expected: ConnectRequest) -> None:
    data = b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\n"
    whole = feed([data])
    assert whole == Outcome(None, b"", expected, b"", State.REPLY_PENDING)
    assert feed(one_byte_at_a_time(data)) == whole


def test_bytes_after_the_head_are_kept_for_the_stream() -> None:
    outcome = feed([REQUEST + b"\x16\x03\x01hello"])
    assert outcome.payload == b"\x16\x03\x01hello"


def test_accept_answers_200_and_makes_the_connection_a_relay() -> None:
    conn = HttpConnectConnection()
    conn.receive_data(REQUEST)
    assert conn.next_request() is not None
    assert conn.next_request() is None   # exactly once
    conn.accept()
    assert conn.data_to_send() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert conn.state is State.RELAY
    conn.receive_data(b"more")
    assert conn.take_payload() == b"more"


@pytest.mark.parametrize(("reason", "status"), [("denied", 403), ("refused", 502),
                                                ("timed_out", 502), ("whatever", 502)])
def test_a_refusal_carries_its_status_and_the_gateways_words(reason: str, status: int) -> None:
    conn = HttpConnectConnection()
    conn.receive_data(REQUEST + b"early")
    conn.refuse(status_for(reason), 'denied by rule "no-ssh"')
    sent = conn.data_to_send()
    assert status_line(sent).startswith(b"HTTP/1.1 %d " % status)
    assert sent.endswith(b'\r\n\r\ndenied by rule "no-ssh"\n')
    assert b"Connection: close" in sent
    assert conn.state is State.CLOSED and conn.take_payload() == b""


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"CONNECT wiki HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT wiki:0 HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT wiki:65536 HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT wiki:+80 HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT [::1:22 HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT [fe80::1%25eth0]:22 HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT wi;ki:22 HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT :22 HTTP/1.1\r\nHost: wiki\r\n\r\n", b"400"),
     (b"CONNECT wiki:22 HTTP/1.1\r\n\r\n", b"400"),   # HTTP/1.1 needs Host
     (b"\x00CONNECT wiki:22 HTTP/1.1\r\n\r\n", b"400")],
    ids=["no-port", "port-0", "port-too-big", "signed-port", "open-bracket",
         "ipv6-scope", "bad-name", "no-host", "no-host-header", "nul"])
def test_a_request_that_cannot_be_carried_is_answered_and_fails(data: bytes,
                                                                 status: bytes) -> None:
    whole = feed([data])
    assert whole.error is not None and whole.state is State.FAILED
    assert status_line(whole.sent).split(b" ")[1] == status
    assert whole.request is None
    assert feed(one_byte_at_a_time(data)) == whole


def test_a_head_larger_than_the_limit_fails_with_431() -> None:
    outcome = feed([b"CONNECT a:1 HTTP/1.1\r\nX: " + b"a" * (20 * 1024)])
    assert status_line(outcome.sent) == b"HTTP/1.1 431 Request Header Fields Too Large"


@pytest.mark.parametrize("chunks", [[b"POST http://wiki/form HTTP/1.1\r\nHost: wiki\r\n"
                                     b"Content-Length: 4\r\n\r\nbody"],
                                    one_byte_at_a_time(b"POST http://wiki/form HTTP/1.1\r\n"
                                                       b"Host: wiki\r\nContent-Length: 4"
                                                       b"\r\n\r\nbody")],
                         ids=["whole", "byte-by-byte"])
def test_a_first_request_other_than_connect_is_handed_over_with_its_body(
        chunks: list[bytes]) -> None:
    conn = HttpConnectConnection(credentials=SECRET)   # the forwarder checks it, per request
    for chunk in chunks:
        conn.receive_data(chunk)
    assert conn.state is State.FORWARD
    assert conn.next_request() is None and conn.data_to_send() == b""
    http, request = conn.take_forward()
    assert (request.method, request.target) == (b"POST", b"http://wiki/form")
    assert http.next_event() == h11.Data(data=b"body")
    assert conn.state is State.CLOSED
    with pytest.raises(ProtocolError):
        conn.take_forward()


def test_early_data_beyond_the_limit_fails() -> None:
    conn = HttpConnectConnection()
    conn.receive_data(REQUEST + b"x" * MAX_EARLY_DATA)
    with pytest.raises(ProtocolError, match="before the answer"):
        conn.receive_data(b"y")


def test_anything_after_a_failure_raises_again() -> None:
    conn = HttpConnectConnection()
    with pytest.raises(ProtocolError):
        conn.receive_data(b"CONNECT x HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.data_to_send()
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive_data(REQUEST)
    assert conn.data_to_send() == b""


def test_a_handshake_that_times_out_is_answered_408_and_later_input_ignored() -> None:
    conn = HttpConnectConnection()
    conn.receive_data(HEAD)          # no blank line yet
    conn.time_out()
    assert status_line(conn.data_to_send()) == b"HTTP/1.1 408 Request Timeout"
    assert conn.state is State.CLOSED
    conn.receive_data(b"\r\n")
    assert conn.next_request() is None and conn.data_to_send() == b""


def test_answering_when_no_request_is_pending_is_refused() -> None:
    conn = HttpConnectConnection()
    with pytest.raises(ProtocolError):
        conn.accept()
    with pytest.raises(ValueError):
        conn.refuse(200, "no")


# --- Proxy-Authorization ---------------------------------------------------------------


def test_with_credentials_the_right_basic_authorization_passes() -> None:
    data = HEAD + authorization(b"portcullis", b"s3cret") + b"\r\n\r\n"
    outcome = feed(one_byte_at_a_time(data), SECRET)
    assert outcome.request == ConnectRequest("wiki.corp.example", 443)


def test_the_authorization_scheme_name_is_case_insensitive() -> None:
    data = HEAD + authorization(b"portcullis", b"s3cret", b"bAsIc") + b"\r\n\r\n"
    assert feed([data], SECRET).request is not None


@pytest.mark.parametrize(
    "header",
    [b"", authorization(b"portcullis", b"wrong"), authorization(b"other", b"s3cret"),
     authorization(b"portcullis", b"s3cret", b"Bearer"),
     b"Proxy-Authorization: Basic !!notbase64!!",
     b"Proxy-Authorization: Basic " + base64.b64encode(b"portcullis-s3cret"),
     authorization(b"portcullis", b"s3cret") + b"\r\n" + authorization(b"portcullis", b"s3cret"),
     b"Authorization: Basic " + base64.b64encode(b"portcullis:s3cret")],
    ids=["missing", "wrong-password", "wrong-user", "other-scheme", "not-base64", "no-colon",
         "twice", "origin-authorization"])
def test_without_the_right_authorization_the_answer_is_407_with_a_challenge(
        header: bytes) -> None:
    data = HEAD + (header + b"\r\n" if header else b"") + b"\r\n"
    outcome = feed([data], SECRET)
    assert status_line(outcome.sent) == b"HTTP/1.1 407 Proxy Authentication Required"
    assert b'\r\nProxy-Authenticate: Basic realm="portcullis connect"\r\n' in outcome.sent
    assert outcome.request is None and outcome.state is State.FAILED
    assert b"s3cret" not in outcome.sent


def test_without_credentials_an_authorization_header_is_ignored() -> None:
    data = HEAD + authorization(b"anyone", b"anything") + b"\r\n\r\n"
    assert feed([data]).request is not None


# --- properties ------------------------------------------------------------------------


@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0), max_size=8),
       with_secret=st.booleans())
def test_arbitrary_bytes_raise_only_protocol_error_with_the_same_outcome_for_any_split(
        data: bytes, cuts: list[int], with_secret: bool) -> None:
    credentials = SECRET if with_secret else None
    whole = feed([data], credentials)
    assert feed(split_at(data, cuts), credentials) == whole


@given(host=st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}", fullmatch=True),
       port=st.integers(1, 65535), early=st.binary(max_size=64),
       cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_a_valid_request_split_anywhere_gives_the_same_request_and_payload(
        host: str, port: int, early: bytes, cuts: list[int]) -> None:
    target = f"{host}:{port}".encode()
    data = (b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n"
            + authorization(b"portcullis", b"s3cret") + b"\r\n\r\n" + early)
    outcome = feed(split_at(data, cuts), SECRET)
    assert outcome == Outcome(None, b"", ConnectRequest(host, port), early,
                              State.REPLY_PENDING)
