"""The device proxy of the device agent, end to end on 127.0.0.1: a console proxy's
secure channel accepted or refused, plain viewers refused (mandatory) or passed, and bad
input closed, with the agent still serving after each case.

The hub here is `FakeHub`, a stand-in for the shadow hub that the lead is building now:
a small Starlette app served by uvicorn over TLS (certificates from portcullis.pki.ca),
with only the routes these tests need and the checks a hub must make. The VNC server is
a fake too (it greets like RFB 3.8, then echoes); real VNC programs are for the e2e suite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import errno
import json
import os
import resource
import secrets
import socket
import ssl
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from portcullis.client.state import ClientState
from portcullis.errors import ClientError
from portcullis.pki import IssuedCert, certificate_fingerprint, create_ca, issue_certificate
from portcullis.proto.shadow import (
    PREFACE,
    ShadowRequest,
    key_id_of,
    parse_signed_request,
    sign_request,
)
from portcullis.shadow import agent as agent_module
from portcullis.shadow.agent import AgentSettings, DeviceAgent
from portcullis.shadow.certificates import (
    console_csr,
    private_key_pem,
    renewed_certificate,
    stage_device_files,
)
from portcullis.shadow.console import ConsoleProxy, _ViewerListener
from portcullis.shadow.refusals import RefusalBudget

DEVICE = "kiosk-7"
CODE = "enrol-7f3a"
TOKEN = "operator-session-token"
RFB_GREETING = b"RFB 003.008\n"


class _CertificateHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol handing the app the client certificate's DER."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        self._peer_der = ssl_object.getpeercert(binary_form=True) if ssl_object else None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": {"peer_der": self._peer_der}}


@dataclass
class FakeHub:
    """A stand-in for the shadow hub (the lead builds the real one): registration by
    code, verify with signature / device / console / expiry / single-use checks, the
    operator's request endpoint, and records of what agents and consoles told it."""

    directory: Path
    ca: IssuedCert = field(default_factory=lambda: create_ca("Test deployment CA"))
    console_ca: IssuedCert = field(default_factory=lambda: create_ca("Test console CA"))
    rogue_ca: IssuedCert = field(default_factory=lambda: create_ca("Rogue console CA"))
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    mandatory: bool = False
    refuse_with: str | None = None       # verify answers "no" with this reason
    consent: str = "none"
    issue_from_rogue_ca: bool = False    # console certificates from another CA
    watch_fails: bool = False            # the session watch answers 503
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    server: uvicorn.Server | None = None
    url: str = ""

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def names(self, kind: str) -> list[dict[str, Any]]:
        return [body for event, body in self.events if event == kind]

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file.write_bytes(self.ca.cert_pem)
        server_pair = issue_certificate(self.ca, "hub", ip_addresses=["127.0.0.1"])
        (self.directory / "hub.crt").write_bytes(server_pair.cert_pem)
        (self.directory / "hub.key").write_bytes(server_pair.key_pem)
        app = Starlette(routes=[
            Route("/api/v1/shadow/agent/register", self.register, methods=["POST"]),
            Route("/api/v1/shadow/agent/state", self.state, methods=["GET"]),
            Route("/api/v1/shadow/agent/verify", self.verify, methods=["POST"]),
            Route("/api/v1/shadow/agent/sessions/{id}/{what}", self.session,
                  methods=["GET", "POST"]),
            Route("/api/v1/shadow/agent/insecure", self.insecure, methods=["POST"]),
            Route("/api/v1/shadow/agent/renew", self.renew, methods=["POST"]),
            Route("/api/v1/shadow/agent/refused", self.refused, methods=["POST"]),
            Route("/api/v1/shadow/requests", self.request, methods=["POST"]),
            Route("/api/v1/shadow/requests/{id}/report", self.report, methods=["POST"]),
        ])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                http=_CertificateHttp, lifespan="off",
                                ssl_certfile=str(self.directory / "hub.crt"),
                                ssl_keyfile=str(self.directory / "hub.key"))
        config.load()
        assert config.ssl is not None
        # Devices present self-signed certificates: each registered one is its own trust
        # anchor (partial chain), and the handler then looks the device up by fingerprint.
        config.ssl.verify_mode = ssl.CERT_OPTIONAL
        config.ssl.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        config.ssl.load_verify_locations(cadata=self.ca.cert_pem.decode())
        self._ssl = config.ssl
        self.server = uvicorn.Server(config)
        self._task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.should_exit = True
        await self._task

    # -- agent side ----------------------------------------------------------------------
    def _device_of(self, request: Request) -> dict[str, Any] | None:
        der = request.scope.get("extensions", {}).get("tls", {}).get("peer_der")
        if not der:
            return None
        fingerprint = certificate_fingerprint(ssl.DER_cert_to_PEM_cert(der).encode())
        for device in self.devices.values():
            if device["fingerprint"] == fingerprint and device["status"] == "approved":
                return device
        return None

    async def register(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.events.append(("register", body))
        name, pem = body["name"], body["certificate"].encode()
        known = self.devices.get(name)
        if known is not None and known["certificate"] != pem:
            return JSONResponse({"error": "name registered with another certificate"}, 403)
        if known is None:
            if body["code"] not in (CODE, None):
                return JSONResponse({"error": "wrong or expired enrolment code"}, 403)
            known = {"name": name, "certificate": pem,
                     "fingerprint": certificate_fingerprint(pem),
                     "status": "approved" if body["code"] == CODE else "pending",
                     "address": f"{request.client.host if request.client else ''}:"
                                f"{body['listen_port']}"}
            self.devices[name] = known
            self._ssl.load_verify_locations(cadata=pem.decode())
        return JSONResponse({
            "status": known["status"], "fingerprint": known["fingerprint"],
            "hub_key": self.key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
            "console_ca": self.console_ca.cert_pem.decode(), "mandatory": self.mandatory})

    async def state(self, request: Request) -> JSONResponse:
        device = self._device_of(request)
        if device is None:
            return JSONResponse({"error": "unknown device"}, 403)
        asked = dict(request.query_params)
        self.events.append(("state", asked))
        # As the hub: only this authenticated call moves a device.
        if "advertise" in asked:
            device["address"] = asked["advertise"]
        elif "listen_port" in asked:
            device["address"] = (f"{request.client.host if request.client else ''}:"
                                 f"{asked['listen_port']}")
        return JSONResponse({"status": "approved", "mandatory": self.mandatory,
                             "heartbeat": 1})

    async def verify(self, request: Request) -> JSONResponse:
        device = self._device_of(request)
        if device is None:
            return JSONResponse({"error": "unknown device"}, 403)
        body = await request.json()
        self.events.append(("verify", body))
        signed = parse_signed_request(base64.b64decode(body["request"]))
        shadow = signed.request
        reason = (self.refuse_with
                  or ("signature" if not signed.signature_valid(self.key.public_key()) else None)
                  or ("another device" if shadow.device_fingerprint != device["fingerprint"]
                      else None)
                  or ("another console" if shadow.console_fingerprint !=
                      body["console_fingerprint"] else None)
                  or ("expired" if shadow.expires_at < time.time() else None)
                  or ("replayed" if shadow.request_id in self.used else None))
        if reason is not None:
            return JSONResponse({"verdict": "no", "reason": reason})
        self.used.add(shadow.request_id)
        session = secrets.token_hex(8)
        self.events.append(("verified", {"session": session}))
        return JSONResponse({"verdict": "yes", "session": session,
                             "operator": shadow.operator, "consent": self.consent,
                             "consent_timeout": 5})

    async def session(self, request: Request) -> JSONResponse:
        if self._device_of(request) is None:
            return JSONResponse({"error": "unknown device"}, 403)
        what = request.path_params["what"]
        if what == "watch":
            if self.watch_fails:
                return JSONResponse({"error": "the hub is away"}, 503)
            await asyncio.sleep(0.5)   # a short long-poll: tests stop quickly
            return JSONResponse({"end": False})
        self.events.append((what, {"session": request.path_params["id"],
                                   **(await request.json())}))
        return JSONResponse({})

    async def insecure(self, request: Request) -> JSONResponse:
        if self._device_of(request) is None:
            return JSONResponse({"error": "unknown device"}, 403)
        self.events.append(("insecure", await request.json()))
        return JSONResponse({})

    async def refused(self, request: Request) -> JSONResponse:
        if self._device_of(request) is None:
            return JSONResponse({"error": "unknown device"}, 403)
        self.events.append(("refused", await request.json()))
        return JSONResponse({})

    async def renew(self, request: Request) -> JSONResponse:
        device = self._device_of(request)   # identified by the OLD certificate
        if device is None:
            return JSONResponse({"error": "unknown device"}, 403)
        pem = (await request.json())["certificate"].encode()
        device["certificate"], device["fingerprint"] = pem, certificate_fingerprint(pem)
        self._ssl.load_verify_locations(cadata=pem.decode())
        self.events.append(("renew", {"fingerprint": device["fingerprint"]}))
        return JSONResponse({"fingerprint": device["fingerprint"]})

    # -- operator side ---------------------------------------------------------------------
    async def request(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": "sign in"}, 401)
        body = await request.json()
        device = self.devices.get(body["device"])
        if device is None:
            return JSONResponse({"error": f"no device {body['device']}"}, 404)
        console = self.console_certificate(body["csr"].encode())
        now = int(time.time())
        shadow = ShadowRequest(
            request_id=secrets.token_hex(16), device=device["name"],
            device_fingerprint=device["fingerprint"], operator="alice",
            console_fingerprint=certificate_fingerprint(console), nonce=secrets.token_hex(16),
            issued_at=now, expires_at=now + 60, key_id=key_id_of(self.key.public_key()))
        return JSONResponse({
            "request": base64.b64encode(sign_request(shadow, self.key)).decode(),
            "request_id": shadow.request_id, "certificate": console.decode(),
            "console_ca": self.console_ca.cert_pem.decode(),
            "device": {"name": device["name"], "fingerprint": device["fingerprint"],
                       "address": device["address"]},
            "expires_at": shadow.expires_at})

    def console_certificate(self, csr_pem: bytes) -> bytes:
        ca = self.rogue_ca if self.issue_from_rogue_ca else self.console_ca
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
        csr = x509.load_pem_x509_csr(csr_pem)
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
                .issuer_name(ca_cert.subject).public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1))
                .not_valid_after(now + dt.timedelta(minutes=5))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
                .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
        return cert.public_bytes(serialization.Encoding.PEM)

    async def report(self, request: Request) -> JSONResponse:
        self.events.append(("report", await request.json()))
        return JSONResponse({})


