"""What `portcullis shadow device …` does on the hub's host: devices added, listed,
approved and removed in the durable store, each audited. A removed device is refused by
every hub node at its next call, and its running shadow sessions end within a second
(the hub's session watches read the durable store)."""

from __future__ import annotations

import datetime as dt
import re
import secrets

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.config.shadow import DEVICE_NAME_PATTERN
from portcullis.errors import ConfigError, NotFoundError
from portcullis.shadow.hub import enrolment_code_hash
from portcullis.store import DurableStore, ShadowDeviceRecord
from portcullis.tokens import TokenHasher

_DEVICE_NAME = re.compile(DEVICE_NAME_PATTERN)
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


class DeviceAdministration:
    def __init__(self, settings: Settings, durable: DurableStore, administrator: str) -> None:
        self._settings = settings
        self._durable = durable
        self._administrator = administrator
        self._audit = AuditTrail(settings.path(settings.log.audit_file), echo=False)

    def close(self) -> None:
        self._audit.close()

    async def add(self, name: str) -> str:
        """Add a device; return its one-time enrolment code (shown once, kept hashed)."""
        if not _DEVICE_NAME.fullmatch(name):
            raise ConfigError(f"{name!r} is not a device name: 1-63 lowercase letters, "
                              "digits, '.', '-' or '_', starting with a letter or digit")
        code = secrets.token_urlsafe(18)
        hasher = TokenHasher.from_directory(self._settings.path(self._settings.secrets_dir))
        lifetime = self._settings.shadow.enrolment_code_lifetime
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime)
        # A name taken by a device merely waiting for approval (anyone may register one)
        # is the administrator's to give: the pending registration goes.
        replaced = await self._durable.shadow_device(name)
        if replaced is not None and replaced.status == "pending":
            await self._durable.remove_shadow_device(name)
        await self._durable.add_shadow_device(name, enrolment_code_hash(hasher, code), expires)
        self._audit.record("shadow.device_added", device=name, by=self._administrator,
                           replaced_pending=replaced.fingerprint
                           if replaced is not None and replaced.status == "pending" else None)
        return code

    async def approve(self, name: str, fingerprint: str) -> None:
        fingerprint = fingerprint.strip().lower()
        if not _FINGERPRINT.fullmatch(fingerprint):
            raise ConfigError(f"{fingerprint!r} is not a fingerprint: give the sha256:… the "
                              "agent printed")
        if not await self._durable.approve_shadow_device(name, fingerprint,
                                                         self._administrator):
            record = await self._durable.shadow_device(name)
            why = ("no device of that name" if record is None
                   else f"it is {record.status}, not pending" if record.status != "pending"
                   else "its agent registered another certificate "
                        f"({record.fingerprint}): compare with what the agent printed")
            self._audit.record("shadow.approval_refused", device=name,
                               fingerprint=fingerprint, by=self._administrator, reason=why)
            raise NotFoundError(f"device {name!r} not approved: {why}")
        self._audit.record("shadow.device_approved", device=name, fingerprint=fingerprint,
                           by=self._administrator)

    async def remove(self, name: str) -> None:
        if not await self._durable.remove_shadow_device(name):
            raise NotFoundError(f"no device named {name!r}")
        self._audit.record("shadow.device_removed", device=name, by=self._administrator)

    async def list(self) -> list[ShadowDeviceRecord]:
        return await self._durable.shadow_devices()
