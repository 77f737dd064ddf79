"""The broker and the redirect rule are pure: tested as tables."""

from __future__ import annotations

import pytest

from portcullis.config.model import Resource
from portcullis.identity.claims import Claims
from portcullis.portal.broker import authorize_launch, visible_resources
from portcullis.portal.redirects import safe_next

RESOURCES = [
    Resource(name="wiki", title="Wiki", address="wiki:80", groups=["staff"]),
    Resource(name="ledger", title="Ledger", address="ledger:443", groups=["finance"]),
    Resource(name="lab", title="Lab", address="lab:22", users=["carol"]),
    Resource(name="orphan", title="Orphan", address="o:1"),
]


def claims(user: str, *groups: str) -> Claims:
    return Claims(sub=f"local:{user}", username=user, groups=groups)


@pytest.mark.parametrize(("who", "expected"), [
    (claims("alice", "staff"), ["wiki"]),
    (claims("bob", "finance", "staff"), ["wiki", "ledger"]),
    (claims("carol"), ["lab"]),
    (claims("dave", "Staff"), []),  # group names are exact
])
def test_broker_lists_only_what_the_user_may_use(who: Claims, expected: list[str]) -> None:
    assert [r.name for r in visible_resources(RESOURCES, who)] == expected


def test_resource_without_groups_or_users_is_for_nobody() -> None:
    decision = authorize_launch(RESOURCES, claims("admin", "admins", "staff"), "orphan")
    assert not decision.allowed


def test_launch_decision_says_why() -> None:
    allowed = authorize_launch(RESOURCES, claims("alice", "staff"), "wiki")
    denied = authorize_launch(RESOURCES, claims("alice", "staff"), "ledger")
    missing = authorize_launch(RESOURCES, claims("alice", "staff"), "nope")
    assert allowed.allowed and "staff" in allowed.reason
    assert not denied.allowed and "finance" in denied.reason
    assert not missing.allowed and missing.resource is None


@pytest.mark.parametrize(("target", "expected"), [
    ("/", "/"), ("/launch/x?y=1", "/launch/x?y=1"), (None, "/"), ("", "/"),
    ("//evil.example/", "/"), ("/\\evil.example", "/"), ("https://evil.example/", "/"),
    ("javascript:alert(1)", "/"), ("/ok\r\nSet-Cookie: x", "/"),
])
def test_post_login_redirects_only_to_same_origin_paths(target: str | None,
                                                        expected: str) -> None:
    assert safe_next(target) == expected
