"""Whether a signed request a device forwarded is genuine and meant for that device and
that console, now: a pure function that returns its reason. It reads no store and no
clock: the hub gives it what it read, and audits what it returns. (Who may shadow which
device is `portcullis.policy.shadow.may_shadow`.)"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from portcullis.proto.shadow import SignedRequest

# How far a request's issue time may lie ahead of the hub's clock (several hub nodes).
CLOCK_SKEW = 5


@dataclass(frozen=True)
class Verdict:
    ok: bool
    code: str       # for the audit trail: signature, device, device-certificate, ...
    reason: str     # for the operator (through the device's REFUSE)


def check_request(signed: SignedRequest, hub_keys: Mapping[str, Ed25519PublicKey], *,
                  device: str, device_fingerprint: str, console_fingerprint: str,
                  now: int) -> Verdict:
    """Whether `device` (as its mutual TLS proved it) may honour this request from the
    console whose certificate has `console_fingerprint`. Single use is the caller's:
    it spends the request in the ephemeral store after this says yes."""
    request = signed.request
    key = hub_keys.get(request.key_id)
    if key is None or not signed.signature_valid(key):
        return Verdict(False, "signature", "the shadow request was not signed by this "
                                           "hub's key")
    if request.device != device:
        return Verdict(False, "device", f"the shadow request is for device "
                                        f"{request.device!r}, not {device!r}")
    if request.device_fingerprint != device_fingerprint:
        return Verdict(False, "device-certificate", "the shadow request names another "
                                                    "certificate of this device")
    if request.console_fingerprint != console_fingerprint:
        return Verdict(False, "console-certificate", "the shadow request was issued to "
                                                     "another console certificate")
    if now >= request.expires_at:
        return Verdict(False, "expired", f"the shadow request expired "
                                         f"{now - request.expires_at + 1} s ago; ask again")
    if request.issued_at > now + CLOCK_SKEW:
        return Verdict(False, "not-yet-valid", "the shadow request was issued in the "
                                               "future: check the hubs' clocks")
    return Verdict(True, "ok", "genuine")
