"""The device agent's HTTPS client of the shadow hub's agent API (docs: BRIEF, "Hub HTTP API").

The hub is verified against the deployment CA (`--ca`); every call but `register`
presents the device certificate as the TLS client certificate, which is how the hub
knows the device. One HTTP client per identity: after a renewal `use_identity` builds a
new one and closes the old (a TLS connection keeps the certificate it started with).

Every failure becomes a `ClientError` saying what to do; a 403 becomes `HubRefused`
with the hub's own reason, so the agent can tell "removed" from "unreachable". Never
logs; never sends the private key anywhere.
"""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from portcullis.errors import ClientError
from portcullis.net.tls import client_context, describe_tls_failure
from portcullis.shadow.certificates import DeviceIdentity

TIMEOUT = httpx.Timeout(10.0)
# The hub holds a watch for at most 20 s before it answers {"end": false}.
WATCH_TIMEOUT = httpx.Timeout(10.0, read=30.0)
_AGENT = "/api/v1/shadow/agent"


class HubRefused(ClientError):
    """The hub answered 403: this device is unknown, pending, removed, or its enrolment
    code or certificate is refused. The message carries the hub's reason."""


@dataclass(frozen=True)
class Registration:
    status: str             # "approved" | "pending"
    fingerprint: str
    hub_key: bytes          # PEM, Ed25519 SubjectPublicKeyInfo
    console_ca: bytes       # PEM
    mandatory: bool


@dataclass(frozen=True)
class AgentState:
    mandatory: bool
    heartbeat: float


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str             # why not (empty when allowed)
    session: str = ""
    operator: str = ""
    consent: str = "none"   # "none" | "notify" | "ask"
    consent_timeout: float = 30.0


@dataclass(frozen=True)
class WatchAnswer:
    end: bool
    reason: str


