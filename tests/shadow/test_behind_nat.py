"""Devices behind NAT, inside one process with real sockets on 127.0.0.1: the agent's
connections to the hub (reconnecting with backoff, answering the hub's streams from its
own proxy), the registry of which node holds a device, and the gateway's channel that
admits a console only for its own unused request and carries its bytes. The real
programs over mutual TLS are in tests/e2e/test_secure_shadowing.py."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from websockets.http11 import Request

from peers.stores import FakeClock
from portcullis.audit import AuditTrail
from portcullis.client.state import ClientState
from portcullis.errors import ClientError
from portcullis.gateway.upgrade import websocket_protocol_class
from portcullis.net.muxdialer import MuxDialer
from portcullis.net.muxsession import MuxSession
from portcullis.net.websocket import Opened, WebSocketMux
from portcullis.proto.mux import MuxConnection, Reason, Timers
from portcullis.shadow.console import carry_to_device
from portcullis.shadow.dialout import (
    CHANNEL_PATH,
    AgentConnections,
    AgentEndpoint,
    ChannelEndpoint,
    DeviceSessions,
    DialOutRegistry,
)
from portcullis.shadow.hub import enrolment_code_hash
from portcullis.shadow.hublink import CONNECT_PATH, HubLink, HubLinkSettings
from portcullis.store import EphemeralStore
from shadow.test_hub import HASHER, World, csr, self_signed, world  # noqa: F401  (world: fixture)

FAST = HubLinkSettings(connections=1, handshake_timeout=5.0, reconnect_min=0.01,
                       reconnect_max=0.05)


async def serve(endpoints: dict[str, Opened]) -> tuple[asyncio.Server, int]:
    protocol = websocket_protocol_class(endpoints)
    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class FakeHub:
    """Turns the first `refuse` connections away with a GOAWAY, then greets each one."""

    def __init__(self, refuse: int, on_session: Callable[[MuxSession], None] = lambda _: None
                 ) -> None:
        self.refuse = refuse
        self.arrivals = 0
        self.sessions: list[MuxSession] = []
        self._on_session = on_session

    def opened(self, carrier: WebSocketMux, request: Request) -> None:
        self.arrivals += 1
        session = MuxSession(MuxConnection("gateway"))
        carrier.attach(session)
        if self.arrivals <= self.refuse:
            session.close(Reason.AUTH_FAILED, "not yet")
            return
        session.mux.send_hello({"node": "hub-a"})
        session.flush_soon()
        self.sessions.append(session)
        self._on_session(session)


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(link: HubLink) -> AsyncIterator[HubLink]:
    task = asyncio.ensure_future(link.run())
    try:
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_agent_reconnects_with_growing_jittered_delays_and_starts_over() -> None:
    hub = FakeHub(refuse=3)
    server, port = await serve({CONNECT_PATH: hub.opened})
    delays: list[int] = []

    def delay(attempt: int, low: float, high: float) -> float:
        delays.append(attempt)
        return 0.0

    said: list[str] = []
    link = HubLink(f"ws://127.0.0.1:{port}", lambda: None, ("127.0.0.1", 9), "kiosk-1",
                   settings=FAST, say=said.append, delay=delay)
    async with running(link):
        await asyncio.wait_for(link.connected.wait(), 10)
        assert delays == [0, 1, 2]     # three refusals, each waited a longer draw
        assert any("refused by the hub" in line and "not yet" in line for line in said)
        hub.sessions[0].close(Reason.SHUTDOWN, "restarting")
        await wait_until(lambda: len(hub.sessions) == 2)
        assert delays == [0, 1, 2, 0]  # a connection that was up starts the count over
        assert said[-1] == "hub connection 1: connected (hub node hub-a)"
    server.close()


async def test_a_stream_the_hub_opens_reaches_the_agents_own_proxy() -> None:
    proxy, proxy_port = await echo_server()
    hub = FakeHub(refuse=0)
    server, port = await serve({CONNECT_PATH: hub.opened})
    link = HubLink(f"ws://127.0.0.1:{port}", lambda: None, ("127.0.0.1", proxy_port),
                   "kiosk-1", settings=FAST, say=lambda line: None)
    async with running(link):
        await asyncio.wait_for(link.connected.wait(), 10)
        connections = AgentConnections()
        connections.add("kiosk-1", hub.sessions[0])
        dialer = MuxDialer(DeviceSessions(connections, "kiosk-1"))
        received: asyncio.Queue[bytes] = asyncio.Queue()

        class Collect(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.put_nowait(bytes(data))

        transport, _ = await dialer.connect("ignored.example", 1, Collect)
        transport.write(b"RFB through the hub")
        assert await asyncio.wait_for(received.get(), 5) == b"RFB through the hub"
        transport.close()
    server.close()
    proxy.close()


async def test_renewal_replaces_idle_connections() -> None:
    hub = FakeHub(refuse=0)
    server, port = await serve({CONNECT_PATH: hub.opened})
    link = HubLink(f"ws://127.0.0.1:{port}", lambda: None, ("127.0.0.1", 9), "kiosk-1",
                   settings=FAST, say=lambda line: None)
    async with running(link):
        await wait_until(lambda: len(hub.sessions) == 1)
        link.renewed()
        await wait_until(lambda: len(hub.sessions) == 2)
        assert hub.sessions[0].goaway == (Reason.SHUTDOWN, "the device certificate was renewed")
    server.close()


# -- the registry ------------------------------------------------------------------------------
async def test_the_registry_names_the_node_and_forgets_only_its_own_entry(
        ephemeral_store: EphemeralStore) -> None:
    node_a = DialOutRegistry(ephemeral_store, "hub-a:1")
    node_b = DialOutRegistry(ephemeral_store, "hub-b:2")
    assert await node_a.holder("kiosk-1") is None
    await node_a.record("kiosk-1", 2)
    assert await node_b.holder("kiosk-1") == "hub-a:1"
    await node_b.forget("kiosk-1")      # b does not hold it: a's entry stays
    assert await node_a.holder("kiosk-1") == "hub-a:1"
    await node_a.forget("kiosk-1")
    assert await node_b.holder("kiosk-1") is None


async def test_an_entry_no_node_refreshes_expires(clock: FakeClock) -> None:
    from portcullis.store.ephemeral import MemoryStore

    registry = DialOutRegistry(MemoryStore(clock=clock), "hub-a:1")
    await registry.record("kiosk-1", 1)
    clock.advance(14)
    assert await registry.holder("kiosk-1") == "hub-a:1"
    clock.advance(2)
    assert await registry.holder("kiosk-1") is None


async def test_a_channel_waits_briefly_for_a_reconnecting_agent() -> None:
    connections = AgentConnections(wait=5.0)
    assert connections.pick("kiosk-1") is None
    waiting = asyncio.ensure_future(connections.session("kiosk-1"))
    await asyncio.sleep(0.05)
    hub = FakeHub(refuse=0)
    server, port = await serve({CONNECT_PATH: hub.opened})
    link = HubLink(f"ws://127.0.0.1:{port}", lambda: None, ("127.0.0.1", 9), "kiosk-1",
                   settings=FAST, say=lambda line: None)
    async with running(link):
        await wait_until(lambda: len(hub.sessions) == 1)
        connections.add("kiosk-1", hub.sessions[0])
        assert await asyncio.wait_for(waiting, 5) is hub.sessions[0]
    server.close()
    assert await AgentConnections(wait=0.0).session("kiosk-1") is None


# -- the hub's endpoints -------------------------------------------------------------------------
@dataclass
class Hub:
    world: World
    connections: AgentConnections
    registry: DialOutRegistry
    port: int           # the hub's real endpoints
    agent_port: int     # where this test's agents connect (no TLS: see the fixture)

    def state(self, token: str) -> ClientState:
        return ClientState(f"http://127.0.0.1:{self.port}", "helen", token, None)


@pytest.fixture
async def hub(world: World, ephemeral_store: EphemeralStore,  # noqa: F811
              tmp_path: Any) -> AsyncIterator[Hub]:
    connections = AgentConnections(wait=0.2)
    registry = DialOutRegistry(ephemeral_store, "hub-a:1")
    audit = AuditTrail(world.audit_path, echo=False)
    agents = AgentEndpoint(world.hub, connections, registry, audit, Timers())
    channels = ChannelEndpoint(world.hub, world.sessions, connections, registry, audit,
                               Timers())
    # The agents here connect without TLS (the e2e test presents real certificates), so
    # the carrying tests attach the agent's connection to the pool themselves.
    agent_hub = FakeHub(refuse=0, on_session=lambda session: connections.add("kiosk-1",
                                                                             session))
    server, port = await serve({CONNECT_PATH: agents.opened, CHANNEL_PATH: channels.opened})
    agent_server, agent_port = await serve({CONNECT_PATH: agent_hub.opened})
    yield Hub(world, connections, registry, port, agent_port)
    server.close()
    agent_server.close()


async def test_an_agent_without_a_device_certificate_is_turned_away(hub: Hub) -> None:
    said: list[str] = []
    link = HubLink(f"ws://127.0.0.1:{hub.port}", lambda: None, ("127.0.0.1", 9), "kiosk-1",
                   settings=FAST, say=said.append)
    async with running(link):
        await wait_until(lambda: len(hub.world.audited("shadow.dialout_refused")) >= 1)
        await wait_until(lambda: any("present the device certificate" in line
                                     for line in said))
    assert not link.connected.is_set()


async def test_the_channel_carries_the_consoles_bytes_to_the_device(hub: Hub) -> None:
    await hub.world.device()
    proxy, proxy_port = await echo_server()
    link = HubLink(f"ws://127.0.0.1:{hub.agent_port}", lambda: None,
                   ("127.0.0.1", proxy_port), "kiosk-1", settings=FAST, say=lambda line: None)
    token, session = await hub.world.operator()
    answer = await hub.world.hub.issue(session, {"device": "kiosk-1", "csr": csr()}, "x")
    async with running(link):
        await asyncio.wait_for(link.connected.wait(), 10)
        carried = await carry_to_device(hub.state(token), answer["request_id"], "kiosk-1")
        reader, writer = await asyncio.open_connection(sock=carried.socket)
        writer.write(b"PSH1 and then RFB")
        assert await asyncio.wait_for(reader.readexactly(17), 5) == b"PSH1 and then RFB"
        writer.close()
        carried.close()
    record = (await wait_for_audit(hub, "shadow.dialout_channel"))[0]
    assert record["device"] == "kiosk-1" and record["operator"] == "helen"
    # Not spent: the device spends the request when it verifies it.
    assert await hub.world.hub.issued(answer["request_id"]) is not None
    proxy.close()


async def wait_for_audit(hub: Hub, event: str) -> list[dict[str, Any]]:
    await wait_until(lambda: bool(hub.world.audited(event)))
    return hub.world.audited(event)


async def test_a_request_of_another_sign_in_is_refused(hub: Hub) -> None:
    await hub.world.device()
    _, helen = await hub.world.operator()
    answer = await hub.world.hub.issue(helen, {"device": "kiosk-1", "csr": csr()}, "x")
    eve_token, _ = await hub.world.operator("eve")
    with pytest.raises(ClientError, match="no unused shadow request of yours"):
        await carry_to_device(hub.state(eve_token), answer["request_id"], "kiosk-1")
    refused = hub.world.audited("shadow.dialout_channel_refused")
    assert refused[0]["operator"] == "eve"


async def test_a_device_held_by_another_node_is_refused_naming_that_node(hub: Hub) -> None:
    await hub.world.device()
    token, session = await hub.world.operator()
    answer = await hub.world.hub.issue(session, {"device": "kiosk-1", "csr": csr()}, "x")
    await DialOutRegistry(hub.registry._store, "hub-b:7").record("kiosk-1", 2)
    with pytest.raises(ClientError, match="connected to hub node hub-b:7, not to this one"):
        await carry_to_device(hub.state(token), answer["request_id"], "kiosk-1")


async def test_a_device_not_connected_is_refused(hub: Hub) -> None:
    await hub.world.device()
    token, session = await hub.world.operator()
    answer = await hub.world.hub.issue(session, {"device": "kiosk-1", "csr": csr()}, "x")
    with pytest.raises(ClientError, match="device kiosk-1 is not connected to the hub"):
        await carry_to_device(hub.state(token), answer["request_id"], "kiosk-1")


# -- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("listen", ["0.0.0.0:5900", "192.0.2.1:5900", "[::]:5900"])
def test_dial_out_refuses_a_proxy_listening_beyond_loopback(listen: str, tmp_path: Any
                                                            ) -> None:
    from portcullis.cli.shadow_agent import shadow_agent

    result = CliRunner().invoke(shadow_agent, [
        "--hub", "https://hub.example:8445", "--ca", str(tmp_path / "ca.crt"),
        "--dir", str(tmp_path / "agent"), "--dial-out", "--listen", listen])
    assert result.exit_code == 2
    assert "loopback only" in result.output


async def test_a_device_registers_as_dial_out_and_consoles_are_told_so(hub: Hub) -> None:


    await hub.world.durable.add_shadow_device(
        "nat-1", enrolment_code_hash(HASHER, "code-1"),
        dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    answer = await hub.world.hub.register({"name": "nat-1", "certificate": self_signed("nat-1"),
                                           "code": "code-1", "advertise": "dial-out",
                                           "listen_port": 0}, "10.9.8.7")
    assert answer["status"] == "approved"
    _, session = await hub.world.operator()
    issued = await hub.world.hub.issue(session, {"device": "nat-1", "csr": csr()}, "x")
    assert issued["device"]["address"] == "dial-out"
