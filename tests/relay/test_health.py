"""The relay's health app and counters: what /health, /ready and /status answer."""

from __future__ import annotations

import httpx

from portcullis.relay.health import health_app
from portcullis.relay.status import RelayStatus


async def get(status: RelayStatus, reasons: list[str], path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=health_app(status, lambda: reasons))
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        return await client.get(path)


async def test_ready_answers_503_with_the_reasons_until_the_relay_can_serve() -> None:
    status = RelayStatus()
    assert (await get(status, [], "/health")).status_code == 200
    refused = await get(status, ["no edge is connected"], "/ready")
    assert refused.status_code == 503
    assert "no edge is connected" in refused.text
    assert (await get(status, [], "/ready")).status_code == 200


async def test_status_counts_edges_streams_bytes_and_refusals() -> None:
    status = RelayStatus()
    status.edge_connected("portcullis-gateway@192.0.2.5")
    status.edge_connected("portcullis-gateway@192.0.2.5")
    status.edge_connected("portcullis-gateway@192.0.2.6")
    status.edge_disconnected("portcullis-gateway@192.0.2.6")
    status.stream_opened()
    status.stream_opened()
    status.stream_closed(100, 20)
    status.refused("denied")
    status.refused("certificate")
    status.refused("denied")
    answer = (await get(status, [], "/status")).json()
    assert answer == {
        "ready": True, "reasons": [],
        "edges": {"portcullis-gateway@192.0.2.5": 2}, "connections": 2,
        "streams": 1, "streams_total": 2, "bytes_to_edges": 100, "bytes_from_edges": 20,
        "refusals": {"certificate": 1, "denied": 2}}
