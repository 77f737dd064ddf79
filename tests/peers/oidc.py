"""A real OpenID provider (npm oidc-provider, tests/peers/oidc_provider.mjs) for the
OpenID Connect tests, behind a small tampering proxy.

    test ──► TamperingProxy (127.0.0.1:P, the issuer's address) ──► oidc-provider

The provider's issuer is the proxy's URL, so every request of the factor (discovery,
JWKS, token, userinfo) and of the simulated browser goes through the proxy, which
passes them on unchanged, unless a test sets `tamper_token` / `tamper_userinfo` /
`tamper_device`: then that function rewrites the JSON the provider answered at its token
/ userinfo / device authorization endpoint on its way back. That is how crafted ID
tokens (another audience, alg "none", HMAC, a key in the header...) reach the factor by
the real token endpoint path; `token_error` makes the token endpoint answer an error
the provider never sends (slow_down). The signing keys
are generated here and given to the provider, so a crafted token can also be signed
with the provider's own key (`OidcPeer.resign`), and `restart(keys)` rotates them: the
provider comes back on another port with the new key set, behind the same proxy (the
issuer does not change).

`sign_in(url, account, callback)` is the browser: it follows the authorization request
through oidc-provider's development login and consent pages (any account id signs in;
the password is not checked) and returns the callback's query parameters;
`device_sign_in(uri, code, account)` is the user's other device for a device
authorization (RFC 8628; the provider's `deviceFlow` is on unless a peer is started with
`device_flow=False`).
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import ECKey, Key, RSAKey

from conftest import Process
from peers.missing import missing_peer

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = Path(__file__).parent / "oidc_provider.mjs"

CALLBACK = "https://gateway.test/login/callback/idp"
"""Where the confidential clients' answers go (never fetched: `sign_in` stops there)."""
SERVICE_CALLBACK = "https://localhost/login/callback/idp"
"""The callback of a LoginService with its default public URL, for provider "idp"."""
LOOPBACK_CALLBACK = "http://127.0.0.1/callback"
"""The native client's redirect URI; RFC 8252 lets the port vary."""

CLIENT_SECRET = "portcullis-client-secret"
# The code flow and the device authorization grant (RFC 8628), for a gateway's client.
GRANT_TYPES = ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"]
CLIENTS = [
    {"client_id": "portcullis", "client_secret": CLIENT_SECRET,
     "redirect_uris": [CALLBACK, SERVICE_CALLBACK],
     "token_endpoint_auth_method": "client_secret_basic", "grant_types": GRANT_TYPES},
    {"client_id": "portcullis-post", "client_secret": CLIENT_SECRET,
     "redirect_uris": [CALLBACK], "token_endpoint_auth_method": "client_secret_post"},
    {"client_id": "portcullis-cli", "application_type": "native",
     "redirect_uris": [LOOPBACK_CALLBACK], "token_endpoint_auth_method": "none"},
    # ID tokens signed with the provider's EC key (the provider needs one: default_keys).
    {"client_id": "portcullis-es", "client_secret": CLIENT_SECRET,
     "redirect_uris": [CALLBACK], "id_token_signed_response_alg": "ES256"},
]
# Which claims each scope releases (oidc-provider sends only declared claims).
CLAIMS = {
    "openid": ["sub"],
    "profile": ["name", "preferred_username"],
    "email": ["email", "email_verified"],
    "groups": ["groups", "hasgroups"],
    "ad": ["ad_sid", "ad_upn", "ad_guid"],
    "azure": ["upn", "oid", "onprem_sid"],
}
ACCOUNTS: dict[str, dict[str, Any]] = {
    # Okta-like: AD's SID, UPN and GUID as custom claims.
    "alice": {"preferred_username": "alice", "name": "Alice Liddell",
              "email": "alice@example.test", "email_verified": True,
              "groups": ["staff", "Finance"],
              "ad_sid": "S-1-5-21-1004336348-1177238915-682003330-1105",
              "ad_upn": "alice@corp.example.test",
              "ad_guid": "8c6f6f5a-37a2-4c65-9d1e-0f6d3b7b2f11"},
    # Azure-like: upn, oid, onprem_sid.
    "carol": {"preferred_username": "carol@contoso.example", "name": "Carol",
              "upn": "carol@contoso.example", "oid": "00000000-0000-0000-0000-00000000c0de",
              "onprem_sid": "S-1-5-21-3623811015-3361044348-30300820-1013",
              "groups": ["vpn-users"]},
    # Azure's groups overage: too many groups to carry, only a flag that there are some.
    "crowded": {"preferred_username": "crowded@contoso.example", "hasgroups": True},
    # Okta with the AD agent, for a user of the slapd directory (tests/peers/ldap.py):
    # the token's SID and UPN are the directory account's, its groups Okta's own.
    "alice.okta": {"preferred_username": "alice.okta@example.okta", "name": "Alice (Okta)",
                   "groups": ["Everyone"], "ad_sid": "S-1-5-21-1-2-3-1104",
                   "ad_upn": "alice@corp.example"},
    # Nothing but the subject.
    "bare": {},
}
SCOPES = ["openid", "profile", "email", "groups", "ad", "azure"]
STARTUP_TIMEOUT = 20.0