class FakeVnc:
    """Greets like an RFB 3.8 server, then echoes; counts its connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(RFB_GREETING)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


@dataclass
class World:
    hub: FakeHub
    vnc: FakeVnc
    agent: DeviceAgent
    directory: Path
    said: list[str]

    @property
    def port(self) -> int:
        assert self.agent.listen_address is not None
        return self.agent.listen_address[1]

    def operator(self) -> ClientState:
        return ClientState(self.hub.url, "alice", TOKEN, str(self.hub.ca_file))

    def audit(self) -> list[dict[str, Any]]:
        lines = (self.directory / "agent" / "audit.log").read_text().splitlines()
        return [json.loads(line) for line in lines]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    hub = FakeHub(tmp_path / "hub")
    await hub.start()
    vnc = FakeVnc()
    vnc_port = await vnc.start()
    said: list[str] = []
    agent = DeviceAgent(AgentSettings(
        hub_url=hub.url, ca_file=hub.ca_file, directory=tmp_path / "agent", name=DEVICE,
        vnc=("127.0.0.1", vnc_port), listen=("127.0.0.1", 0), code=CODE,
        sniff_timeout=0.3, request_timeout=3.0, register_interval=0.1), say=said.append)
    running = asyncio.ensure_future(agent.run())
    serving = asyncio.ensure_future(agent.serving.wait())
    await asyncio.wait({running, serving}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if running.done():
        running.result()   # raises the agent's error
    assert agent.serving.is_set(), said
    yield World(hub, vnc, agent, tmp_path, said)
    for _ in range(200):   # every connection the test made is over: no slot leaked
        if agent.open_connections == 0:
            break
        await asyncio.sleep(0.05)
    assert agent.open_connections == 0
    agent.stop()
    await asyncio.wait_for(running, 30)
    assert vnc.server is not None
    vnc.server.close()
    await hub.stop()


# -- helpers -----------------------------------------------------------------------------
async def shadow_once(world: World, payload: bytes = b"hello device") -> tuple[int, bytes]:
    """Run the console proxy; as the viewer, read the greeting and an echo of `payload`."""
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    proxy = ConsoleProxy(world.operator(), DEVICE, say=lambda line: None)
    run = asyncio.ensure_future(proxy.run(
        on_listening=lambda host, port: listening.set_result(port)))
    done, _ = await asyncio.wait({run, listening}, timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    if run in done:
        run.result()
    reader, writer = await asyncio.open_connection("127.0.0.1", listening.result())
    received = await reader.readexactly(len(RFB_GREETING))
    writer.write(payload)
    received += await reader.readexactly(len(payload))
    writer.close()
    return await asyncio.wait_for(run, 30), received


def console_tls(world: World) -> tuple[ssl.SSLContext, str]:
    """A client context with a console certificate of the hub's console CA, and the
    certificate's fingerprint."""
    key, csr = console_csr()
    cert = world.hub.console_certificate(csr)
    directory = world.directory / f"console-{secrets.token_hex(4)}"
    directory.mkdir()
    (directory / "c.crt").write_bytes(cert)
    (directory / "c.key").write_bytes(private_key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(directory / "c.crt", directory / "c.key")
    return context, certificate_fingerprint(cert)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            data += chunk
    return data


async def reported(world: World, code: str, count: int = 1) -> list[dict[str, Any]]:
    """The refusal reports with `code` the hub received, once `count` arrived."""
    for _ in range(200):
        found = [body for body in world.hub.names("refused") if body["code"] == code]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    return [body for body in world.hub.names("refused") if body["code"] == code]


async def assert_still_serving(world: World) -> None:
    """A plain viewer (speaking first) still reaches the VNC server through the proxy."""
    before = world.vnc.connections
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    writer.write(b"RFB 003.008\n")
    assert await asyncio.wait_for(reader.readexactly(24), 10) == RFB_GREETING + b"RFB 003.008\n"
    writer.close()
    assert world.vnc.connections == before + 1


# -- the secure channel -------------------------------------------------------------------
async def test_secure_channel_relays_the_viewer_to_the_vnc_server(world: World) -> None:
    status, received = await shadow_once(world)
    assert status == 0
    assert received == RFB_GREETING + b"hello device"
    for _ in range(100):
        if world.hub.names("end"):
            break
        await asyncio.sleep(0.05)
    (up,) = world.hub.names("up")
    (end,) = world.hub.names("end")
    assert end["session"] == up["session"]
    assert end["bytes_to_device"] == len(b"hello device")
    assert end["bytes_to_console"] == len(RFB_GREETING) + len(b"hello device")
    assert "shadow.channel.up" in [entry["event"] for entry in world.audit()]
    await assert_still_serving(world)


async def test_hub_saying_no_reaches_the_operator_with_its_reason(world: World) -> None:
    world.hub.refuse_with = "alice may not shadow kiosk-7 (rule help-desk-only)"
    with pytest.raises(ClientError, match=r"refused the shadowing: alice may not shadow"):
        await shadow_once(world)
    (report,) = world.hub.names("report")
    assert report["problem"] == "refused"
    assert world.vnc.connections == 0
    world.hub.refuse_with = None
    await assert_still_serving(world)


def signed_for(world: World, console_fingerprint: str, device_fingerprint: str = "") -> bytes:
    """A request signed by the hub's key, as the hub would issue it."""
    assert world.agent.identity is not None
    now = int(time.time())
    return sign_request(ShadowRequest(
        request_id=secrets.token_hex(16), device=DEVICE,
        device_fingerprint=device_fingerprint or world.agent.identity.fingerprint,
        operator="alice", console_fingerprint=console_fingerprint,
        nonce=secrets.token_hex(16), issued_at=now, expires_at=now + 60,
        key_id=key_id_of(world.hub.key.public_key())), world.hub.key)


async def send_request(world: World, context: ssl.SSLContext, signed: bytes) -> bytes:
    """Open a channel with `context`, send `signed`; the device's first answer bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port, ssl=context,
                                                   server_hostname=DEVICE)
    writer.write(PREFACE + struct.pack("!BH", 1, len(signed)) + signed)
    header = await asyncio.wait_for(reader.readexactly(3), 10)
    kind, length = struct.unpack("!BH", header)
    payload = await asyncio.wait_for(reader.readexactly(length), 10)
    writer.close()
    return bytes([kind]) + payload


async def test_replayed_request_is_refused_with_the_hubs_reason(world: World) -> None:
    context, fingerprint = console_tls(world)
    signed = signed_for(world, fingerprint)
    first = await send_request(world, context, signed)
    assert first[:1] == b"\x02"   # ACCEPT
    again = await send_request(world, context, signed)
    assert again == b"\x03replayed"
    assert world.vnc.connections == 1
    await assert_still_serving(world)


async def test_request_for_another_console_is_refused_before_the_hub_is_asked(
        world: World) -> None:
    context, _ = console_tls(world)
    _, other_fingerprint = console_tls(world)
    answer = await send_request(world, context, signed_for(world, other_fingerprint))
    assert answer[:1] == b"\x03" and b"another console certificate" in answer
    assert not world.hub.names("verify")
    (report,) = await reported(world, "console-certificate")
    assert report["operator"] == "alice" and len(report["request_id"]) == 32
    assert report["console_fingerprint"] != other_fingerprint
    assert report["client"].startswith("127.0.0.1:")


async def test_request_for_another_device_is_refused(world: World) -> None:
    context, fingerprint = console_tls(world)
    answer = await send_request(world, context,
                                signed_for(world, fingerprint, "sha256:" + "ab" * 32))
    assert answer[:1] == b"\x03" and b"not for this one" in answer
    assert not world.hub.names("verify")
    (report,) = await reported(world, "device")
    assert report["console_fingerprint"] == fingerprint and "not for this one" in report["reason"]


async def test_request_signed_by_another_key_is_refused(world: World) -> None:
    context, fingerprint = console_tls(world)
    real_key = world.hub.key
    world.hub.key = Ed25519PrivateKey.generate()
    signed = signed_for(world, fingerprint)
    world.hub.key = real_key
    answer = await send_request(world, context, signed)
    assert answer[:1] == b"\x03" and b"not signed by this device's hub" in answer
    (report,) = await reported(world, "signature")
    assert report["request_id"] == parse_signed_request(signed).request.request_id


async def test_console_certificate_of_another_ca_is_refused_at_tls(world: World) -> None:
    world.hub.issue_from_rogue_ca = True
    with pytest.raises(ClientError, match=r"refused this console's certificate"):
        await shadow_once(world)
    assert world.vnc.connections == 0
    assert not world.hub.names("verify")
    for _ in range(100):
        if "shadow.tls.failed" in [entry["event"] for entry in world.audit()]:
            break
        await asyncio.sleep(0.05)
    assert "shadow.tls.failed" in [entry["event"] for entry in world.audit()]
    (report,) = await reported(world, "console-ca")
    assert report["request_id"] is None and report["client"].startswith("127.0.0.1:")
    world.hub.issue_from_rogue_ca = False
    await assert_still_serving(world)


# -- plain viewers -------------------------------------------------------------------------
async def test_mandatory_plain_viewer_gets_the_rfb_failure_with_the_reason(world: World) -> None:
    world.hub.mandatory = True
    for _ in range(200):   # the next heartbeat (every second) brings the switch
        assert world.agent.record is not None
        if world.agent.record.mandatory:
            break
        await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    assert await asyncio.wait_for(reader.readexactly(12), 10) == RFB_GREETING
    writer.write(b"RFB 003.008\n")
    answer = await read_all(reader)
    assert answer[0] == 0   # no security types: a failure follows
    (length,) = struct.unpack("!I", answer[1:5])
    reason = answer[5:5 + length].decode()
    assert "secure shadowing is required" in reason
    assert world.vnc.connections == 0
    # The secure channel still works.
    status, _ = await shadow_once(world)
    assert status == 0


async def test_plain_viewer_reaches_the_vnc_server_and_is_reported(world: World) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    # A viewer waits for the server: after the sniff timeout the proxy passes it on.
    assert await asyncio.wait_for(reader.readexactly(12), 10) == RFB_GREETING
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    writer.close()
    for _ in range(100):
        if world.hub.names("insecure"):
            break
        await asyncio.sleep(0.05)
    assert world.hub.names("insecure")
    assert "shadow.insecure" in [entry["event"] for entry in world.audit()]


# -- bad input -----------------------------------------------------------------------------
async def test_garbage_instead_of_tls_is_closed(world: World) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_all(reader) == b""
    assert world.vnc.connections == 0
    await assert_still_serving(world)


async def test_tls_then_garbage_is_refused_and_closed(world: World) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port,
                                                   ssl=console_tls(world)[0],
                                                   server_hostname=DEVICE)
    writer.write(b"this is no preface at all")
    answer = await read_all(reader)
    assert answer[:1] == b"\x03"   # REFUSE
    assert b"preface" in answer
    assert world.vnc.connections == 0
    (report,) = await reported(world, "malformed")
    assert "preface" in report["reason"]
    await assert_still_serving(world)


async def test_request_of_one_mebibyte_is_refused(world: World) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port,
                                                   ssl=console_tls(world)[0],
                                                   server_hostname=DEVICE)
    writer.write(PREFACE + b"\x01\xff\xff" + b"\x00" * (1 << 20))
    answer = await read_all(reader)
    assert answer[:1] == b"\x03"
    assert b"8192" in answer
    assert not world.hub.names("verify")
    await assert_still_serving(world)


async def test_silent_tls_client_is_closed_by_the_request_timer(world: World) -> None:
    reader, _ = await asyncio.open_connection("127.0.0.1", world.port, ssl=console_tls(world)[0],
                                              server_hostname=DEVICE)
    answer = await read_all(reader)   # request_timeout is 3 s in these tests
    assert answer[:1] == b"\x03" and b"no shadow request" in answer
    await assert_still_serving(world)


async def test_agent_printed_its_fingerprint_and_keeps_its_key_private(world: World) -> None:
    assert world.agent.identity is not None
    assert any(world.agent.identity.fingerprint in line for line in world.said)
    key_mode = (world.directory / "agent" / "device.key").stat().st_mode & 0o777
    assert key_mode == 0o600
    record = json.loads((world.directory / "agent" / "agent.json").read_text())
    assert record["fingerprint"] == world.agent.identity.fingerprint


IDLE_CONNECTIONS = 10_000
_IDLE_CLIENT = r"""
import selectors, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
selector = selectors.DefaultSelector()
opened = 0
for index in range(count):
    # From many loopback addresses: one address may hold only 64 connections.
    source = f"127.1.{index // 50 // 250}.{index // 50 % 250 + 1}"
    sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                    source_address=(source, 0))
    sock.setblocking(False)
    selector.register(sock, selectors.EVENT_READ)
    opened += 1
