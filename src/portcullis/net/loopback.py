"""A browser's one redirect back to this machine (RFC 8252 §7.3), for the commands that
sign in through an identity provider: `portcullis login` and `portcullis auth test`.

The receiver listens on 127.0.0.1 only, on a port the system picks (or one the
administrator registered with the provider), serves a start page — which sends the
browser on to the provider, by a redirect or, for a SAML POST binding, a form — and takes
the first answer that arrives at (or under) its callback path, by GET (a query) or POST
(a form). Everything else is a 404; the wait is bounded.

Any web page the user has open can make their browser request 127.0.0.1, so: a request
whose Host is not this listener's own address is refused (a DNS-rebinding page reaches
the port under its own name, and must not read the start page's SAMLRequest and
RelayState), and the start page lives at an unguessable path, as does the callback when
the caller lets it (`portcullis login`; `auth test` must use the path it registered).
"""

from __future__ import annotations

import html
import secrets
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from portcullis.errors import ClientError

MAX_ANSWER_BYTES = 512 * 1024
DONE_PAGE = (b"<!doctype html><meta charset=utf-8><title>Portcullis</title>"
             b"<p>Done: you can close this tab and return to the terminal.</p>")


class LoopbackReceiver:
    def __init__(self, callback_path: str | None = None, port: int = 0) -> None:
        self._callback_path = callback_path or f"/callback/{secrets.token_urlsafe(16)}"
        self._start_path = f"/start/{secrets.token_urlsafe(16)}"
        self._answer: dict[str, str] | None = None
        self._arrived = threading.Event()
        self._start: tuple[str, Mapping[str, str] | None] | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _ours(self) -> bool:
                if self.headers.get("host") == receiver.host:
                    return True
                self.send_error(HTTPStatus.MISDIRECTED_REQUEST)
                return False

            def do_GET(self) -> None:
                if not self._ours():
                    return
                path, _, query = self.path.partition("?")
                if path == receiver._start_path and receiver._start is not None:
                    self._send_start(*receiver._start)
                elif path.startswith(receiver._callback_path):
                    self._take(dict(parse_qsl(query)))
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)

            def do_POST(self) -> None:
                if not self._ours():
                    return
                declared = self.headers.get("content-length") or "0"
                length = int(declared) if declared.isdigit() else 0
                if (not self.path.startswith(receiver._callback_path)
                        or not 0 < length <= MAX_ANSWER_BYTES):
                    self.send_error(HTTPStatus.NOT_FOUND)
                    return
                self._take(dict(parse_qsl(self.rfile.read(length).decode("utf-8", "replace"))))

            def _take(self, answer: dict[str, str]) -> None:
                if receiver._answer is None:
                    receiver._answer = answer
                    receiver._arrived.set()
                self._send(HTTPStatus.OK, DONE_PAGE)

            def _send_start(self, url: str, form: Mapping[str, str] | None) -> None:
                if form is None:
                    self.send_response(HTTPStatus.SEE_OTHER)
                    self.send_header("location", url)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                fields = "".join(f'<input type="hidden" name="{html.escape(k)}" '
                                 f'value="{html.escape(v)}">' for k, v in form.items())
                page = (f'<!doctype html><meta charset=utf-8><title>Portcullis</title>'
                        f'<form method="post" action="{html.escape(url)}">{fields}'
                        f'<button>Continue to your identity provider</button></form>'
                        f'<script>document.forms[0].submit()</script>')
                self._send(HTTPStatus.OK, page.encode())

            def _send(self, status: HTTPStatus, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "text/html; charset=utf-8")
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass   # the terminal belongs to the command

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.timeout = 1.0
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def base(self) -> str:
        return f"http://{self.host}"

    @property
    def callback_url(self) -> str:
        return self.base + self._callback_path

    def start_at(self, url: str, form: Mapping[str, str] | None = None) -> str:
        """The local URL to open in a browser: it sends the browser on to `url`."""
        if urlsplit(url).scheme not in ("https", "http"):
            raise ClientError(f"the identity provider's address {url!r} is not a web URL")
        self._start = (url, form)
        return self.base + self._start_path

    def wait(self, timeout: float) -> dict[str, str]:
        """The answer that came back, or ClientError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self._arrived.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise ClientError(f"no answer from the browser within {timeout:.0f} s; "
                                  "sign in again")
        answer, self._answer = self._answer, None
        self._arrived.clear()     # ready for the flow's next redirect step, if any
        assert answer is not None
        return answer

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LoopbackReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
