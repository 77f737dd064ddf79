"""When the portal runs in another process, the gateway forwards portal requests to it
over mutual TLS, adding the client's address (which the portal trusts only because the
connection carries the gateway's certificate)."""

from __future__ import annotations

import ssl

import httpx
from starlette.requests import Request
from starlette.responses import Response

from portcullis.web.client_certificate import FORWARDED_HEADER, forwarded_value

# Never passed on: hop-by-hop headers, what httpx has already decoded, and every
# forwarding header a client could forge (the gateway sets its own).
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
              b"te", b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
              b"content-encoding", b"x-forwarded-for", b"x-forwarded-proto",
              b"x-forwarded-host", b"x-forwarded-port", b"forwarded", b"x-real-ip",
              FORWARDED_HEADER}


class PortalProxy:
    def __init__(self, portal_url: str, tls: ssl.SSLContext) -> None:
        self._http = httpx.AsyncClient(base_url=portal_url, verify=tls, timeout=15.0,
                                       follow_redirects=False)

    async def forward(self, request: Request) -> Response:
        headers = [(name, value) for name, value in request.headers.raw
                   if name.lower() not in HOP_BY_HOP]
        client = request.client.host if request.client else "unknown"
        headers += [(b"x-forwarded-for", client.encode()), (b"x-forwarded-proto", b"https")]
        certificate = forwarded_value(dict(request.scope))
        if certificate is not None:
            headers.append((FORWARDED_HEADER, certificate))
        try:
            upstream = await self._http.request(
                request.method, request.url.path, params=request.url.query or None,
                headers=headers, content=await request.body())
        except httpx.HTTPError:
            return Response("the portal is unavailable", 502, media_type="text/plain")
        kept = [(name, value) for name, value in upstream.headers.raw
                if name.lower() not in HOP_BY_HOP]
        response = Response(upstream.content, upstream.status_code)
        response.raw_headers = [*kept, (b"content-length", str(len(upstream.content)).encode())]
        return response

    async def close(self) -> None:
        await self._http.aclose()
