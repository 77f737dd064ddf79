"""One table of admission cases, driving three tests: the pure decision
(tests/policy/test_admission.py), `policy explain` (the same file, and the CLI), and the
real gateway tunnel (tests/e2e/test_admission_e2e.py) for the rows marked live.

Placeholders, filled by each driver: {own} is an address of the gateway host's own
interfaces and {own_net} the /30 it sits in (the pure test uses 198.18.7.1; the gateway
test the host side of a veth pair it creates), {port} a port a test listener serves on
{own} and on 127.0.0.1, {redis} the port of the real Redis on 127.0.0.1. Live rows touch
only loopback and {own}: link-local, multicast and metadata addresses stay in the pure
table, so no test sends a packet elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Users and the group that gives each one rule set. The rules apply in this order.
USERS = {
    "hannah": "hosts",     # only `hosts` rules
    "alice": "all",        # an allow rule with no destination ("any destination")
    "wendy": "wide",       # 0.0.0.0/0 and ::/0: everything, but nothing named
    "lou": "loop",         # networks = ["127.0.0.0/8"]: loopback, named explicitly
    "olga": "own",         # networks = ["{own}/32"]: the gateway's own address, named
    "lena": "lab",         # the /30 around {own}: wider than the own address
    "cleo": "cloud",       # networks = ["169.254.169.254/32"]: the metadata address, named
    "bob": "finance",      # no rule at all
}

POLICIES = """
[[policies]]
name = "no-ssh"
action = "deny"
ports = ["22"]

[[policies]]
name = "lab-hosts"
action = "allow"
groups = ["hosts"]
hosts = ["localhost", "*.corp.example"]

[[policies]]
name = "everything"
action = "allow"
groups = ["all"]

[[policies]]
name = "wide"
action = "allow"
groups = ["wide"]
networks = ["0.0.0.0/0", "::/0"]

[[policies]]
name = "loopback"
action = "allow"
groups = ["loop"]
networks = ["127.0.0.0/8"]

[[policies]]
name = "own-address"
action = "allow"
groups = ["own"]
networks = ["{own}/32"]

[[policies]]
name = "lab-net"
action = "allow"
groups = ["lab"]
networks = ["{own_net}"]