def signing_key(kid: str, alg: str = "RS256") -> Key:
    """A fresh private key for the provider (with the private members)."""
    parameters = {"kid": kid, "use": "sig", "alg": alg}
    if alg.startswith("ES"):
        return ECKey.generate_key("P-256", parameters)
    return RSAKey.generate_key(2048, parameters)


def default_keys() -> list[Key]:
    """An RSA key (it signs RS256, the clients' default) and an EC key (ES256)."""
    return [signing_key("k1"), signing_key("e1", "ES256")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, unverified (the tests rewrite them)."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


class TamperingProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream = 0
        self.tamper_token: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.tamper_userinfo: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.tamper_device: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        # Set: /token answers HTTP 400 with this body, the provider not asked.
        self.token_error: dict[str, Any] | None = None
        self.requests: list[str] = []          # "METHOD /path", in order
        # Seconds spent answering (the provider's time and the forwarding): what a
        # benchmark counts as the provider's side of a sign-in.
        self.answering = 0.0
        self._answering_lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> int:
        return sum(1 for line in self.requests if line.split(" ")[1].split("?")[0] == path)

    def answered(self, seconds: float) -> None:
        with self._answering_lock:
            self.answering += seconds

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _Forward(BaseHTTPRequestHandler):
    server: TamperingProxy

    def _forward(self) -> None:
        started = time.perf_counter()
        try:
            self._pass_on()
        finally:
            self.server.answered(time.perf_counter() - started)

    def _pass_on(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        self.server.requests.append(f"{self.command} {self.path}")
        if self.path.split("?")[0] == "/token" and self.server.token_error is not None:
            self._answer(400, [("Content-Type", "application/json")],
                         json.dumps(self.server.token_error).encode())
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        content = answer.read()
        path = self.path.split("?")[0]
        tamper = {"/token": self.server.tamper_token,
                  "/me": self.server.tamper_userinfo,
                  "/device/auth": self.server.tamper_device}.get(path)
        if tamper is not None and answer.status == 200:
            content = json.dumps(tamper(json.loads(content))).encode()
        self._answer(answer.status, answer.getheaders(), content)
        upstream.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], content: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = _forward

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class OidcPeer:
    directory: Path
    proxy: TamperingProxy
    keys: list[Key]
    process: Process | None = None
    restarts: int = field(default=0)
    # The provider's registered clients (a gateway started by a test adds its own).
    clients: list[dict[str, Any]] = field(default_factory=lambda: list(CLIENTS))
    device_flow: bool = True

    @property
    def issuer(self) -> str:
        return self.proxy.url

    @property
    def signing(self) -> Key:
        return self.keys[0]

    def provider(self, name: str = "idp", client_id: str = "portcullis",
                 **extra: Any) -> dict[str, Any]:
        """An oidc provider entry of `[auth.providers]` for one of CLIENTS; the secret
        file `secrets/oidc` (write_secret) for the confidential ones."""
        entry: dict[str, Any] = {"type": "oidc", "name": name, "issuer": self.issuer,
                                 "client_id": client_id, "scopes": SCOPES}
        if client_id != "portcullis-cli":
            # The confidential clients share one secret.
            entry["client_secret_file"] = "secrets/oidc"
        if client_id == "portcullis-post":
            entry["client_auth"] = "client_secret_post"
        return {**entry, **extra}

    def start(self) -> None:
        config = self.directory / f"provider-{self.restarts}.json"
        config.write_text(json.dumps({
            "issuer": self.issuer, "clients": self.clients, "accounts": ACCOUNTS,
            "claims": CLAIMS, "keys": [key.as_dict(private=True) for key in self.keys],
            "deviceFlow": self.device_flow}))
        self.process = Process([str(SCRIPT), str(config)],
                               self.directory / f"provider-{self.restarts}.log",
                               program=shutil.which("node") or "node")
        match = self.process.wait_for(r"listening (\d+)", timeout=STARTUP_TIMEOUT)
        self.proxy.upstream = int(match.group(1))

    def restart(self, keys: list[Key]) -> None:
        """The provider again, with `keys` (the first signs): a key rotation."""
        self.stop_provider()
        self.keys = keys
        self.restarts += 1
        self.start()

    def stop_provider(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def close(self) -> None:
        self.stop_provider()
        self.proxy.close()

    def resign(self, token: str, key: Key | None = None, **changes: Any) -> str:
        """`token` with its claims changed (None removes one), signed again with the
        provider's signing key (or `key`)."""
        claims = {**token_claims(token), **changes}
        claims = {name: value for name, value in claims.items() if value is not None}
        key = key or self.signing
        header = {"alg": key.get("alg") or "RS256", "kid": key.kid}
        return jws.serialize_compact(header, json.dumps(claims).encode(), key)


def require_oidc_provider() -> None:
    if shutil.which("node") is None:
        missing_peer("node is not installed (run 'make peers' as root)")
    if not (NODE_DIR / "node_modules" / "oidc-provider").is_dir():
        missing_peer("oidc-provider is not installed (cd tests/peers/node && npm ci)")


def start_oidc_provider(directory: Path, keys: list[Key] | None = None,
                        clients: list[dict[str, Any]] | None = None, *,
                        device_flow: bool = True) -> OidcPeer:
    """The provider, with CLIENTS and `clients` registered; `device_flow`: whether it
    offers the device authorization grant."""
    require_oidc_provider()
    directory.mkdir(parents=True, exist_ok=True)
    peer = OidcPeer(directory, TamperingProxy(), keys or default_keys(),
                    clients=[*CLIENTS, *(clients or [])], device_flow=device_flow)
    try:
        peer.start()
    except BaseException:
        peer.close()
        raise
    return peer


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcPeer]:
    """One provider for the session; tests that tamper reset the proxy's hooks."""
    peer = start_oidc_provider(tmp_path_factory.mktemp("oidc-provider"))
    try:
        yield peer
    finally:
        peer.close()


async def sign_in(url: str, account: str, callback: str) -> dict[str, str]:
    """What a browser does after the gateway's redirect: the authorization request, the
    provider's login page (as `account`) and consent page; the callback's parameters."""
    async with httpx.AsyncClient(timeout=10) as browser:
        response = await browser.get(url)
        for _ in range(12):
            location = response.headers.get("location")
            if response.is_redirect and location:
                target = urljoin(str(response.url), location)
                if target.split("?")[0] == callback.split("?")[0]:
                    return dict(parse_qsl(urlsplit(target).query))
                response = await browser.get(target)
                continue
            action = re.search(r'action="([^"]+)"', response.text)
            prompt = re.search(r'name="prompt" value="(\w+)"', response.text)
            assert action and prompt, f"not a login or consent page: {response.text[:500]}"
            form = {"prompt": prompt.group(1)}
            if prompt.group(1) == "login":
                form |= {"login": account, "password": "not checked"}
            response = await browser.post(urljoin(str(response.url), action.group(1)),
                                          data=form)
    raise AssertionError("the provider never sent the browser to the callback")


async def device_sign_in(verification_uri: str, user_code: str, account: str, *,
                         abort: bool = False) -> str:
    """What the user does on their other device for a device authorization (RFC 8628):
    oidc-provider's /device page (type the code), its confirmation page (continue, or
    "abort" with `abort`), then its login and consent pages. The last page's text."""
    async with httpx.AsyncClient(timeout=10) as browser:
        response = await browser.get(verification_uri)
        for _ in range(12):
            if response.is_redirect:
                response = await browser.get(urljoin(str(response.url),
                                                     response.headers["location"]))
                continue
            action = re.search(r'<form[^>]*action="([^"]+)"', response.text)
            if action is None:
                return response.text          # the success (or error) page
            form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"',
                                   response.text))
            if 'name="user_code"' in response.text:
                form.setdefault("user_code", user_code)
            aborting = abort and form.get("confirm") == "yes"
            if aborting:
                form["abort"] = "yes"
            if form.get("prompt") == "login":
                form |= {"login": account, "password": "not checked"}
            response = await browser.post(urljoin(str(response.url), action.group(1)),
                                          data=form)
            if aborting:
                return response.text          # the code page again, saying so
    raise AssertionError("the provider's device pages never ended")
