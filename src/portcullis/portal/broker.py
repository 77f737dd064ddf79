"""The resource broker: which published resources a user may see and launch.

Pure: a function of (resources, claims). A resource is for the users it names and the
members of the groups it names; one that names neither is for nobody (default deny).
Decisions carry their reason so that administrators can be told why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from portcullis.config.model import Resource
from portcullis.identity.claims import Claims


@dataclass(frozen=True)
class BrokerDecision:
    allowed: bool
    reason: str
    resource: Resource | None = None


def decide(resource: Resource, claims: Claims) -> BrokerDecision:
    if claims.username in resource.users:
        return BrokerDecision(True, f"user {claims.username} is listed", resource)
    shared = sorted(set(resource.groups) & set(claims.groups))
    if shared:
        return BrokerDecision(True, f"member of group {shared[0]}", resource)
    return BrokerDecision(False, f"{claims.username} is in none of the groups "
                          f"{resource.groups} and not among the users {resource.users}", resource)


def visible_resources(resources: Sequence[Resource], claims: Claims) -> list[Resource]:
    return [resource for resource in resources if decide(resource, claims).allowed]


def authorize_launch(resources: Sequence[Resource], claims: Claims, name: str) -> BrokerDecision:
    resource = next((r for r in resources if r.name == name), None)
    if resource is None:
        return BrokerDecision(False, f"no resource named {name!r}")
    return decide(resource, claims)