[[policies]]
name = "metadata"
action = "allow"
groups = ["cloud"]
networks = ["169.254.169.254/32"]
"""

LOOPBACK_TOLD = "the gateway host is never a destination"


@dataclass(frozen=True)
class Row:
    user: str
    asked: str
    port: int | str                  # a number, or "{port}" (the test listener's)
    allowed: bool
    reason: str                      # a substring of the decision's reason
    resolved: tuple[str, ...] = ()   # what the name resolves to (pure and explain drivers)
    dials: str | None = None         # the address dialled, when allowed
    told: str = ""                   # a substring of what the client is told, when refused
    protocol: Literal["tcp", "udp", "icmp"] = "tcp"
    live: bool = False               # also run through the real gateway

    @property
    def id(self) -> str:
        return f"{self.user}-{self.asked}:{self.port}/{self.protocol}"


ROWS: tuple[Row, ...] = (
    # --- hosts rules: a name admitted only at addresses that pass the check ------------
    Row("hannah", "localhost", "{port}", False, "127.0.0.1 is the gateway host's loopback",
        ("127.0.0.1",), told=LOOPBACK_TOLD, live=True),
    Row("hannah", "localhost", "{port}", False, "names it only by host name",
        ("::1", "127.0.0.1"), told=LOOPBACK_TOLD),
    Row("hannah", "127.0.0.1", "{port}", False, "default deny",
        told="no rule allows it (default deny)", live=True),
    Row("hannah", "wiki.corp.example", 443, True, 'allowed by rule "lab-hosts"',
        ("10.1.2.3",), dials="10.1.2.3"),
    Row("hannah", "metadata.corp.example", 80, False, "169.254.169.254 is link-local",
        ("169.254.169.254",), told="link-local addresses are never a destination"),
    Row("hannah", "mixed.corp.example", 443, True, "10.1.2.3 dialled, not the others",
        ("127.0.0.1", "10.1.2.3"), dials="10.1.2.3"),
    Row("hannah", "rebound.corp.example", 443, False,
        "{own} is an address of the gateway host's own interfaces", ("{own}",),
        told=LOOPBACK_TOLD),
    Row("hannah", "mapped.corp.example", 443, False, "127.0.0.2 is the gateway host's loopback",
        ("::ffff:127.0.0.2",), told=LOOPBACK_TOLD),
    # --- an allow rule with no destination: "any destination" is not a choice -----------
    Row("alice", "127.0.0.1", "{port}", False, 'rule "everything" allows any destination',
        told=LOOPBACK_TOLD, live=True),
    Row("alice", "127.0.0.1", "{redis}", False, "127.0.0.1 is the gateway host's loopback",
        told=LOOPBACK_TOLD, live=True),
    Row("alice", "localhost", "{redis}", False, "is the gateway host's loopback",
        ("127.0.0.1",), told=LOOPBACK_TOLD, live=True),
    Row("alice", "127.9.8.7", "{port}", False, "127.9.8.7 is the gateway host's loopback",
        told=LOOPBACK_TOLD, live=True),
    Row("alice", "::ffff:127.0.0.1", "{port}", False, "127.0.0.1 is the gateway host's loopback",
        told=LOOPBACK_TOLD, live=True),
    Row("alice", "::1", "{port}", False, "::1 is the gateway host's loopback",
        told=LOOPBACK_TOLD, live=True),
    Row("alice", "{own}", "{port}", False, "an address of the gateway host's own interfaces",
        told=LOOPBACK_TOLD, live=True),
    Row("alice", "0.0.0.0", "{port}", False, "unspecified address", told=LOOPBACK_TOLD,
        live=True),
    Row("alice", "::", "{port}", False, "unspecified address", told=LOOPBACK_TOLD),
    Row("alice", "169.254.169.254", 80, False, "169.254.169.254 is link-local",
        told="link-local addresses are never a destination"),
    Row("alice", "fe80::1", 80, False, "fe80::1 is link-local",
        told="link-local addresses are never a destination"),
    Row("alice", "fe80::1%eth0", 80, False, "is link-local",
        told="link-local addresses are never a destination"),
    Row("alice", "224.0.0.251", 5353, False, "multicast", protocol="udp",
        told="multicast addresses are never a destination"),
    Row("alice", "255.255.255.255", 9, False, "broadcast", protocol="udp",
        told="broadcast address is never a destination"),
    Row("alice", "127.0.0.1", 0, False, "127.0.0.1 is the gateway host's loopback",
        protocol="icmp", told=LOOPBACK_TOLD),
    Row("alice", "127.0.0.1", 53, False, "127.0.0.1 is the gateway host's loopback",
        protocol="udp", told=LOOPBACK_TOLD),
    Row("alice", "10.1.2.3", 443, True, 'allowed by rule "everything"', dials="10.1.2.3"),
    Row("alice", "10.1.2.3", 22, False, 'denied by rule "no-ssh"',
        told='denied by rule "no-ssh"'),
    Row("alice", "127.0.0.1", 22, False, 'denied by rule "no-ssh"',
        told='denied by rule "no-ssh"', live=True),
    # --- 0.0.0.0/0 covers the gateway host but does not name it ----------------------------
    Row("wendy", "127.0.0.1", "{port}", False, "covers it only by 0.0.0.0/0",
        told=LOOPBACK_TOLD, live=True),
    Row("wendy", "::1", "{port}", False, "covers it only by ::/0", told=LOOPBACK_TOLD),
    Row("wendy", "{own}", "{port}", False, "covers it only by 0.0.0.0/0", told=LOOPBACK_TOLD,
        live=True),
    Row("wendy", "10.1.2.3", 443, True, 'allowed by rule "wide"', dials="10.1.2.3"),
    # --- networks = ["127.0.0.0/8"]: the administrator's informed choice --------------------
    Row("lou", "127.0.0.1", "{port}", True, 'allowed by rule "loopback"', dials="127.0.0.1",
        live=True),
    Row("lou", "127.0.0.1", "{redis}", True, 'allowed by rule "loopback"', dials="127.0.0.1",
        live=True),
    Row("lou", "localhost", "{port}", True, 'allowed by rule "loopback"', ("127.0.0.1",),
        dials="127.0.0.1", live=True),
    Row("lou", "localhost", "{port}", True, 'allowed by rule "loopback"',
        ("::1", "127.0.0.1"), dials="127.0.0.1"),
    Row("lou", "::ffff:127.0.0.1", "{port}", True, 'allowed by rule "loopback"',
        dials="127.0.0.1", live=True),
    Row("lou", "127.0.0.1", 22, False, 'denied by rule "no-ssh"', told='"no-ssh"'),
    Row("lou", "::1", "{port}", False, "default deny", told="default deny"),
    Row("lou", "{own}", "{port}", False, "default deny", told="default deny", live=True),
    Row("lou", "127.0.0.1", 0, True, 'allowed by rule "loopback"', protocol="icmp",
        dials="127.0.0.1"),
    # --- the gateway's own address, named and merely covered ------------------------------
    Row("olga", "{own}", "{port}", True, 'allowed by rule "own-address"', dials="{own}",
        live=True),
    Row("olga", "127.0.0.1", "{port}", False, "default deny", told="default deny", live=True),
    Row("lena", "{own}", "{port}", False, "covers it only by {own_net}", told=LOOPBACK_TOLD),
    # --- the metadata address, named --------------------------------------------------------
    Row("cleo", "169.254.169.254", 80, True, 'allowed by rule "metadata"',
        dials="169.254.169.254"),
    Row("cleo", "169.254.169.253", 80, False, "default deny", told="default deny"),
    # --- no rule ----------------------------------------------------------------------------
    Row("bob", "127.0.0.1", "{port}", False, "default deny", told="default deny"),
    Row("bob", "localhost", "{port}", False, "default deny", told="default deny"),
)


def fill(text: str, own: str, own_net: str, port: int, redis: int = 6379) -> str:
    return (text.replace("{own_net}", own_net).replace("{own}", own)
            .replace("{port}", str(port)).replace("{redis}", str(redis)))
