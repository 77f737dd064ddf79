"""The shadow hub (role `shadow-hub`): registered devices, signed shadow requests, the
shadow sessions they open, and ending them.

Devices register their own self-signed certificates, authorised by a one-time enrolment
code or by an administrator approving the fingerprint; the hub's agent listener then
trusts exactly those certificates (`DeviceTrust`). An operator asks for a request; the
hub decides (`decisions.may_shadow`), issues a certificate for the console's key and a
request signed with its key that names the device, its certificate, the operator and
that console certificate, for at most 60 s. The device forwards the request; the hub
checks it (`decisions.check_request`) and spends it (`take` in the ephemeral store:
single use across every hub node) before it says yes.

A shadow session ends when the device or console closes it, an administrator ends it,
the operator's sign-in session ends (any of the hardening issue's endings), or the
device is removed. The device's agent holds a watch on its session; the hub answers it
within half a second of any of those, on whichever node it is asked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import json
import re
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.config.shadow import DEVICE_NAME_PATTERN
from portcullis.config.values import parse_host_port
from portcullis.errors import DuplicateError, PKIError
from portcullis.identity.endings import Ending
from portcullis.identity.sessions import Session, SessionManager
from portcullis.pki import certificate_fingerprint
from portcullis.policy.engine import Subject
from portcullis.policy.shadow import may_shadow
from portcullis.proto.shadow import (
    ShadowProtocolError,
    ShadowRequest,
    parse_signed_request,
    sign_request,
)
from portcullis.shadow.decisions import CLOCK_SKEW, check_request
from portcullis.shadow.hublink import DIAL_OUT
from portcullis.shadow.keys import HubKeys
from portcullis.store import DurableStore, EphemeralStore, EventBus, ShadowDeviceRecord
from portcullis.tokens import TokenHasher

log = structlog.get_logger("portcullis.shadow.hub")

ISSUED_PREFIX = "shadow-issued:"      # request id -> who asked, until used or expired
ISSUED_TO_PREFIX = "shadow-issued-to:"   # request id -> the session it was issued to
REPORT_WINDOW = 600.0                 # a console may report on its request this long
PENDING_PREFIX = "shadow-pending-from:"   # address -> registrations without a code
PENDING_PER_ADDRESS = 10              # ... per address and hour: no squatting of names
MAX_PENDING = 1000                    # devices waiting for approval, at most
SESSION_PREFIX = "shadow-session:"    # session id -> the running session
SESSIONS_SET = "shadow-sessions"
ENDED_PREFIX = "shadow-ended:"        # session id -> why it ended (read by every node)
ENDED_CHANNEL = "shadow-ended"
DIAL_OUT_PREFIX = "shadow-dialout:"   # device -> the hub node holding its connections
SESSION_TTL = 86400.0                 # a session record outlives any shadow session
WATCH_SECONDS = 20.0                  # the longest a watch is held before "not yet"
WATCH_STEP = 0.5                      # how often a held watch looks at the stores
CODE_NAMESPACE = "shadow-enrolment"
MAX_CERTIFICATE_PEM = 8192
_DEVICE_NAME = re.compile(DEVICE_NAME_PATTERN)


class HubRefusal(Exception):
    """A request the hub refuses; `status` is the HTTP status, the message is shown."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DeviceTrust:
    """What the agent listener trusts: exactly the approved devices' current
    certificates (self-signed, each its own trust anchor). OpenSSL cannot take an anchor
    back out of a context, so each change builds a fresh context from `make_context` and
    the listener's context hands every new handshake to it (its SNI callback runs for
    every ClientHello, SNI or not): a removed device's or a replaced certificate stops
    verifying at once, and two certificates of one name (a renewal, a re-registration)
    never shadow each other. Which device a certificate is, the hub checks by fingerprint
    on every call; certificates approved on another hub node arrive with `refresh`,
    which the hub runs every few seconds."""

    def __init__(self, listener: ssl.SSLContext,
                 make_context: Callable[[], ssl.SSLContext]) -> None:
        self._make = make_context
        self._anchors: dict[str, str] = {}
        self.current = make_context()
        listener.sni_callback = self._hand_over

    def _hand_over(self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                   context: ssl.SSLContext) -> None:
        connection.context = self.current

    def __contains__(self, fingerprint: str) -> bool:
        return fingerprint in self._anchors

    def set(self, anchors: dict[str, str]) -> None:
        """Trust exactly these certificates (fingerprint -> PEM) from now on."""
        if anchors == self._anchors:
            return
        context = self._make()
        for pem in anchors.values():
            context.load_verify_locations(cadata=pem)
        self._anchors, self.current = dict(anchors), context


