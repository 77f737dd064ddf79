"""Who may shadow which device: the `[[shadow.policies]]` rules over device groups and
user groups, as a pure function that returns its reason. The hub decides with it when an
operator asks and again when the device asks, and `portcullis policy explain --shadow`
prints the same decision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from portcullis.config.shadow import Consent, ShadowSettings
from portcullis.policy.engine import Subject

_STRICTNESS: dict[Consent, int] = {"none": 0, "notify": 1, "ask": 2}


@dataclass(frozen=True)
class ShadowDecision:
    allowed: bool
    rule: str | None          # the rule that decided; None for the default
    reason: str
    device_groups: tuple[str, ...] = ()
    consent: Consent = "none"
    consent_timeout: float = 30.0


def may_shadow(settings: ShadowSettings, admin_groups: Sequence[str], operator: Subject,
               device: str) -> ShadowDecision:
    groups = settings.groups_of(device)
    names = tuple(group.name for group in groups)
    # Of several groups' consent settings the strictest applies, with the shortest wait.
    consent: Consent = max((group.consent for group in groups), key=_STRICTNESS.__getitem__,
                           default="none")
    timeout = min((group.consent_timeout for group in groups), default=30.0)

    def decided(allowed: bool, rule: str | None, reason: str) -> ShadowDecision:
        return ShadowDecision(allowed, rule, reason, names, consent, timeout)

    in_groups = f"device groups {', '.join(names)}" if names else "no device group"
    for rule in settings.policies:
        who = (operator.username in rule.users
               or bool(operator.groups & set(rule.groups)))
        where = not rule.device_groups or bool(set(rule.device_groups) & set(names))
        if who and where:
            verb = "allows" if rule.action == "allow" else "denies"
            return decided(rule.action == "allow", rule.name,
                           f"shadow rule {rule.name!r} {verb} {operator.username} on "
                           f"{device} ({in_groups})")
    if settings.policies:
        return decided(False, None, f"no shadow rule lets {operator.username} shadow "
                                    f"{device} ({in_groups}); nothing matched: denied")
    admins = sorted(operator.groups & set(admin_groups))
    if admins:
        return decided(True, None, f"no [[shadow.policies]] are written: administrators "
                                   f"(group {admins[0]}) may shadow every device")
    return decided(False, None, "no [[shadow.policies]] are written: only administrators "
                                f"({', '.join(admin_groups)}) may shadow devices")
