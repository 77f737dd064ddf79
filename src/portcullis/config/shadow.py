"""The `[shadow]` section: the shadow hub (secure VNC shadowing of managed devices).

    [shadow]
    listen = "0.0.0.0:8446"        # where device agents reach the hub (mutual TLS)
    mandatory = true               # devices refuse plain VNC on their port 5900

    [[shadow.device_groups]]
    name = "kiosks"
    devices = ["kiosk-*"]          # device names, shell-style patterns
    consent = "ask"                # none | notify | ask (the device's user is asked)

    [[shadow.policies]]
    name = "helpdesk-kiosks"
    action = "allow"
    groups = ["helpdesk"]
    device_groups = ["kiosks"]     # empty: every device

Who may shadow which device is decided by the first rule whose users/groups and device
groups match (`shadow/decisions.py`); without any rule, members of `admin_groups` may
shadow every device and nobody else may shadow any.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import Field, field_validator, model_validator

from portcullis.config.section import NAME_PATTERN, Section
from portcullis.errors import AuthError
from portcullis.identity.names import canonical_username

Consent = Literal["none", "notify", "ask"]
DEVICE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class DeviceGroup(Section):
    name: str = Field(pattern=NAME_PATTERN)
    devices: list[str] = Field(min_length=1)
    consent: Consent = "none"
    # How long the device's user has to answer a consent question; silence is a no.
    # Bounded below the console's wait for the device's answer (90 s).
    consent_timeout: float = Field(default=30.0, gt=0, le=60)

    @field_validator("devices")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or pattern != pattern.strip().lower():
                raise ValueError(f"{pattern!r}: write device name patterns in lowercase, "
                                 "without spaces (e.g. \"kiosk-*\")")
        return value

    def matches(self, device: str) -> bool:
        return any(fnmatch.fnmatchcase(device, pattern) for pattern in self.devices)


class ShadowRule(Section):
    name: str = Field(pattern=NAME_PATTERN)
    action: Literal["allow", "deny"]
    groups: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    # Empty: every device.
    device_groups: list[str] = Field(default_factory=list)
    description: str = ""

    @field_validator("users")
    @classmethod
    def _users(cls, value: list[str]) -> list[str]:
        try:
            return [canonical_username(user) for user in value]
        except AuthError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _someone(self) -> ShadowRule:
        if not self.groups and not self.users:
            raise ValueError(f"rule {self.name!r} names no groups and no users: say whom "
                             "it is for (groups = [...] or users = [...])")
        return self


class ShadowSettings(Section):
    # Device agents' port on the hub (mutual TLS with the devices' own certificates).
    listen: str = "0.0.0.0:8446"
    # Devices accept only the TLS channel; a plain VNC viewer is told why it is refused.
    mandatory: bool = False
    # A signed request is good for this long, and once (the bound: 60 s).
    request_lifetime: int = Field(default=60, ge=5, le=60)
    # A one-time enrolment code (`portcullis shadow device add`) is good for this long.
    enrolment_code_lifetime: float = Field(default=86400.0, gt=0, le=30 * 86400)
    # Agents report in this often; the hub's answer carries `mandatory` (the push).
    heartbeat: float = Field(default=30.0, ge=1, le=3600)
    # The console proxy's certificate, issued per request, lives this long.
    console_certificate_lifetime: float = Field(default=300.0, ge=60, le=3600)
    device_groups: list[DeviceGroup] = Field(default_factory=list)
    policies: list[ShadowRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> ShadowSettings:
        groups = [group.name for group in self.device_groups]
        if len(set(groups)) != len(groups):
            raise ValueError("device_groups: a device group name is used twice")
        rules = [rule.name for rule in self.policies]
        if len(set(rules)) != len(rules):
            raise ValueError("policies: a rule name is used twice")
        for index, rule in enumerate(self.policies):
            unknown = sorted(set(rule.device_groups) - set(groups))
            if unknown:
                raise ValueError(f"policies[{index}].device_groups: no device group named "
                                 f"{', '.join(map(repr, unknown))} (define it under "
                                 "[[shadow.device_groups]])")
        return self

    def groups_of(self, device: str) -> list[DeviceGroup]:
        """The device groups a device belongs to, in the order they are written."""
        return [group for group in self.device_groups if group.matches(device)]