@dataclass(frozen=True)
class ShadowSessionRecord:
    id: str
    device: str
    operator: str
    handle: str | None        # the operator's sign-in session
    console: str              # the console certificate's fingerprint
    started: float
    up: bool = False

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ShadowSessionRecord:
        return cls(**json.loads(raw))


class ShadowHub:
    def __init__(self, settings: Callable[[], Settings], durable: DurableStore,
                 ephemeral: EphemeralStore, events: EventBus, audit: AuditTrail,
                 keys: HubKeys, hasher: TokenHasher, sessions: SessionManager,
                 trust: DeviceTrust, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self.durable = durable
        self._ephemeral = ephemeral
        self._events = events
        self.audit = audit
        self.keys = keys
        self._hasher = hasher
        self._sessions = sessions
        self.trust = trust
        self._clock = clock
        self._ended_here: dict[str, asyncio.Event] = {}

    # -- devices ------------------------------------------------------------------------
    async def register(self, body: dict[str, Any], peer_address: str) -> dict[str, Any]:
        name = _text(body, "name")
        if not _DEVICE_NAME.fullmatch(name):
            raise HubRefusal(400, f"{name!r} is not a device name: 1-63 lowercase letters, "
                                  "digits, '.', '-' or '_'")
        certificate = _device_certificate(_text(body, "certificate"), self._clock())
        fingerprint = certificate_fingerprint(certificate.encode())
        advertise = _advertise(body, peer_address)
        code = body.get("code")
        now = self._now()
        record = await self.durable.shadow_device(name)

        def refused(why: str) -> HubRefusal:
            self.audit.record("shadow.registration_refused", device=name,
                              fingerprint=fingerprint, client=peer_address, reason=why)
            return HubRefusal(403, why)

        if record is None:
            if code:
                raise refused(f"no device named {name!r} was added; an administrator adds "
                              f"it with 'portcullis shadow device add {name}'")
            if await self._ephemeral.incr(PENDING_PREFIX + peer_address,
                                          3600.0) > PENDING_PER_ADDRESS:
                raise refused("too many registrations without a code from this address; "
                              "ask an administrator for an enrolment code")
            if sum(r.status == "pending"
                   for r in await self.durable.shadow_devices()) >= MAX_PENDING:
                raise refused("too many devices wait for approval; ask an administrator "
                              "for an enrolment code")
            try:
                await self.durable.add_pending_shadow_device(name, certificate, fingerprint,
                                                             advertise, now)
            except DuplicateError:
                raise refused("this certificate is registered for another device") from None
            self.audit.record("shadow.device_pending", device=name, fingerprint=fingerprint,
                              client=peer_address)
            return self._registered("pending", fingerprint)
        if record.status == "enrolling":
            if not isinstance(code, str) or not code:
                raise refused(f"device {name!r} waits for its enrolment code: start the "
                              "agent with --code CODE")
            if not await self.durable.enrol_shadow_device(
                    name, self._code_hash(code), certificate, fingerprint, advertise, now):
                raise refused("the enrolment code is wrong, used or expired; ask for a new "
                              f"one ('portcullis shadow device add {name}')")
            self.audit.record("shadow.device_enrolled", device=name, fingerprint=fingerprint,
                              client=peer_address)
            await self.refresh_trust()
            return self._registered("approved", fingerprint)
        if record.fingerprint != fingerprint:
            raise refused(f"device {name!r} is registered with another certificate; an "
                          f"administrator must remove it first ('portcullis shadow device "
                          f"remove {name}')")
        if record.status == "approved" and fingerprint not in self.trust:
            # Approved meanwhile (perhaps on another node, or by the CLI).
            await self.refresh_trust()
        # Unauthenticated (anyone can read a device's certificate off its port 5900): the
        # answer only. Where the device is reached changes on its authenticated heartbeat.
        return self._registered(record.status, fingerprint)

    def _registered(self, status: str, fingerprint: str) -> dict[str, Any]:
        return {"status": status, "fingerprint": fingerprint,
                "hub_key": self.keys.public_key_pem,
                "console_ca": self.keys.console_ca.cert_pem.decode(),
                "mandatory": self._settings().shadow.mandatory}

    async def device_of(self, peer_der: bytes | None,
                        peer_address: str = "unknown") -> ShadowDeviceRecord:
        """The approved device whose certificate the agent presented."""
        if not peer_der:
            raise HubRefusal(401, "present the device certificate (mutual TLS)")
        fingerprint = certificate_fingerprint(ssl.DER_cert_to_PEM_cert(peer_der).encode())
        record = await self.durable.shadow_device_with(fingerprint)
        if record is None or record.status != "approved":
            why = ("not registered (removed?)" if record is None else "waits for approval")
            self.audit.record("shadow.device_refused", fingerprint=fingerprint,
                              device=record.name if record else None, client=peer_address,
                              reason=why)
            raise HubRefusal(403, f"this device is {why}")
        return record

    async def refused_by_device(self, device: ShadowDeviceRecord,
                                body: dict[str, Any]) -> None:
        """What the device refused by itself (its own check of a request, a console
        certificate of another CA at TLS, consent): audited here like the hub's own
        refusals. The agent limits how often it tells."""
        def field(key: str, limit: int = 200) -> str | None:
            value = body.get(key)
            return _printable(value, limit) if isinstance(value, str) else None

        self.audit.record("shadow.request_refused", device=device.name, by="device",
                          code=field("code", 40) or "unknown", reason=field("reason", 500),
                          request=field("request_id", 64), operator=field("operator", 256),
                          console=field("console_fingerprint", 80),
                          client=field("client", 100), count=body.get("count")
                          if isinstance(body.get("count"), int) else None)

    async def state(self, device: ShadowDeviceRecord, asked: dict[str, Any],
                    peer_address: str) -> dict[str, Any]:
        """The heartbeat: last seen, where the device is reached (as the agent, proven by
        its certificate, says), and the settings pushed to it."""
        told = "advertise" in asked or "listen_port" in asked
        advertise = _advertise(asked, peer_address) if told else device.advertise
        if advertise != device.advertise:
            self.audit.record("shadow.device_moved", device=device.name,
                              old=device.advertise, new=advertise)
        await self.durable.seen_shadow_device(device.name, self._now(), advertise)
        settings = self._settings().shadow
        return {"status": device.status, "mandatory": settings.mandatory,
                "heartbeat": settings.heartbeat}

    async def renew(self, device: ShadowDeviceRecord, body: dict[str, Any]) -> dict[str, Any]:
        certificate = _device_certificate(_text(body, "certificate"), self._clock())
        fingerprint = certificate_fingerprint(certificate.encode())
        if not await self.durable.replace_shadow_certificate(
                device.name, str(device.fingerprint), certificate, fingerprint):
            raise HubRefusal(409, "the certificate could not be replaced (another device "
                                  "has it, or this one was just renewed or removed)")
        # Exactly the current certificates: the old one goes now (two anchors of one name
        # would make OpenSSL pick by name).
        await self.refresh_trust()
        self.audit.record("shadow.certificate_renewed", device=device.name,
                          old=device.fingerprint, new=fingerprint)
        return {"fingerprint": fingerprint}

    async def devices_for(self, session: Session) -> list[ShadowDeviceRecord]:
        """Every device for an administrator; for anyone else the approved devices they
        may shadow (a device list tells where devices are: no more than needed)."""
        settings = self._settings()
        records = await self.durable.shadow_devices()
        if set(settings.admin_groups) & set(session.claims.groups):
            return records
        operator = Subject(session.username, frozenset(session.claims.groups))
        return [record for record in records if record.status == "approved"
                and may_shadow(settings.shadow, settings.admin_groups, operator,
                               record.name).allowed]

    async def refresh_trust(self) -> None:
        self.trust.set({str(record.fingerprint): str(record.certificate)
                        for record in await self.durable.shadow_devices()
                        if record.status == "approved" and record.certificate})

    async def keep_trust_fresh(self, interval: float = 5.0) -> None:
        while True:
            try:
                await self.refresh_trust()
            except Exception as exc:   # a store outage must not end the loop
                log.warning("device certificates not refreshed", error=str(exc))
            await asyncio.sleep(interval)

    # -- requests -----------------------------------------------------------------------
    async def issue(self, session: Session, body: dict[str, Any],
                    client: str) -> dict[str, Any]:
        settings = self._settings()
        name = _text(body, "device")
        operator = Subject(session.username, frozenset(session.claims.groups))
        # The policy first: whoever may not shadow a name learns nothing about it.
        decision = may_shadow(settings.shadow, settings.admin_groups, operator, name)
        if not decision.allowed:
            self.audit.record("shadow.request_denied", device=name,
                              operator=operator.username, client=client, rule=decision.rule,
                              reason=decision.reason)
            raise HubRefusal(403, f"you may not shadow {name}: {decision.reason}")
        record = await self.durable.shadow_device(name)
        if record is None or record.status != "approved" or not record.fingerprint:
            self.audit.record("shadow.request_refused", device=name,
                              operator=operator.username, client=client,
                              reason="no such device" if record is None else "not approved")
            if record is None:
                raise HubRefusal(404, f"no device named {name!r} is registered")
            raise HubRefusal(409, f"device {name!r} is not approved yet")
        lifetime = settings.shadow.request_lifetime
        try:
            console = self.keys.console_certificate(_text(body, "csr").encode(),
                                                    settings.shadow.console_certificate_lifetime)
        except PKIError as exc:
            raise HubRefusal(400, str(exc)) from None
        console_fingerprint = certificate_fingerprint(console)
        now = int(self._clock())
        request = ShadowRequest(
            request_id=secrets.token_hex(16), device=name,
            device_fingerprint=record.fingerprint, operator=operator.username,
            console_fingerprint=console_fingerprint, nonce=secrets.token_hex(16),
            issued_at=now, expires_at=now + lifetime, key_id=self.keys.key_id)
        asked = {"operator": operator.username, "handle": session.handle,
                 "console": console_fingerprint, "device": name}
        await self._ephemeral.put(ISSUED_PREFIX + request.request_id,
                                  json.dumps(asked).encode(), lifetime + CLOCK_SKEW)
        # Who may report on this request afterwards (the console's account of failures).
        await self._ephemeral.put(ISSUED_TO_PREFIX + request.request_id,
                                  session.handle.encode(), REPORT_WINDOW)
        self.audit.record("shadow.request_issued", request=request.request_id, device=name,
                          operator=operator.username, client=client, rule=decision.rule,
                          console=console_fingerprint, expires_at=request.expires_at)
        return {"request": base64.b64encode(sign_request(request, self.keys.signing_key))
                .decode(), "request_id": request.request_id,
                "certificate": console.decode(),
                "console_ca": self.keys.console_ca.cert_pem.decode(),
                "device": {"name": name, "fingerprint": record.fingerprint,
                           "address": record.advertise},
                "expires_at": request.expires_at}

    async def issued(self, request_id: str) -> dict[str, Any] | None:
        """Who a request still unused was issued to (read, not spent: the device spends
        it at `verify`), or None once used or expired."""
        raw = await self._ephemeral.get(ISSUED_PREFIX + request_id[:64])
        return None if raw is None else dict(json.loads(raw))

    async def dial_out_node(self, device: str) -> str | None:
        """The hub node that holds the dial-out connections of `device`, if any does."""
        raw = await self._ephemeral.get(DIAL_OUT_PREFIX + device)
        return None if raw is None else str(json.loads(raw).get("node", "")) or None

    async def verify(self, device: ShadowDeviceRecord,
                     body: dict[str, Any]) -> dict[str, Any]:
        """Yes (a new shadow session) or no with the reason, for the device to pass on."""
        settings = self._settings()
        presented = _text(body, "console_fingerprint")

        def no(code: str, reason: str, **fields: Any) -> dict[str, Any]:
            self.audit.record("shadow.request_refused", device=device.name, code=code,
                              reason=reason, console=presented, **fields)
            return {"verdict": "no", "reason": reason}

        try:
            signed = parse_signed_request(base64.b64decode(_text(body, "request"),
                                                           validate=True))
        except (ShadowProtocolError, binascii.Error, ValueError) as exc:
            return no("malformed", f"the shadow request is malformed: {exc}")
        request = signed.request
        verdict = check_request(signed, {self.keys.key_id: self.keys.public_key},
                                device=device.name,
                                device_fingerprint=str(device.fingerprint),
                                console_fingerprint=presented, now=int(self._clock()))
        fields = {"request": request.request_id, "operator": request.operator}
        if not verdict.ok:
            return no(verdict.code, verdict.reason, **fields)
        issued = await self._ephemeral.take(ISSUED_PREFIX + request.request_id)
        if issued is None:
            return no("replayed", "the shadow request was used already; ask for a new one",
                      **fields)
        asked = json.loads(issued)
        standing = await self._sessions.standing(asked["handle"])
        if isinstance(standing, Ending):
            return no("signed-out", f"the operator's session ended: {standing.value}",
                      **fields)
        decision = may_shadow(settings.shadow, settings.admin_groups,
                              Subject(request.operator, frozenset(standing.claims.groups)),
                              device.name)
        if not decision.allowed:
            return no("policy", decision.reason, **fields)
        session = ShadowSessionRecord(secrets.token_hex(8), device.name, request.operator,
                                      asked["handle"], presented, self._clock())
        await self._ephemeral.put(SESSION_PREFIX + session.id, session.encode(), SESSION_TTL)
        await self._ephemeral.add_to_set(SESSIONS_SET, session.id, SESSION_TTL)
        self.audit.record("shadow.request_verified", session=session.id, device=device.name,
                          consent=decision.consent, **fields)
        return {"verdict": "yes", "session": session.id, "operator": request.operator,
                "consent": decision.consent, "consent_timeout": decision.consent_timeout}

    async def report(self, session: Session, request_id: str, body: dict[str, Any],
                     client: str) -> None:
        """The console's account of a failure the hub cannot see (a device presenting
        another certificate, a device unreachable): audited."""
        issued_to = await self._ephemeral.get(ISSUED_TO_PREFIX + request_id[:64])
        if issued_to is None or issued_to.decode() != session.handle:
            raise HubRefusal(404, "no such request of this session")
        # Once per request: a console has one account to give.
        await self._ephemeral.delete(ISSUED_TO_PREFIX + request_id[:64])
        self.audit.record("shadow.console_problem", request=request_id[:64],
                          operator=session.username, client=client,
                          problem=_printable(str(body.get("problem", "")), 40),
                          detail=_printable(str(body.get("detail", "")), 500))

    # -- sessions -----------------------------------------------------------------------
    async def session(self, session_id: str) -> ShadowSessionRecord | None:
        raw = await self._ephemeral.get(SESSION_PREFIX + session_id)
        return None if raw is None else ShadowSessionRecord.decode(raw)

    async def own_session(self, device: ShadowDeviceRecord,
                          session_id: str) -> ShadowSessionRecord:
        record = await self.session(session_id)
        if record is None or record.device != device.name:
            raise HubRefusal(404, "no such shadow session of this device")
        return record

    async def channel_up(self, record: ShadowSessionRecord) -> None:
        up = ShadowSessionRecord(**{**record.__dict__, "up": True})
        await self._ephemeral.put(SESSION_PREFIX + record.id, up.encode(), SESSION_TTL)
        self.audit.record("shadow.channel_up", session=record.id, device=record.device,
                          operator=record.operator)

    async def channel_ended(self, record: ShadowSessionRecord, body: dict[str, Any]) -> None:
        def count(key: str) -> int:
            value = body.get(key, 0)
            return value if isinstance(value, int) and value >= 0 else 0

        await self._forget(record.id)
        self.audit.record("shadow.channel_ended", session=record.id, device=record.device,
                          operator=record.operator,
                          bytes_to_device=count("bytes_to_device"),
                          bytes_to_console=count("bytes_to_console"),
                          seconds=round(self._clock() - record.started, 3),
                          reason=str(body.get("reason", ""))[:200])

    async def insecure(self, device: ShadowDeviceRecord, body: dict[str, Any]) -> None:
        self.audit.record("shadow.insecure_session", device=device.name,
                          client=_printable(str(body.get("client", "")), 100),
                          phase=_printable(str(body.get("event", "open")), 20))

    async def running(self) -> list[ShadowSessionRecord]:
        records = []
        for session_id in sorted(await self._ephemeral.set_members(SESSIONS_SET)):
            record = await self.session(session_id)
            if record is None:
                await self._ephemeral.remove_from_set(SESSIONS_SET, session_id)
            else:
                records.append(record)
        return records

    async def end(self, session_id: str, reason: str, by: str) -> bool:
        record = await self.session(session_id)
        if record is None:
            return False
        # As long as the session record: an agent cut off from the hub for a while
        # still hears of the end when it is back (and ends by itself meanwhile).
        await self._ephemeral.put(ENDED_PREFIX + session_id, reason.encode(), SESSION_TTL)
        self._wake(session_id)
        try:
            await self._events.publish(ENDED_CHANNEL, session_id.encode())
        except Exception as exc:   # the other nodes still see the marker within 0.5 s
            log.warning("shadow session end not published", error=str(exc))
        self.audit.record("shadow.session_ended", session=session_id, device=record.device,
                          operator=record.operator, by=by, reason=reason)
        return True

    async def watch(self, record: ShadowSessionRecord, *,
                    hold: float = WATCH_SECONDS) -> dict[str, Any]:
        """Held until the session must end (then why) or `hold` seconds pass."""
        woken = self._ended_here.setdefault(record.id, asyncio.Event())
        deadline = self._clock() + hold
        try:
            while True:
                why = await self._why_ended(record)
                if why is not None:
                    return {"end": True, "reason": why}
                if self._clock() >= deadline:
                    return {"end": False}
                woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), WATCH_STEP)
        finally:
            self._ended_here.pop(record.id, None)

    async def listen_for_ends(self) -> None:
        """Other nodes' ends wake this node's watches at once (the stores are read every
        half second anyway, so a lost message only costs that)."""
        def deliver(message: bytes) -> None:
            self._wake(message.decode(errors="replace"))

        await self._events.listen(ENDED_CHANNEL, deliver)

    async def _why_ended(self, record: ShadowSessionRecord) -> str | None:
        marker = await self._ephemeral.get(ENDED_PREFIX + record.id)
        if marker is not None:
            return marker.decode(errors="replace")
        device = await self.durable.shadow_device(record.device)
        if device is None or device.status != "approved":
            return "the device was removed"
        if record.handle is not None:
            standing = await self._sessions.standing(record.handle)
            if isinstance(standing, Ending):
                return f"the operator's session ended: {standing.value}"
        return None

    def _wake(self, session_id: str) -> None:
        event = self._ended_here.get(session_id)
        if event is not None:
            event.set()

    async def _forget(self, session_id: str) -> None:
        await self._ephemeral.delete(SESSION_PREFIX + session_id)
        await self._ephemeral.remove_from_set(SESSIONS_SET, session_id)

    def _code_hash(self, code: str) -> str:
        return enrolment_code_hash(self._hasher, code)

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)


