"""Devices behind NAT, the agent's side (`portcullis shadow-agent --dial-out`): the
connections the agent keeps to its hub, over which consoles reach it.

The agent keeps `connections` (K) WebSocket connections to the hub's
`/api/v1/shadow/agent/connect` (TLS: the hub verified with `--ca`, the device
certificate presented). Each is one mux session in which the agent is the "client": the
hub opens a stream per console channel, and the agent answers it by connecting to its
own device proxy on loopback, so that the TLS handshake with the console, the request
check, consent and the rest are the code a reachable device runs, unchanged. Nothing
else is dialled: the stream's destination is ignored.

A connection that cannot be made or ends is replaced after a delay drawn from
[0, min(reconnect_max, reconnect_min * 2^attempt)] (full jitter: after a hub restart its
agents do not all arrive at once), and never given up. After a certificate renewal the
idle connections are replaced at once, so the hub sees the new certificate; busy ones
when their channels end. Each slot says its state once per change.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from portcullis.errors import ClientError
from portcullis.net import websocket
from portcullis.net.backoff import backoff_delay, greeted_session, keep_slots
from portcullis.net.dialer import DirectDialer
from portcullis.net.muxsession import MuxSession
from portcullis.proto import mux
from portcullis.proto.mux import Reason

CONNECT_PATH = "/api/v1/shadow/agent/connect"   # served by shadow.dialout at the hub
DIAL_OUT = "dial-out"   # the address such a device registers (consoles go through the hub)


@dataclass(frozen=True)
class HubLinkSettings:
    connections: int = 2
    handshake_timeout: float = 10.0
    reconnect_min: float = 0.2
    reconnect_max: float = 10.0
    proxy_timeout: float = 5.0   # connecting to our own proxy on loopback


@dataclass
class HubSlot:
    index: int
    state: str = "starting"
    session: MuxSession | None = None
    node: str = ""


class HubLink:
    """Keeps the agent's connections to `hub_url` up until cancelled; each stream the hub
    opens is joined to a connection to `proxy` (the device proxy, on loopback)."""

    def __init__(self, hub_url: str, tls: Callable[[], ssl.SSLContext | None],
                 proxy: tuple[str, int], device: str, *,
                 settings: HubLinkSettings = HubLinkSettings(),
                 say: Callable[[str], None] = print,
                 delay: Callable[[int, float, float], float] = backoff_delay) -> None:
        self._url = websocket.websocket_url(hub_url, CONNECT_PATH)
        self._tls = tls
        self._proxy = proxy
        self._device = device
        self._settings = settings
        self._say = say
        self._delay = delay
        self._dialer = DirectDialer(timeout=settings.proxy_timeout)
        self.slots = [HubSlot(index) for index in range(1, settings.connections + 1)]
        self.connected = asyncio.Event()   # set while at least one slot is connected
        self.attempts = 0                  # connection attempts so far (tests, status)

    async def run(self) -> None:
        await keep_slots(self.slots, self._keep, "the device agent is stopping")

    def renewed(self) -> None:
        """The device certificate changed: replace the idle connections now (the next
        ones present the new certificate); busy ones go once their channels end."""
        for slot in self.slots:
            session = slot.session
            if session is not None and session.open_streams == 0:
                session.close(Reason.SHUTDOWN, "the device certificate was renewed")

    async def _keep(self, slot: HubSlot) -> None:
        settings = self._settings
        attempt = 0
        while True:
            session = await self._connect(slot)
            if session is not None:
                attempt = 0
                await session.closed.wait()
                slot.session = None
                slot.node = ""
                self._connected_changed()
                self._state(slot, "lost: " + session.end_reason())
            await asyncio.sleep(self._delay(attempt, settings.reconnect_min,
                                            settings.reconnect_max))
            attempt += 1

    async def _connect(self, slot: HubSlot) -> MuxSession | None:
        settings = self._settings
        self.attempts += 1
        try:
            carrier = await websocket.connect(self._url, self._tls(),
                                              timeout=settings.handshake_timeout)
        except (ClientError, ssl.SSLError, OSError) as exc:
            self._state(slot, f"cannot connect: {exc}")
            return None
        session, hello = await greeted_session(
            carrier, {"role": "shadow-agent", "device": self._device}, self._open,
            settings.handshake_timeout)
        if hello is None:
            self._state(slot, f"refused by the hub: {session.end_reason()}")
            return None
        slot.node = str(hello.get("node", ""))
        slot.session = session
        self._connected_changed()
        self._state(slot, f"connected (hub node {slot.node})" if slot.node else "connected")
        return session

    async def _open(self, session: MuxSession, event: mux.StreamOpened) -> None:
        if event.protocol != mux.Protocol.TCP:
            session.refuse(event.stream_id, Reason.DENIED, "a shadow agent carries TCP only")
            return
        host, port = self._proxy
        await session.connect_stream(event.stream_id, self._dialer, host, port,
                                     refusal="the device proxy does not answer")

    def _connected_changed(self) -> None:
        if any(slot.session is not None for slot in self.slots):
            self.connected.set()
        else:
            self.connected.clear()

    def _state(self, slot: HubSlot, state: str) -> None:
        if state != slot.state:
            slot.state = state
            self._say(f"hub connection {slot.index}: {state}")
