"""The one normalised claim set every provider's answer becomes, kept with the session."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Claims:
    sub: str
    username: str
    groups: tuple[str, ...] = ()
    idp: str = "local"
    amr: tuple[str, ...] = ()
    auth_time: float = field(default_factory=time.time)
    display_name: str | None = None
    email: str | None = None
    upn: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claims:
        return cls(**{**data, "groups": tuple(data.get("groups", ())),
                      "amr": tuple(data.get("amr", ()))})
