"""A small web application on loopback, behind the gateway in the web proxy's tests: a
real Starlette app under uvicorn (in a thread of the test process) that verifies the
gateway's `X-Portcullis-Assertion` with PyJWT against the published JWKS, and echoes
what it received. It counts every request, so a test can tell that nothing arrived.

Routes: `/whoami` (any method: the verified claims, the headers, the body's length),
`/big?size=N` (N bytes, streamed), `/drip` (a line now, one more when told),
`/redirect?to=URL` (302 there), `/cookie?set=VALUE` (a raw Set-Cookie), `/ws` (a
WebSocket echo; `/ws?assertion=1` first sends the user).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp
from starlette.websockets import WebSocket

CHUNK = b"x" * (256 * 1024)


@dataclass
class WebApp:
    """The running application: where it listens and what it saw."""

    port: int
    jwks_url: str
    audience: str
    ca: Path
    requests: list[str] = field(default_factory=list)
    # `/drip` sends its first line, then "second" once this is set (or, 10 s later,
    # "never told": a proxy that held the first line back never let the client see it).
    drip: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def verify(self, token: str) -> dict[str, Any]:
        context = ssl.create_default_context(cafile=str(self.ca))
        keys = jwt.PyJWKClient(self.jwks_url, ssl_context=context, cache_keys=False)
        key = keys.get_signing_key_from_jwt(token)
        return dict(jwt.decode(token, key.key, algorithms=["ES256"], audience=self.audience,
                               options={"require": ["exp", "iat", "iss", "aud", "sub"]}))

    def app(self) -> Starlette:
        async def whoami(request: Request) -> Response:
            body = await request.body()
            token = request.headers.get("x-portcullis-assertion")
            try:
                claims = (await asyncio.to_thread(self.verify, token)) if token else None
                error = None
            except jwt.PyJWTError as exc:
                claims, error = None, str(exc)
            return JSONResponse({"claims": claims, "error": error, "method": request.method,
                                 "path": request.url.path, "query": request.url.query,
                                 "headers": [[k, v] for k, v in request.headers.items()],
                                 "body": len(body)})

        async def big(request: Request) -> Response:
            size = int(request.query_params["size"])

            async def chunks() -> AsyncIterator[bytes]:
                left = size
                while left > 0:
                    piece = CHUNK[:min(left, len(CHUNK))]
                    left -= len(piece)
                    yield piece

            return StreamingResponse(chunks(), media_type="application/octet-stream",
                                     headers={"content-length": str(size)})

        async def drip(request: Request) -> Response:
            async def lines() -> AsyncIterator[bytes]:
                yield b"first\n"
                told = await asyncio.to_thread(self.drip.wait, 10)
                yield b"second\n" if told else b"never told\n"

            return StreamingResponse(lines(), media_type="text/plain")

        async def redirect(request: Request) -> Response:
            return Response(status_code=302, headers={"location": request.query_params["to"]})

        async def cookie(request: Request) -> Response:
            response = Response("cookie")
            response.raw_headers.append((b"set-cookie", request.query_params["set"].encode()))
            return response

        async def echo(websocket: WebSocket) -> None:
            await websocket.accept()
            if websocket.query_params.get("assertion"):
                token = websocket.headers.get("x-portcullis-assertion", "")
                claims = await asyncio.to_thread(self.verify, token)
                await websocket.send_text(claims["username"])
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await websocket.send_text(message["text"])
                else:
                    await websocket.send_bytes(message.get("bytes") or b"")

        app = Starlette(routes=[
            Route("/whoami", whoami, methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]),
            Route("/big", big), Route("/drip", drip), Route("/redirect", redirect),
            Route("/cookie", cookie),
            WebSocketRoute("/ws", echo)])

        async def counting(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                self.requests.append(scope["path"])
            await app(scope, receive, send)

        return counting  # type: ignore[return-value]


def serve_webapp(jwks_url: str, audience: str, ca: Path) -> Iterator[WebApp]:
    """Run the application until the generator is closed."""
    sock = socket.create_server(("127.0.0.1", 0))
    webapp = WebApp(sock.getsockname()[1], jwks_url, audience, ca)
    with serve_asgi(webapp.app(), sock):
        yield webapp


@contextlib.contextmanager
def serve_asgi(app: ASGIApp, sock: socket.socket) -> Iterator[None]:
    """Serve `app` under uvicorn, in a thread, on `sock` until the generator is closed."""
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                           lifespan="off", ws="websockets-sansio"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the test web application did not start"
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
