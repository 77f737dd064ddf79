"""Federation: sign-ins per second and their latency through the OIDC and the SAML
factors, and tokens issued per second by the gateway's own OpenID provider, each beside
the same library work done directly, in interleaved rounds.

- OIDC: LoginService.begin -> the redirect URL -> the IdP's part (the browser at the
  real npm oidc-provider of tests/peers/oidc.py: authorize, login, consent) -> callback
  (the factor redeems the code, verifies the ID token, asks userinfo) -> a session.
  The provider sits behind the tests' forwarding proxy, which counts the seconds it
  spends answering: the callback's round trips to the provider are subtracted from the
  gateway's time and added to the IdP's. Directly: joserfc verifying the same ID tokens
  (captured on their way back) with the provider's JWKS, and checking iss and aud.
- SAML: the same through the SAML factor against pysaml2's IdP (tests/peers/saml.py,
  its own process; xmlsec1 signs and verifies, a process per signature). The IdP's part
  is the browser's trip through it. Directly: pysaml2's parse_authn_request_response on
  the same Responses, with the same client the factor configured.
- OP: one code flow (authorize with a session cookie, token with PKCE) and one refresh
  per issue, on the provider's routes in this process (httpx's ASGI transport: no TLS,
  no sockets) over the default stores; directly: the two ES256 signatures (joserfc)
  each issue makes.

Sign-ins are sequential (one at a time), so each one's parts can be timed apart; the
rates are 1 / the mean time of the part. CPU is this process's: for OIDC the event loop
thread's (the proxy's threads are the IdP's side), for SAML the process's and its
finished children's (xmlsec1). BENCH_ROUNDS (default 5) and BENCH_SIGN_INS (per round
and kind, default 30; the OP does 4x as many) change the size; every round is also
bounded in time.
"""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import re
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
from joserfc import jwt
from joserfc.jwk import KeySet
from starlette.applications import Starlette

from bench.report import Report, Table
from portcullis.audit import AuditTrail, configure_logging
from portcullis.config.model import Settings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.login import Authenticated, NextStep
from portcullis.identity.sessions import SESSION_COOKIE, SessionManager
from portcullis.idp.decisions import s256
from portcullis.idp.endpoints import IdpDeps, routes
from portcullis.idp.keys import KeyRing
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

# The tests' peers and their in-process login service are the real thing; reuse them
# rather than keep second copies of their setup here.
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from peers import saml as saml_peer
from peers.login import CLIENT, Login, build_login_service, flow
from peers.oidc import CLIENT_SECRET, SERVICE_CALLBACK, OidcPeer, start_oidc_provider
from peers.oidc import sign_in as oidc_browser

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SIGN_INS = int(os.environ.get("BENCH_SIGN_INS", "30"))
OP_FLOWS = 4 * SIGN_INS
PART_TIME_LIMIT = 12.0      # seconds per measurement per round: the whole run stays short

OP_ISSUER = "https://gw.bench"
OP_CALLBACK = "https://app.bench/cb"
OP_SECRET = "bench-client-secret-0123456789"
OP_VERIFIER = "v" * 43


def process_cpu() -> float:
    """This process's CPU seconds and its finished children's (xmlsec1)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


@dataclass
class Part:
    """One part of one measurement in one round: seconds and CPU seconds per op."""

    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, seconds: float, cpu: float | None = None) -> None:
        self.seconds.append(seconds)
        if cpu is not None:
            self.cpu.append(cpu)


Round = dict[str, Part]


class Measured(Protocol):
    async def round(self, parts: Round) -> None:
        """One round's measurements, added to `parts`."""


async def bounded(count: int, once: Callable[[], Awaitable[None]]) -> None:
    """`once` up to `count` times, stopping early at PART_TIME_LIMIT."""
    deadline = time.monotonic() + PART_TIME_LIMIT
    for _ in range(count):
        await once()
        if time.monotonic() > deadline:
            break


# -- OIDC -------------------------------------------------------------------------------


