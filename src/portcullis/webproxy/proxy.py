"""The application's host: every request of a signed-in, allowed user goes to the
upstream, streamed both ways; everyone else is sent to sign in (navigations) or told
401.

Per request: the app cookie names a record (`handoff`) bound to this resource and a
gateway session; the session must still stand and the broker still allow the resource
(`decisions.admit_request`). Then the request goes on through the node's Dialer
(`net.httpdial.DialerTransport`, one keep-alive pool per upstream), with the headers of
`rewrite.upstream_request_headers` and a fresh assertion (each upstream connection
admitted like a launch's: `upstreams.AdmittedDialer`), and the answer comes back
with `rewrite.browser_response_headers`. Bodies are never held whole: chunks go on as
they come, under the transports' flow control.

`/.portcullis/enter` on the application's host redeems the portal's one-time code and
sets the app cookie. Never logs a cookie, a code or an assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import Message, Receive, Scope, Send

from portcullis.audit import AuditTrail
from portcullis.errors import StoreError
from portcullis.identity.endings import Ending
from portcullis.identity.sessions import Session, SessionManager
from portcullis.net.destinations import HostAddresses
from portcullis.net.dialer import Dialer
from portcullis.net.httpdial import DialerTransport
from portcullis.net.tls import client_context
from portcullis.portal.pages import error_page
from portcullis.portal.redirects import safe_next
from portcullis.webproxy.assertion import Asserter
from portcullis.webproxy.decisions import WebDecision, admit_request, is_navigation
from portcullis.webproxy.entry import ENTER_PATH, OWN_PATHS, entry_url
from portcullis.webproxy.handoff import Binding, Handoff
from portcullis.webproxy.rewrite import (
    APP_COOKIE,
    Forwarding,
    browser_response_headers,
    cookie_value,
    upstream_request_headers,
)
from portcullis.webproxy.sites import Site, Sites, host_name
from portcullis.webproxy.upstreams import AdmittedDialer

log = structlog.get_logger("portcullis.webproxy")
# httpx tells of every request at INFO: a proxy's every request is not news.
logging.getLogger("httpx").setLevel(logging.WARNING)

# An upstream may think for a while (a report, a long poll); a connection it never
# answers on is given up after this.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=15.0, read=300.0, write=60.0, pool=15.0)
# The most of an answer held between the upstream and the browser (see _stream_back).
COALESCE_LIMIT = 1024 * 1024


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def has_body(scope: Scope) -> bool:
    length = header(scope, b"content-length")
    return header(scope, b"transfer-encoding") is not None or (
        length is not None and length.strip() not in (b"", b"0"))


class WebProxy:
    def __init__(self, sites: Sites, sessions: SessionManager, handoff: Handoff,
                 asserter: Asserter, dialer: Dialer, audit: AuditTrail,
                 base_dir: Path) -> None:
        self.sites = sites
        self.sessions = sessions
        self.handoff = handoff
        self.asserter = asserter
        self.audit = audit
        host_addresses = HostAddresses()
        self._clients = {site.name: httpx.AsyncClient(
            transport=DialerTransport(AdmittedDialer(dialer, site.name, audit, host_addresses),
                                      _upstream_tls(site, base_dir)),
            timeout=UPSTREAM_TIMEOUT, follow_redirects=False) for site in sites.all}

    def client_for(self, site: Site) -> httpx.AsyncClient:
        """The keep-alive pool of `site`'s upstream."""
        return self._clients[site.name]

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    # -- who may ---------------------------------------------------------------------
    async def admit(self, site: Site, headers: list[tuple[bytes, bytes]], method: str,
                    client: str) -> WebDecision:
        """The decision for a request on `site`'s host carrying `headers`; a denial by
        policy is audited."""
        binding = await self.handoff.app_session(cookie_value(headers, APP_COOKIE))
        standing: Session | Ending | None = None
        if binding is not None:
            standing = await self.sessions.standing(binding.session_handle)
        decision = admit_request(site, binding.resource if binding else None, standing)
        if not decision.allowed and decision.audited:
            self.audit.record("web.denied", resource=site.name, method=method, client=client,
                              user=decision.session.username if decision.session else None,
                              reason=decision.reason)
        return decision

    # -- ASGI ------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        site = self.sites.by_host(host_name(header(scope, b"host")))
        if site is None:   # the dispatcher sends only resource hosts here
            await Response("misdirected request", 421, media_type="text/plain")(
                scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            await self._answer(site, request, scope, receive, send)
        except StoreError as exc:   # sessions or keys cannot be read: nothing is let through
            log.error("store unavailable", resource=site.name, error=str(exc))
            response = error_page(request, 503, "Temporarily unavailable",
                                  "The gateway cannot check your session at the moment.",
                                  "Try again in a moment.")
            response.headers["cache-control"] = "no-store"
            await response(scope, receive, send)

    async def _answer(self, site: Site, request: Request, scope: Scope, receive: Receive,
                      send: Send) -> None:
        client = request.client.host if request.client else "unknown"
        if scope["path"].startswith(OWN_PATHS):   # the gateway's, never the application's
            response = (await self._enter(site, request, client)
                        if scope["path"] == ENTER_PATH and scope["method"] == "GET" else
                        error_page(request, 404, "Not found", "There is no such page.",
                                   "Check the address."))
        else:
            decision = await self.admit(site, scope["headers"], scope["method"], client)
            if decision.allowed and decision.session is not None:
                await self._forward(site, decision.session, scope, receive, send, client)
                return
            response = self._refused(site, request)
        # The application's answers keep their own caching; the gateway's are never kept.
        response.headers["cache-control"] = "no-store"
        await response(scope, receive, send)

    async def _enter(self, site: Site, request: Request, client: str) -> Response:
        query = parse_qs(request.url.query)
        binding = await self.handoff.redeem_code((query.get("code") or [""])[0])
        target = safe_next((query.get("next") or ["/"])[0])
        standing = (await self.sessions.standing(binding.session_handle)
                    if binding is not None else None)
        decision = admit_request(site, binding.resource if binding else None, standing)
        if not decision.allowed or binding is None:
            self.audit.record("web.enter_refused", resource=site.name, client=client,
                              reason=decision.reason)
            return error_page(request, 403, "Sign-in link not valid",
                              "This sign-in link was used already, has expired or is not "
                              "for this application.",
                              "Open the application again from the portal.",
                              action=("Open it again",
                                      self.sites.gateway_url + entry_url(site.name, target)))
        token = await self.handoff.open_app_session(Binding(site.name,
                                                            binding.session_handle))
        response = RedirectResponse(target, 303)
        response.set_cookie(APP_COOKIE, token, path="/", secure=True, httponly=True,
                            samesite="lax")
        return response

    def _refused(self, site: Site, request: Request) -> Response:
        # As the browser sent it: the decoded path could differ (%2F).
        raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
        query = request.scope.get("query_string", b"")
        target = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
        again = self.sites.gateway_url + entry_url(site.name, target)
        if is_navigation(request.method):
            return RedirectResponse(again, 303)
        return error_page(request, 401, "Sign in again",
                          "Your session for this application has ended.",
                          "Sign in again, then repeat what you were doing.",
                          action=("Sign in", again))

    async def _forward(self, site: Site, session: Session, scope: Scope, receive: Receive,
                       send: Send, client: str) -> None:
        public_host = header(scope, b"host") or site.public_host.encode()
        identity = await self.asserter.headers(session.claims, site)
        headers = upstream_request_headers(
            scope["headers"], site, Forwarding(client, public_host, identity))
        body_done = asyncio.Event()
        if not has_body(scope):
            body_done.set()

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise httpx.ReadError("the client went away")
                chunk = message.get("body", b"")
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    body_done.set()
                    return

        url = httpx.URL(scheme=site.scheme, host=site.host, port=site.port).copy_with(
            raw_path=site.upstream_target(scope.get("raw_path") or scope["path"].encode(),
                                          scope.get("query_string", b"")))
        client_http = self._clients[site.name]
        upstream_request = client_http.build_request(
            scope["method"], url, headers=headers,
            content=body() if has_body(scope) else None)
        try:
            upstream = await client_http.send(upstream_request, stream=True)
        except HTTPException as exc:   # the edge's body cap, counted while streaming
            await Response(exc.detail, exc.status_code, media_type="text/plain")(
                scope, receive, send)
            return
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log.warning("web upstream failed", resource=site.name, error=str(exc))
            await self._unavailable(site, scope, receive, send)
            return
        try:
            answer = browser_response_headers(upstream.headers.raw, site, self.sites.all,
                                              self.sites.gateway_host)
            for reason in answer.refused_cookies:
                self.audit.record("web.cookie_refused", resource=site.name,
                                  user=session.username, reason=reason)
            if answer.refused_location is not None:
                self.audit.record("web.redirect_refused", resource=site.name,
                                  user=session.username, reason=answer.refused_location)
                await error_page(Request(scope), 502, "Redirect refused",
                                 "The application tried to send you to an address the "
                                 "gateway does not publish.",
                                 "Tell the application's administrator.")(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": upstream.status_code,
                        "headers": answer.headers})
            await self._stream_back(upstream, receive, send, body_done)
        finally:
            await upstream.aclose()

    async def _stream_back(self, upstream: httpx.Response, receive: Receive, send: Send,
                           body_done: asyncio.Event) -> None:
        """The upstream's body as it comes, until it ends or the client goes away (then
        the upstream connection is closed, not read to its end).

        What arrives while a write to the browser is under way goes out with the next
        one, up to COALESCE_LIMIT: a write costs uvicorn's TLS about as much for 64 KiB as
        for 1 MiB (measured: 158 against 479 MB/s), so a fast upstream is passed on in
        large writes and a slow one at once, and no more than the limit is held."""
        pending = bytearray()
        readable = asyncio.Event()    # something to send, or the body has ended
        has_room = asyncio.Event()
        has_room.set()
        ended = False

        async def pull() -> None:
            nonlocal ended
            try:
                async for chunk in upstream.aiter_raw():
                    await has_room.wait()
                    pending.extend(chunk)
                    if len(pending) >= COALESCE_LIMIT:
                        has_room.clear()
                    readable.set()
            finally:
                ended = True
                readable.set()

        async def disconnected() -> None:
            # Once the request body is read, receive() returns only at the disconnect
            # (an unread body's last, empty message may come first).
            message: Message = {}
            while message.get("type") != "http.disconnect":
                message = await receive()

        reader = asyncio.ensure_future(pull())
        gone: asyncio.Future[None] | None = None
        try:
            while not (ended and not pending):
                await readable.wait()
                readable.clear()
                if not pending:
                    continue
                if gone is None and body_done.is_set():
                    gone = asyncio.ensure_future(disconnected())
                if gone is not None and gone.done():
                    return
                data = bytes(pending)
                pending.clear()
                has_room.set()
                await send({"type": "http.response.body", "body": data, "more_body": True})
            reader.result()   # the upstream's failure, if it broke off
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as exc:
            log.warning("web upstream broke off", error=str(exc))
        finally:
            for task in (reader, gone):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _unavailable(self, site: Site, scope: Scope, receive: Receive,
                           send: Send) -> None:
        await error_page(Request(scope), 502, "Application unavailable",
                         f"{site.resource.title} does not answer at the moment.",
                         "Try again in a moment; if it persists, tell your "
                         "administrator.")(scope, receive, send)


def _upstream_tls(site: Site, base_dir: Path) -> ssl.SSLContext:
    """What verifies an https upstream: its CA file, or the system's."""
    ca = site.resource.upstream_ca_file
    return client_context(base_dir / ca if ca else None)