print("opened", opened, flush=True)
closed = 0
deadline = time.monotonic() + 120
while closed < opened and time.monotonic() < deadline:
    for key, _ in selector.select(timeout=1):
        try:
            data = key.fileobj.recv(65536)
        except ConnectionError:
            data = b""
        if not data:
            selector.unregister(key.fileobj)
            key.fileobj.close()
            closed += 1
print("closed", closed, flush=True)
"""


async def test_ten_thousand_idle_connections_are_closed_and_the_agent_serves_on(
        world: World) -> None:
    world.hub.mandatory = True   # idle = plain viewer: the RFB failure, then closed
    for _ in range(200):
        assert world.agent.record is not None
        if world.agent.record.mandatory:
            break
        await asyncio.sleep(0.05)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _IDLE_CLIENT, str(world.port), str(IDLE_CONNECTIONS),
        stdout=asyncio.subprocess.PIPE)
    assert client.stdout is not None
    opened = await asyncio.wait_for(client.stdout.readline(), 120)
    assert opened.split() == [b"opened", str(IDLE_CONNECTIONS).encode()]
    # While they are open (or being closed), the secure channel works.
    status, received = await shadow_once(world)
    assert status == 0 and received.endswith(b"hello device")
    closed = await asyncio.wait_for(client.stdout.readline(), 150)
    await client.wait()
    assert closed.split() == [b"closed", str(IDLE_CONNECTIONS).encode()]
    await shadow_once(world)
    for _ in range(200):   # every slot was given back
        if world.agent.open_connections == 0:
            break
        await asyncio.sleep(0.05)
    assert world.agent.open_connections == 0


async def test_consent_refused_by_the_devices_user_reaches_the_operator(world: World) -> None:
    world.hub.consent = "ask"
    world.agent.settings.consent_command = "false"
    with pytest.raises(ClientError, match="the device's user refused the shadowing"):
        await shadow_once(world)
    assert world.vnc.connections == 0
    (report,) = await reported(world, "consent")
    assert report["operator"] == "alice"
    world.agent.settings.consent_command = "true"
    status, _ = await shadow_once(world)
    assert status == 0


async def test_renewal_makes_a_new_certificate_that_consoles_then_pin(world: World) -> None:
    assert world.agent.identity is not None
    old = world.agent.identity.fingerprint
    await world.agent.renew_if_due(dt.datetime.now(dt.UTC) + dt.timedelta(days=364))
    new = world.agent.identity.fingerprint
    assert new != old
    assert world.hub.names("renew") == [{"fingerprint": new}]
    record = json.loads((world.directory / "agent" / "agent.json").read_text())
    assert record["fingerprint"] == new
    # The hub now hands consoles the new fingerprint, and the device presents it.
    status, _ = await shadow_once(world)
    assert status == 0
    state = await world.agent.hub.state()   # the hub knows the device by its new certificate
    assert state.heartbeat == 1


async def test_removed_device_stops_serving_and_says_so(world: World) -> None:
    world.hub.devices[DEVICE]["status"] = "removed"
    for _ in range(200):
        if world.agent.stopped_because is not None:
            break
        await asyncio.sleep(0.05)
    assert world.agent.stopped_because is not None
    assert "unknown device" in world.agent.stopped_because
    assert any("no longer serves shadowing" in line for line in world.said)


async def test_pending_device_waits_for_approval_before_serving(tmp_path: Path) -> None:
    hub = FakeHub(tmp_path / "hub")
    await hub.start()
    said: list[str] = []
    agent = DeviceAgent(AgentSettings(
        hub_url=hub.url, ca_file=hub.ca_file, directory=tmp_path / "agent", name=DEVICE,
        vnc=("127.0.0.1", 9), listen=("127.0.0.1", 0), register_interval=0.05),
        say=said.append)
    running = asyncio.ensure_future(agent.run())
    try:
        for _ in range(200):
            if len(hub.names("register")) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(hub.names("register")) >= 3   # it keeps asking
        assert agent.identity is not None
        assert f"waiting for approval: portcullis shadow device approve {DEVICE} " \
               f"{agent.identity.fingerprint}" in said
        assert not agent.serving.is_set()
        # Nothing listens for shadowing yet: a connection is never answered.
        reader, writer = await asyncio.open_connection(*agent.listen_address or ("", 0))
        writer.write(b"RFB 003.008\n")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)
        writer.close()
        hub.devices[DEVICE]["status"] = "approved"
        await asyncio.wait_for(agent.serving.wait(), 30)
    finally:
        agent.stop()
        await asyncio.wait_for(running, 30)
        await hub.stop()


# -- review fixes ---------------------------------------------------------------------------
async def test_heartbeat_tells_the_hub_where_the_device_is_reached(world: World) -> None:
    for _ in range(200):
        if world.hub.names("state"):
            break
        await asyncio.sleep(0.05)
    assert world.hub.names("state")[-1] == {"listen_port": str(world.port)}
    world.agent.settings.advertise = "kiosk-7.example:5901"
    for _ in range(200):   # the next heartbeat (every second) says it
        if world.hub.names("state")[-1] == {"advertise": "kiosk-7.example:5901"}:
            break
        await asyncio.sleep(0.05)
    assert world.hub.names("state")[-1] == {"advertise": "kiosk-7.example:5901"}
    assert world.hub.devices[DEVICE]["address"] == "kiosk-7.example:5901"


async def plain_viewer(world: World, source: str = "127.0.0.1"
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain viewer relayed to the VNC server (it spoke first: no sniff wait)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port,
                                                   local_addr=(source, 0))
    writer.write(b"RFB 003.008\n")
    assert await asyncio.wait_for(reader.readexactly(24), 10) == RFB_GREETING + b"RFB 003.008\n"
    return reader, writer


async def test_one_address_holds_at_most_64_connections(world: World) -> None:
    from portcullis.shadow.agent import MAX_CONNECTIONS_PER_ADDRESS
    viewers = [await plain_viewer(world) for _ in range(MAX_CONNECTIONS_PER_ADDRESS)]
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    writer.write(b"RFB 003.008\n")
    assert await read_all(reader) == b""   # closed at once, nothing relayed
    writer.close()
    assert world.vnc.connections == MAX_CONNECTIONS_PER_ADDRESS
    # Another address is served meanwhile.
    _, other = await plain_viewer(world, "127.0.0.2")
    other.close()
    for _, each in viewers:
        each.close()
    for _ in range(200):
        if world.agent.open_connections == 0:
            break
        await asyncio.sleep(0.05)
    await assert_still_serving(world)


def test_the_connection_cap_stays_below_the_open_files_limit() -> None:
    from portcullis.shadow.agent import connection_limit
    from portcullis.web.edge import SPARE_FILES
    assert connection_limit(20_000, 1024) == 1024 - SPARE_FILES
    assert connection_limit(20_000, 1_048_576) == 20_000
    assert connection_limit(20_000, resource.RLIM_INFINITY) == 20_000


async def test_the_agent_raised_its_open_files_limit_and_keeps_its_cap_below(
        world: World) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert world.agent.connection_limit < soft


class _OutOfFiles:
    """A listening socket whose accept fails as a process out of descriptors does."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.accepts = 0

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        self.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self.real.close()


