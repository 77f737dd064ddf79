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

`/.portcullis/start` on the application's host gives the browser its state cookie and
sends it to the portal's entry; `/.portcullis/enter` redeems the portal's one-time code
(only beside the state cookie it was bound to: `handoff`) and sets the app cookie.
Never logs a cookie, a code or an assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
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
from portcullis.gateway.connections import Connection, ConnectionRegistry
from portcullis.identity.endings import Ending
from portcullis.identity.sessions import Session, SessionManager
from portcullis.net.destinations import HostAddresses
from portcullis.net.dialer import Dialer
from portcullis.net.httpdial import LIMITS, DialerTransport
from portcullis.net.tls import client_context
from portcullis.portal.pages import error_page, stylesheet
from portcullis.portal.redirects import safe_next
from portcullis.proto.mux import Reason
from portcullis.tokens import new_token
from portcullis.web.answers import STYLESHEET
from portcullis.web.security import APPLICATION_ANSWER
from portcullis.webproxy.assertion import Asserter
from portcullis.webproxy.decisions import (
    OncePer,
    WebDecision,
    admit_request,
    cross_site_refusal,
    is_navigation,
)
from portcullis.webproxy.entry import ENTER_PATH, OWN_PATHS, START_PATH, entry_url
from portcullis.webproxy.handoff import (
    MAX_TOKEN,
    STATE_LIFETIME,
    Binding,
    Handoff,
    state_digest,
    state_matches,
)
from portcullis.webproxy.rewrite import (
    APP_COOKIE,
    STATE_COOKIE,
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
# One upstream connection per WebSocket, made when it opens and closed with it.
WEBSOCKET_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=0)
# The most of an answer held between the upstream and the browser (see _stream_back).
COALESCE_LIMIT = 1024 * 1024
# A request still under way after this is one the session's ending must end (_forward):
# well under a second, so that an ending just before is acted on within one.
REGISTER_AFTER = 0.5


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
                 base_dir: Path, registry: ConnectionRegistry) -> None:
        self.sites = sites
        self.sessions = sessions
        self.handoff = handoff
        self.asserter = asserter
        self.audit = audit
        self._registry = registry
        self._audit_once = OncePer()
        host_addresses = HostAddresses()
        def client(site: Site, limits: httpx.Limits) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=DialerTransport(
                    AdmittedDialer(dialer, site.name, audit, host_addresses),
                    _upstream_tls(site, base_dir), limits),
                timeout=UPSTREAM_TIMEOUT, follow_redirects=False)

        self._clients = {site.name: client(site, LIMITS) for site in sites.all}
        # A WebSocket holds its upstream connection for as long as it is open: from a pool
        # of their own, one connection each, never kept, so that open WebSockets never
        # make the application's requests wait. Their number is bounded by the edge's
        # connection limits (each is a browser's connection too).
        self._websocket_clients = {site.name: client(site, WEBSOCKET_LIMITS)
                                   for site in sites.all}

    def websocket_client_for(self, site: Site) -> httpx.AsyncClient:
        """The connections of `site`'s upstream that carry WebSockets."""
        return self._websocket_clients[site.name]

    async def close(self) -> None:
        for client in (*self._clients.values(), *self._websocket_clients.values()):
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
            self.audit_once("web.denied", site, binding.session_handle if binding else client,
                            method=method, client=client, reason=decision.reason,
                            user=decision.session.username if decision.session else None)
        return decision

    def refuse_cross_site(self, site: Site, headers: list[tuple[bytes, bytes]], method: str,
                          client: str, *, websocket: bool = False) -> bool:
        """Whether another site's page made this request (`cross_site_refusal`); if so,
        it is audited (once a while per client)."""
        reason = cross_site_refusal(site, method, headers, websocket=websocket)
        if reason is not None:
            self.audit_once("web.cross_site_refused", site, client, method=method,
                            client=client, reason=reason)
        return reason is not None

    def audit_once(self, event: str, site: Site, who: str, **fields: object) -> None:
        """An audit line for a denial, unless the same one (event, resource, session or
        client) was written in the last minute: a page retrying in a loop, or a flood,
        must not fill the trail."""
        if self._audit_once.due((event, site.name, who), time.monotonic()):
            self.audit.record(event, resource=site.name, **fields)

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
            if scope["path"] == ENTER_PATH and scope["method"] == "GET":
                response = await self._enter(site, request, client)
            elif scope["path"] == START_PATH and scope["method"] == "GET":
                target = safe_next(request.query_params.get("next"))
                response = self._to_entry(site, request, target)
            elif scope["path"] == STYLESHEET and scope["method"] in ("GET", "HEAD"):
                response = await stylesheet(request)
            else:
                response = error_page(request, 404, "Not found", "There is no such page.",
                                      "Check the address.")
        elif self.refuse_cross_site(site, scope["headers"], scope["method"], client):
            response = error_page(request, 403, "Request refused",
                                  "Another site's page asked your browser to change something "
                                  "in this application.",
                                  "Open the application directly and do it there.")
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
        if binding is not None and not state_matches(
                binding.state, cookie_value(request.scope["headers"], STATE_COOKIE)):
            # Issued to another browser: whoever sent this one here wants it signed in
            # as them.
            decision = WebDecision(False, "the sign-in link is another browser's")
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

    def _to_entry(self, site: Site, request: Request, target: str) -> Response:
        """To the portal's entry for `target`, with the digest of this browser's state
        cookie (set here when it has none)."""
        state = cookie_value(request.scope["headers"], STATE_COOKIE)
        if state is None or not 0 < len(state) <= MAX_TOKEN:
            state = new_token()
        response = RedirectResponse(
            self.sites.gateway_url + entry_url(site.name, target, state_digest(state)), 303)
        response.set_cookie(STATE_COOKIE, state, max_age=STATE_LIFETIME, path="/",
                            secure=True, httponly=True, samesite="lax")
        return response

    def _refused(self, site: Site, request: Request) -> Response:
        # As the browser sent it: the decoded path could differ (%2F).
        raw_path = request.scope.get("raw_path") or request.scope["path"].encode()
        query = request.scope.get("query_string", b"")
        target = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
        if is_navigation(request.method):
            return self._to_entry(site, request, target)
        again = self.sites.gateway_url + entry_url(site.name, target)
        return error_page(request, 401, "Sign in again",
                          "Your session for this application has ended.",
                          "Sign in again, then repeat what you were doing.",
                          action=("Sign in", again))

    async def _forward(self, site: Site, session: Session, scope: Scope, receive: Receive,
                       send: Send, client: str) -> None:
        """`_exchange`, ended with the gateway session (sign-out, kill, expiry).

        A request that lasts (a long poll, an event stream, a download) is registered
        with the gateway's connections under its session after REGISTER_AFTER, so the
        session's ending ends it at once, as it ends WebSockets; registering then
        re-checks the session, so an ending in between is not missed. Most requests are
        over before and cost the registry nothing."""
        exchange_send = InFlight(send)
        exchange = asyncio.ensure_future(
            self._exchange(site, session, scope, receive, exchange_send, client))
        exchange_send.task = exchange
        connection = Connection("web", session.username, client, exchange_send,
                                detail=site.name, session_handle=session.handle)
        timer = asyncio.get_running_loop().call_later(REGISTER_AFTER, self._registry.add,
                                                      connection)
        try:
            await asyncio.wait([exchange])
        finally:
            timer.cancel()
            self._registry.remove(connection)
            if not exchange.done():   # this request's own task was cancelled
                exchange.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await exchange
        if not exchange.cancelled():
            exchange.result()   # its failure, if any, as before
        elif not exchange_send.started:
            response = self._refused(site, Request(scope))
            response.headers["cache-control"] = "no-store"
            await response(scope, receive, send)
        # Otherwise the answer is left incomplete: the server closes the connection, and
        # the browser cannot take the cut-off body for a whole one.

    async def _exchange(self, site: Site, session: Session, scope: Scope, receive: Receive,
                        send: Send, client: str) -> None:
        target = site.upstream_target(scope.get("raw_path") or scope["path"].encode(),
                                      scope.get("query_string", b""))
        if target is None:   # the edge refuses these before: never sent on regardless
            await Response("bad request path", 400, media_type="text/plain")(
                scope, receive, send)
            return
        identity = await self.asserter.headers(session.claims, site)
        headers = upstream_request_headers(scope["headers"], site,
                                           Forwarding(client, identity))
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
            raw_path=target)
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
                        "headers": answer.headers, APPLICATION_ANSWER: True})
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


class InFlight:
    """A forwarded request as the connection registry sees it: its ASGI `send`, counted,
    and ended by cancelling the `task` that forwards it."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.task: asyncio.Future[None] | None = None
        self.started = False
        self._sent = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        else:
            self._sent += len(message.get("body", b""))
        await self._send(message)

    def close(self, reason: Reason, message: str) -> None:
        if self.task is not None:
            self.task.cancel()

    def byte_counts(self) -> tuple[int, int]:
        return self._sent, 0

    @property
    def open_streams(self) -> int:
        return 0 if self.task is None or self.task.done() else 1


def _upstream_tls(site: Site, base_dir: Path) -> ssl.SSLContext:
    """What verifies an https upstream: its CA file, or the system's."""
    ca = site.resource.upstream_ca_file
    return client_context(base_dir / ca if ca else None)
