"""Checks of values that several sections share: addresses and networks. Each raises
ValueError with a message that names the value and says what would be accepted."""

from __future__ import annotations

import ipaddress

# Defined with the network code (the light client needs it without the configuration).
from portcullis.net.addresses import parse_host_port

__all__ = ["check_networks", "parse_host_port"]


def check_networks(value: list[str]) -> list[str]:
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not an IPv4 or IPv6 network") from None
    return value