async def test_out_of_files_pauses_accepting_instead_of_spinning(world: World) -> None:
    real = world.agent._listener
    assert real is not None
    out_of_files = _OutOfFiles(real)
    world.agent._listener = out_of_files  # type: ignore[assignment]
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)   # in the backlog
    writer.write(b"RFB 003.008\n")
    for _ in range(200):   # the listening socket stays readable all along
        await asyncio.sleep(0)
    assert out_of_files.accepts == 1
    world.agent._listener = real
    # A second later accepting resumes, and the waiting viewer is served.
    assert await asyncio.wait_for(reader.readexactly(24), 10) == RFB_GREETING + b"RFB 003.008\n"
    writer.close()


async def test_a_silent_plain_relay_is_ended_after_the_idle_timeout(world: World) -> None:
    world.agent.settings.plain_idle_timeout = 0.5
    reader, writer = await plain_viewer(world)
    assert await asyncio.wait_for(read_all(reader), 10) == b""
    writer.close()
    for _ in range(100):
        if "shadow.insecure.end" in [entry["event"] for entry in world.audit()]:
            break
        await asyncio.sleep(0.05)
    (end,) = [entry for entry in world.audit() if entry["event"] == "shadow.insecure.end"]
    assert end["reason"] == "no data for 0.5 s"


