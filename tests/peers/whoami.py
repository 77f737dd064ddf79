"""A small web application that believes only a verified `X-Portcullis-Assertion`: it
checks the JWT with PyJWT (ES256, the key fetched from the gateway's published JWKS,
issuer and audience as configured, expiry) and shows the user's name and groups.

Run in a thread of the test process (uvicorn on a free loopback port) so that the test
can read what it received: every request's path and Cookie header, and the verified
claims. Stopped by the fixture.
"""

from __future__ import annotations

import html
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from conftest import free_port

START_TIMEOUT = 10.0


@dataclass
class Received:
    path: str
    cookie: str | None
    claims: dict[str, Any] | None   # the verified claims, None when refused
    refusal: str = ""


@dataclass
class WhoAmI:
    """The application; `received` lists every request that reached it."""

    jwks_url: str
    issuer: str
    audience: str
    ca_file: Path
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        self._keys = jwt.PyJWKClient(self.jwks_url, ssl_context=context, timeout=5)

    def verify(self, token: str | None) -> dict[str, Any]:
        if not token:
            raise jwt.InvalidTokenError("no X-Portcullis-Assertion")
        key = self._keys.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=["ES256"], audience=self.audience, issuer=self.issuer,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]})
        return claims

    async def page(self, request: Request) -> Response:
        try:
            # PyJWKClient fetches with urllib: a blocking call, off the event loop.
            claims = await run_in_threadpool(
                self.verify, request.headers.get("x-portcullis-assertion"))
        except jwt.PyJWTError as exc:
            self.received.append(Received(request.url.path, request.headers.get("cookie"),
                                          None, str(exc)))
            return HTMLResponse(f"<h1>Not verified</h1><p>{html.escape(str(exc))}</p>", 401)
        self.received.append(Received(request.url.path, request.headers.get("cookie"),
                                      claims))
        groups = "".join(f"<li>{html.escape(group)}</li>" for group in claims["groups"])
        return HTMLResponse(
            "<!doctype html><title>Who am I</title>"
            f"<h1 id=user>{html.escape(claims['username'])}</h1>"
            f"<ul id=groups>{groups}</ul>")

    async def echo(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            pass

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self.page, methods=["GET", "POST"]),
                                 WebSocketRoute("/echo", self.echo)])


class Server:
    """uvicorn serving `app` on 127.0.0.1:PORT in a thread."""

    def __init__(self, app: Starlette) -> None:
        self.port = free_port()
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)

