"""The relay's counters, in one object that every part of the relay updates: the classic
server, the dial-out connector and `RelayCore`. `/status` and `portcullis relay status`
print `snapshot()`.

Updated once per connection or stream (never per chunk); never logs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RelayStatus:
    """What the relay is doing now, and what it did since it started.

    `edges`: edge identity -> its open connections to (or from) this relay. A classic
    edge holds one TLS connection per relayed connection; a dial-out edge holds the K
    WebSocket connections the relay dialled. `streams`: relayed connections, UDP flows
    and echo channels open now. Bytes count finished streams.
    """

    edges: Counter[str] = field(default_factory=Counter)
    streams: int = 0
    streams_total: int = 0
    bytes_to_edges: int = 0
    bytes_from_edges: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    listening: bool = False

    def edge_connected(self, edge: str) -> None:
        self.edges[edge] += 1

    def edge_disconnected(self, edge: str) -> None:
        self.edges[edge] -= 1
        if self.edges[edge] <= 0:
            del self.edges[edge]

    def stream_opened(self) -> None:
        self.streams += 1
        self.streams_total += 1

    def stream_closed(self, bytes_to_edge: int, bytes_from_edge: int) -> None:
        self.streams -= 1
        self.bytes_to_edges += bytes_to_edge
        self.bytes_from_edges += bytes_from_edge

    def refused(self, reason: str) -> None:
        """Count one refusal under a short reason ("denied", "certificate", ...)."""
        self.refusals[reason] += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "edges": dict(sorted(self.edges.items())),
            "connections": sum(self.edges.values()),
            "streams": self.streams,
            "streams_total": self.streams_total,
            "bytes_to_edges": self.bytes_to_edges,
            "bytes_from_edges": self.bytes_from_edges,
            "refusals": dict(sorted(self.refusals.items())),
        }