class OidcBench:
    def __init__(self, login: Login, peer: OidcPeer, jwks: KeySet) -> None:
        self.login = login
        self.peer = peer
        self.jwks = jwks
        self.id_tokens: list[str] = []
        # The ID tokens, seen on their way back from the token endpoint (unchanged).
        peer.proxy.tamper_token = self._capture

    def _capture(self, body: dict[str, Any]) -> dict[str, Any]:
        self.id_tokens.append(body["id_token"])
        return body

    async def round(self, parts: Round) -> None:
        self.id_tokens.clear()
        await bounded(SIGN_INS, lambda: self._sign_in(parts))
        direct = parts.setdefault("oidc direct", Part())
        for token in self.id_tokens:
            cpu = time.thread_time()
            started = time.perf_counter()
            self._verify_directly(token)
            direct.add(time.perf_counter() - started, time.thread_time() - cpu)

    async def _sign_in(self, parts: Round) -> None:
        service, proxy = self.login.service, self.peer.proxy
        started, cpu = time.perf_counter(), time.thread_time()
        begun = await service.begin(CLIENT)
        assert isinstance(begun, NextStep) and begun.step.redirect is not None, begun
        begin_seconds, begin_cpu = time.perf_counter() - started, time.thread_time() - cpu
        browser_started = time.perf_counter()
        answers = await oidc_browser(begun.step.redirect.url, "alice", SERVICE_CALLBACK)
        browser = time.perf_counter() - browser_started
        answered, cpu = proxy.answering, time.thread_time()
        callback_started = time.perf_counter()
        done = await service.callback(answers["state"], answers, CLIENT, begun.handle)
        callback = time.perf_counter() - callback_started
        callback_cpu = time.thread_time() - cpu
        assert isinstance(done, Authenticated), self.login.events()[-1:]
        at_idp = proxy.answering - answered
        parts.setdefault("oidc whole", Part()).add(time.perf_counter() - started)
        parts.setdefault("oidc gateway", Part()).add(begin_seconds + callback - at_idp,
                                                     begin_cpu + callback_cpu)
        parts.setdefault("oidc idp", Part()).add(browser + at_idp)

    def _verify_directly(self, token: str) -> None:
        verified = jwt.decode(token, self.jwks, algorithms=["RS256"])
        jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": self.peer.issuer},
            aud={"essential": True, "value": "portcullis"},
            sub={"essential": True}).validate(verified.claims)


# -- SAML -------------------------------------------------------------------------------


class SamlBench:
    def __init__(self, login: Login, peer: saml_peer.SamlPeer, client: Any) -> None:
        self.login = login
        self.peer = peer
        # pysaml2's Saml2Client as the factor configured it (metadata, keys, entity id):
        # "directly" then differs from the factor only by what the factor adds.
        self.client = client
        self.responses: list[str] = []

    async def round(self, parts: Round) -> None:
        from saml2 import BINDING_HTTP_POST

        self.responses.clear()
        await bounded(SIGN_INS, lambda: self._sign_in(parts))
        direct = parts.setdefault("saml direct", Part())
        for encoded in self.responses:
            request_id = re.search(rb'InResponseTo="([^"]+)"', base64.b64decode(encoded))
            assert request_id is not None
            cpu, started = process_cpu(), time.perf_counter()
            response = self.client.parse_authn_request_response(
                encoded, BINDING_HTTP_POST,
                outstanding={request_id.group(1).decode(): saml_peer.CALLBACK})
            direct.add(time.perf_counter() - started, process_cpu() - cpu)
            assert response is not None and response.assertion is not None

    async def _sign_in(self, parts: Round) -> None:
        service = self.login.service
        started, cpu = time.perf_counter(), process_cpu()
        begun = await service.begin(CLIENT)
        assert isinstance(begun, NextStep) and begun.step.redirect is not None, begun
        begin_seconds, begin_cpu = time.perf_counter() - started, process_cpu() - cpu
        redirect = begun.step.redirect
        browser_started = time.perf_counter()
        posted = await self.peer.browse(redirect.url,
                                        dict(redirect.form) if redirect.form else None,
                                        "alice", saml_peer.USERS["alice"]["password"])
        browser = time.perf_counter() - browser_started
        cpu, callback_started = process_cpu(), time.perf_counter()
        done = await service.callback(posted["RelayState"], posted, CLIENT, begun.handle)
        callback = time.perf_counter() - callback_started
        callback_cpu = process_cpu() - cpu
        assert isinstance(done, Authenticated), self.login.events()[-1:]
        self.responses.append(posted["SAMLResponse"])
        parts.setdefault("saml whole", Part()).add(time.perf_counter() - started)
        parts.setdefault("saml gateway", Part()).add(begin_seconds + callback,
                                                     begin_cpu + callback_cpu)
        parts.setdefault("saml idp", Part()).add(browser)


