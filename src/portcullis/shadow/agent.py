"""The device agent: enrolment at the hub, heartbeat and renewal, and the device proxy.

The device proxy listens on the VNC port (5900 by default) in front of the device's own
VNC server (loopback only). Per connection it looks at the first bytes without reading
them: a TLS ClientHello is the secure channel from a console proxy (mutual TLS: the
console's certificate must come from the hub's console CA); a plain viewer gets an RFB
security failure when secure shadowing is mandatory, else it is passed to the local
server and reported as insecure; anything else is closed. A request is forwarded to the
hub, which alone says yes; only then does the agent connect to the local VNC server.

Every failure ends that connection only; the agent keeps serving. It never serves before
the hub approved it, never logs a private key, and keeps its key 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import shlex
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from portcullis.audit import AuditTrail
from portcullis.errors import ClientError, PKIError, PortcullisError
from portcullis.net.tls import client_context, server_context
from portcullis.pki import certificate_fingerprint
from portcullis.proto import rfb
from portcullis.proto.shadow import (
    ChannelFailed,
    RequestReceived,
    ShadowChannel,
    ShadowProtocolError,
    parse_signed_request,
)
from portcullis.shadow.bridge import Bridge, BridgeResult
from portcullis.shadow.certificates import (
    DEVICE_DAYS,
    RENEW_BEFORE_DAYS,
    DeviceIdentity,
    create_device_files,
    load_device_files,
    renewal_due,
    renewed_certificate,
    replace_device_files,
)
from portcullis.shadow.hubclient import HubClient, HubRefused, Registration, Verdict
from portcullis.shadow.hublink import DIAL_OUT, HubLink

AGENT_FILE = "agent.json"
AUDIT_FILE = "audit.log"
# Sockets and transports this process holds open at once; beyond it a new connection
# is closed at once (10,000 idle ones must be fine: each costs a socket and a timer).
MAX_CONNECTIONS = 20_000
SNIFF_TIMEOUT = 1.0         # a viewer never speaks first: silence means a plain viewer
HANDSHAKE_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0      # PREFACE + REQUEST after the handshake (the codec's timer)
VNC_CONNECT_TIMEOUT = 5.0
REGISTER_INTERVAL = 3.0
REGISTER_INTERVAL_MAX = 30.0
_PEEK = 4                   # enough for rfb.classify_first_bytes


@dataclass
class AgentSettings:
    hub_url: str
    ca_file: Path
    directory: Path
    name: str
    vnc: tuple[str, int]
    listen: tuple[str, int] = ("0.0.0.0", 5900)
    code: str | None = None
    advertise: str | None = None
    consent_command: str | None = None
    # Behind NAT: keep connections to the hub and take consoles' channels over them; the
    # proxy then listens on loopback only (the CLI refuses anything else).
    dial_out: bool = False
    max_connections: int = MAX_CONNECTIONS
    sniff_timeout: float = SNIFF_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    register_interval: float = REGISTER_INTERVAL
    days: int = DEVICE_DAYS
    renew_before_days: int = RENEW_BEFORE_DAYS


@dataclass
class AgentRecord:
    """agent.json: what the hub told this device at registration (and since)."""

    hub: str
    name: str
    fingerprint: str
    hub_key: str       # PEM
    console_ca: str    # PEM
    mandatory: bool
    status: str = "approved"

    def save(self, directory: Path) -> None:
        path = directory / AGENT_FILE
        temporary = path.with_name(f".{AGENT_FILE}.{secrets.token_hex(4)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle, indent=2)
        os.replace(temporary, path)

    @classmethod
    def load(cls, directory: Path) -> AgentRecord | None:
        try:
            return cls(**json.loads((directory / AGENT_FILE).read_text("utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ClientError(f"cannot read {directory / AGENT_FILE} ({exc}); remove it and "
                              "start the agent again to register anew") from None


@dataclass
class _Counters:
    """What the proxy did, for tests and the final line."""

    accepted: int = 0
    refused_full: int = 0
    channels: int = 0
    plain_refused: int = 0
    plain_passed: int = 0
    closed_garbage: int = 0
    failed: dict[str, int] = field(default_factory=dict)


class DeviceAgent:
    """One device: `run()` enrols (waiting for approval), then serves until `stop()`."""

    def __init__(self, settings: AgentSettings, *, say: Callable[[str], None] = print) -> None:
        self.settings = settings
        self._say = say
        self.directory = Path(settings.directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.audit = AuditTrail(self.directory / AUDIT_FILE)
        self.hub = HubClient(settings.hub_url, settings.ca_file)
        self.identity: DeviceIdentity | None = None
        self.record: AgentRecord | None = None
        self.counters = _Counters()
        self.listen_address: tuple[str, int] | None = None
        self.stopped_because: str | None = None
        self._listener: socket.socket | None = None
        self._tls: ssl.SSLContext | None = None
        self._hub_key: Ed25519PublicKey | None = None
        self._open = 0
        self._sniffing: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._transports: set[asyncio.BaseTransport] = set()
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self.serving = asyncio.Event()
        self.hub_link: HubLink | None = None

    @property
    def open_connections(self) -> int:
        """Connections the proxy holds now (sniffing, handshaking, refused, relayed)."""
        return self._open

    # -- life cycle -----------------------------------------------------------------------
    async def run(self) -> None:
        """Enrol, then serve until `stop()` (or the hub removes this device)."""
        try:
            self._bind()
            await self.enrol()
            if self._stop.is_set():
                return
            self._start_serving()
            if self.settings.dial_out:
                assert self.listen_address is not None
                self.hub_link = HubLink(self.settings.hub_url, self._hub_link_tls,
                                        self.listen_address, self.settings.name,
                                        say=self._say)
                link = self._spawn(self.hub_link.run())
            heartbeat = self._spawn(self._heartbeat())
            await self._stop.wait()
            heartbeat.cancel()
            if self.hub_link is not None:
                link.cancel()   # GOAWAY to the hub now, not after the shutdown's wait
        finally:
            await self._shutdown()

    def stop(self, reason: str = "the device agent stopped") -> None:
        if self.stopped_because is None:
            self.stopped_because = reason
        self._stop.set()

    async def enrol(self) -> None:
        """Create the key and certificate on first start, register, and wait until the hub
        approved this device (polling with a bounded backoff)."""
        settings = self.settings
        if (self.directory / "device.crt").exists():
            self.identity = load_device_files(self.directory)
        else:
            self.identity = create_device_files(self.directory, settings.name,
                                                days=settings.days)
            self._say(f"created the device certificate {self.identity.cert_path}")
        self._say(f"device {settings.name}: certificate fingerprint {self.identity.fingerprint}")
        assert self.listen_address is not None
        interval = settings.register_interval
        told_pending = False
        while not self._stop.is_set():
            try:
                registration = await self.hub.register(
                    settings.name, self.identity.pair.cert_pem, code=settings.code,
                    advertise=DIAL_OUT if settings.dial_out else settings.advertise,
                    listen_port=self.listen_address[1])
            except HubRefused:
                raise
            except ClientError as exc:
                self._say(f"{exc}; trying again in {interval:g} s")
            else:
                if registration.status == "approved":
                    self._registered(registration)
                    return
                if not told_pending:
                    self._say(f"waiting for approval: portcullis shadow device approve "
                              f"{settings.name} {self.identity.fingerprint}")
                    told_pending = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)
            interval = min(interval * 2, REGISTER_INTERVAL_MAX)

    def _registered(self, registration: Registration) -> None:
        assert self.identity is not None
        if registration.fingerprint != self.identity.fingerprint:
            raise ClientError(f"the hub registered fingerprint {registration.fingerprint}, but "
                              f"this device's certificate is {self.identity.fingerprint}; "
                              "ask the administrator to remove and re-add the device")
        try:
            hub_key = serialization.load_pem_public_key(registration.hub_key)
        except ValueError:
            raise ClientError("the hub's request-signing key is not a PEM public key") from None
        if not isinstance(hub_key, Ed25519PublicKey):
            raise ClientError("the hub's request-signing key is not an Ed25519 key")
        self._hub_key = hub_key
        self.record = AgentRecord(self.hub.url, self.settings.name, registration.fingerprint,
                                  registration.hub_key.decode(), registration.console_ca.decode(),
                                  registration.mandatory)
        self.record.save(self.directory)
        self.hub.use_identity(self.identity)
        self._tls = self._server_tls()
        self._say(f"approved by the hub; secure shadowing is "
                  f"{'mandatory' if registration.mandatory else 'optional'}")

    def _hub_link_tls(self) -> ssl.SSLContext:
        """The TLS client of a dial-out connection: the current device certificate."""
        assert self.identity is not None
        return client_context(self.settings.ca_file, cert_file=self.identity.cert_path,
                              key_file=self.identity.key_path)

    def _server_tls(self) -> ssl.SSLContext:
        assert self.identity is not None and self.record is not None
        context = server_context(self.identity.cert_path, self.identity.key_path)
        try:
            context.load_verify_locations(cadata=self.record.console_ca)
        except ssl.SSLError as exc:
            raise PKIError(f"the hub's console CA is not a usable PEM certificate: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _bind(self) -> None:
        host, port = self.settings.listen
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1024)
        except OSError as exc:
            raise ClientError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        listener.setblocking(False)
        self._listener = listener
        bound = listener.getsockname()
        self.listen_address = (str(bound[0]), int(bound[1]))

    def _start_serving(self) -> None:
        assert self._listener is not None
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)
        host, port = self.listen_address or ("", 0)
        self._say(f"device proxy listening on {host}:{port}, VNC server at "
                  f"{self.settings.vnc[0]}:{self.settings.vnc[1]}")
        self.serving.set()

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listener is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self._listener.fileno())
            self._listener.close()
        for fd, (sock, timer) in list(self._sniffing.items()):
            timer.cancel()
            loop.remove_reader(fd)
            sock.close()
        self._sniffing.clear()
        reason = self.stopped_because or "the device agent stopped"
        for session in list(self._sessions):
            session.end(reason)
        for transport in list(self._transports):
            transport.close()
        # Let the sessions tell the hub `end` (bounded: a hub that is gone must not hang us).
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await self.hub.aclose()
        self.audit.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- heartbeat and renewal ------------------------------------------------------------
    async def _heartbeat(self) -> None:
        interval = 30.0
        while True:
            try:
                state = await self.hub.state()
            except HubRefused as exc:
                self._say(f"{exc}: this device no longer serves shadowing")
                self.audit.record("shadow.device.refused", reason=str(exc))
                self.stop(f"the hub refused this device ({exc})")
                return
            except ClientError as exc:
                self._say(f"heartbeat: {exc}")
            else:
                interval = max(1.0, state.heartbeat)
                assert self.record is not None
                if state.mandatory != self.record.mandatory:
                    self.record.mandatory = state.mandatory
                    self.record.save(self.directory)
                    self._say("secure shadowing is now "
                              f"{'mandatory' if state.mandatory else 'optional'}")
                await self.renew_if_due()
            await asyncio.sleep(interval)

    async def renew_if_due(self, now: dt.datetime | None = None) -> None:
        """Renew the device certificate if it is due at `now`: a new key and certificate,
        sent to the hub over a connection that presents the old one."""
        assert self.identity is not None and self.record is not None
        if not renewal_due(self.identity.certificate, now or dt.datetime.now(dt.UTC),
                           self.settings.renew_before_days):
            return
        renewed = renewed_certificate(self.settings.name, days=self.settings.days)
        try:
            # Sent over the connection that presents the OLD certificate: it vouches.
            fingerprint = await self.hub.renew(renewed.cert_pem)
        except ClientError as exc:
            self._say(f"renewal: {exc}; trying again at the next heartbeat")
            return
        if fingerprint != certificate_fingerprint(renewed.cert_pem):
            self._say("renewal: the hub registered another fingerprint; keeping the old "
                      "certificate")
            return
        self.identity = replace_device_files(self.directory, renewed)
        self.record.fingerprint = fingerprint
        self.record.save(self.directory)
        self.hub.use_identity(self.identity)
        self._tls = self._server_tls()   # new handshakes present the new certificate
        if self.hub_link is not None:
            self.hub_link.renewed()
        self.audit.record("shadow.device.renewed", fingerprint=fingerprint)
        self._say(f"renewed the device certificate: fingerprint {fingerprint}")

    # -- accepting and sniffing -----------------------------------------------------------
    def _accept_ready(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        for _ in range(64):   # a burst at a time, then back to the loop
            try:
                sock, _peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return   # EMFILE and the like: the connection waits in the backlog
            if self._open >= self.settings.max_connections:
                self.counters.refused_full += 1
                sock.close()
                continue
            self._open += 1
            self.counters.accepted += 1
            sock.setblocking(False)
            fd = sock.fileno()
            timer = loop.call_later(self.settings.sniff_timeout, self._sniffed, fd, True)
            self._sniffing[fd] = (sock, timer)
            loop.add_reader(fd, self._sniffed, fd, False)

    # Why MSG_PEEK: the first bytes decide between TLS and plain RFB, and both paths want
    # them still unread (the TLS handshake must read the ClientHello itself; start_tls
    # cannot be given bytes already read). Peeking on the raw socket under add_reader,
    # then handing the untouched socket to connect_accepted_socket (with or without
    # ssl=), is the one way that needs no byte re-injection.
    def _sniffed(self, fd: int, timed_out: bool) -> None:
        entry = self._sniffing.pop(fd, None)
        if entry is None:
            return
        sock, timer = entry
        timer.cancel()
        asyncio.get_running_loop().remove_reader(fd)
        kind = "rfb-client"
        if not timed_out:
            try:
                head = sock.recv(_PEEK, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                loop = asyncio.get_running_loop()   # spurious wake-up: keep waiting
                self._sniffing[fd] = (sock, loop.call_later(self.settings.sniff_timeout,
                                                            self._sniffed, fd, True))
                loop.add_reader(fd, self._sniffed, fd, False)
                return
            except OSError:
                head = b""
            if not head:
                self._release_socket(sock)
                return
            kind = rfb.classify_first_bytes(head)
        peer = _address(sock)
        if kind == "garbage":
            self.counters.closed_garbage += 1
            self.audit.record("shadow.connection.garbage", client=peer)
            self._release_socket(sock)
        elif kind == "tls":
            self._spawn(self._open_tls(sock, peer))
        else:
            self._spawn(self._open_plain(sock, peer))

    def _release_socket(self, sock: socket.socket) -> None:
        sock.close()
        self._open -= 1

    def _released(self, transport: asyncio.BaseTransport) -> None:
        if transport in self._transports:
            self._transports.discard(transport)
            self._open -= 1

    # -- plain viewers ----------------------------------------------------------------------
    async def _open_plain(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        assert self.record is not None
        mandatory = self.record.mandatory
        holder = _Holding(self) if not mandatory else None
        refusal = _PlainRefusal(self, rfb.SECURE_SHADOWING_REQUIRED) if mandatory else None
        protocol: asyncio.Protocol = refusal or cast(asyncio.Protocol, holder)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except OSError:
            self._release_socket(sock)
            return
        self._transports.add(transport)
        if refusal is not None:
            self.counters.plain_refused += 1
            self.audit.record("shadow.plain.refused", client=peer,
                              reason="secure shadowing is mandatory")
            return
        assert holder is not None
        try:
            vnc = await self._connect_vnc()
        except ClientError as exc:
            self.audit.record("shadow.plain.failed", client=peer, reason=str(exc))
            transport.close()
            return
        self.counters.plain_passed += 1
        self.audit.record("shadow.insecure", client=peer)
        self._spawn(self._tell_hub_insecure(peer))
        vnc_transport, vnc_holder = vnc
        Bridge(transport, vnc_transport, first_pending=holder.take(),
               second_pending=vnc_holder.take(),
               on_closed=lambda result: self._plain_ended(peer, transport, result))

    async def _tell_hub_insecure(self, peer: str) -> None:
        try:
            await self.hub.insecure(peer)
        except ClientError as exc:
            self._say(f"insecure session from {peer}: {exc}")

    def _plain_ended(self, peer: str, transport: asyncio.BaseTransport,
                     result: BridgeResult) -> None:
        self._released(transport)
        self.audit.record("shadow.insecure.end", client=peer,
                          bytes_to_device=result.first_to_second,
                          bytes_to_viewer=result.second_to_first)

    async def _connect_vnc(self) -> tuple[asyncio.Transport, _Holding]:
        host, port = self.settings.vnc
        loop = asyncio.get_running_loop()
        holder = _Holding(None)
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: holder, host, port), VNC_CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise ClientError(f"the device's VNC server at {host}:{port} does not answer "
                              f"({getattr(exc, 'strerror', None) or type(exc).__name__}); "
                              "is it running?") from None
        return transport, holder

    # -- the secure channel -----------------------------------------------------------------
    async def _open_tls(self, sock: socket.socket, peer: str) -> None:
        loop = asyncio.get_running_loop()
        channel = _DeviceChannel(self, peer)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: channel, sock, ssl=self._tls,
                ssl_handshake_timeout=self.settings.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # A console certificate of another CA, no certificate, a stalled handshake.
            self.counters.failed["tls"] = self.counters.failed.get("tls", 0) + 1
            self.audit.record("shadow.tls.failed", client=peer,
                              reason=str(exc) or type(exc).__name__)
            with contextlib.suppress(OSError):
                sock.close()
            self._open -= 1
            return
        self._transports.add(transport)

    def check_request(self, signed: bytes, console_fingerprint: str) -> str | None:
        """Why this device refuses `signed` before asking the hub (defence in depth), or
        None. The hub checks it all again, and single use."""
        assert self.identity is not None and self._hub_key is not None
        try:
            parsed = parse_signed_request(signed)
        except ShadowProtocolError as exc:
            return f"the shadow request is malformed: {exc}"
        request = parsed.request
        if not parsed.signature_valid(self._hub_key):
            return "the shadow request is not signed by this device's hub"
        if request.device != self.settings.name or \
                request.device_fingerprint != self.identity.fingerprint:
            return (f"the shadow request is for device {request.device} "
                    f"({request.device_fingerprint}), not for this one")
        if request.console_fingerprint != console_fingerprint:
            return ("the shadow request names another console certificate than the one "
                    "this console presented")
        return None

    async def consent(self, verdict: Verdict) -> str | None:
        """Why the device's user said no, or None when they agreed (or need not)."""
        if verdict.consent == "none":
            return None
        command = self.settings.consent_command
        if command is None:
            if verdict.consent == "notify":
                return None
            return ("this device asks its user for consent, but the agent has no "
                    "--consent-command to ask with")
        env = {**os.environ, "PORTCULLIS_OPERATOR": verdict.operator,
               "PORTCULLIS_DEVICE": self.settings.name, "PORTCULLIS_CONSENT": verdict.consent}
        try:
            process = await asyncio.create_subprocess_exec(
                *shlex.split(command), env=env, stdin=asyncio.subprocess.DEVNULL)
        except (OSError, ValueError) as exc:
            return f"the device's consent command cannot run ({exc})"
        if verdict.consent == "notify":
            self._spawn(process.wait())
            return None
        try:
            status = await asyncio.wait_for(process.wait(), verdict.consent_timeout)
        except TimeoutError:
            process.kill()
            self._spawn(process.wait())
            return f"the device's user did not answer within {verdict.consent_timeout:g} s"
        return None if status == 0 else "the device's user refused the shadowing"


