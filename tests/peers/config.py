"""`[[auth.providers]]` entries for the real peers, as the dict that Settings validates
and as the TOML a deployment's portcullis.toml holds (tests/peers/ldap.py and
tests/peers/radius.py build them; this renders them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    """A TOML literal for a string, path, number, boolean, list or (inline) table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {toml_value(item)}"
                                for key, item in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def provider_toml(provider: dict[str, Any]) -> str:
    """`provider` as a `[[auth.providers]]` table, one key a line. A key whose value is
    None is left out: TOML has no null, and an absent key is what None means."""
    lines = ["[[auth.providers]]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in provider.items()
              if value is not None]
    return "\n".join(lines) + "\n"