# -- the gateway as OpenID provider -----------------------------------------------------


class OpBench:
    def __init__(self, http: httpx.AsyncClient, keys: Any) -> None:
        self.http = http
        self.keys = keys
        self.authorize = "/oauth2/authorize?" + urlencode({
            "response_type": "code", "client_id": "app", "redirect_uri": OP_CALLBACK,
            "scope": "openid profile groups", "state": "s", "nonce": "n",
            "code_challenge": s256(OP_VERIFIER), "code_challenge_method": "S256"})

    @classmethod
    async def open(cls, stack: AsyncExitStack, directory: Path) -> OpBench:
        (directory / "app.secret").write_text(OP_SECRET)
        settings = Settings.model_validate({
            "gateway": {"public_url": OP_ISSUER},
            "oidc": {"enabled": True, "clients": [{
                "id": "app", "secret_file": "app.secret", "redirect_uris": [OP_CALLBACK],
                "groups": ["staff"]}]}}).model_copy(update={"base_dir": directory})
        durable = await DurableStore.open(f"sqlite:///{directory / 'op.db'}")
        stack.push_async_callback(durable.close)
        ephemeral = MemoryStore()
        hasher = TokenHasher(b"b" * 32)
        sessions = SessionManager(ephemeral, AccountStatus(durable), hasher,
                                  settings.session)
        audit = AuditTrail(directory / "op-audit.jsonl")
        stack.callback(audit.close)
        app = Starlette(routes=routes(IdpDeps(settings, sessions, durable, ephemeral,
                                              hasher, audit)))
        token, _ = await sessions.create(Claims(sub="corp:alice", username="alice",
                                                groups=("staff",), idp="corp"), "127.0.0.1")
        http = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url=OP_ISSUER))
        http.cookies.set(SESSION_COOKIE, token, domain="gw.bench")
        return cls(http, (await KeyRing(durable, hasher, 30).active()).signing)

    async def round(self, parts: Round) -> None:
        await bounded(OP_FLOWS, lambda: self._issue(parts))
        direct = parts.setdefault("op direct", Part())
        for _ in range(len(parts["op code flow"].seconds)):
            cpu, started = time.process_time(), time.perf_counter()
            for typ in ("JWT", "at+jwt"):
                jwt.encode({"alg": "ES256", "kid": self.keys.kid, "typ": typ},
                           {"sub": "corp:alice", "iss": OP_ISSUER, "aud": "app"}, self.keys)
            direct.add(time.perf_counter() - started, time.process_time() - cpu)

    async def _issue(self, parts: Round) -> None:
        client_auth = {"client_id": "app", "client_secret": OP_SECRET}
        cpu, started = time.process_time(), time.perf_counter()
        location = (await self.http.get(self.authorize)).headers["location"]
        code = dict(parse_qsl(urlsplit(location).query))["code"]
        issued = (await self.http.post("/oauth2/token", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": OP_CALLBACK,
            "code_verifier": OP_VERIFIER, **client_auth})).json()
        parts.setdefault("op code flow", Part()).add(time.perf_counter() - started,
                                                     time.process_time() - cpu)
        cpu, started = time.process_time(), time.perf_counter()
        refreshed = await self.http.post("/oauth2/token", data={
            "grant_type": "refresh_token", "refresh_token": issued["refresh_token"],
            **client_auth})
        parts.setdefault("op refresh", Part()).add(time.perf_counter() - started,
                                                   time.process_time() - cpu)
        assert refreshed.status_code == 200, refreshed.text