def enrolment_code_hash(hasher: TokenHasher, code: str) -> str:
    """How an enrolment code is kept: a keyed hash, never the code."""
    return hasher.digest(CODE_NAMESPACE, code)


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise HubRefusal(400, f"the request needs {key!r} (a non-empty string)")
    return value


def _printable(value: str, limit: int) -> str:
    """For the audit trail and the terminal: no control characters, bounded."""
    return "".join(char if char.isprintable() else "?" for char in value[:limit])


def _advertise(body: dict[str, Any], peer_address: str) -> str:
    advertise = body.get("advertise")
    if advertise == DIAL_OUT:   # behind NAT: consoles reach it through the hub
        return DIAL_OUT
    if isinstance(advertise, str) and advertise:
        try:
            parse_host_port(advertise, what="advertise")
        except ValueError as exc:
            raise HubRefusal(400, str(exc)) from None
        if len(advertise) > 300 or not advertise.isprintable():
            raise HubRefusal(400, "'advertise' must be a printable HOST:PORT")
        return advertise
    port = body.get("listen_port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise HubRefusal(400, "give 'advertise' (HOST:PORT) or 'listen_port'")
    host = f"[{peer_address}]" if ":" in peer_address else peer_address
    return f"{host}:{port}"


def _device_certificate(pem: str, now: float) -> str:
    """The PEM, if it is one self-signed certificate of an EC P-256 or Ed25519 key valid
    now: what an agent makes (a device's certificate is its own trust anchor)."""
    if len(pem) > MAX_CERTIFICATE_PEM:
        raise HubRefusal(400, "the certificate is too large")
    try:
        certificate = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise HubRefusal(400, "'certificate' is not a PEM certificate") from None
    key = certificate.public_key()
    if not (isinstance(key, ed25519.Ed25519PublicKey)
            or (isinstance(key, ec.EllipticCurvePublicKey)
                and isinstance(key.curve, ec.SECP256R1))):
        raise HubRefusal(400, "the device key must be EC P-256 or Ed25519")
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise HubRefusal(400, "the certificate is not self-signed by its own key") from None
    # It becomes a trust anchor of the agents' listener: one that may sign certificates
    # would let its holder mint others (the hub looks devices up by exact fingerprint,
    # but a device has no business being a CA).
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        if constraints.value.ca:
            raise HubRefusal(400, "a device certificate must not be a CA (CA:TRUE)")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if usage.key_cert_sign:
            raise HubRefusal(400, "a device certificate must not sign certificates "
                                  "(keyCertSign)")
    except x509.ExtensionNotFound:
        pass
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    if not certificate.not_valid_before_utc <= moment < certificate.not_valid_after_utc:
        raise HubRefusal(400, "the certificate is not valid now (check the device's clock)")
    return certificate.public_bytes(serialization.Encoding.PEM).decode()