class HubClient:
    """The agent's calls to the hub at `url`, trusting `ca_file` for the hub's certificate."""

    def __init__(self, url: str, ca_file: Path, identity: DeviceIdentity | None = None) -> None:
        self.url = url.rstrip("/")
        self._ca_file = Path(ca_file)
        # Built now so that a missing or unreadable --ca fails at start, not at first use.
        self._anonymous = self._client(client_context(self._ca_file))
        self._device: httpx.AsyncClient | None = None
        # Replaced clients, closed with this one: a watch in flight on one may still run.
        self._retired: list[httpx.AsyncClient] = []
        if identity is not None:
            self.use_identity(identity)

    def _client(self, tls: ssl.SSLContext) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, verify=tls, timeout=TIMEOUT)

    def use_identity(self, identity: DeviceIdentity) -> None:
        """Present `identity` from now on (calls in flight on the old client finish)."""
        tls = client_context(self._ca_file, cert_file=identity.cert_path,
                             key_file=identity.key_path)
        if self._device is not None:
            self._retired.append(self._device)
        self._device = self._client(tls)

    async def aclose(self) -> None:
        for client in (self._anonymous, self._device, *self._retired):
            if client is not None:
                await client.aclose()

    # -- calls ------------------------------------------------------------------------------
    async def register(self, name: str, certificate: bytes, *, code: str | None,
                       advertise: str | None, listen_port: int) -> Registration:
        body = await self._call(self._anonymous, "POST", f"{_AGENT}/register", "register", json={
            "name": name, "certificate": certificate.decode("ascii"), "code": code,
            "advertise": advertise, "listen_port": listen_port})
        status = _text(body, "status")
        if status not in ("approved", "pending"):
            raise ClientError(f"the hub at {self.url} answered the registration with status "
                              f"{status!r}; is it a Portcullis shadow hub of this version?")
        return Registration(status, _text(body, "fingerprint"),
                            _text(body, "hub_key").encode(), _text(body, "console_ca").encode(),
                            bool(body.get("mandatory", False)))

    async def state(self, *, advertise: str | None = None,
                    listen_port: int | None = None) -> AgentState:
        """The heartbeat. It also says where consoles reach this device: `advertise`
        (HOST:PORT) when given, else `listen_port` at the address the hub sees. Only this
        authenticated call may move a registered device (not `register`)."""
        params: dict[str, str | int] = {}
        if advertise is not None:
            params["advertise"] = advertise
        elif listen_port is not None:
            params["listen_port"] = listen_port
        body = await self._call(self._identified(), "GET", f"{_AGENT}/state", "heartbeat",
                                params=params)
        return AgentState(bool(body.get("mandatory", False)),
                          float(body.get("heartbeat", 30.0)))

    async def verify(self, signed: bytes, console_fingerprint: str) -> Verdict:
        body = await self._call(self._identified(), "POST", f"{_AGENT}/verify", "verify", json={
            "request": base64.b64encode(signed).decode("ascii"),
            "console_fingerprint": console_fingerprint})
        if body.get("verdict") != "yes":
            return Verdict(False, str(body.get("reason") or "the hub refused the request"))
        return Verdict(True, "", _text(body, "session"), _text(body, "operator"),
                       str(body.get("consent", "none")),
                       float(body.get("consent_timeout", 30.0)))

    async def session_up(self, session: str) -> None:
        await self._call(self._identified(), "POST", f"{_AGENT}/sessions/{session}/up",
                         "session up", json={})

    async def session_end(self, session: str, *, bytes_to_device: int, bytes_to_console: int,
                          reason: str) -> None:
        await self._call(self._identified(), "POST", f"{_AGENT}/sessions/{session}/end",
                         "session end", json={"bytes_to_device": bytes_to_device,
                                              "bytes_to_console": bytes_to_console,
                                              "reason": reason})

    async def watch(self, session: str) -> WatchAnswer:
        body = await self._call(self._identified(), "GET", f"{_AGENT}/sessions/{session}/watch",
                                "session watch", timeout=WATCH_TIMEOUT)
        return WatchAnswer(bool(body.get("end", False)), str(body.get("reason") or ""))

    async def insecure(self, client: str) -> None:
        await self._call(self._identified(), "POST", f"{_AGENT}/insecure", "insecure session",
                         json={"client": client})

    async def refused(self, code: str, reason: str, *, client: str,
                      request_id: str | None = None, operator: str | None = None,
                      console_fingerprint: str | None = None, count: int | None = None
                      ) -> None:
        """Tell the hub of a refusal the agent decided itself (the hub audits it);
        `count` when it stands for several (a summary)."""
        body: dict[str, Any] = {"code": code, "reason": reason, "request_id": request_id,
                                "operator": operator,
                                "console_fingerprint": console_fingerprint or None,
                                "client": client}
        if count is not None:
            body["count"] = count
        await self._call(self._identified(), "POST", f"{_AGENT}/refused", "refusal report",
                         json=body)

    async def renew(self, certificate: bytes) -> str:
        """Send the new certificate over a connection presenting the old one."""
        body = await self._call(self._identified(), "POST", f"{_AGENT}/renew", "renewal",
                                json={"certificate": certificate.decode("ascii")})
        return _text(body, "fingerprint")

    # -- plumbing ---------------------------------------------------------------------------
    def _identified(self) -> httpx.AsyncClient:
        if self._device is None:
            raise ClientError("the device certificate is not loaded yet (register first)")
        return self._device

    async def _call(self, client: httpx.AsyncClient, method: str, path: str, what: str,
                    **kwargs: Any) -> dict[str, Any]:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ClientError(f"the hub at {self.url} did not answer the {what} in time; "
                              "check that it is running and reachable") from None
        except httpx.HTTPError as exc:
            explained = describe_tls_failure(
                exc, self.url, peer="hub",
                untrusted_remedy="pass --ca FILE with the deployment's CA certificate "
                                 "(DIR/pki/ca.crt on the hub)")
            raise ClientError(explained or f"cannot reach the hub at {self.url} for the "
                                           f"{what}: {exc or type(exc).__name__}") from None
        if response.status_code == 403:
            raise HubRefused(f"the hub refused the {what}: {_error_of(response)}")
        if response.status_code >= 400:
            raise ClientError(f"the hub answered the {what} with {response.status_code}: "
                              f"{_error_of(response)}")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ClientError(f"the hub's answer to the {what} is not a JSON object; is "
                              f"{self.url} a Portcullis shadow hub?")
        return body


def _error_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or "(no reason given)"
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])[:500]
    return response.text[:200]


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ClientError(f"the hub's answer lacks {key!r}; is it a Portcullis shadow hub of "
                          "this version?")
    return value
