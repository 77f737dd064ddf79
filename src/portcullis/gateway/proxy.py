"""When the portal runs in another process, the gateway forwards portal requests to it
over mutual TLS, adding the client's address (which the portal trusts only because the
connection carries the gateway's certificate). The connections are made by the node's
Dialer, like every connection towards the inside.

The request target goes on as the client sent it (not decoded and encoded again); one
that cannot go on as it is, is answered 4xx here and never reaches the portal."""

from __future__ import annotations

import ssl

import httpx
from starlette.requests import Request
from starlette.responses import Response

from portcullis.net.dialer import Dialer
from portcullis.net.httpdial import DialerTransport
from portcullis.web.answers import error_body
from portcullis.web.client_certificate import FORWARDED_HEADER, forwarded_value

# Never passed on: hop-by-hop headers, what httpx has already decoded, and every
# forwarding header a client could forge (the gateway sets its own).
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
              b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
              b"content-encoding", b"x-forwarded-for", b"x-forwarded-proto",
              b"x-forwarded-host", b"x-forwarded-port", b"forwarded", b"x-real-ip",
              FORWARDED_HEADER}
# Longer targets are refused (414): no portal URL comes near this.
MAX_TARGET = 8 * 1024


def forwardable_target(raw_path: bytes, query: bytes, path: str) -> tuple[bytes | None, int]:
    """The target to request from the portal, or None and the status to answer (pure)."""
    target = raw_path + (b"?" + query if query else b"")
    if len(target) > MAX_TARGET:
        return None, 414
    # Printable ASCII only, as RFC 3986 allows; and no control character once decoded
    # (%00, %0d%0a): no portal path has one.
    if (not target.startswith(b"/") or any(byte <= 0x20 or byte >= 0x7F for byte in target)
            or any(ord(char) < 0x20 or ord(char) == 0x7F for char in path)):
        return None, 400
    return target, 200


class PortalProxy:
    def __init__(self, portal_url: str, tls: ssl.SSLContext, dialer: Dialer) -> None:
        self._http = httpx.AsyncClient(base_url=portal_url, timeout=15.0,
                                       transport=DialerTransport(dialer, tls),
                                       follow_redirects=False)

    async def forward(self, request: Request) -> Response:
        scope = request.scope
        target, status = forwardable_target(scope.get("raw_path") or scope["path"].encode(),
                                            scope.get("query_string", b""), scope["path"])
        if target is None:
            return refusal(request, status, "bad request target")
        headers = [(name, value) for name, value in request.headers.raw
                   if name.lower() not in HOP_BY_HOP]
        client = request.client.host if request.client else "unknown"
        headers += [(b"x-forwarded-for", client.encode()), (b"x-forwarded-proto", b"https")]
        certificate = forwarded_value(dict(request.scope))
        if certificate is not None:
            headers.append((FORWARDED_HEADER, certificate))
        try:
            upstream = await self._http.request(
                request.method, httpx.URL(raw_path=target), headers=headers,
                content=await request.body())
        except httpx.InvalidURL:   # what the check above let through and httpx refuses
            return refusal(request, 400, "bad request target")
        except httpx.HTTPError:
            return refusal(request, 502, "the portal is unavailable")
        kept = [(name, value) for name, value in upstream.headers.raw
                if name.lower() not in HOP_BY_HOP]
        response = Response(upstream.content, upstream.status_code)
        response.raw_headers = [*kept, (b"content-length", str(len(upstream.content)).encode())]
        return response

    async def close(self) -> None:
        await self._http.aclose()


def refusal(request: Request, status: int, message: str) -> Response:
    """A page for a browser, JSON for the API, plain text otherwise (web/answers.py)."""
    body, media_type = error_body(request.url.path, request.headers.get("accept", ""),
                                  status, message)
    return Response(body, status, media_type=media_type)
