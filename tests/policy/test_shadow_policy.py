"""Who may shadow which device: the decision table of `may_shadow`."""

from __future__ import annotations

import pytest

from portcullis.config.shadow import ShadowSettings
from portcullis.policy.engine import Subject
from portcullis.policy.shadow import may_shadow

SETTINGS = ShadowSettings.model_validate({
    "device_groups": [
        {"name": "kiosks", "devices": ["kiosk-*"], "consent": "notify"},
        {"name": "finance", "devices": ["fin-*", "kiosk-fin*"], "consent": "ask",
         "consent_timeout": 20},
    ],
    "policies": [
        {"name": "no-contractors", "action": "deny", "groups": ["contractors"]},
        {"name": "helpdesk-kiosks", "action": "allow", "groups": ["helpdesk"],
         "device_groups": ["kiosks"]},
        {"name": "carol-everywhere", "action": "allow", "users": ["Carol"]},
    ],
})


def who(name: str, *groups: str) -> Subject:
    return Subject(name, frozenset(groups))


@pytest.mark.parametrize(("operator", "device", "allowed", "rule"), [
    (who("ann", "helpdesk"), "kiosk-3", True, "helpdesk-kiosks"),
    (who("ann", "helpdesk"), "fin-1", False, None),
    (who("ann", "helpdesk", "contractors"), "kiosk-3", False, "no-contractors"),
    (who("carol"), "fin-1", True, "carol-everywhere"),
    (who("bob", "admins"), "kiosk-3", False, None),   # rules written: no admin default
])
def test_the_first_matching_rule_decides(operator: Subject, device: str, allowed: bool,
                                         rule: str | None) -> None:
    decision = may_shadow(SETTINGS, ["admins"], operator, device)
    assert (decision.allowed, decision.rule) == (allowed, rule)
    assert device in decision.reason


def test_the_strictest_consent_of_the_device_groups_applies() -> None:
    decision = may_shadow(SETTINGS, [], who("carol"), "kiosk-fin2")
    assert decision.device_groups == ("kiosks", "finance")
    assert (decision.consent, decision.consent_timeout) == ("ask", 20)
    assert may_shadow(SETTINGS, [], who("carol"), "pc-1").consent == "none"


def test_without_rules_administrators_only() -> None:
    empty = ShadowSettings()
    assert may_shadow(empty, ["admins"], who("bob", "admins"), "any").allowed
    refused = may_shadow(empty, ["admins"], who("eve", "staff"), "any")
    assert not refused.allowed and "only administrators" in refused.reason


@pytest.mark.parametrize(("raw", "message"), [
    ({"policies": [{"name": "x", "action": "allow", "groups": ["a"],
                    "device_groups": ["nope"]}]}, "no device group named 'nope'"),
    ({"policies": [{"name": "x", "action": "allow"}]}, "names no groups and no users"),
    ({"device_groups": [{"name": "k", "devices": ["Kiosk *"]}]}, "lowercase"),
    ({"request_lifetime": 61}, "less than or equal to 60"),
    ({"device_groups": [{"name": "k", "devices": ["a"], "consent": "maybe"}]}, "consent"),
])
def test_a_broken_section_says_what_is_wrong(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShadowSettings.model_validate(raw)
