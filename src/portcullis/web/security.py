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

from portcullis.web.answers import error_body

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


# Set in an `http.response.start` message by the web proxy for an upstream's answer.
APPLICATION_ANSWER = "portcullis.application_answer"


@dataclass(frozen=True)
class LargerBodies:
    """POSTs to these exact `paths` may carry up to `max_body` bytes: a SAML IdP's signed
    Response arrives at the ACS as one form POST, and may be larger than anything else a
    browser sends (portal/saml.py says how large)."""

    paths: frozenset[str]
    max_body: int


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, *, max_body: int, max_header_bytes: int,
                 larger: LargerBodies | None = None) -> None:
        self.app = app
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.larger = larger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":   # lifespan; WebSocket upgrades never reach ASGI here
            await self.app(scope, receive, send)
            return
        if has_dot_segment(scope.get("raw_path") or scope["path"].encode()):
            await _refuse(scope, send, 400, "bad request path")
            return
        # The HTTP parser bounds only headers that arrive in pieces; bound them all.
        if sum(len(name) + len(value) + 4 for name, value in scope["headers"]) > \
                self.max_header_bytes:
            await _refuse(scope, send, 431, "request headers too large")
            return
        max_body = self.max_body
        if (self.larger is not None and scope["method"] == "POST"
                and scope["path"] in self.larger.paths):
            max_body = max(max_body, self.larger.max_body)
        length = _content_length(scope)
        if length is not None and length > max_body:
            await _refuse(scope, send, 413, "request body too large")
            return

        received = 0

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
            if message["type"] == "http.response.start" and message.get(APPLICATION_ANSWER):
                # A web application's answer, through the gateway: its own policy and
                # caching, as it sent them. The gateway's own pages on its host get ours.
                message = {key: value for key, value in message.items()
                           if key != APPLICATION_ANSWER}
            elif message["type"] == "http.response.start":
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


def has_dot_segment(raw_path: bytes) -> bool:
    """Whether a request target's path holds a "." or ".." segment, also percent-encoded
    or after a backslash: some hop (httpx, an upstream) would resolve it, so the path a
    check saw would not be the one served."""
    path = raw_path.split(b"?", 1)[0].lower().replace(b"%2e", b".").replace(b"%2f", b"/")
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


async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
    """Refuse before any role sees the request: a page for a browser, JSON for the API,
    plain text for anything else (web/answers.py)."""
    accept = next((value.decode("latin-1") for name, value in scope["headers"]
                   if name == b"accept"), "")
    body, media_type = error_body(scope["path"], accept, status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type.encode()),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS]})
    await send({"type": "http.response.body", "body": body})
