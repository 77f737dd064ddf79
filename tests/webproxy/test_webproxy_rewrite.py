"""The web proxy's pure parts, byte by byte: hosts, request headers, redirects, cookies,
and the decision on each request."""

from __future__ import annotations

import pytest

from portcullis.config.model import Resource
from portcullis.identity.claims import Claims
from portcullis.identity.endings import Ending
from portcullis.identity.sessions import Session
from portcullis.webproxy.assertion import assertion_claims, identity_headers
from portcullis.webproxy.decisions import admit_request, is_navigation
from portcullis.webproxy.rewrite import (
    Forwarding,
    browser_response_headers,
    cookie_value,
    rewrite_location,
    rewrite_set_cookie,
    upstream_request_headers,
    without_cookie,
)
from portcullis.webproxy.sites import Destination, Sites, covers, host_name

GATEWAY = "https://gw.example.org:8443"


def resource(name: str, upstream: str, host: str, groups: list[str] | None = None
             ) -> Resource:
    return Resource(name=name, title=name, kind="web", upstream=upstream, host=host,
                    groups=groups or ["staff"])


SITES = Sites([resource("wiki", "http://10.0.0.5:8080/wiki", "wiki.gw.example.org"),
               resource("chat", "https://chat.corp:443", "chat.gw.example.org"),
               Resource(name="ssh", title="ssh", address="10.0.0.9:22", groups=["staff"])],
              GATEWAY)
WIKI = SITES.by_name("wiki")
CHAT = SITES.by_name("chat")
assert WIKI is not None and CHAT is not None


def public(name: str) -> bool:
    return SITES.is_public(name)


# -- sites ------------------------------------------------------------------------------
def test_sites_know_each_web_resource_by_its_host_and_nothing_else() -> None:
    assert [site.name for site in SITES.all] == ["wiki", "chat"]
    assert WIKI.upstream_host_header == b"10.0.0.5:8080"
    assert CHAT.upstream_host_header == b"chat.corp"
    assert WIKI.public_origin == "https://wiki.gw.example.org:8443"
    assert WIKI.upstream_target(b"/a%20b", b"q=1") == b"/wiki/a%20b?q=1"


@pytest.mark.parametrize(("host", "destination"), [
    (b"wiki.gw.example.org", Destination.WEB),
    (b"WIKI.gw.example.org.:8443", Destination.WEB),
    (b"gw.example.org:8443", Destination.GATEWAY),
    (b"localhost", Destination.GATEWAY),
    (b"127.0.0.1:8443", Destination.GATEWAY),
    (b"[::1]:8443", Destination.GATEWAY),
    (None, Destination.GATEWAY),
    (b"evil.example", Destination.UNKNOWN),
    (b"other.gw.example.org", Destination.UNKNOWN),
    (b"wiki.gw.example.org@evil", Destination.UNKNOWN),
    (b"\xff", Destination.UNKNOWN),
])
def test_a_request_goes_where_its_host_says(host: bytes | None,
                                           destination: Destination) -> None:
    assert SITES.destination(host)[0] is destination


def test_host_names_lose_port_case_brackets_and_the_trailing_dot() -> None:
    assert host_name("Wiki.Example.:443") == "wiki.example"
    assert host_name("[::1]:80") == "::1"
    assert host_name("[::1]x") is None
    assert host_name("") is None


def test_a_wildcard_covers_exactly_one_label() -> None:
    assert covers(["*.gw.example.org"], "wiki.gw.example.org")
    assert not covers(["*.gw.example.org"], "a.wiki.gw.example.org")
    assert not covers(["*.gw.example.org"], "gw.example.org")
    assert covers(["wiki.gw.example.org"], "wiki.gw.example.org")
    assert not covers(["localhost"], "wiki.localhost")


