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
import errno
import json
import os
import resource
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
    SignedRequest,
    parse_signed_request,
)
from portcullis.shadow.bridge import Bridge, BridgeResult
from portcullis.shadow.certificates import (
    DEVICE_DAYS,
    RENEW_BEFORE_DAYS,
    DeviceIdentity,
    create_device_files,
    discard_staged_device_files,
    load_device_files,
    load_staged_device_files,
    renewal_due,
    renewed_certificate,
    replace_device_files,
    stage_device_files,
)
from portcullis.shadow.hubclient import HubClient, HubRefused, Registration, Verdict
from portcullis.shadow.hublink import DIAL_OUT, HubLink
from portcullis.shadow.refusals import RefusalBudget
from portcullis.web.edge import SPARE_FILES, Admissions, raise_open_files_limit

AGENT_FILE = "agent.json"
AUDIT_FILE = "audit.log"
# Sockets and transports this process holds open at once; beyond it a new connection
# is closed at once (10,000 idle ones must be fine: each costs a socket and a timer).
MAX_CONNECTIONS = 20_000
# Of which from one address: a viewer and a console need one or two each; 64 leaves room
# for a NAT in front of several, while one client cannot take every slot.
MAX_CONNECTIONS_PER_ADDRESS = 64
# Out of file descriptors (EMFILE/ENFILE): accepting pauses this long, rather than
# spinning on a listening socket that stays readable.
ACCEPT_RETRY_DELAY = 1.0
# A plain (insecure) relay with no byte either way for this long is ended.
PLAIN_IDLE_TIMEOUT = 300.0
# The session watch: a failed long poll is retried after this long; this many failures
# in a row end the channel (fail closed: the hub could not end it otherwise).
WATCH_RETRY_INTERVAL = 2.0
WATCH_FAILURES_MAX = 3
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
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    plain_idle_timeout: float = PLAIN_IDLE_TIMEOUT
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
    refused_address: int = 0
    accept_paused: int = 0
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
        # Every connection holds a place from accept to close: in all and per address.
        self._admissions = Admissions(settings.max_connections,
                                      settings.max_connections_per_address)
        self._sniffing: dict[int, tuple[socket.socket, asyncio.TimerHandle, str]] = {}
        self._transports: dict[asyncio.BaseTransport, str] = {}   # -> the peer's address
        self._sessions: set[_Session] = set()
        self._plain: set[Bridge] = set()    # insecure relays, closed if mandatory turns on
        self._accept_paused = False
        self.refusal_budget = RefusalBudget()   # replaceable (tests: a shorter window)
        self._refusal_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self.serving = asyncio.Event()
        self.hub_link: HubLink | None = None

    @property
    def open_connections(self) -> int:
        """Connections the proxy holds now (sniffing, handshaking, refused, relayed)."""
        return self._admissions.total

    @property
    def advertise(self) -> str | None:
        """Where consoles reach this device, as told to the hub (None: the address the
        hub sees, and the listen port)."""
        return DIAL_OUT if self.settings.dial_out else self.settings.advertise

    @property
    def connection_limit(self) -> int:
        """How many connections the proxy holds at most (below the open-files limit)."""
        return self._admissions.max_total

    # -- life cycle -----------------------------------------------------------------------
    async def run(self) -> None:
        """Enrol, then serve until `stop()` (or the hub removes this device)."""
        try:
            self._bind()
            self._admissions.max_total = self._files_for_connections(
                self.settings.max_connections)
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

    def _files_for_connections(self, wanted: int) -> int:
        """Raise the open-files limit for `wanted` connections; how many fit in what was
        obtained (each holds a socket; the process keeps SPARE_FILES for the rest)."""
        raise_open_files_limit(wanted)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = connection_limit(wanted, soft)
        if limit < wanted:
            self._say(f"the open files limit ({soft}) allows {limit} connections, not "
                      f"{wanted}; raise it (ulimit -n) for more")
        return limit

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
            await self.adopt_staged_identity()
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
                    advertise=self.advertise,
                    listen_port=self.listen_address[1])
            except HubRefused:
                # The hub may know this device by a renewal whose swap did not finish.
                if await self.adopt_staged_identity():
                    continue
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
        if self._refusal_timer is not None:
            self._refusal_timer.cancel()
        if self._listener is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self._listener.fileno())
            self._listener.close()
        for fd, (sock, timer, address) in list(self._sniffing.items()):
            timer.cancel()
            loop.remove_reader(fd)
            self._release_socket(sock, address)
        self._sniffing.clear()
        reason = self.stopped_because or "the device agent stopped"
        for session in list(self._sessions):
            session.end(reason)
        self._end_plain(reason)
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
            assert self.listen_address is not None
            sent_with = self.identity
            try:
                # Every heartbeat says where consoles reach this device (the hub records
                # and audits a change): the authenticated call, never `register`.
                state = await self.hub.state(advertise=self.advertise,
                                             listen_port=self.listen_address[1])
            except HubRefused as exc:
                if self.identity is not sent_with:
                    # Renewed while this heartbeat was out: it presented the old
                    # certificate, which the hub no longer knows. Not a removal.
                    continue
                if await self.adopt_staged_identity():
                    continue
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
                    if state.mandatory:
                        self._end_plain("secure shadowing is now mandatory")
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
            # On disk before the hub hears of it: once the hub switched, the old pair is
            # refused, so the new one must survive whatever happens next.
            staged = stage_device_files(self.directory, renewed)
        except (OSError, PKIError) as exc:
            self._say(f"renewal: cannot write the new certificate ({exc}); trying again at "
                      "the next heartbeat")
            return
        try:
            # Sent over the connection that presents the OLD certificate: it vouches.
            fingerprint = await self.hub.renew(renewed.cert_pem)
        except ClientError as exc:
            # The staged pair stays: the hub may have switched before its answer was lost
            # (the next refused heartbeat, or the next start, adopts it then).
            self._say(f"renewal: {exc}; trying again at the next heartbeat")
            return
        if fingerprint != certificate_fingerprint(renewed.cert_pem):
            discard_staged_device_files(self.directory)
            self._say("renewal: the hub registered another fingerprint; keeping the old "
                      "certificate")
            return
        self._adopt(staged, "renewed")

    async def adopt_staged_identity(self) -> bool:
        """A renewal's staged pair that the hub already took (a heartbeat presenting it
        succeeds) becomes this device's identity; one the hub refuses is discarded, and
        the old pair kept. True when adopted."""
        try:
            staged = load_staged_device_files(self.directory)
        except PKIError as exc:
            self._say(f"discarding the unreadable staged renewal: {exc}")
            discard_staged_device_files(self.directory)
            return False
        if staged is None:
            return False
        probe = HubClient(self.settings.hub_url, self.settings.ca_file, staged)
        try:
            await probe.state()
        except HubRefused:
            discard_staged_device_files(self.directory)
            self._say("the hub does not know the staged renewal; keeping the current "
                      "certificate")
            return False
        except ClientError as exc:
            self._say(f"cannot ask the hub about the staged renewal ({exc}); keeping the "
                      "current certificate for now")
            return False
        finally:
            await probe.aclose()
        self._adopt(staged, "adopted the renewed")
        return True

    def _adopt(self, staged: DeviceIdentity, what: str) -> None:
        """Swap the staged pair in; if the swap fails, serve from the staged files."""
        try:
            self.identity = replace_device_files(self.directory, staged.pair)
            discard_staged_device_files(self.directory)
        except (OSError, PKIError) as exc:
            self.identity = staged
            self._say(f"cannot put the renewed certificate in place ({exc}); using "
                      f"{staged.cert_path} until the next start adopts it")
        fingerprint = self.identity.fingerprint
        if self.record is not None:
            self.record.fingerprint = fingerprint
            self.record.save(self.directory)
            self.hub.use_identity(self.identity)
            self._tls = self._server_tls()   # new handshakes present the new certificate
        if self.hub_link is not None:   # reconnect with the new certificate
            self.hub_link.renewed()
        self.audit.record("shadow.device.renewed", fingerprint=fingerprint)
        self._say(f"{what} device certificate: fingerprint {fingerprint}")

    # -- accepting and sniffing -----------------------------------------------------------
    def _accept_ready(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        for _ in range(64):   # a burst at a time, then back to the loop
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return   # the one connection failed (ECONNABORTED and the like)
                # Out of descriptors: the connection waits in the backlog. The listening
                # socket stays readable, so stop watching it for a while, not spin.
                self._pause_accepting(ACCEPT_RETRY_DELAY)
                return
            address = str(peer[0])
            admission = self._admissions.admit(address)
            if not admission.admitted:
                if self._admissions.total >= self._admissions.max_total:
                    self.counters.refused_full += 1
                else:
                    self.counters.refused_address += 1
                sock.close()
                continue
            self.counters.accepted += 1
            sock.setblocking(False)
            fd = sock.fileno()
            timer = loop.call_later(self.settings.sniff_timeout, self._sniffed, fd, True)
            self._sniffing[fd] = (sock, timer, address)
            loop.add_reader(fd, self._sniffed, fd, False)

    def _pause_accepting(self, delay: float) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        self.counters.accept_paused += 1
        self._accept_paused = True
        loop.remove_reader(self._listener.fileno())
        loop.call_later(delay, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = False
        if self._listener is not None and self._listener.fileno() != -1 \
                and not self._stop.is_set():
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)

    # Why MSG_PEEK: the first bytes decide between TLS and plain RFB, and both paths want
    # them still unread (the TLS handshake must read the ClientHello itself; start_tls
    # cannot be given bytes already read). Peeking on the raw socket under add_reader,
    # then handing the untouched socket to connect_accepted_socket (with or without
    # ssl=), is the one way that needs no byte re-injection.
    def _sniffed(self, fd: int, timed_out: bool) -> None:
        entry = self._sniffing.pop(fd, None)
        if entry is None:
            return
        sock, timer, address = entry
        timer.cancel()
        asyncio.get_running_loop().remove_reader(fd)
        kind = "rfb-client"
        if not timed_out:
            try:
                head = sock.recv(_PEEK, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                loop = asyncio.get_running_loop()   # spurious wake-up: keep waiting
                self._sniffing[fd] = (sock, loop.call_later(self.settings.sniff_timeout,
                                                            self._sniffed, fd, True), address)
                loop.add_reader(fd, self._sniffed, fd, False)
                return
            except OSError:
                head = b""
            if not head:
                self._release_socket(sock, address)
                return
            kind = rfb.classify_first_bytes(head)
        peer = _address(sock)
        if kind == "garbage":
            self.counters.closed_garbage += 1
            self.audit.record("shadow.connection.garbage", client=peer)
            self._release_socket(sock, address)
        elif kind == "tls":
            self._spawn(self._open_tls(sock, peer, address))
        else:
            self._spawn(self._open_plain(sock, peer, address))

    def _release_socket(self, sock: socket.socket, address: str) -> None:
        sock.close()
        self._admissions.release(address)

    def _released(self, transport: asyncio.BaseTransport) -> None:
        address = self._transports.pop(transport, None)
        if address is not None:
            self._admissions.release(address)

    # -- plain viewers ----------------------------------------------------------------------
    async def _open_plain(self, sock: socket.socket, peer: str, address: str) -> None:
        loop = asyncio.get_running_loop()
        assert self.record is not None
        mandatory = self.record.mandatory
        holder = _Holding(self) if not mandatory else None
        refusal = _PlainRefusal(self, rfb.SECURE_SHADOWING_REQUIRED) if mandatory else None
        protocol: asyncio.Protocol = refusal or cast(asyncio.Protocol, holder)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except OSError:
            self._release_socket(sock, address)
            return
        self._transports[transport] = address
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
            self.report_refusal("vnc-unreachable", str(exc), peer)
            transport.close()
            return
        vnc_transport, vnc_holder = vnc
        if transport.is_closing() or self.record.mandatory:
            # Gone while the VNC server was dialled, or mandatory came in the meantime.
            vnc_transport.close()
            transport.close()
            return
        self.counters.plain_passed += 1
        self.audit.record("shadow.insecure", client=peer)
        self._spawn(self._tell_hub_insecure(peer))
        # Filled once the bridge exists (it may end within its constructor).
        bridged: list[Bridge] = []
        idle: list[asyncio.TimerHandle] = []
        reasons: list[str] = []
        bridge = Bridge(transport, vnc_transport, first_pending=holder.take(),
                        second_pending=vnc_holder.take(),
                        on_closed=lambda result: self._plain_ended(
                            peer, transport, result, bridged, idle, reasons))
        if not bridge.closed.done():
            bridged.append(bridge)
            self._plain.add(bridge)
            self._watch_idle(bridge, idle, reasons, -1, loop.time())

    def _watch_idle(self, bridge: Bridge, idle: list[asyncio.TimerHandle], reasons: list[str],
                    seen: int, since: float) -> None:
        """End a plain relay once no byte crossed it either way for plain_idle_timeout:
        a check every tenth of it (one timer per relay, not one per chunk)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        crossed = bridge.first_to_second + bridge.second_to_first
        if crossed != seen:
            seen, since = crossed, now
        elif now - since >= self.settings.plain_idle_timeout:
            reasons.append(f"no data for {self.settings.plain_idle_timeout:g} s")
            bridge.close(reasons[0])
            return
        idle[:] = [loop.call_later(self.settings.plain_idle_timeout / 10, self._watch_idle,
                                   bridge, idle, reasons, seen, since)]

    def _end_plain(self, reason: str) -> None:
        """Close every plain relay running now (mandatory turned on, or stopping)."""
        for bridge in list(self._plain):
            bridge.close(reason, linger=ENDING_LINGER)

    async def _tell_hub_insecure(self, peer: str) -> None:
        try:
            await self.hub.insecure(peer)
        except ClientError as exc:
            self._say(f"insecure session from {peer}: {exc}")

    def _plain_ended(self, peer: str, transport: asyncio.BaseTransport, result: BridgeResult,
                     bridged: list[Bridge], idle: list[asyncio.TimerHandle], reasons: list[str]
                     ) -> None:
        for bridge in bridged:
            self._plain.discard(bridge)
        for timer in idle:
            timer.cancel()
        self._released(transport)
        reason = result.error if result.error and result.ended_by == "first" else None
        self.audit.record("shadow.insecure.end", client=peer,
                          bytes_to_device=result.first_to_second,
                          bytes_to_viewer=result.second_to_first,
                          reason=reasons[0] if reasons else reason or "closed")

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
    async def _open_tls(self, sock: socket.socket, peer: str, address: str) -> None:
        loop = asyncio.get_running_loop()
        channel = _DeviceChannel(self, peer)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: channel, sock, ssl=self._tls,
                ssl_handshake_timeout=self.settings.handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            # A console certificate of another CA, no certificate, a stalled handshake.
            reason = str(exc) or type(exc).__name__
            self.counters.failed["tls"] = self.counters.failed.get("tls", 0) + 1
            self.audit.record("shadow.tls.failed", client=peer, reason=reason)
            if isinstance(exc, ssl.SSLError):
                self.report_refusal("console-ca", f"the TLS handshake failed: {reason}", peer)
            else:
                self.report_refusal("malformed", f"the TLS handshake did not complete: "
                                                 f"{reason}", peer)
            with contextlib.suppress(OSError):
                sock.close()
            self._admissions.release(address)
            return
        self._transports[transport] = address

    def check_request(self, signed: bytes, console_fingerprint: str) -> tuple[str, str] | None:
        """Why this device refuses `signed` before asking the hub (defence in depth), as
        (code, reason) with the code of the refusal report, or None. The hub checks it all
        again, and single use."""
        assert self.identity is not None and self._hub_key is not None
        try:
            parsed = parse_signed_request(signed)
        except ShadowProtocolError as exc:
            return "malformed", f"the shadow request is malformed: {exc}"
        request = parsed.request
        if not parsed.signature_valid(self._hub_key):
            return "signature", "the shadow request is not signed by this device's hub"
        if request.device != self.settings.name or \
                request.device_fingerprint != self.identity.fingerprint:
            return "device", (f"the shadow request is for device {request.device} "
                              f"({request.device_fingerprint}), not for this one")
        if request.console_fingerprint != console_fingerprint:
            return "console-certificate", ("the shadow request names another console "
                                           "certificate than the one this console presented")
        return None

    # -- refusals told to the hub -----------------------------------------------------------
    def report_refusal(self, code: str, reason: str, client: str, *,
                       request: SignedRequest | None = None,
                       console_fingerprint: str | None = None) -> None:
        """Tell the hub (best effort, in the background) of a refusal this agent decided
        itself, so that the hub's audit trail has it; budgeted per peer address, the
        rest summed up once per window (`RefusalBudget`)."""
        if self.record is None or self._stop.is_set():
            return
        loop = asyncio.get_running_loop()
        address = client.rpartition(":")[0] or client
        if not self.refusal_budget.admit(address, code, loop.time()):
            self._arm_refusal_timer()
            return
        shadow = request.request if request is not None else None
        self._spawn(self._tell_hub_refused(
            code, reason, client, request_id=shadow.request_id if shadow else None,
            operator=shadow.operator if shadow else None,
            console_fingerprint=console_fingerprint))

    def _arm_refusal_timer(self) -> None:
        deadline = self.refusal_budget.get_timer()
        if deadline is None or self._refusal_timer is not None:
            return
        self._refusal_timer = asyncio.get_running_loop().call_at(deadline,
                                                                 self._refusals_summed)

    def _refusals_summed(self) -> None:
        self._refusal_timer = None
        summary = self.refusal_budget.summary(asyncio.get_running_loop().time())
        if summary is not None and not self._stop.is_set():
            self._spawn(self._tell_hub_refused(summary.code, summary.reason,
                                               summary.example_address, count=summary.count))
        self._arm_refusal_timer()

    async def _tell_hub_refused(self, code: str, reason: str, client: str, *,
                                request_id: str | None = None, operator: str | None = None,
                                console_fingerprint: str | None = None,
                                count: int | None = None) -> None:
        try:
            await self.hub.refused(code, reason, client=client, request_id=request_id,
                                   operator=operator, console_fingerprint=console_fingerprint,
                                   count=count)
        except ClientError as exc:
            self._say(f"cannot tell the hub of a refusal ({code}): {exc}")

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
        # The codec refused it (bad preface or frame, no request in time, data before
        # the answer): a request that does not parse, as far as the hub is concerned.
        agent.report_refusal("malformed", reason, self._peer,
                             console_fingerprint=self._console_fingerprint)
        self._transport.close()

    def refuse(self, reason: str, code: str | None = None,
               request: SignedRequest | None = None) -> None:
        """Answer REFUSE and close; `code`: the agent decided it (not the hub), so the
        hub is told too."""
        assert self._codec is not None and self._transport is not None
        self._codec.refuse(reason)
        self._transport.write(self._codec.data_to_send())
        self._agent.audit.record("shadow.request.refused", client=self._peer, reason=reason)
        self._agent.counters.failed["refused"] = self._agent.counters.failed.get("refused", 0) + 1
        self._transport.close()
        if code is not None:
            self._agent.report_refusal(code, reason, self._peer, request=request,
                                       console_fingerprint=self._console_fingerprint)

    async def _decide(self, signed: bytes) -> None:
        agent = self._agent
        assert self._transport is not None and self._codec is not None
        problem = agent.check_request(signed, self._console_fingerprint)
        if problem is not None:
            code, reason = problem
            # Any other code means the request parsed: its id and operator go to the hub.
            parsed = None if code == "malformed" else parse_signed_request(signed)
            self.refuse(reason, code, parsed)
            return
        request = parse_signed_request(signed)
        try:
            verdict = await agent.hub.verify(signed, self._console_fingerprint)
        except ClientError as exc:
            self.refuse(f"the device cannot check the request with its hub: {exc}")
            return
        if self._transport.is_closing():
            if verdict.allowed:   # the hub listed the session: it must hear it is over
                await _ended_at_hub(agent, verdict.session, 0, 0,
                                    "the channel failed before it was up")
            return
        if not verdict.allowed:
            self.refuse(verdict.reason)
            return
        refusal = await agent.consent(verdict)
        code = "consent"
        if refusal is None:
            try:
                vnc_transport, vnc_holder = await agent._connect_vnc()
            except ClientError as exc:
                refusal, code = str(exc), "vnc-unreachable"
        if refusal is not None:
            if not self._transport.is_closing():
                self.refuse(refusal, code, request)
            else:
                agent.report_refusal(code, refusal, self._peer, request=request,
                                     console_fingerprint=self._console_fingerprint)
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
        failures = 0
        while not self._bridge.closed.done():
            try:
                answer = await hub.watch(session)
            except HubRefused as exc:
                self.end(str(exc))
                return
            except ClientError as exc:
                # Fail closed: a hub that cannot be reached cannot end the session either
                # (administrator, sign-out, removal), so it ends after a few tries.
                failures += 1
                if failures >= WATCH_FAILURES_MAX:
                    self._agent._say(f"session {session}: {exc}")
                    self.end("the hub cannot be reached")
                    return
                await asyncio.sleep(WATCH_RETRY_INTERVAL)
                continue
            failures = 0
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


def connection_limit(wanted: int, open_files: int) -> int:
    """How many of `wanted` connections fit in `open_files` descriptors, SPARE_FILES kept
    for the rest of the process (the VNC side of a relay, the hub's client, logs)."""
    if open_files == resource.RLIM_INFINITY or open_files < 0:
        return wanted
    return max(1, min(wanted, open_files - SPARE_FILES))


def _address(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "unknown"
    return f"{host}:{port}"