class _Holding(asyncio.Protocol):
    """A connection waiting to be bridged: reading paused, any bytes kept in order."""

    def __init__(self, agent: DeviceAgent | None) -> None:
        self._agent = agent
        self._chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._agent is not None and self.transport is not None:
            self._agent._released(self.transport)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


class _PlainRefusal(asyncio.Protocol):
    """A plain viewer while secure shadowing is mandatory: the RFB security failure."""

    def __init__(self, agent: DeviceAgent, reason: str) -> None:
        self._agent = agent
        self._codec = rfb.RfbRefusal(reason)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._codec.data_to_send())
        self._timer = asyncio.get_running_loop().call_later(
            self._agent.settings.request_timeout, self._transport.close)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._codec.receive_data(data)
        self._transport.write(self._codec.data_to_send())
        if self._codec.finished:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._agent._released(self._transport)


class _DeviceChannel(asyncio.Protocol):
    """One TLS connection from a console proxy, until it is bridged or refused."""

    def __init__(self, agent: DeviceAgent, peer: str) -> None:
        self._agent = agent
        self._peer = peer
        self._transport: asyncio.Transport | None = None
        self._codec: ShadowChannel | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._console_fingerprint = ""
        self._bridged = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._codec = ShadowChannel("device", now=loop.time(),
                                    request_timeout=self._agent.settings.request_timeout)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        if der:
            self._console_fingerprint = certificate_fingerprint(
                ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self._codec is not None
        deadline = self._codec.get_timer()
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        assert self._codec is not None
        self._codec.handle_timer(asyncio.get_running_loop().time())
        self._after_codec()

    def data_received(self, data: bytes) -> None:
        if self._codec is None or self._bridged:
            return
        self._codec.receive_data(data)
        self._after_codec()

    def _after_codec(self) -> None:
        assert self._codec is not None and self._transport is not None
        output = self._codec.data_to_send()
        if output:
            self._transport.write(output)
        while (event := self._codec.next_event()) is not None:
            if isinstance(event, RequestReceived):
                # Nothing more may come before our answer: what does waits in the socket.
                self._transport.pause_reading()
                self._agent._spawn(self._decide(event.signed))
            elif isinstance(event, ChannelFailed):
                self._failed("protocol", event.reason)
        self._arm_timer()

    def _failed(self, kind: str, reason: str) -> None:
        assert self._transport is not None
        agent = self._agent
        agent.counters.failed[kind] = agent.counters.failed.get(kind, 0) + 1
        agent.audit.record("shadow.channel.failed", client=self._peer, reason=reason)
        self._transport.close()

    def refuse(self, reason: str) -> None:
        assert self._codec is not None and self._transport is not None
        self._codec.refuse(reason)
        self._transport.write(self._codec.data_to_send())
        self._agent.audit.record("shadow.request.refused", client=self._peer, reason=reason)
        self._agent.counters.failed["refused"] = self._agent.counters.failed.get("refused", 0) + 1
        self._transport.close()

    async def _decide(self, signed: bytes) -> None:
        agent = self._agent
        assert self._transport is not None and self._codec is not None
        problem = agent.check_request(signed, self._console_fingerprint)
        if problem is not None:
            self.refuse(problem)
            return
        try:
            verdict = await agent.hub.verify(signed, self._console_fingerprint)
        except ClientError as exc:
            self.refuse(f"the device cannot check the request with its hub: {exc}")
            return
        if self._transport.is_closing():
            return
        if not verdict.allowed:
            self.refuse(verdict.reason)
            return
        refusal = await agent.consent(verdict)
        if refusal is None:
            try:
                vnc_transport, vnc_holder = await agent._connect_vnc()
            except ClientError as exc:
                refusal = str(exc)
        if refusal is not None:
            if not self._transport.is_closing():
                self.refuse(refusal)
            await _ended_at_hub(agent, verdict.session, 0, 0, refusal)
            return
        if self._transport.is_closing():
            vnc_transport.close()
            await _ended_at_hub(agent, verdict.session, 0, 0,
                                "the console left before the channel was up")
            return
        self._codec.accept(verdict.session)
        self._transport.write(self._codec.data_to_send())
        self._bridged = True
        if self._timer is not None:
            self._timer.cancel()
        agent.counters.channels += 1
        session = _Session(agent, verdict, self._peer, self._transport, vnc_transport,
                           vnc_holder)
        agent._sessions.add(session)
        session.start()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None and not self._bridged:
            self._agent._released(self._transport)


# An ending the hub orders (administrator, sign-out, removal) is over within this long,
# whether or not the console reads what is still queued for it.
ENDING_LINGER = 0.5


class _Session:
    """A channel that is up: the bridge, the hub's watch, and the end report."""

    def __init__(self, agent: DeviceAgent, verdict: Verdict, peer: str,
                 console: asyncio.Transport, vnc: asyncio.Transport, vnc_holder: _Holding
                 ) -> None:
        self._agent = agent
        self.verdict = verdict
        self._peer = peer
        self._console = console
        self._bridge = Bridge(console, vnc, second_pending=vnc_holder.take(),
                              on_closed=self._closed)
        self._end_reason: str | None = None
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        agent = self._agent
        agent.audit.record("shadow.channel.up", session=self.verdict.session,
                           operator=self.verdict.operator, client=self._peer)
        self._watch = agent._spawn(self._up_and_watch())

    def end(self, reason: str) -> None:
        if self._end_reason is None:
            self._end_reason = reason
        self._bridge.close(reason, linger=ENDING_LINGER)

    async def _up_and_watch(self) -> None:
        hub, session = self._agent.hub, self.verdict.session
        try:
            await hub.session_up(session)
        except ClientError as exc:
            self._agent._say(f"session {session}: {exc}")
        while not self._bridge.closed.done():
            try:
                answer = await hub.watch(session)
            except HubRefused as exc:
                self.end(str(exc))
                return
            except ClientError:
                await asyncio.sleep(2.0)   # the hub is away: the session goes on
                continue
            if answer.end:
                self.end(answer.reason or "ended at the hub")
                return

    def _closed(self, result: BridgeResult) -> None:
        agent = self._agent
        agent._sessions.discard(self)
        agent._released(self._console)
        if self._watch is not None:
            self._watch.cancel()
        reason = self._end_reason or ("the console ended the channel" if result.ended_by ==
                                      "first" else "the VNC server ended the session")
        agent.audit.record("shadow.channel.end", session=self.verdict.session,
                           operator=self.verdict.operator, client=self._peer,
                           bytes_to_device=result.first_to_second,
                           bytes_to_console=result.second_to_first, reason=reason)
        agent._spawn(_ended_at_hub(agent, self.verdict.session, result.first_to_second,
                                   result.second_to_first, reason))


async def _ended_at_hub(agent: DeviceAgent, session: str, to_device: int, to_console: int,
                        reason: str) -> None:
    try:
        await agent.hub.session_end(session, bytes_to_device=to_device,
                                    bytes_to_console=to_console, reason=reason)
    except PortcullisError as exc:
        agent._say(f"session {session}: {exc}")


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
