"""Schema of the durable store and the ordered steps that build it.

The tables are declared once, with SQLAlchemy Core, and `MIGRATIONS` is the ordered list of
steps that bring an empty database to that schema. `migrate()` runs on every open: it
records each applied step in `schema_version`, so opening a database twice applies nothing,
and a database at version N gets only the steps after N.

Two processes may open one database at once: the whole run is one transaction that first
takes a lock (a PostgreSQL advisory lock; on SQLite the durable store begins this
transaction IMMEDIATE, which takes the write lock). The second process then waits and finds
nothing left to do.

This module must never drop or rewrite data silently: a step changes the schema forward
only, and a database newer than this code is refused rather than "fixed".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    insert,
    select,
    text,
)

from portcullis.errors import StoreError

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


def _users_columns() -> list[Column[Any]]:
    return [
        Column("id", Integer, primary_key=True),
        Column("name", String(255), nullable=False, unique=True),
        Column("password_hash", String(512), nullable=True),
        Column("disabled", Boolean, nullable=False, default=False),
        Column("created_at", DateTime(timezone=True), nullable=False),
    ]


users = Table(
    "users",
    metadata,
    *_users_columns(),
    # Sessions created before this moment are void (set by disable and password change).
    Column("sessions_valid_after", DateTime(timezone=True), nullable=True),
)

user_groups = Table(
    "user_groups",
    metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("group_name", String(255), nullable=False),
    UniqueConstraint("user_id", "group_name"),
)

# TOTP secrets by identity (realm:user), whoever keeps the account: sealed with AES-GCM
# under a key derived from the deployment's token key, the identity as associated data.
totp_secrets = Table(
    "totp_secrets",
    metadata,
    Column("identity", String(320), primary_key=True),
    Column("sealed_secret", LargeBinary, nullable=False),
    Column("enrolled_at", DateTime(timezone=True), nullable=False),
)

# One-time recovery codes, stored as keyed hashes; used codes keep their row.
recovery_codes = Table(
    "recovery_codes",
    metadata,
    Column("identity", String(320), ForeignKey("totp_secrets.identity", ondelete="CASCADE"),
           nullable=False),
    Column("code_hash", String(128), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("identity", "code_hash"),
)

# At most one enrolment code per identity (auth.totp.enrolment = "code"): a keyed hash,
# single-use (the row goes when it is used) and expiring.
totp_enrolment_codes = Table(
    "totp_enrolment_codes",
    metadata,
    Column("identity", String(320), primary_key=True),
    Column("code_hash", String(128), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

# The OpenID provider's ES256 signing keys (idp/keys.py): the private JWK sealed with
# AES-GCM under a key derived from the token key, the kid as associated data. The
# generation is the primary key, so two nodes making "the next key" at once cannot both.
oidc_signing_keys = Table(
    "oidc_signing_keys",
    metadata,
    Column("generation", Integer, primary_key=True, autoincrement=False),
    Column("kid", String(64), nullable=False, unique=True),
    Column("sealed_jwk", LargeBinary, nullable=False),
    Column("signs_from", DateTime(timezone=True), nullable=False),
)

# Devices registered with the shadow hub (shadow/hub.py). A device added by an
# administrator waits with an enrolment code (a keyed hash, single use, expiring) and no
# certificate; a device that registered without a code waits "pending" with its
# certificate until an administrator approves that certificate's fingerprint.
shadow_devices = Table(
    "shadow_devices",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("certificate", Text, nullable=True),
    Column("fingerprint", String(80), nullable=True, unique=True),
    Column("enrolment_code_hash", String(128), nullable=True),
    Column("code_expires_at", DateTime(timezone=True), nullable=True),
    Column("advertise", String(300), nullable=True),
    Column("first_seen", DateTime(timezone=True), nullable=True),
    Column("last_seen", DateTime(timezone=True), nullable=True),
    Column("approved_by", String(255), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


@dataclass(frozen=True)
class Migration:
    """One forward step: `apply` runs inside the migration transaction."""

    version: int
    description: str
    apply: Callable[[Connection], None]


# The steps create the tables declared above. When a later step alters a table, the earlier
# steps must keep creating the *old* shape (declare it inside the step), or a fresh database
# and an upgraded one would differ.
def _create_users_v1(conn: Connection) -> None:
    Table("users", MetaData(), *_users_columns()).create(conn)


def _add_sessions_valid_after(conn: Connection) -> None:
    column_type = DateTime(timezone=True).compile(dialect=conn.dialect)
    conn.execute(text(f"ALTER TABLE users ADD COLUMN sessions_valid_after {column_type}"))


MIGRATIONS: Sequence[Migration] = (
    Migration(1, "users", _create_users_v1),
    Migration(2, "user groups", lambda conn: user_groups.create(conn)),
    Migration(3, "users.sessions_valid_after", _add_sessions_valid_after),
    Migration(4, "TOTP secrets and recovery codes",
              lambda conn: metadata.create_all(conn, tables=[totp_secrets, recovery_codes])),
    Migration(5, "TOTP enrolment codes", lambda conn: totp_enrolment_codes.create(conn)),
    Migration(6, "OpenID provider signing keys", lambda conn: oidc_signing_keys.create(conn)),
    Migration(7, "shadow devices", lambda conn: shadow_devices.create(conn)),
)

LATEST_VERSION = MIGRATIONS[-1].version

# Any constant works; it only has to be the same in every Portcullis process.
_ADVISORY_LOCK_KEY = 0x706F7274  # "port"


def current_version(conn: Connection) -> int:
    """The highest applied step, 0 for an empty database."""
    if not conn.dialect.has_table(conn, schema_version.name):
        return 0
    version = conn.execute(select(func.max(schema_version.c.version))).scalar_one()
    return int(version or 0)


def migrate(conn: Connection, steps: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply the steps not yet applied, in order; return the resulting version.

    `conn` must be inside a transaction that the caller commits: the steps and their
    `schema_version` rows then land together or not at all.
    """
    if conn.dialect.name == "postgresql":
        # Released at the end of the transaction; the second opener waits here.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
    schema_version.create(conn, checkfirst=True)
    version = current_version(conn)
    known = max((step.version for step in steps), default=0)
    if version > known:
        raise StoreError(
            f"the database schema is at version {version}, newer than this Portcullis "
            f"understands ({known}); upgrade Portcullis or point it at another database"
        )
    for step in steps:
        if step.version <= version:
            continue
        step.apply(conn)
        conn.execute(
            insert(schema_version).values(
                version=step.version,
                description=step.description,
                applied_at=datetime.now(UTC),
            )
        )
        version = step.version
    return version
