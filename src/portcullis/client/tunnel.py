"""`portcullis connect`: the client end of the SSL VPN.

A few WebSockets to the gateway, the tunnel's carriers, carry every connection the local
listeners capture: carrier 0 is the tunnel (its loss is the tunnel's), and with the join
secret the gateway gives it, `carriers - 1` more join the same tunnel, so that parallel
streams spread over the gateway's worker processes (each carrier is one WebSocket, served
by one process on one core; this process stays one event loop). A new TCP stream goes
to the live carrier with the fewest open streams; an extra carrier that drops is
reopened in the background while new streams go to the others.

When carrier 0 drops, or the gateway stops answering the codec's keep-alive PINGs for
the dead-peer time the gateway pushed, every carrier closes, streams in flight fail and
new ones wait while it reconnects with backoff; when an administrator ends it, or the
session is no longer valid, it stops and says why. A status file lets `portcullis
status` show bytes, streams (per carrier too), round trip and the pushed configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from portcullis.errors import ClientError, ProtocolError
from portcullis.net import websocket
from portcullis.net.muxsession import BridgeFactory, MuxSession, StreamBridge
from portcullis.proto import mux
from portcullis.proto.mux import MuxConnection, Reason

HELLO_TIMEOUT = 15.0
BACKOFF = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
STATUS_FILE = "tunnel-status.json"
DEFAULT_CARRIERS = 2
MAX_CARRIERS = 16   # the gateway takes no more per tunnel
SPREAD_TRIES = 8    # new carriers opened to land on a gateway process not yet used
# Reasons after which reconnecting cannot help. The gateway's message says why, and
# whether signing in again can; these are for a gateway that sends none.
FINAL = {Reason.ADMIN_ENDED: "ended by an administrator", Reason.AUTH_FAILED:
         "the gateway no longer accepts this session: sign in again with 'portcullis login'"}


def final_message(reason: Reason, message: str) -> str:
    return message or FINAL[reason]


def choose_carrier(loads: Sequence[int | None]) -> int | None:
    """The carrier a new TCP stream goes to, given each carrier's open streams (None for
    one that is down): the live one with the fewest, the lowest index on a tie, so that
    streams opened together alternate; None when none is live."""
    live = [(load, index) for index, load in enumerate(loads) if load is not None]
    return min(live)[1] if live else None


def land_elsewhere(process: object, others: Sequence[object], processes: object,
                   tries: int) -> bool:
    """Whether a new carrier that landed on gateway process `process` should be opened
    again: the node has more processes (`processes`, as the gateway says) than the
    tunnel's other carriers use (`others`), this one shares a process with one of them,
    and tries are left. Which process takes a connection is the kernel's choice, so a
    few tries are what spreading a tunnel over the gateway's cores costs."""
    return (tries < SPREAD_TRIES and isinstance(processes, int)
            and processes > len(set(others)) and process in others)


class CarrierRefused(ClientError):
    """The gateway did not take a carrier; `final` says why, when retrying cannot help."""

    def __init__(self, message: str, final: str | None = None) -> None:
        super().__init__(message)
        self.final = final