async def test_mandatory_turning_on_closes_the_running_plain_sessions(world: World) -> None:
    reader, writer = await plain_viewer(world)
    world.hub.mandatory = True
    assert await asyncio.wait_for(read_all(reader), 20) == b""
    writer.close()
    for _ in range(100):
        if "shadow.insecure.end" in [entry["event"] for entry in world.audit()]:
            break
        await asyncio.sleep(0.05)
    (end,) = [entry for entry in world.audit() if entry["event"] == "shadow.insecure.end"]
    assert end["reason"] == "secure shadowing is now mandatory"


async def test_a_flood_of_bad_tls_is_reported_ten_at_a_time_then_summed_up(
        world: World) -> None:
    world.agent.refusal_budget = RefusalBudget(window=2.0)
    world.hub.issue_from_rogue_ca = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    key, csr = console_csr()
    directory = world.directory / "rogue"
    directory.mkdir()
    (directory / "c.crt").write_bytes(world.hub.console_certificate(csr))
    (directory / "c.key").write_bytes(private_key_pem(key))
    context.load_cert_chain(directory / "c.crt", directory / "c.key")
    for _ in range(25):
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port, ssl=context,
                                                       server_hostname=DEVICE)
        await read_all(reader)
        writer.close()
    (summary,) = [body for body in await reported(world, "console-ca", 11)
                  if body.get("count")]
    assert summary["count"] == 15 and "15 more refusals" in summary["reason"]
    assert len(world.hub.names("refused")) == 11
    world.hub.issue_from_rogue_ca = False


