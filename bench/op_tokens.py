"""OpenID provider: tokens issued per second, and their latency, through the provider's
own endpoints, beside the same library work done directly.

- through the OP: one whole code flow per sign-in (GET /oauth2/authorize with a session
  cookie, POST /oauth2/token with client_secret_post and the PKCE verifier), then one
  refresh (POST /oauth2/token, grant_type=refresh_token), on the provider's Starlette
  routes in this process (httpx's ASGI transport: no TLS, no sockets), over the default
  stores (memory://, SQLite). Each issue signs an ID token and an access token;
- directly: the two ES256 signatures (joserfc) that each issue makes, nothing else.

The ratio is what the provider adds to the signing: records in the ephemeral store,
session checks, parsing. Not measured: TLS and uvicorn, which login_rate covers.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from joserfc import jwt
from starlette.applications import Starlette

from bench.report import Report, Table, verdict
from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.sessions import SESSION_COOKIE, SessionManager
from portcullis.idp.decisions import s256
from portcullis.idp.endpoints import IdpDeps, routes
from portcullis.idp.keys import KeyRing
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

ISSUER = "https://gw.bench"
CALLBACK = "https://app.bench/cb"
SECRET = "bench-client-secret-0123456789"
VERIFIER = "v" * 43
FLOWS = 300
TARGET_PER_SECOND = 100.0


async def _measure(directory: Path) -> dict[str, list[float]]:
    (directory / "app.secret").write_text(SECRET)
    settings = Settings.model_validate({
        "gateway": {"public_url": ISSUER},
        "oidc": {"enabled": True, "clients": [{
            "id": "app", "secret_file": "app.secret", "redirect_uris": [CALLBACK],
            "groups": ["staff"]}]}}).model_copy(update={"base_dir": directory})
    durable = await DurableStore.open(f"sqlite:///{directory / 'db'}")
    ephemeral = MemoryStore()
    hasher = TokenHasher(b"b" * 32)
    sessions = SessionManager(ephemeral, AccountStatus(durable), hasher, settings.session)
    audit = AuditTrail(directory / "audit.jsonl")
    app = Starlette(routes=routes(IdpDeps(settings, sessions, durable, ephemeral, hasher,
                                          audit)))
    token, _ = await sessions.create(Claims(sub="corp:alice", username="alice",
                                            groups=("staff",), idp="corp"), "127.0.0.1")
    authorize = "/oauth2/authorize?" + urlencode({
        "response_type": "code", "client_id": "app", "redirect_uri": CALLBACK,
        "scope": "openid profile groups", "state": "s", "nonce": "n",
        "code_challenge": s256(VERIFIER), "code_challenge_method": "S256"})
    client_auth = {"client_id": "app", "client_secret": SECRET}
    flows: list[float] = []
    refreshes: list[float] = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url=ISSUER) as http:
            http.cookies.set(SESSION_COOKIE, token, domain="gw.bench")
            for _ in range(FLOWS):
                started = time.perf_counter()
                location = (await http.get(authorize)).headers["location"]
                code = dict(parse_qsl(urlsplit(location).query))["code"]
                issued = (await http.post("/oauth2/token", data={
                    "grant_type": "authorization_code", "code": code,
                    "redirect_uri": CALLBACK, "code_verifier": VERIFIER,
                    **client_auth})).json()
                flows.append(time.perf_counter() - started)
                started = time.perf_counter()
                refreshed = await http.post("/oauth2/token", data={
                    "grant_type": "refresh_token", "refresh_token": issued["refresh_token"],
                    **client_auth})
                refreshes.append(time.perf_counter() - started)
                assert refreshed.status_code == 200, refreshed.text
        keys = await KeyRing(durable, hasher, 30).active()
        direct: list[float] = []
        for _ in range(FLOWS):
            started = time.perf_counter()
            for typ in ("JWT", "at+jwt"):
                jwt.encode({"alg": "ES256", "kid": keys.signing.kid, "typ": typ},
                           {"sub": "corp:alice", "iss": ISSUER, "aud": "app"}, keys.signing)
            direct.append(time.perf_counter() - started)
    finally:
        audit.close()
        await durable.close()
    return {"code flow": flows, "refresh": refreshes, "direct": direct}


def run() -> Report:
    with tempfile.TemporaryDirectory() as directory:
        samples = asyncio.run(_measure(Path(directory)))
    direct_rate = len(samples["direct"]) / sum(samples["direct"])
    rows = []
    for name in ("code flow", "refresh", "direct"):
        values = samples[name]
        rate = len(values) / sum(values)
        rows.append([name if name != "direct" else "direct: two ES256 signatures", rate,
                     statistics.median(values) * 1000,
                     statistics.quantiles(values, n=100)[98] * 1000, rate / direct_rate])
    flow_rate = rows[0][1]
    return Report(
        "op_tokens",
        [Table("OpenID provider: tokens issued (one client, sequential, in process)",
               ["setup", "issues/s", "p50 ms", "p99 ms", "× direct"], rows)],
        [verdict("code flows per second", flow_rate, TARGET_PER_SECOND, "/s")],
        data={name: {"rate": len(v) / sum(v), "p50": statistics.median(v)}
              for name, v in samples.items()})