class TunnelClient:
    def __init__(self, url: str, token: str, tls: ssl.SSLContext, *,
                 say: Callable[[str], None], status_file: Path | None = None,
                 carriers: int = DEFAULT_CARRIERS) -> None:
        if not 1 <= carriers <= MAX_CARRIERS:
            raise ValueError(f"a tunnel has 1 to {MAX_CARRIERS} carriers, not {carriers}")
        self._url = websocket.websocket_url(url, "/api/v1/tunnel")
        self._token = token
        self._tls = tls
        self._say = say
        self._status_file = status_file
        self._carriers = carriers
        self._session: MuxSession | None = None                    # carrier 0
        self._extras: list[MuxSession | None] = [None] * (carriers - 1)
        self._keepers: list[asyncio.Task[None]] = []
        self._retired = (0, 0)   # bytes of extra carriers that ended in this tunnel
        # Each carrier's local address, which `ss` and the gateway's logs show.
        self._local: weakref.WeakKeyDictionary[MuxSession, str] = weakref.WeakKeyDictionary()
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
        session = self._least_busy()
        if session is None or transport.is_closing():
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
        """Carrier 0 while the tunnel is up: where UDP and ICMP flows go. They stay on it
        because a flow is one local socket's conversation, kept until idle, that cannot
        move to another carrier without becoming a new flow (its replies would come
        from a new gateway socket); datagrams are few beside TCP's bulk, and carrier 0
        is the one the tunnel lives and dies with."""
        session = self._session
        return session if session is not None and not session.closed.is_set() else None

    @property
    def config(self) -> dict[str, object]:
        return (self._session.config or {}) if self._session is not None else {}

    def _live_carriers(self) -> list[MuxSession | None]:
        return [session if session is not None and not session.closed.is_set() else None
                for session in (self._session, *self._extras)]

    def _least_busy(self) -> MuxSession | None:
        carriers = self._live_carriers()
        chosen = choose_carrier([session.open_streams if session is not None else None
                                 for session in carriers])
        return carriers[chosen] if chosen is not None else None

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
                    await self._wait_to_retry("tunnel", exc, attempt)
                    attempt += 1
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

    async def _wait_to_retry(self, what: str, error: ClientError, attempt: int) -> None:
        delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
        self._say(f"{what} down ({error}); retrying in {delay:.0f} s")
        await asyncio.sleep(delay)

    def stop(self, message: str = "stopped") -> None:
        self.ended = message
        for session in (self._session, *self._extras):
            if session is not None:
                session.close(Reason.CANCELLED, "client stopped")

    async def _open_carrier(self, fields: dict[str, object]) -> MuxSession:
        """One WebSocket that presents the session (and `fields`) and got the gateway's
        HELLO; `CarrierRefused` if the gateway did not take it."""
        carrier = await websocket.connect(self._url, self._tls)
        codec = MuxConnection("client")
        codec.send_hello({"version": 1, "session": self._token, **fields})
        session = MuxSession(codec)
        carrier.attach(session)
        local = carrier.transport.get_extra_info("sockname") if carrier.transport else None
        self._local[session] = f"{local[0]}:{local[1]}" if local else ""
        try:
            await asyncio.wait_for(asyncio.shield(session.hello), HELLO_TIMEOUT)
        except (TimeoutError, ConnectionError):
            session.close(Reason.CANCELLED, "no answer")
            if session.goaway is None:
                raise CarrierRefused("the gateway did not open the tunnel") from None
            reason, message = session.goaway
            if reason in FINAL:
                final = final_message(reason, message)
                raise CarrierRefused(final, final) from None
            raise CarrierRefused("the gateway refused the tunnel: "
                                 f"{message or reason.name.lower()}") from None
        except asyncio.CancelledError:
            session.close(Reason.CANCELLED, "client stopped")
            raise
        return session

    async def _connect(self) -> MuxSession:
        try:
            session = await self._open_carrier({"carriers": self._carriers})
        except CarrierRefused as exc:
            if exc.final is not None:
                self.ended = exc.final
            raise
        self.hello = session.hello.result()
        self._session = session
        self._retired = (0, 0)
        self.connected_since = time.time()
        join = self.hello.get("join")
        if isinstance(join, str):   # a gateway that gives none serves carrier 0 alone
            self._keepers = [asyncio.ensure_future(self._keep_carrier(index, join))
                             for index in range(1, self._carriers)]
        self._ready.set()
        return session

    async def _keep_carrier(self, index: int, join: str) -> None:
        """Keep extra carrier `index` open while carrier 0 lives: when it drops, new
        streams go to the others and it is reopened, with backoff if that fails. Ended
        for a reason that reconnecting cannot help (an administrator, the session), it
        ends the tunnel as carrier 0 would."""
        attempt = 0
        spread_tries = 0
        while True:
            try:
                session = await self._open_carrier({"join": join, "carrier": index})
            except ClientError as exc:
                if isinstance(exc, CarrierRefused) and exc.final is not None:
                    self.stop(exc.final)
                    return
                await self._wait_to_retry(f"carrier {index}", exc, attempt)
                attempt += 1
                continue
            attempt = 0
            served = session.hello.result()
            if land_elsewhere(served.get("process"), self._processes_used(),
                              served.get("processes"), spread_tries):
                spread_tries += 1
                session.close(Reason.CANCELLED, "opened again on another gateway process")
                continue
            spread_tries = 0
            self._extras[index - 1] = session
            try:
                await session.closed.wait()
            finally:
                self._extras[index - 1] = None
                if not session.closed.is_set():   # cancelled: carrier 0 ended
                    session.close(Reason.CANCELLED, "tunnel closed")
                sent, received = session.byte_counts()
                self._retired = (self._retired[0] + sent, self._retired[1] + received)
            if session.goaway is not None and session.goaway[0] in FINAL:
                self.stop(final_message(*session.goaway))
                return
            self._say(f"carrier {index} lost ({session.end_reason()}); reopening")

    def _processes_used(self) -> list[object]:
        """The gateway processes the tunnel's live carriers are on."""
        return [carrier.hello.result().get("process")
                for carrier in (self._session, *self._extras)
                if carrier is not None and carrier.hello.done()
                and not carrier.hello.cancelled() and carrier.hello.exception() is None]

    async def _hold(self, session: MuxSession) -> None:
        try:
            await session.closed.wait()
        finally:
            self._ready.clear()
            self._session = None
            for keeper in self._keepers:   # the extra carriers end with carrier 0
                keeper.cancel()
            await asyncio.gather(*self._keepers, return_exceptions=True)
            self._keepers = []
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
        carriers: list[dict[str, object]] = []
        sent, received = self._retired
        streams = 0
        for index, carrier in enumerate(self._live_carriers()):
            carrier_sent, carrier_received = carrier.byte_counts() if carrier else (0, 0)
            sent, received = sent + carrier_sent, received + carrier_received
            streams += carrier.open_streams if carrier else 0
            carriers.append({"index": index, "connected": carrier is not None,
                             "local": self._local.get(carrier, "") if carrier else "",
                             "streams": carrier.open_streams if carrier else 0,
                             "bytes_sent": carrier_sent, "bytes_received": carrier_received})
        return {
            "pid": os.getpid(), "gateway": self._url, "connected": session is not None,
            "since": self.connected_since, "tunnel": self.hello.get("id"),
            "user": self.hello.get("user"),
            "streams": streams,
            "bytes_sent": sent, "bytes_received": received, "carriers": carriers,
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