# -- the run ----------------------------------------------------------------------------


ROWS = [  # (part, label, what "direct" it is compared with)
    ("oidc whole", "OIDC sign-in, whole (browser + IdP + gateway)", None),
    ("oidc idp", "  IdP's side: authorize, login, consent, token, userinfo", None),
    ("oidc gateway", "  gateway's side: begin + callback - IdP round trips", "oidc direct"),
    ("oidc direct", "  direct: joserfc verifies the same ID token (RS256)", None),
    ("saml whole", "SAML sign-in, whole (browser + IdP + gateway)", None),
    ("saml idp", "  IdP's side: AuthnRequest check, sign-in, signed Response", None),
    ("saml gateway", "  gateway's side: begin (signed request) + callback", "saml direct"),
    ("saml direct", "  direct: pysaml2 parse_authn_request_response", None),
    ("op code flow", "OP code flow (authorize + token)", "op direct"),
    ("op refresh", "OP refresh (token)", "op direct"),
    ("op direct", "  direct: two ES256 signatures (joserfc)", None),
]


def machine_line() -> str:
    model = "?"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model

    def version(*command: str) -> str:
        if shutil.which(command[0]) is None:
            return "absent"
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    return (f"machine: {os.cpu_count()} cores, {model}, Linux {platform.release()}, "
            f"{ssl.OPENSSL_VERSION}, Python {platform.python_version()}, "
            f"node {version('node', '--version')}, {version('xmlsec1', '--version')}")


def _oidc_login(stack: ExitStack, durable: DurableStore, peer: OidcPeer,
                directory: Path) -> Login:
    (directory / "secrets").mkdir(exist_ok=True)
    (directory / "secrets" / "oidc").write_text(CLIENT_SECRET)
    login, trail = build_login_service(
        flow({"provider": "idp"}, providers=[peer.provider()]), durable, directory,
        directory / "oidc-audit.jsonl")
    stack.callback(trail.close)
    return login


def _saml_login(stack: ExitStack, durable: DurableStore, peer: saml_peer.SamlPeer,
                directory: Path) -> Login:
    provider = peer.provider().model_dump(mode="json", exclude_defaults=True)
    login, trail = build_login_service(
        flow({"provider": saml_peer.PROVIDER}, providers=[{**provider, "type": "saml"}]),
        durable, directory, directory / "saml-audit.jsonl",
        gateway={"public_url": saml_peer.PUBLIC_URL},
        tls={"directory": str(peer.pki_dir)})
    stack.callback(trail.close)
    return login


async def _rounds(directory: Path, oidc: OidcPeer, saml: saml_peer.SamlPeer) -> list[Round]:
    async with AsyncExitStack() as stack:
        durable = await DurableStore.open(f"sqlite:///{directory / 'gateway.db'}")
        stack.push_async_callback(durable.close)
        with ExitStack() as trails:
            oidc_login = _oidc_login(trails, durable, oidc, directory)
            stack.push_async_callback(oidc_login.providers.close)
            saml_login = _saml_login(trails, durable, saml, directory)
            async with httpx.AsyncClient(timeout=10) as http:
                discovery = (await http.get(
                    f"{oidc.issuer}/.well-known/openid-configuration")).json()
                jwks = KeySet.import_key_set((await http.get(discovery["jwks_uri"])).json())
            saml_source = saml_login.providers.saml(saml.provider())
            saml_client = (await saml_source.get())._client
            benches: list[Measured] = [OidcBench(oidc_login, oidc, jwks),
                       SamlBench(saml_login, saml, saml_client),
                       await OpBench.open(stack, directory)]
            # One unmeasured sign-in each: discovery, JWKS, metadata, keys, connections.
            for bench in benches:
                await bench.round({})
            rounds = []
            for number in range(ROUNDS):
                parts: Round = {}
                for bench in benches:
                    await bench.round(parts)
                rounds.append(parts)
                print(f"round {number + 1}/{ROUNDS}: "
                      f"{len(parts['oidc whole'].seconds)} OIDC, "
                      f"{len(parts['saml whole'].seconds)} SAML, "
                      f"{len(parts['op code flow'].seconds)} OP flows", flush=True)
            return rounds


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}–{max(values):.1f}"


