"""Address pools: each tunnel gets its own intranet IP, and the gateway sources that
tunnel's outbound connections from it, so servers see the user rather than the gateway.

Leases live in the ephemeral store (`put_new` is atomic), so several gateway nodes
sharing Redis never hand out one address twice; a lease is renewed while its tunnel
lives and expires if the node holding it dies. Allocation goes round the pool from
where it last stopped, so a released address is the last to be handed out again.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from portcullis.store import EphemeralStore

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
LEASE_SECONDS = 60.0
MAX_SCAN = 65536   # addresses looked at per allocation, however large the pool


@dataclass
class AddressPool:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    store: EphemeralStore
    lease_seconds: float = LEASE_SECONDS
    _next: int = field(default=0, init=False)

    @property
    def _first_and_count(self) -> tuple[int, int]:
        """Usable addresses: an IPv4 network's first and last are not hosts (but a /31's
        are); an IPv6 network's first is the subnet-router anycast address."""
        network = self.network
        if network.version == 4 and network.prefixlen < 31:
            first, count = 1, network.num_addresses - 2
        elif network.version == 6:
            first, count = 1, network.num_addresses - 1
        else:
            first, count = 0, network.num_addresses
        return first, min(count, MAX_SCAN)

    async def allocate(self, holder: str) -> Address | None:
        """A free address leased to `holder`, or None when the pool is full."""
        first, count = self._first_and_count
        base = int(self.network.network_address) + first
        for step in range(count):
            index = (self._next + step) % count
            address = ipaddress.ip_address(base + index)
            if await self.store.put_new(self._key(address), holder.encode(),
                                        self.lease_seconds):
                self._next = index + 1
                return address
        return None

    async def renew(self, address: Address, holder: str) -> bool:
        """Extend the lease; False if it is no longer `holder`'s (it expired)."""
        key = self._key(address)
        if await self.store.get(key) != holder.encode():
            return False
        return await self.store.touch(key, self.lease_seconds)

    async def release(self, address: Address, holder: str) -> None:
        """Give the address back, unless it has meanwhile gone to someone else."""
        key = self._key(address)
        if await self.store.get(key) == holder.encode():
            await self.store.delete(key)

    def _key(self, address: Address) -> str:
        return f"pool:{address}"
