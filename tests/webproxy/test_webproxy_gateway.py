"""A web application behind a running gateway (`portcullis up`): the sign-in handoff,
the assertion as an application verifies it (PyJWT, the published JWKS), what is
stripped, rewritten and refused, WebSockets and their end with the session.

The application is tests/peers/webapp.py on loopback; clients connect to 127.0.0.1 and
name the host in SNI and Host, as a browser resolving `*.localhost` would."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Iterator
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import psutil
import pytest
import websockets

from conftest import Deployment, Process, init_deployment
from peers.webapp import WebApp, serve_webapp

PASSWORD = "correct horse battery staple"
GIB = 1024 ** 3


class LoopbackBackend(httpcore.SyncBackend):
    """Every name is 127.0.0.1 (TLS still checks the name asked for)."""

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return super().connect_tcp("127.0.0.1", port, timeout, local_address, socket_options)


def browser(ca: Path) -> httpx.Client:
    """An HTTP client that reaches every *.localhost name on loopback; it follows no
    redirect and keeps no cookie of its own (the tests carry them)."""
    transport = httpx.HTTPTransport()
    context = ssl.create_default_context(cafile=str(ca))
    transport._pool = httpcore.ConnectionPool(ssl_context=context,
                                              network_backend=LoopbackBackend())
    client = httpx.Client(transport=transport, timeout=60, follow_redirects=False)
    client.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    return client


class Published:
    """The running deployment, its two web resources and their applications."""

    def __init__(self, deployment: Deployment, wiki: WebApp, other: WebApp) -> None:
        self.deployment = deployment
        self.wiki = wiki
        self.other = other
        self.port = deployment.port
        self.gateway = f"https://localhost:{deployment.port}"
        self.client = browser(deployment.ca)

    def origin(self, host: str) -> str:
        return f"https://{host}:{self.port}"

    def sign_in(self, user: str) -> str:
        first = self.client.post(self.gateway + "/api/v1/login", json={}).json()
        answer = self.client.post(self.gateway + "/api/v1/login", json={
            "handle": first["handle"], "answers": {"username": user, "password": PASSWORD}})
        assert answer.json()["status"] == "authenticated", answer.text
        return str(answer.json()["token"])

    def enter(self, token: str, name: str = "wiki", target: str = "/whoami") -> str:
        """Follow the portal's handoff to the application's host; its app cookie."""
        entry = self.client.get(f"{self.gateway}/web/{name}", params={"next": target},
                                headers={"authorization": f"Bearer {token}"})
        assert entry.status_code == 303, entry.text
        enter = self.client.get(entry.headers["location"])
        assert enter.status_code == 303, enter.text
        assert enter.headers["location"] == target
        cookie = enter.headers["set-cookie"]
        assert cookie.startswith("__Host-portcullis-app=")
        return cookie.split(";", 1)[0]

    def audit(self) -> list[dict[str, Any]]:
        path = self.deployment.directory / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    deployment = init_deployment(tmp_path_factory.mktemp("webproxy") / "deployment")
    jwks = f"https://localhost:{deployment.port}/.well-known/jwks.json"
    wiki_serving = serve_webapp(jwks, f"https://wiki.localhost:{deployment.port}",
                                deployment.ca)
    other_serving = serve_webapp(jwks, f"https://other.localhost:{deployment.port}",
                                 deployment.ca)
    wiki, other = next(wiki_serving), next(other_serving)
    deployment.add_web_resource("wiki", wiki.url, "wiki.localhost", ["staff"])
    deployment.add_web_resource("other", other.url, "other.localhost", ["staff"])
    # "plain" is "other"'s application again, with identity headers.
    deployment.add_web_resource("plain", other.url, "plain.localhost", ["staff"],
                                identity_headers=True)
    # "loop" names its upstream: a name that resolves to the gateway host's loopback is
    # no destination (only an address literal there is the administrator's choice).
    deployment.add_web_resource("loop", f"http://localhost:{wiki.port}", "loop.localhost",
                                ["staff"])
    deployment.add_user("alice", PASSWORD, ["staff"])
    deployment.add_user("bob", PASSWORD, ["finance"])
    process = Process(["up", "--dir", str(deployment.directory)],
                      deployment.directory.parent / "up.log")
    try:
        process.wait_for(r"Portal: https://")
        published = Published(deployment, wiki, other)
        yield published
        published.client.close()   # no keep-alive connection for the gateway to wait on
    finally:
        process.stop()
        for serving in (wiki_serving, other_serving):
            serving.close()


def test_a_signed_in_user_reaches_the_application_which_verifies_who_they_are(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice"))
    answer = published.client.get(
        published.origin("wiki.localhost") + "/whoami?x=1",
        headers={"cookie": f"{cookie}; theirs=kept", "x-portcullis-assertion": "forged",
                 "x-forwarded-user": "root", "x-forwarded-for": "203.0.113.9",
                 "forwarded": "for=203.0.113.9", "x-portcullis-anything": "forged"})
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    assert seen["error"] is None
    claims = seen["claims"]
    assert claims["username"] == "alice" and claims["groups"] == ["staff"]
    assert claims["iss"] == published.gateway
    assert claims["aud"] == published.origin("wiki.localhost")
    assert 0 < claims["exp"] - claims["iat"] <= 60
    headers = dict(seen["headers"])
    assert headers["host"] == urlsplit(published.wiki.url).netloc
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == f"wiki.localhost:{published.port}"
    assert headers["cookie"] == "theirs=kept"   # the app cookie never goes upstream
    assert "x-forwarded-user" not in headers and "forwarded" not in headers
    assert "x-portcullis-anything" not in headers
    assert seen["query"] == "x=1"


def test_identity_headers_when_asked_for_are_the_gateways_never_the_clients(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice"), "plain")
    seen = published.client.get(published.origin("plain.localhost") + "/whoami",
                                headers={"cookie": cookie, "x-forwarded-user": "root",
                                         "x-forwarded-groups": "admins"}).json()
    headers = [[name, value] for name, value in seen["headers"]
               if name.startswith("x-forwarded-") and name not in (
                   "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")]
    assert headers == [["x-forwarded-user", "alice"], ["x-forwarded-groups", "staff"]]
    # The same application behind another host name: an assertion for that one is not
    # one for this (its audience says so).
    assert seen["claims"] is None and "audience" in seen["error"].lower()


def test_a_post_body_goes_through_and_the_answer_keeps_the_applications_headers(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice"))
    answer = published.client.post(published.origin("wiki.localhost") + "/whoami",
                                    headers={"cookie": cookie}, content=b"z" * 50_000)
    assert answer.json()["method"] == "POST" and answer.json()["body"] == 50_000
    # The portal's policy headers are not forced on the application.
    assert "content-security-policy" not in answer.headers


def test_an_upstream_named_to_resolve_to_the_gateway_host_is_refused(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice"), "loop")
    before = len(published.wiki.requests)
    answer = published.client.get(published.origin("loop.localhost") + "/whoami",
                                  headers={"cookie": cookie})
    assert answer.status_code == 502
    assert "localhost:" not in answer.text and str(published.wiki.port) not in answer.text
    assert len(published.wiki.requests) == before
    assert any(event["event"] == "web.upstream_refused" for event in published.audit())


def test_a_body_over_the_edges_limit_is_refused_also_when_chunked(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice")).encode()
    before = len(published.wiki.requests)
    chunk = b"a" * 100_000
    answer = raw_request(published, "wiki.localhost",
                         b"POST /whoami HTTP/1.1\r\nHost: wiki.localhost\r\nCookie: " + cookie +
                         b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
                         b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    sized = published.client.post(published.origin("wiki.localhost") + "/whoami",
                                   content=chunk, headers={"cookie": cookie.decode()})
    assert sized.status_code == 413
    assert len(published.wiki.requests) <= before + 1   # the chunked one may have begun


def test_without_a_session_a_navigation_is_sent_to_sign_in_and_a_post_is_refused(
        published: Published) -> None:
    before = len(published.wiki.requests)
    origin = published.origin("wiki.localhost")
    navigation = published.client.get(origin + "/whoami?a=b")
    assert navigation.status_code == 303
    assert navigation.headers["location"] == (published.gateway +
                                              "/web/wiki?next=%2Fwhoami%3Fa%3Db")
    post = published.client.post(origin + "/whoami", content=b"x",
                                  headers={"cookie": "__Host-portcullis-app=made-up"})
    assert post.status_code == 401
    assert "Sign in again" in post.text
    assert len(published.wiki.requests) == before


def test_a_user_outside_the_groups_gets_the_not_allowed_page_and_nothing_reaches_the_app(
        published: Published) -> None:
    before = len(published.wiki.requests)
    token = published.sign_in("bob")
    entry = published.client.get(f"{published.gateway}/web/wiki", params={"next": "/"},
                                 headers={"authorization": f"Bearer {token}"})
    assert entry.status_code == 403
    assert "Not allowed" in entry.text
    assert len(published.wiki.requests) == before
    assert any(event["event"] == "web.denied" and event.get("user") == "bob"
               for event in published.audit())


def test_a_code_redeems_once_and_the_app_cookie_is_worth_nothing_on_another_host(
        published: Published) -> None:
    token = published.sign_in("alice")
    entry = published.client.get(f"{published.gateway}/web/wiki", params={"next": "/"},
                                 headers={"authorization": f"Bearer {token}"})
    code_url = entry.headers["location"]
    first = published.client.get(code_url)
    assert first.status_code == 303
    set_cookie = first.headers["set-cookie"].lower()
    for attribute in ("secure", "httponly", "samesite=lax", "path=/"):
        assert attribute in set_cookie
    assert "domain" not in set_cookie
    assert first.headers["cache-control"] == "no-store"
    assert published.client.get(code_url).status_code == 403   # used
    wiki_before = len(published.wiki.requests)
    own = published.client.post(published.origin("wiki.localhost") + "/.portcullis/enter",
                                headers={"cookie": first.headers["set-cookie"].split(";")[0]})
    assert own.status_code == 404 and len(published.wiki.requests) == wiki_before
    before = len(published.other.requests)
    cookie = first.headers["set-cookie"].split(";", 1)[0]
    elsewhere = published.client.get(published.origin("other.localhost") + "/whoami",
                                     headers={"cookie": cookie})
    assert elsewhere.status_code == 303   # to sign in for "other"
    assert len(published.other.requests) == before


def test_redirects_to_upstreams_are_rewritten_and_to_internal_addresses_refused(
        published: Published) -> None:
    cookie = {"cookie": published.enter(published.sign_in("alice"))}
    origin = published.origin("wiki.localhost")

    def redirect(to: str) -> httpx.Response:
        return published.client.get(origin + "/redirect", params={"to": to}, headers=cookie)

    assert redirect(published.wiki.url + "/x?y=1").headers["location"] == origin + "/x?y=1"
    assert redirect(published.other.url + "/z").headers["location"] == (
        published.origin("other.localhost") + "/z")
    assert redirect("https://example.org/").headers["location"] == "https://example.org/"
    refused = redirect("http://10.1.2.3:8080/admin")
    assert refused.status_code == 502
    assert "10.1.2.3" not in refused.text and "location" not in refused.headers
    assert any(event["event"] == "web.redirect_refused" for event in published.audit())


def test_a_cookie_for_the_gateways_domain_is_refused_and_others_made_host_only(
        published: Published) -> None:
    cookie = {"cookie": published.enter(published.sign_in("alice"))}
    origin = published.origin("wiki.localhost")
    refused = published.client.get(origin + "/cookie",
                                   params={"set": "steal=1; Domain=.localhost; Path=/"},
                                   headers=cookie)
    assert "set-cookie" not in refused.headers
    assert any(event["event"] == "web.cookie_refused" for event in published.audit())
    kept = published.client.get(origin + "/cookie",
                                params={"set": "app=1; Domain=127.0.0.1; Path=/"},
                                headers=cookie)
    assert kept.headers["set-cookie"] == "app=1; Path=/; Secure"
    own = published.client.get(origin + "/cookie",
                               params={"set": "__Host-portcullis-app=mine; Path=/"},
                               headers=cookie)
    assert "set-cookie" not in own.headers


def raw_request(published: Published, server_name: str, head: bytes) -> bytes:
    context = ssl.create_default_context(cafile=str(published.deployment.ca))
    with socket.create_connection(("127.0.0.1", published.port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname=server_name) as tls:
        tls.sendall(head)
        received = b""
        while b"\r\n\r\n" not in received:
            data = tls.recv(65536)
            if not data:
                break
            received += data
        return received


def test_another_resources_host_or_an_absolute_form_on_a_resources_connection_is_refused(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice")).encode()
    before = len(published.other.requests) + len(published.wiki.requests)
    other_host = raw_request(published, "wiki.localhost",
                             b"GET /whoami HTTP/1.1\r\nHost: other.localhost\r\nCookie: " +
                             cookie + b"\r\n\r\n")
    assert other_host.startswith(b"HTTP/1.1 421")
    absolute = raw_request(published, "wiki.localhost",
                           b"GET http://wiki.localhost/whoami HTTP/1.1\r\n"
                           b"Host: wiki.localhost\r\nCookie: " + cookie + b"\r\n\r\n")
    assert absolute.startswith(b"HTTP/1.1 421")
    unknown = raw_request(published, "localhost",
                          b"GET / HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
    assert unknown.startswith(b"HTTP/1.1 421")
    two_hosts = raw_request(published, "wiki.localhost",
                            b"GET /whoami HTTP/1.1\r\nHost: wiki.localhost\r\n"
                            b"Host: other.localhost\r\nCookie: " + cookie + b"\r\n\r\n")
    assert two_hosts.startswith(b"HTTP/1.1 4")
    gateway_on_resource = raw_request(published, "wiki.localhost",
                                      b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert gateway_on_resource.startswith(b"HTTP/1.1 421")
    assert len(published.other.requests) + len(published.wiki.requests) == before


async def test_a_websocket_echoes_through_the_resource_and_ends_within_a_second_of_sign_out(
        published: Published) -> None:
    token = published.sign_in("alice")
    cookie = published.enter(token)
    context = ssl.create_default_context(cafile=str(published.deployment.ca))
    async with websockets.connect(f"wss://wiki.localhost:{published.port}/ws?assertion=1",
                                  host="127.0.0.1", ssl=context,
                                  additional_headers={"cookie": cookie}) as ws:
        assert await asyncio.wait_for(ws.recv(), 10) == "alice"
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello"
        await ws.send(b"\x00\x01" * 40_000)
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\x01" * 40_000
        signed_out = await asyncio.to_thread(
            published.client.post, published.gateway + "/api/v1/logout",
            headers={"authorization": f"Bearer {token}"})
        assert signed_out.status_code == 200
        ended = time.monotonic()
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 1.0)
        assert time.monotonic() - ended < 1.0
    # The app cookie died with the session too.
    after = await asyncio.to_thread(published.client.get,
                                    published.origin("wiki.localhost") + "/whoami",
                                    headers={"cookie": cookie})
    assert after.status_code == 303


async def test_a_websocket_without_a_session_or_for_another_host_is_refused(
        published: Published) -> None:
    cookie = await asyncio.to_thread(published.enter,
                                     await asyncio.to_thread(published.sign_in, "alice"))
    context = ssl.create_default_context(cafile=str(published.deployment.ca))
    before = len(published.wiki.requests) + len(published.other.requests)
    # No app cookie; then a connection opened for wiki (SNI) asking for other (Host).
    for host, headers, status in (("wiki", {}, 401), ("other", {"cookie": cookie}, 421)):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"wss://{host}.localhost:{published.port}/ws",
                                          host="127.0.0.1", ssl=context,
                                          server_hostname="wiki.localhost",
                                          additional_headers=headers):
                pass
        assert refused.value.response.status_code == status
    assert len(published.wiki.requests) + len(published.other.requests) == before


def test_what_a_slow_application_sends_reaches_the_browser_at_once(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice"))
    published.wiki.drip.clear()
    with published.client.stream("GET", published.origin("wiki.localhost") + "/drip",
                                 headers={"cookie": cookie}) as got:
        lines = got.iter_lines()
        assert next(lines) == "first"   # while the application still holds the second
        published.wiki.drip.set()
        assert next(lines) == "second"


def test_a_gibibyte_from_the_application_streams_with_flat_memory(
        published: Published) -> None:
    cookie = published.enter(published.sign_in("alice"))
    gateway = psutil.Process(published_pid(published))
    start = gateway.memory_info().rss
    peak = start
    received = 0
    with published.client.stream("GET", published.origin("wiki.localhost") + "/big",
                                 params={"size": str(GIB)}, headers={"cookie": cookie}) as got:
        assert got.status_code == 200
        assert got.headers["content-length"] == str(GIB)
        for chunk in got.iter_raw(1024 * 1024):
            received += len(chunk)
            if received % (64 * 1024 * 1024) < len(chunk):
                peak = max(peak, gateway.memory_info().rss)
    assert received == GIB
    assert peak - start < 64 * 1024 * 1024, (start, peak)


def published_pid(published: Published) -> int:
    """The gateway's process: the one listening on the deployment's port."""
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == published.port:
            assert connection.pid is not None
            return connection.pid
    raise AssertionError("no process listens on the gateway's port")
