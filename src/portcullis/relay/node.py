"""The relay process (`portcullis serve relay --dir DIR`): the classic listener, the
health app, and (in dial-out mode) the connector to the edges, around one `RelayCore`.

Which modes run: the classic listener when `relay.edges` is empty, or when `relay.listen`
is written in the file (both modes at once); the dial-out connector when `relay.edges`
names edges. SIGTERM/SIGINT stop; SIGHUP renews due certificates, loads a renewed
`relay` certificate for new handshakes and re-reads `relay.allow` for new connections.
The relay keeps no durable store: its record is the audit trail (`log.audit_file`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import uvicorn
from cryptography import x509

from portcullis.audit import AuditTrail
from portcullis.config import config_path, load_settings
from portcullis.config.model import Settings
from portcullis.config.values import parse_host_port
from portcullis.errors import ConfigError, PKIError
from portcullis.net.dialer import DirectDialer
from portcullis.net.tls import client_context, server_context
from portcullis.pki.maintenance import LoadedCertificates, maintain
from portcullis.policy.relay_allow import parse_allow_list
from portcullis.relay.classic import ClassicServer
from portcullis.relay.core import RelayCore
from portcullis.relay.dialout import DialOutConnector, DialOutSettings
from portcullis.relay.health import health_app
from portcullis.relay.status import RelayStatus
from portcullis.web.edge import Edge, raise_open_files_limit

log = structlog.get_logger("portcullis.relay")
CERTIFICATE_CHECK_SECONDS = 86400.0


@dataclass(frozen=True)
class Listening:
    """Where the relay listens, once it does (for the ready line and the tests)."""

    classic: tuple[str, int] | None
    health: tuple[str, int]


class RelayNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        relay = settings.relay
        self.status = RelayStatus()
        self.audit = AuditTrail(settings.path(settings.log.audit_file))
        self.core = RelayCore(parse_allow_list(relay.allow), self.audit, self.status,
                              dialer=DirectDialer(timeout=relay.dial_timeout),
                              resolve_timeout=relay.dial_timeout)
        self.certificates = LoadedCertificates(settings)
        cert, key = settings.role_cert("relay")
        self.tls = self.certificates.track("relay", server_context(
            cert, key, client_ca_file=settings.ca_cert_path, require_client_cert=True))
        self.dial_out_connector: DialOutConnector | None = None
        if relay.edges:
            self.dial_out_connector = DialOutConnector(
                self.core, DialOutSettings.from_settings(relay),
                self.certificates.track("relay", client_context(
                    settings.ca_cert_path, cert_file=cert, key_file=key)))
        self.classic: ClassicServer | None = None
        if not relay.edges or "listen" in relay.model_fields_set:
            # One edge's connections all come from its address: only the total is bounded.
            limits = settings.limits.model_copy(update={
                "tls_handshake_timeout": relay.handshake_timeout,
                "max_connections_per_address": settings.limits.max_connections})
            self.classic = ClassicServer(self.core, self.tls, Edge(limits))

    @classmethod
    def build(cls, settings: Settings) -> RelayNode:
        maintain(settings, ["relay"])   # renew a due certificate before loading it
        return cls(settings)

    @property
    def dial_out(self) -> bool:
        return bool(self.settings.relay.edges)

    def not_ready(self) -> list[str]:
        """Why the relay cannot serve now; empty when it can."""
        reasons = []
        if self.classic is not None and not self.status.listening:
            reasons.append("the classic listener is not listening")
        problem = self._certificate_problem(dt.datetime.now(dt.UTC))
        if problem is not None:
            reasons.append(problem)
        if self.dial_out and not self.status.edges:
            reasons.append("no edge is connected")
        return reasons

    def reload(self) -> None:
        """SIGHUP: certificates renewed and reloaded; `relay.allow` re-read for new
        connections. Everything else needs a restart."""
        try:
            maintain(self.settings, ["relay"])
        except PKIError as exc:
            log.error("certificates not checked", error=str(exc))
        self.certificates.reload_changed()
        try:
            fresh = load_settings(config_path(self.settings.base_dir))
        except ConfigError as exc:
            log.error("configuration not reloaded", error=str(exc))
            return
        self.core.reload(parse_allow_list(fresh.relay.allow))
        log.info("relay configuration reloaded", allow=len(fresh.relay.allow))

    def bind(self) -> tuple[socket.socket | None, socket.socket]:
        """Bind the classic and health sockets now, so a taken port is one clear error."""
        relay = self.settings.relay
        classic = (_bound(relay.listen, "relay.listen") if self.classic is not None
                   else None)
        try:
            health = _bound(relay.health_listen, "relay.health_listen")
        except ConfigError:
            if classic is not None:
                classic.close()
            raise
        return classic, health

    async def serve(self, on_ready: Callable[[Listening], None] | None = None) -> None:
        """Serve until SIGINT/SIGTERM."""
        classic_sock, health_sock = self.bind()
        raise_open_files_limit(self.settings.limits.max_connections)
        health = uvicorn.Server(uvicorn.Config(
            health_app(self.status, self.not_ready), lifespan="off", log_config=None,
            server_header=False, access_log=False, timeout_graceful_shutdown=1))
        loop = asyncio.get_running_loop()
        stopped = asyncio.Event()

        def stop() -> None:
            health.should_exit = True
            stopped.set()

        classic_at = None
        if self.classic is not None and classic_sock is not None:
            classic_at = self.classic.listen(classic_sock)
            self.status.listening = True
        # _serve, not serve: serve() would install its own signal handlers.
        health_task = asyncio.ensure_future(health._serve([health_sock]))
        daily = asyncio.ensure_future(self._check_certificates_daily())
        dialling = (asyncio.ensure_future(self.dial_out_connector.run())
                    if self.dial_out_connector is not None else None)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            while not health.started and not health_task.done():
                await asyncio.sleep(0.02)
            if health.started and on_ready is not None:
                on_ready(Listening(classic_at, _address(health_sock)))
            await asyncio.wait([health_task, asyncio.ensure_future(stopped.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop()
            self.status.listening = False
            if self.classic is not None:
                self.classic.close()
            daily.cancel()
            if dialling is not None:
                dialling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dialling
            with contextlib.suppress(asyncio.CancelledError):
                await health_task
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.audit.close()

    async def _check_certificates_daily(self) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_SECONDS)
            self.reload()

    def _certificate_problem(self, now: dt.datetime) -> str | None:
        path = self.settings.role_cert("relay")[0]
        try:
            certificate = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return f"the relay certificate {path} cannot be read"
        if now < certificate.not_valid_before_utc:
            return f"the relay certificate {path} is not valid yet"
        if now > certificate.not_valid_after_utc:
            return f"the relay certificate {path} has expired"
        return None


def _bound(listen: str, key: str) -> socket.socket:
    host, port = parse_host_port(listen, any_port=True)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=4096)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror}", key=key) from None


def _address(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return str(host), int(port)