async def test_an_unreachable_vnc_server_is_refused_reported_and_ended(world: World) -> None:
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    world.agent.settings.vnc = unused.getsockname()   # bound, not listening: refused
    try:
        with pytest.raises(ClientError, match=r"does not answer"):
            await shadow_once(world)
    finally:
        unused.close()
    (report,) = await reported(world, "vnc-unreachable")
    (verified,) = world.hub.names("verified")
    for _ in range(100):
        if world.hub.names("end"):
            break
        await asyncio.sleep(0.05)
    (end,) = world.hub.names("end")
    assert end["session"] == verified["session"] and report["operator"] == "alice"


async def test_data_after_the_request_ends_the_session_the_hub_listed(world: World) -> None:
    context, fingerprint = console_tls(world)
    signed = signed_for(world, fingerprint)
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port, ssl=context,
                                                   server_hostname=DEVICE)
    writer.write(PREFACE + struct.pack("!BH", 1, len(signed)) + signed + b"RFB 003.008\n")
    answer = await read_all(reader)
    writer.close()
    assert answer[:1] == b"\x03"
    for _ in range(200):
        if world.hub.names("end"):
            break
        await asyncio.sleep(0.05)
    (verified,) = world.hub.names("verified")
    (end,) = world.hub.names("end")
    assert end["session"] == verified["session"]
    assert world.vnc.connections == 0


