"""Access policy of the SSL VPN: ordered allow/deny rules, first match wins, default deny.

`model` validates the rules as written in portcullis.toml; `engine` decides one stream
and says why. Nothing here resolves names, does I/O or logs.
"""

from portcullis.policy.engine import (
    DEFAULT_DENY,
    AccessPolicy,
    Destination,
    PolicyDecision,
    RuleCheck,
    Subject,
)
from portcullis.policy.model import PolicyRule, check_unique_names

__all__ = [
    "DEFAULT_DENY",
    "AccessPolicy",
    "Destination",
    "PolicyDecision",
    "PolicyRule",
    "RuleCheck",
    "Subject",
    "check_unique_names",
]
