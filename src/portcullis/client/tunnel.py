"""`portcullis connect`: the client end of the SSL VPN.

One WebSocket to the gateway carries every connection the local listeners capture.
When it drops, or the gateway stops answering the codec's keep-alive PINGs for the
dead-peer time the gateway pushed, streams in flight fail and new ones wait while it
reconnects with backoff; when an administrator ends it, or the session is no longer
valid, it stops and says why. A status file lets `portcullis status` show bytes,
streams, round trip and the pushed configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from portcullis.errors import ClientError, ProtocolError
from portcullis.net import websocket
from portcullis.net.muxsession import BridgeFactory, MuxSession, StreamBridge
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason

HELLO_TIMEOUT = 15.0
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
STATUS_FILE = "tunnel-status.json"
# Reasons after which reconnecting cannot help. The gateway's message says why, and
# whether signing in again can; these are for a gateway that sends none.
FINAL = {Reason.ADMIN_ENDED: "ended by an administrator", Reason.AUTH_FAILED:
         "the gateway no longer accepts this session: sign in again with 'portcullis login'"}


def final_message(reason: Reason, message: str) -> str:
    return message or FINAL[reason]


class TunnelClient:
    def __init__(self, url: str, token: str, tls: ssl.SSLContext, *,
                 say: Callable[[str], None], status_file: Path | None = None) -> None:
        self._url = websocket.websocket_url(url, "/api/v1/tunnel")
        self._token = token
        self._tls = tls
        self._say = say
        self._status_file = status_file
        self._session: MuxSession | None = None
        self._ready = asyncio.Event()
        self.hello: dict[str, object] = {}
        self.ended: str | None = None
        self.connected_since: float | None = None

    # -- what the local listeners use -----------------------------------------------
    async def open(self, transport: asyncio.Transport, protocol: mux.Protocol, host: str,
                   port: int, *, make: BridgeFactory | None = None,
                   early: bytes | bytearray = b"") -> StreamBridge | None:
        """Carry an accepted local connection as a stream, once the tunnel is up."""
        transport.pause_reading()
        await self._ready.wait()
        session = self._session
        if session is None or session.closed.is_set() or transport.is_closing():
            transport.close()
            return None
        try:
            bridge = session.open_local(protocol, host, port, make=make)
        except (ProtocolError, ValueError):   # the tunnel just ended, or a bad destination
            transport.close()
            return None
        bridge.hold(bytes(early))
        transport.set_protocol(bridge)
        bridge.connection_made(transport)
        return bridge

    @property
    def current(self) -> MuxSession | None:
        """The tunnel's session while it is up."""
        session = self._session
        return session if session is not None and not session.closed.is_set() else None

    @property
    def config(self) -> dict[str, object]:
        return (self._session.config or {}) if self._session is not None else {}

    # -- the connection loop -----------------------------------------------------------
    async def run(self, on_connected: Callable[[TunnelClient], None] | None = None) -> str:
        """Connect, and reconnect after drops, until ended for good; return why."""
        attempt = 0
        status = asyncio.ensure_future(self._report_status())
        try:
            while self.ended is None:
                try:
                    session = await self._connect()
                except ClientError as exc:
                    if self.ended is not None or (attempt == 0 and
                                                  self.connected_since is None):
                        raise
                    delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                    self._say(f"tunnel down ({exc}); retrying in {delay:.0f} s")
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                if on_connected is not None:
                    on_connected(self)
                await self._hold(session)
        finally:
            status.cancel()
            self._ready.set()   # release waiting connections: they close
            self._write_status()
        return self.ended or "stopped"

    def stop(self, message: str = "stopped") -> None:
        self.ended = message
        if self._session is not None:
            self._session.close(Reason.CANCELLED, "client stopped")

    async def _connect(self) -> MuxSession:
        carrier = await websocket.connect(self._url, self._tls)
        codec = MuxConnection("client")
        codec.send_hello({"version": 1, "session": self._token})
        session = MuxSession(codec)
        carrier.attach(session)
        try:
            self.hello = await asyncio.wait_for(asyncio.shield(session.hello), HELLO_TIMEOUT)
        except (TimeoutError, ConnectionError):
            session.close(Reason.CANCELLED, "no answer")
            if session.goaway is not None:
                reason, message = session.goaway
                if reason in FINAL:
                    self.ended = final_message(reason, message)
                    raise ClientError(self.ended) from None
                raise ClientError("the gateway refused the tunnel: "
                                  f"{message or reason.name.lower()}") from None
            raise ClientError("the gateway did not open the tunnel") from None
        self._session = session
        self.connected_since = time.time()
        self._ready.set()
        return session

    async def _hold(self, session: MuxSession) -> None:
        try:
            await session.closed.wait()
        finally:
            self._ready.clear()
            self._session = None
        if session.goaway is not None and session.goaway[0] in FINAL:
            self.ended = final_message(*session.goaway)
        elif self.ended is None:
            silent = session.ended_here is not None and session.ended_here[0] == Reason.TIMED_OUT
            why = (f"the gateway stopped answering: {session.ended_here[1]}"
                   if silent and session.ended_here else session.end_reason())
            self._say(f"tunnel lost ({why}); reconnecting")

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        session = self._session
        sent, received = session.byte_counts() if session is not None else (0, 0)
        return {
            "pid": os.getpid(), "gateway": self._url, "connected": session is not None,
            "since": self.connected_since, "tunnel": self.hello.get("id"),
            "user": self.hello.get("user"), "streams": session.open_streams if session else 0,
            "bytes_sent": sent, "bytes_received": received,
            "rtt_ms": round(session.rtt * 1000, 2) if session and session.rtt else None,
            "intranet_ip": self.config.get("intranet_ip"),
            "networks": self.config.get("networks"), "ended": self.ended,
        }

    async def _report_status(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(1.0)

    def _write_status(self) -> None:
        if self._status_file is None:
            return
        with contextlib.suppress(OSError):
            temporary = self._status_file.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.status()))
            os.chmod(temporary, 0o600)
            temporary.replace(self._status_file)