async def test_a_hub_that_cannot_be_reached_ends_the_channel(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "WATCH_RETRY_INTERVAL", 0.05)
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    proxy = ConsoleProxy(world.operator(), DEVICE, say=lambda line: None)
    run = asyncio.ensure_future(proxy.run(
        on_listening=lambda host, port: listening.set_result(port)))
    reader, writer = await asyncio.open_connection("127.0.0.1", await listening)
    assert await reader.readexactly(len(RFB_GREETING)) == RFB_GREETING
    world.hub.watch_fails = True
    assert await asyncio.wait_for(read_all(reader), 20) == b""
    writer.close()
    await asyncio.wait_for(run, 30)
    for _ in range(100):
        if world.hub.names("end"):
            break
        await asyncio.sleep(0.05)
    (end,) = world.hub.names("end")
    assert end["reason"] == "the hub cannot be reached"
    (audited,) = [entry for entry in world.audit() if entry["event"] == "shadow.channel.end"]
    assert audited["reason"] == "the hub cannot be reached"


async def test_a_renewal_the_hub_took_survives_a_failed_swap_and_a_restart(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    assert world.agent.identity is not None
    old = world.agent.identity.fingerprint

    def disk_full(directory: Path, issued: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(agent_module, "replace_device_files", disk_full)
    await world.agent.renew_if_due(dt.datetime.now(dt.UTC) + dt.timedelta(days=364))
    new = world.agent.identity.fingerprint
    assert new != old and world.hub.names("renew") == [{"fingerprint": new}]
    state = await world.agent.hub.state()   # the running agent presents the new pair
    assert state.heartbeat == 1
    monkeypatch.undo()
    # A restart adopts the staged pair the hub knows (the old one would be refused).
    said: list[str] = []
    again = DeviceAgent(AgentSettings(
        hub_url=world.hub.url, ca_file=world.hub.ca_file, directory=world.directory / "agent",
        name=DEVICE, vnc=world.agent.settings.vnc, listen=("127.0.0.1", 0)), say=said.append)
    try:
        again._bind()
        await asyncio.wait_for(again.enrol(), 30)
        assert again.identity is not None and again.identity.fingerprint == new
        assert not (world.directory / "agent" / "device.new.crt").exists()
    finally:
        assert again._listener is not None
        again._listener.close()
        await again.hub.aclose()
        again.audit.close()


async def test_a_staged_renewal_the_hub_does_not_know_is_discarded(world: World) -> None:
    assert world.agent.identity is not None
    old = world.agent.identity.fingerprint
    stage_device_files(world.directory / "agent", renewed_certificate(DEVICE))
    assert not await world.agent.adopt_staged_identity()
    assert world.agent.identity.fingerprint == old
    state = await world.agent.hub.state()
    assert state.heartbeat == 1


async def test_viewer_of_another_user_is_closed_and_the_listener_waits_on() -> None:
    warned: list[str] = []
    listener = _ViewerListener(warn=warned.append, uid=os.getuid() + 1)
    server = await asyncio.get_running_loop().create_server(listener.protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await read_all(reader) == b""
    writer.close()
    assert not listener.connected.done()
    assert warned and f"not by you (uid {os.getuid() + 1})" in warned[0]
    server.close()


async def test_viewer_of_this_user_is_taken() -> None:
    listener = _ViewerListener(warn=pytest.fail)
    server = await asyncio.get_running_loop().create_server(listener.protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    transport, _ = await asyncio.wait_for(listener.connected, 10)
    transport.close()
    writer.close()
    server.close()
