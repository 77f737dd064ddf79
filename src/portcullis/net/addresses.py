"""HOST:PORT as people write it, for listeners and peers alike. Here rather than in
`config/` so that the light client (`portcullis-client`), which has no configuration
file and no pydantic, parses its --listen options with the same rule as the servers."""

from __future__ import annotations

import re


def parse_host_port(value: str, *, what: str = "address",
                    any_port: bool = False) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port"; raise ValueError with a message a user can act on.

    `any_port` admits port 0, "any free port", for listeners the OS may choose.
    """
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", value)
    if not match:
        raise ValueError(f"{what} must be HOST:PORT (IPv6 as [ADDR]:PORT), got {value!r}")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not (0 if any_port else 1) <= port < 65536:
        raise ValueError(f"port must be 1-65535, got {port}")
    return host, port
