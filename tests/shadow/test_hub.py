"""The shadow hub's decisions end to end inside one process: registration, issuing,
verifying and every refusal the issue lists, with the real stores (SQLite or PostgreSQL,
memory or Redis) and a clock the test moves. The agent and console that call it over
mutual TLS are tested in tests/e2e/test_secure_shadowing.py."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.endings import Ending
from portcullis.identity.sessions import Session, SessionManager
from portcullis.proto.shadow import key_id_of, parse_signed_request, sign_request
from portcullis.shadow.hub import DeviceTrust, HubRefusal, ShadowHub, enrolment_code_hash
from portcullis.shadow.keys import HubKeys
from portcullis.store import DurableStore, EphemeralStore, MemoryEventBus
from portcullis.store.durable import ShadowDeviceRecord
from portcullis.tokens import TokenHasher

HASHER = TokenHasher(b"s" * 32)


@dataclass
class Clock:
    now: float = field(default_factory=lambda: float(int(dt.datetime.now(dt.UTC).timestamp())))

    def __call__(self) -> float:
        return self.now


def self_signed(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "console")]))
               .sign(key, hashes.SHA256()))
    return request.public_bytes(serialization.Encoding.PEM).decode()


def der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)


@dataclass
class World:
    hub: ShadowHub
    durable: DurableStore
    sessions: SessionManager
    clock: Clock
    audit_path: Path

    def audited(self, event: str) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines()
        return [record for record in map(json.loads, lines) if record["event"] == event]

    async def operator(self, name: str = "helen", groups: tuple[str, ...] = ("admins",)
                       ) -> tuple[str, Session]:
        if await self.durable.get_user(name) is None:
            await self.durable.add_user(name, None, list(groups))
        claims = Claims(sub=f"local:{name}", username=name, groups=groups)
        return await self.sessions.create(claims, "127.0.0.1")

    async def device(self, name: str = "kiosk-1") -> tuple[str, ShadowDeviceRecord]:
        code = "enrol-" + name
        await self.durable.add_shadow_device(name, enrolment_code_hash(HASHER, code),
                                             dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        cert = self_signed(name)
        answer = await self.hub.register({"name": name, "certificate": cert, "code": code,
                                          "listen_port": 5900}, "10.9.8.7")
        assert answer["status"] == "approved"
        return cert, await self.hub.device_of(der(cert))


def server_context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


@pytest.fixture
async def world(durable: DurableStore, ephemeral_store: EphemeralStore,
                tmp_path: Path) -> World:
    settings = Settings.model_validate({"shadow": {"heartbeat": 5}})
    clock = Clock()
    audit_path = tmp_path / "audit.jsonl"
    sessions = SessionManager(ephemeral_store, AccountStatus(durable, ttl=0), HASHER,
                              settings.session)
    hub = ShadowHub(lambda: settings, durable, ephemeral_store, MemoryEventBus(),
                    AuditTrail(audit_path, echo=False), HubKeys.load_or_create(tmp_path),
                    HASHER, sessions, DeviceTrust(server_context(), server_context),
                    clock=clock)
    return World(hub, durable, sessions, clock, audit_path)


async def issued(world: World, device: str = "kiosk-1") -> tuple[dict[str, Any], str]:
    _, session = await world.operator()
    answer = await world.hub.issue(session, {"device": device, "csr": csr()}, "127.0.0.1")
    console = x509.load_pem_x509_certificate(answer["certificate"].encode())
    fingerprint = "sha256:" + console.fingerprint(hashes.SHA256()).hex()
    return answer, fingerprint


async def test_a_genuine_request_is_honoured_once(world: World) -> None:
    _, device = await world.device()
    answer, console = await issued(world)
    assert answer["device"] == {"name": "kiosk-1", "fingerprint": device.fingerprint,
                                "address": "10.9.8.7:5900"}
    request = parse_signed_request(base64.b64decode(answer["request"])).request
    assert request.expires_at - request.issued_at == 60
    assert request.console_fingerprint == console and request.operator == "helen"
    yes = await world.hub.verify(device, {"request": answer["request"],
                                          "console_fingerprint": console})
    assert yes["verdict"] == "yes" and yes["operator"] == "helen"
    again = await world.hub.verify(device, {"request": answer["request"],
                                            "console_fingerprint": console})
    assert again == {"verdict": "no", "reason": "the shadow request was used already; ask "
                                                "for a new one"}
    assert [r["code"] for r in world.audited("shadow.request_refused")] == ["replayed"]
    assert [r["session"] for r in world.audited("shadow.request_verified")] == [yes["session"]]


async def test_a_request_61_seconds_old_is_refused(world: World) -> None:
    _, device = await world.device()
    answer, console = await issued(world)
    world.clock.now += 61
    no = await world.hub.verify(device, {"request": answer["request"],
                                         "console_fingerprint": console})
    assert no["verdict"] == "no" and "expired" in no["reason"]


async def test_another_device_or_console_certificate_is_refused(world: World) -> None:
    _, kiosk = await world.device("kiosk-1")
    _, other = await world.device("kiosk-2")
    answer, console = await issued(world, "kiosk-1")
    for device, presented in [(other, console), (kiosk, "sha256:" + "0" * 64)]:
        no = await world.hub.verify(device, {"request": answer["request"],
                                             "console_fingerprint": presented})
        assert no["verdict"] == "no"
    assert [r["code"] for r in world.audited("shadow.request_refused")] == [
        "device", "console-certificate"]
    # Refusals do not spend the request: the right device and console still may.
    yes = await world.hub.verify(kiosk, {"request": answer["request"],
                                         "console_fingerprint": console})
    assert yes["verdict"] == "yes"


async def test_a_request_signed_by_another_key_is_refused(world: World) -> None:
    _, device = await world.device()
    answer, console = await issued(world)
    genuine = parse_signed_request(base64.b64decode(answer["request"])).request
    other = Ed25519PrivateKey.generate()
    # Another key, under its own id or claiming the hub's: both refused.
    forged = sign_request(replace(genuine, key_id=key_id_of(other.public_key())), other)
    claiming = bytearray(sign_request(genuine, world.hub.keys.signing_key))
    claiming[-64:] = other.sign(b"anything")
    for wire in (forged, bytes(claiming)):
        no = await world.hub.verify(device, {"request": base64.b64encode(wire).decode(),
                                             "console_fingerprint": console})
        assert no == {"verdict": "no",
                      "reason": "the shadow request was not signed by this hub's key"}
    assert [r["code"] for r in world.audited("shadow.request_refused")] == ["signature"] * 2


async def test_garbage_is_a_malformed_request(world: World) -> None:
    _, device = await world.device()
    for garbage in ["not base64!", base64.b64encode(b"\x00" * 100).decode()]:
        no = await world.hub.verify(device, {"request": garbage,
                                             "console_fingerprint": "sha256:" + "0" * 64})
        assert no["verdict"] == "no" and "malformed" in no["reason"]


async def test_an_operator_outside_the_policy_gets_no_request(world: World) -> None:
    await world.device()
    _, session = await world.operator("eve", ("staff",))
    with pytest.raises(HubRefusal, match="you may not shadow kiosk-1") as refused:
        await world.hub.issue(session, {"device": "kiosk-1", "csr": csr()}, "127.0.0.1")
    assert refused.value.status == 403
    assert world.audited("shadow.request_denied")[0]["operator"] == "eve"


async def test_an_operator_signed_out_before_the_device_asks_is_refused(world: World) -> None:
    _, device = await world.device()
    _, session = await world.operator()
    answer = await world.hub.issue(session, {"device": "kiosk-1", "csr": csr()}, "x")
    await world.sessions.revoke(session.handle, Ending.ADMIN_REVOKED)
    console = x509.load_pem_x509_certificate(answer["certificate"].encode())
    no = await world.hub.verify(device, {"request": answer["request"], "console_fingerprint":
                                         "sha256:" + console.fingerprint(hashes.SHA256()).hex()})
    assert no["verdict"] == "no" and "session ended" in no["reason"]


async def test_pending_devices_wait_and_others_are_refused(world: World) -> None:
    cert = self_signed("pos-7")
    pending = await world.hub.register({"name": "pos-7", "certificate": cert,
                                        "listen_port": 5900}, "10.0.0.5")
    assert pending["status"] == "pending"
    with pytest.raises(HubRefusal, match="waits for approval"):
        await world.hub.device_of(der(cert))
    _, session = await world.operator()
    with pytest.raises(HubRefusal, match="not approved yet"):
        await world.hub.issue(session, {"device": "pos-7", "csr": csr()}, "x")
    with pytest.raises(HubRefusal, match="registered with another certificate"):
        await world.hub.register({"name": "pos-7", "certificate": self_signed("pos-7"),
                                  "listen_port": 5900}, "10.0.0.6")
    assert await world.durable.approve_shadow_device("pos-7", pending["fingerprint"], "admin")
    again = await world.hub.register({"name": "pos-7", "certificate": cert,
                                      "listen_port": 5900}, "10.0.0.5")
    assert again["status"] == "approved"


async def test_a_wrong_code_or_unknown_certificate_is_refused(world: World) -> None:
    await world.durable.add_shadow_device("kiosk-9", enrolment_code_hash(HASHER, "right"),
                                          dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    with pytest.raises(HubRefusal, match="wrong, used or expired"):
        await world.hub.register({"name": "kiosk-9", "certificate": self_signed("kiosk-9"),
                                  "code": "wrong", "listen_port": 5900}, "10.0.0.5")
    with pytest.raises(HubRefusal, match="not registered"):
        await world.hub.device_of(der(self_signed("stranger")))
    assert len(world.audited("shadow.registration_refused")) == 1


async def test_a_removed_device_is_refused_and_its_session_ends(world: World) -> None:
    _, device = await world.device()
    answer, console = await issued(world)
    yes = await world.hub.verify(device, {"request": answer["request"],
                                          "console_fingerprint": console})
    record = await world.hub.session(yes["session"])
    assert record is not None
    assert await world.hub.watch(record, hold=0.0) == {"end": False}
    await world.durable.remove_shadow_device("kiosk-1")
    assert await world.hub.watch(record, hold=5.0) == {"end": True,
                                                       "reason": "the device was removed"}
    with pytest.raises(HubRefusal, match="not registered"):
        await world.hub.device_of(der(device.certificate or ""))


async def test_an_administrator_ends_a_session(world: World) -> None:
    _, device = await world.device()
    answer, console = await issued(world)
    yes = await world.hub.verify(device, {"request": answer["request"],
                                          "console_fingerprint": console})
    record = await world.hub.session(yes["session"])
    assert record is not None and [r.id for r in await world.hub.running()] == [record.id]
    assert await world.hub.end(record.id, "ended by an administrator", "admin")
    assert await world.hub.watch(record) == {"end": True,
                                             "reason": "ended by an administrator"}
    await world.hub.channel_ended(record, {"bytes_to_device": 10, "bytes_to_console": 20})
    assert await world.hub.running() == []
    ended = world.audited("shadow.channel_ended")[0]
    assert (ended["bytes_to_device"], ended["bytes_to_console"]) == (10, 20)


async def test_operators_see_only_the_devices_they_may_shadow(world: World) -> None:
    await world.device("kiosk-1")
    await world.hub.register({"name": "pos-7", "certificate": self_signed("pos-7"),
                              "listen_port": 5900}, "10.0.0.5")
    _, admin = await world.operator()
    assert [r.name for r in await world.hub.devices_for(admin)] == ["kiosk-1", "pos-7"]
    _, staff = await world.operator("eve", ("staff",))
    assert await world.hub.devices_for(staff) == []


async def test_an_unauthenticated_registration_does_not_move_a_device(world: World) -> None:
    cert, device = await world.device()
    again = await world.hub.register({"name": "kiosk-1", "certificate": cert,
                                      "advertise": "evil.example:5900"}, "10.6.6.6")
    assert again["status"] == "approved"
    assert (await world.durable.shadow_device("kiosk-1")).advertise == "10.9.8.7:5900"  # type: ignore[union-attr]
    # The device itself, proven by its certificate, says where it is now.
    await world.hub.state(device, {"listen_port": "5901"}, "10.9.8.8")
    assert (await world.durable.shadow_device("kiosk-1")).advertise == "10.9.8.8:5901"  # type: ignore[union-attr]
    assert world.audited("shadow.device_moved")[0]["new"] == "10.9.8.8:5901"
    with pytest.raises(HubRefusal, match="HOST:PORT"):
        await world.hub.state(device, {"advertise": "\x1b[2Jx:1"}, "10.9.8.8")


async def test_a_ca_certificate_is_no_device_certificate(world: World) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue")])
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
          .public_key(key.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(minutes=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
    with pytest.raises(HubRefusal, match="must not be a CA"):
        await world.hub.register({"name": "rogue", "listen_port": 5900, "certificate":
                                  ca.public_bytes(serialization.Encoding.PEM).decode()}, "x")


async def test_whoever_may_not_shadow_learns_nothing_of_names(world: World) -> None:
    _, session = await world.operator("eve", ("staff",))
    for name in ("kiosk-1", "no-such-device"):
        if name == "kiosk-1":
            await world.device()
        with pytest.raises(HubRefusal) as refused:
            await world.hub.issue(session, {"device": name, "csr": csr()}, "x")
        assert refused.value.status == 403


async def test_only_the_issuing_session_reports_once(world: World) -> None:
    await world.device()
    _, session = await world.operator()
    answer = await world.hub.issue(session, {"device": "kiosk-1", "csr": csr()}, "x")
    _, other = await world.operator()
    problem = {"problem": "device-certificate", "detail": "pinned \x1b[31m"}
    with pytest.raises(HubRefusal):
        await world.hub.report(other, answer["request_id"], problem, "x")
    await world.hub.report(session, answer["request_id"], problem, "x")
    with pytest.raises(HubRefusal):
        await world.hub.report(session, answer["request_id"], problem, "x")
    reported = world.audited("shadow.console_problem")
    assert len(reported) == 1 and reported[0]["detail"] == "pinned ?[31m"


async def test_registrations_without_a_code_are_rate_limited(world: World) -> None:
    for index in range(10):
        await world.hub.register({"name": f"pos-{index}", "listen_port": 5900,
                                  "certificate": self_signed(f"pos-{index}")}, "10.0.0.9")
    with pytest.raises(HubRefusal, match="too many registrations"):
        await world.hub.register({"name": "pos-x", "listen_port": 5900,
                                  "certificate": self_signed("pos-x")}, "10.0.0.9")


async def test_what_a_device_refused_and_unknown_devices_are_audited(world: World) -> None:
    _, device = await world.device()
    await world.hub.refused_by_device(device, {
        "code": "console-ca", "reason": "certificate of another CA", "client": "10.1.1.1:4",
        "request_id": None})
    refused = world.audited("shadow.request_refused")[0]
    assert (refused["by"], refused["code"], refused["device"]) == ("device", "console-ca",
                                                                   "kiosk-1")
    with pytest.raises(HubRefusal):
        await world.hub.device_of(der(self_signed("stranger")), "10.2.2.2")
    assert world.audited("shadow.device_refused")[0]["client"] == "10.2.2.2"