# -- the request ------------------------------------------------------------------------
def test_the_upstream_gets_no_identity_forwarding_hop_by_hop_or_gateway_cookie_from_the_client(
        ) -> None:
    sent = [(b"Host", b"wiki.gw.example.org:8443"), (b"Accept", b"text/html"),
            (b"X-Portcullis-Assertion", b"forged"), (b"X-Forwarded-User", b"root"),
            (b"X-Forwarded-For", b"203.0.113.9"), (b"Forwarded", b"for=x"),
            (b"Connection", b"keep-alive, X-Secret"), (b"X-Secret", b"hop"),
            (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic x"), (b"Expect", b"100-continue"),
            (b"Cookie", b"a=1; __Host-portcullis-app=secret; b=2"),
            (b"Cookie", b"__Host-portcullis-app=again")]
    identity = [(b"x-portcullis-assertion", b"signed")]
    assert upstream_request_headers(sent, WIKI, Forwarding("192.0.2.1",
                                                           b"wiki.gw.example.org:8443",
                                                           identity)) == [
        (b"host", b"10.0.0.5:8080"), (b"accept", b"text/html"), (b"cookie", b"a=1; b=2"),
        (b"x-forwarded-for", b"192.0.2.1"), (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"wiki.gw.example.org:8443"),
        (b"x-portcullis-assertion", b"signed")]


def test_a_websocket_upgrade_keeps_its_handshake_headers() -> None:
    sent = [(b"host", b"wiki.gw.example.org"), (b"connection", b"Upgrade"),
            (b"upgrade", b"websocket"), (b"sec-websocket-key", b"k"),
            (b"sec-websocket-version", b"13")]
    headers = upstream_request_headers(sent, WIKI, Forwarding("192.0.2.1", b"w"),
                                       websocket=True)
    assert headers[:5] == [(b"host", b"10.0.0.5:8080"), (b"sec-websocket-key", b"k"),
                           (b"sec-websocket-version", b"13"), (b"connection", b"Upgrade"),
                           (b"upgrade", b"websocket")]


def test_cookies_are_read_and_removed_by_exact_name() -> None:
    headers = [(b"cookie", b"x__Host-portcullis-app=no; __Host-portcullis-app=yes")]
    assert cookie_value(headers, "__Host-portcullis-app") == "yes"
    assert without_cookie(headers[0][1], "__Host-portcullis-app") == \
        b"x__Host-portcullis-app=no"
    assert cookie_value([(b"cookie", b"a=1")], "__Host-portcullis-app") is None


# -- redirects --------------------------------------------------------------------------
@pytest.mark.parametrize(("location", "expected"), [
    (b"http://10.0.0.5:8080/wiki/page?x=1#top", b"https://wiki.gw.example.org:8443/page?x=1#top"),
    (b"http://10.0.0.5:8080/wiki", b"https://wiki.gw.example.org:8443/"),
    (b"https://chat.corp/room", b"https://chat.gw.example.org:8443/room"),
    (b"/wiki/start", b"/start"),
    (b"next.html", b"next.html"),
    (b"https://other.gw.example.org:8443/x", b"https://other.gw.example.org:8443/x"),
    (b"https://login.example.com/authorize?a=b", b"https://login.example.com/authorize?a=b"),
    (b"http://10.0.0.5:9090/", None),       # the upstream's host at another port
    (b"http://192.168.1.1/admin", None),
    (b"http://[fd00::1]/", None),
    (b"http://intranet/", None),
    (b"http://db.internal/", None),
    (b"http://127.0.0.1:5000/", None),
    (b"/elsewhere", None),                  # outside the prefix /wiki
    (b"http://10.0.0.5:8080/other", None),
    (b"http://[bad", None),
])
def test_redirects_are_rewritten_passed_or_refused(location: bytes,
                                                   expected: bytes | None) -> None:
    assert rewrite_location(location, WIKI, SITES.all, public).value == expected


# -- cookies ----------------------------------------------------------------------------
@pytest.mark.parametrize(("cookie", "expected"), [
    (b"sid=1; Path=/wiki/; HttpOnly", b"sid=1; Path=/; HttpOnly; Secure"),
    (b"sid=1; Domain=10.0.0.5; Secure", b"sid=1; Secure"),
    (b"sid=1; Domain=wiki.gw.example.org", b"sid=1; Secure"),
    (b"sid=1; Path=/wiki/x; SameSite=Strict", b"sid=1; Path=/x; SameSite=Strict; Secure"),
    (b"sid=1; Path=/other", b"sid=1; Path=/other; Secure"),
    (b"sid=1; Domain=gw.example.org", None),
    (b"sid=1; Domain=.example.org", None),
    (b"sid=1; Domain=org", None),
    (b"sid=1; Domain=chat.gw.example.org", None),
    (b"__Host-portcullis-app=x; Path=/", None),
    (b"__host-PORTCULLIS-session=x", None),
])
def test_cookies_become_host_only_and_secure_or_are_refused(cookie: bytes,
                                                            expected: bytes | None) -> None:
    assert rewrite_set_cookie(cookie, WIKI, "gw.example.org").value == expected


def test_an_answer_loses_hop_by_hop_headers_and_says_what_it_refused() -> None:
    answer = browser_response_headers(
        [(b"Content-Type", b"text/html"), (b"Connection", b"close, X-Hop"),
         (b"X-Hop", b"1"), (b"Transfer-Encoding", b"chunked"), (b"Keep-Alive", b"5"),
         (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2; Domain=example.org"),
         (b"Location", b"http://10.0.0.5:8080/wiki/x")], WIKI, SITES.all, "gw.example.org")
    assert answer.headers == [(b"content-type", b"text/html"),
                              (b"set-cookie", b"a=1; Secure"),
                              (b"location", b"https://wiki.gw.example.org:8443/x")]
    assert answer.refused_cookies == ("Domain=example.org is the gateway's domain or above",)
    assert answer.refused_location is None
    refused = browser_response_headers([(b"Location", b"http://10.9.9.9/")], WIKI,
                                       SITES.all, "gw.example.org")
    assert refused.headers == [] and refused.refused_location == "an internal address"


# -- decisions --------------------------------------------------------------------------
def session(groups: tuple[str, ...]) -> Session:
    return Session("h", Claims(sub="local:alice", username="alice", groups=groups),
                   "192.0.2.1", 0.0)


def test_a_request_is_admitted_only_with_a_live_session_allowed_for_this_resource() -> None:
    assert admit_request(WIKI, "wiki", session(("staff",))).allowed
    assert not admit_request(WIKI, None, None).allowed
    ended = admit_request(WIKI, "wiki", Ending.SIGNED_OUT)
    assert not ended.allowed and ended.reason == "the gateway session ended: signed out"
    other = admit_request(WIKI, "chat", session(("staff",)))
    assert not other.allowed and other.audited
    denied = admit_request(WIKI, "wiki", session(("finance",)))
    assert not denied.allowed and denied.audited and "none of the groups" in denied.reason
    assert is_navigation("GET") and is_navigation("HEAD") and not is_navigation("POST")


# -- the assertion ----------------------------------------------------------------------
def test_the_assertion_says_who_for_which_application_for_at_most_a_minute() -> None:
    claims = Claims(sub="ldap:alice", username="alice", groups=("staff", "ops"),
                    email="alice@example.org")
    assert assertion_claims(claims, WIKI, GATEWAY, 1000) == {
        "iss": GATEWAY, "aud": "https://wiki.gw.example.org:8443", "sub": "ldap:alice",
        "username": "alice", "email": "alice@example.org", "groups": ["staff", "ops"],
        "iat": 1000, "exp": 1060}
    assert identity_headers(claims) == [(b"x-forwarded-user", b"alice"),
                                        (b"x-forwarded-email", b"alice@example.org"),
                                        (b"x-forwarded-groups", b"staff,ops")]
