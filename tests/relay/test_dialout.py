"""The dial-out connector: its reconnect delays (full jitter, bounded, never giving up),
and the edge it refuses to serve (a server presenting another role's certificate)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from pathlib import Path

from conftest import Deployment
from net.test_socksrelay import Impostor
from portcullis.net.backoff import backoff_delay
from portcullis.net.tls import client_context
from portcullis.relay.dialout import DialOutConnector, DialOutSettings
from relay.test_core import audit_lines, make_core

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def test_the_reconnect_delay_is_drawn_up_to_a_doubling_ceiling_capped_at_the_maximum() -> None:
    ceilings = [backoff_delay(attempt, 0.2, 10.0, draw=lambda low, high: high)
                for attempt in range(12)]
    assert ceilings[:4] == [0.2, 0.4, 0.8, 1.6]
    assert ceilings[-1] == 10.0 and max(ceilings) == 10.0
    assert all(backoff_delay(attempt, 0.2, 10.0, draw=lambda low, high: low) == 0.0
               for attempt in range(12))


def test_the_reconnect_delay_stays_finite_after_very_many_attempts() -> None:
    assert 0.0 <= backoff_delay(10_000, 0.2, 10.0) <= 10.0


def switch_to_websocket(request: bytes) -> bytes:
    """An edge's answer to the relay's upgrade request (RFC 6455 section 4.2.2)."""
    key = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", request)
    assert key, request
    accept = base64.b64encode(hashlib.sha1(key.group(1) + WEBSOCKET_GUID).digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


async def test_an_edge_presenting_the_stas_certificate_is_refused_audited_and_never_served(
        deployment: Deployment, tmp_path: Path) -> None:
    pki = deployment.directory / "pki"
    impostor = Impostor(pki, "sta", answer=switch_to_websocket)
    edge = f"https://127.0.0.1:{impostor.port}"
    core = make_core(tmp_path, ["127.0.0.1/32:1-65535"])
    connector = DialOutConnector(
        core, DialOutSettings((edge,), connections=1, handshake_timeout=2),
        client_context(pki / "ca.crt", cert_file=pki / "relay.crt", key_file=pki / "relay.key"))
    running = asyncio.ensure_future(connector.run())
    try:
        async with asyncio.timeout(20):
            while not (refused := [e for e in audit_lines(tmp_path / "audit.log")
                                   if e["event"] == "relay.edge_refused"]):
                await asyncio.sleep(0.05)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await asyncio.to_thread(impostor.close)
    assert (refused[0]["edge"], refused[0]["reason"]) == (edge, "certificate")
    assert "presented the certificate of 'portcullis-sta'" in str(refused[0]["detail"])
    # What the relay sent after the upgrade: one close frame (opcode 8), no mux HELLO.
    assert impostor.received[0] & 0x0F == 0x8
    assert connector.slots[0].session is None