def _report(rounds: list[Round], machine: str) -> Report:
    rows: list[list[Any]] = []
    data: dict[str, Any] = {"machine": machine, "rounds": ROUNDS}
    per_second = {name: [len(r[name].seconds) / sum(r[name].seconds) for r in rounds]
                  for name, _, _ in ROWS}
    for name, label, direct in ROWS:
        pooled = sorted(s for r in rounds for s in r[name].seconds)
        p50, p95 = (pooled[min(len(pooled) - 1, int(q * len(pooled)))] * 1000
                    for q in (0.50, 0.95))
        cpu = [sum(r[name].cpu) / len(r[name].cpu) * 1000 for r in rounds if r[name].cpu]
        ratio = (statistics.median(per_second[direct]) / statistics.median(per_second[name])
                 if direct else None)
        rows.append([label, statistics.median(per_second[name]), _spread(per_second[name]),
                     p50, p95,
                     statistics.median(cpu) if cpu else "–",
                     f"{ratio:.1f}x" if ratio else ""])
        data[name] = {"per_second": per_second[name], "p50_ms": p50, "p95_ms": p95, "cpu_ms": cpu}
    table = Table(
        f"Federation: {ROUNDS} interleaved rounds, sequential; ops/s median and min–max "
        "over rounds, p50/p95 over all samples, CPU ms per op (this process)",
        ["measure", "ops/s", "min–max", "p50 ms", "p95 ms", "CPU ms", "÷ direct"], rows)
    gateway = {kind: statistics.median(per_second[f"{kind} gateway"]) for kind in ("oidc", "saml")}
    return Report(
        "federation", [table],
        [f"OIDC: {gateway['oidc']:.0f} sign-ins/s at the gateway's side, "
         f"{statistics.median(per_second['oidc whole']):.0f}/s whole",
         f"SAML: {gateway['saml']:.0f} sign-ins/s at the gateway's side, "
         f"{statistics.median(per_second['saml whole']):.0f}/s whole",
         f"OP: {statistics.median(per_second['op code flow']):.0f} code flows/s, "
         f"{statistics.median(per_second['op refresh']):.0f} refreshes/s"],
        notes=[machine,
               "÷ direct: how many times slower than the library work done directly",
               "OIDC CPU: the event loop thread's (the forwarding proxy's threads are the "
               "IdP's side); SAML CPU: the process's and xmlsec1's (a process per "
               "signature); OP CPU: client and provider, both in this process",
               "the tests' forwarding proxy speaks HTTP/1.0: the gateway opens a TCP "
               "connection (plain, 127.0.0.1) per request to the OIDC provider"],
        data=data)


def run() -> Report:
    # Warnings only: an INFO line per token issued would be the terminal's cost, not
    # ours (the audit trail is still written, as the gateway writes it).
    configure_logging("warning")
    machine = machine_line()
    print(machine, flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-federation-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        oidc = start_oidc_provider(directory / "oidc")
        stack.callback(oidc.close)
        (directory / "saml").mkdir()
        saml, saml_process = saml_peer.start_saml_idp(directory / "saml")
        stack.callback(saml_process.stop)
        rounds = asyncio.run(_rounds(directory, oidc, saml))
    return _report(rounds, machine)
