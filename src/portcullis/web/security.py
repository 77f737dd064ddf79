"""ASGI middleware applied to every HTTP answer and request of every role.

Security headers on all responses; hard caps on request headers and bodies (a body
is counted while reading, not trusted from Content-Length alone; POSTs to named paths,
the SAML ACS, may have a larger cap of their own); requests whose path holds a dot
segment are refused before routing, so no handler ever sees a path other than the
one it is routed by.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = [
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; "
     b"base-uri 'none'; "
     b"object-src 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


@dataclass(frozen=True)
class LargerBodies:
    """POSTs to these exact `paths` may carry up to `max_body` bytes: a SAML IdP's signed
    Response arrives at the ACS as one form POST, and may be larger than anything else a
    browser sends (portal/saml.py says how large)."""

    paths: frozenset[str]
    max_body: int


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, *, max_body: int, max_header_bytes: int,
                 larger: LargerBodies | None = None, own_headers: bool = True) -> None:
        """`own_headers` False: answers go out with their own headers only (a web
        application behind the gateway sets its own policy and caching)."""
        self.app = app
        self.own_headers = own_headers
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.larger = larger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":   # lifespan; WebSocket upgrades never reach ASGI here
            await self.app(scope, receive, send)
            return
        if _has_dot_segment(scope):
            await _plain(send, 400, b"bad request path")
            return
        # The HTTP parser bounds only headers that arrive in pieces; bound them all.
        if sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > \
                self.max_header_bytes:
            await _plain(send, 431, b"request headers too large")
            return
        max_body = self.max_body
        if (self.larger is not None and scope["method"] == "POST"
                and scope["path"] in self.larger.paths):
            max_body = max(max_body, self.larger.max_body)
        length = _content_length(scope)
        if length is not None and length > max_body:
            await _plain(send, 413, b"request body too large")
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body:
                    # Raised inside the app, so Starlette answers it (as 413).
                    raise HTTPException(413, "request body too large")
            return message

        async def secured_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start" and self.own_headers:
                started = True
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                headers += [item for item in SECURITY_HEADERS if item[0] not in names]
                # Pages and API answers may show secrets (a TOTP enrolment, tokens):
                # nothing but the static files may be kept by a browser or a proxy.
                if not scope["path"].startswith("/static/") and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, limited_receive, secured_send)


def _has_dot_segment(scope: Scope) -> bool:
    raw = scope.get("raw_path") or scope["path"].encode()
    path = raw.split(b"?", 1)[0].lower().replace(b"%2e", b".").replace(b"%2f", b"/")
    path = path.replace(b"%5c", b"/").replace(b"\\", b"/")
    return any(segment in (b".", b"..") for segment in path.split(b"/"))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return None


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
