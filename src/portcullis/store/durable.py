"""The durable store: local users, their password hashes and groups.

One class, `DurableStore`, over SQLAlchemy Core with an async engine: SQLite by default
(one file, WAL, foreign keys on), PostgreSQL when several gateways share state. The schema
is brought up to date by `migrations.migrate()` each time a store is opened.

It never stores or logs a password in clear: callers pass a hash (argon2) and get it back
unchanged. It never lets a SQLAlchemy, asyncpg or sqlite3 exception escape: every failure
leaves as a `StoreError` (or its children `DuplicateError`, `NotFoundError`) whose message
tells an administrator what failed and where, with any password in the URL hidden.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Connection, Row, delete, event, func, insert, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from portcullis.errors import DuplicateError, NotFoundError, StoreError
from portcullis.store import migrations
from portcullis.store.migrations import (
    oidc_signing_keys,
    recovery_codes,
    shadow_devices,
    totp_enrolment_codes,
    totp_secrets,
    user_groups,
    users,
)

# Plain URLs are rewritten to the async drivers this module is tested with.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}

# Stays under SQLite's limit on bound parameters in one statement.
_IN_CHUNK = 500

# How long SQLite waits for another process's write lock before failing, in seconds.
_SQLITE_BUSY_TIMEOUT = 15.0


@dataclass(frozen=True)
class UserRecord:
    """A local user as stored; `groups` is sorted, `created_at` is timezone-aware UTC."""

    name: str
    password_hash: str | None
    groups: tuple[str, ...]
    disabled: bool
    created_at: datetime
    # Sessions created before this moment are void: set when the account is disabled or
    # its password changes, so a re-enabled account does not revive old sessions.
    sessions_valid_after: datetime | None = None


@dataclass(frozen=True)
class TotpRecord:
    """A user's TOTP enrolment: the sealed secret and how many recovery codes are left."""

    identity: str
    sealed_secret: bytes
    enrolled_at: datetime
    recovery_codes_left: int


@dataclass(frozen=True)
class SigningKeyRecord:
    """One OpenID provider signing key as stored: its private JWK sealed (idp/keys.py)."""

    generation: int
    kid: str
    sealed_jwk: bytes
    signs_from: datetime


@dataclass(frozen=True)
class ShadowDeviceRecord:
    """A device registered with the shadow hub. `status` is "enrolling" (added by an
    administrator, waiting for its agent and code), "pending" (its agent registered
    without a code: waiting for approval of `fingerprint`) or "approved"."""

    name: str
    status: Literal["enrolling", "pending", "approved"]
    certificate: str | None
    fingerprint: str | None
    advertise: str | None
    first_seen: datetime | None
    last_seen: datetime | None
    approved_by: str | None
    created_at: datetime
    code_hash: str | None = None
    code_expires_at: datetime | None = None


def async_database_url(url: str) -> URL:
    """Parse `url` and point it at the async driver; StoreError if unsupported."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL {url!r}: {exc}") from exc
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        raise StoreError(
            f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:///path "
            "or postgresql://user@host/database"
        )
    return parsed.set(drivername=driver)


def _describe(url: URL) -> str:
    """Where the database is, for messages: the URL without its password."""
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def _as_utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; we only ever write UTC.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    """Pragmas on each connection, and transactions that begin when SQLAlchemy says so.

    Python's sqlite3 module defers BEGIN until the first write, so a read-then-write
    transaction can fail to upgrade its lock. We turn that off and emit BEGIN ourselves:
    IMMEDIATE (take the write lock now) on connections that ask for it.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(_SQLITE_BUSY_TIMEOUT * 1000)}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class DurableStore:
    """Users and groups in SQLite or PostgreSQL. Open with `await DurableStore.open(url)`."""

    def __init__(self, engine: AsyncEngine, where: str) -> None:
        self._engine = engine
        # Writes (and migrations) take SQLite's write lock at BEGIN; ignored by PostgreSQL.
        self._writer = engine.execution_options(sqlite_immediate=True)
        self._where = where

    @classmethod
    async def open(
        cls, url: str, *, connect_args: Mapping[str, Any] | None = None
    ) -> DurableStore:
        """Connect, migrate the schema to the latest version, and return the store.

        `connect_args` go to the driver unchanged (for example asyncpg's
        `{"server_settings": {"search_path": "tenant"}}`).
        """
        parsed = async_database_url(url)
        where = _describe(parsed)
        args = dict(connect_args or {})
        if parsed.get_backend_name() == "sqlite":
            args.setdefault("timeout", _SQLITE_BUSY_TIMEOUT)
        try:
            engine = create_async_engine(parsed, connect_args=args)
        except (SQLAlchemyError, ImportError, TypeError) as exc:
            raise StoreError(f"cannot open database at {where}: {exc}") from exc
        if parsed.get_backend_name() == "sqlite":
            _install_sqlite_hooks(engine)
        store = cls(engine, where)
        try:
            with store._mapped_errors("cannot open database"):
                async with store._writer.begin() as conn:
                    await conn.run_sync(migrations.migrate)
        except BaseException:
            await engine.dispose()
            raise
        return store

    async def close(self) -> None:
        await self._engine.dispose()

    async def ping(self) -> None:
        """Raise StoreError unless the database answers (health checks)."""
        async with self._read() as conn:
            await conn.execute(text("SELECT 1"))

    async def schema_version(self) -> int:
        """The schema version of the open database (`migrations.LATEST_VERSION` after open)."""
        async with self._read() as conn:
            return await conn.run_sync(migrations.current_version)

    async def add_user(
        self, name: str, password_hash: str | None, groups: Iterable[str] = ()
    ) -> UserRecord:
        """Create a user; DuplicateError if the name is taken."""
        group_names = tuple(sorted(set(groups)))
        created_at = datetime.now(UTC)
        try:
            async with self._write() as conn:
                inserted = await conn.execute(
                    insert(users)
                    .values(
                        name=name,
                        password_hash=password_hash,
                        disabled=False,
                        created_at=created_at,
                    )
                    .returning(users.c.id)
                )
                user_id = inserted.scalar_one()
                if group_names:
                    await conn.execute(
                        insert(user_groups),
                        [{"user_id": user_id, "group_name": g} for g in group_names],
                    )
        except _Integrity as exc:
            raise DuplicateError(f"user {name!r} already exists") from exc.__cause__
        return UserRecord(name, password_hash, group_names, False, created_at)

    async def get_user(self, name: str) -> UserRecord | None:
        async with self._read() as conn:
            row = (await conn.execute(select(users).where(users.c.name == name))).first()
            if row is None:
                return None
            groups = await conn.execute(
                select(user_groups.c.group_name)
                .where(user_groups.c.user_id == row.id)
                .order_by(user_groups.c.group_name)
            )
            return _record(row, tuple(groups.scalars()))

    async def list_users(self) -> list[UserRecord]:
        """Every user, sorted by name."""
        async with self._read() as conn:
            rows = (await conn.execute(select(users).order_by(users.c.name))).all()
            memberships = await conn.execute(
                select(user_groups.c.user_id, user_groups.c.group_name).order_by(
                    user_groups.c.user_id, user_groups.c.group_name
                )
            )
            groups_of: dict[int, list[str]] = {}
            for user_id, group_name in memberships:
                groups_of.setdefault(user_id, []).append(group_name)
        return [_record(row, tuple(groups_of.get(row.id, ()))) for row in rows]

    async def set_password(self, name: str, password_hash: str) -> None:
        """Replace the password hash, voiding existing sessions; NotFoundError if no user."""
        async with self._write() as conn:
            await self._update_user(conn, name, password_hash=password_hash,
                                    sessions_valid_after=datetime.now(UTC))

    async def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (voiding existing sessions) or re-enable a user; NotFoundError if no user."""
        values: dict[str, Any] = {"disabled": disabled}
        if disabled:
            values["sessions_valid_after"] = datetime.now(UTC)
        async with self._write() as conn:
            await self._update_user(conn, name, **values)

    async def set_groups(self, name: str, groups: Iterable[str]) -> None:
        """Replace the user's groups with `groups`; NotFoundError if there is no such user."""
        group_names = sorted(set(groups))
        async with self._write() as conn:
            user_id = await self._user_id(conn, name)
            await conn.execute(delete(user_groups).where(user_groups.c.user_id == user_id))
            if group_names:
                await conn.execute(
                    insert(user_groups),
                    [{"user_id": user_id, "group_name": g} for g in group_names],
                )

    async def disabled_among(self, names: Iterable[str]) -> set[str]:
        """Which of `names` are local accounts that are disabled: their connections must
        end. Names without a local account (directory users) are not among them."""
        wanted = sorted(set(names))
        disabled: set[str] = set()
        async with self._read() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                result = await conn.execute(
                    select(users.c.name).where(users.c.name.in_(chunk), users.c.disabled.is_(True))
                )
                disabled.update(result.scalars())
        return disabled

    async def get_totp(self, identity: str) -> TotpRecord | None:
        async with self._read() as conn:
            row = (await conn.execute(
                select(totp_secrets).where(totp_secrets.c.identity == identity))).first()
            if row is None:
                return None
            left = (await conn.execute(
                select(func.count()).select_from(recovery_codes).where(
                    recovery_codes.c.identity == identity,
                    recovery_codes.c.used_at.is_(None)))).scalar_one()
        return TotpRecord(identity, bytes(row.sealed_secret), _as_utc(row.enrolled_at),
                          int(left))

    async def set_totp(self, identity: str, sealed_secret: bytes,
                       recovery_hashes: Iterable[str]) -> None:
        """Enrol (or re-enrol): the old secret and its recovery codes go in the same
        transaction, so an old device stops working the moment the new one is confirmed."""
        async with self._write() as conn:
            await conn.execute(delete(recovery_codes).where(
                recovery_codes.c.identity == identity))
            await conn.execute(delete(totp_secrets).where(totp_secrets.c.identity == identity))
            await conn.execute(insert(totp_secrets).values(
                identity=identity, sealed_secret=sealed_secret, enrolled_at=datetime.now(UTC)))
            hashes = sorted(set(recovery_hashes))
            if hashes:
                await conn.execute(insert(recovery_codes), [
                    {"identity": identity, "code_hash": h} for h in hashes])

    async def delete_totp(self, identity: str) -> bool:
        """Forget the secret and its codes (an administrator's reset); False if none."""
        async with self._write() as conn:
            await conn.execute(delete(recovery_codes).where(
                recovery_codes.c.identity == identity))
            result = await conn.execute(
                delete(totp_secrets).where(totp_secrets.c.identity == identity))
        return bool(result.rowcount)

    async def use_recovery_code(self, identity: str, code_hash: str, *,
                                spend: bool = True) -> bool:
        """Mark an unused code used; True only for the one caller that did (atomic).
        With spend=False only say whether it is there unused (a dry run)."""
        unused = (recovery_codes.c.identity == identity,
                  recovery_codes.c.code_hash == code_hash, recovery_codes.c.used_at.is_(None))
        if not spend:
            async with self._read() as conn:
                found = await conn.execute(select(func.count()).select_from(
                    recovery_codes).where(*unused))
                return bool(found.scalar_one())
        async with self._write() as conn:
            result = await conn.execute(
                update(recovery_codes).where(*unused).values(used_at=datetime.now(UTC)))
        return bool(result.rowcount)

    async def set_enrolment_code(self, identity: str, code_hash: str,
                                 expires_at: datetime) -> None:
        """Issue a TOTP enrolment code (its keyed hash), replacing any earlier one."""
        codes = totp_enrolment_codes
        async with self._write() as conn:
            await conn.execute(delete(codes).where(codes.c.identity == identity))
            await conn.execute(insert(codes).values(identity=identity, code_hash=code_hash,
                                                    expires_at=expires_at))

    async def use_enrolment_code(self, identity: str, code_hash: str,
                                 now: datetime) -> Literal["used", "none", "wrong", "expired"]:
        """Spend the identity's enrolment code if `code_hash` is its hash and it has not
        expired ("used", for the one caller that spent it); else why not. A wrong code
        leaves it in place; an expired one is removed."""
        codes = totp_enrolment_codes
        async with self._write() as conn:
            row = (await conn.execute(
                select(codes).where(codes.c.identity == identity))).first()
            if row is None:
                return "none"
            if _as_utc(row.expires_at) <= now:
                await conn.execute(delete(codes).where(codes.c.identity == identity))
                return "expired"
            if not hmac.compare_digest(row.code_hash, code_hash):
                return "wrong"
            spent = await conn.execute(delete(codes).where(
                codes.c.identity == identity, codes.c.code_hash == code_hash))
        return "used" if spent.rowcount else "none"

    async def signing_keys(self) -> list[SigningKeyRecord]:
        """Every OpenID provider signing key, oldest generation first."""
        keys = oidc_signing_keys
        async with self._read() as conn:
            rows = (await conn.execute(select(keys).order_by(keys.c.generation))).all()
        return [SigningKeyRecord(row.generation, row.kid, bytes(row.sealed_jwk),
                                 _as_utc(row.signs_from)) for row in rows]

    async def add_signing_key(self, record: SigningKeyRecord) -> bool:
        """Store a new key; False if its generation exists (another node made it first)."""
        try:
            async with self._write() as conn:
                await conn.execute(insert(oidc_signing_keys).values(
                    generation=record.generation, kid=record.kid,
                    sealed_jwk=record.sealed_jwk, signs_from=record.signs_from))
        except _Integrity:
            return False
        return True

    async def drop_signing_keys(self, generations: Iterable[int]) -> None:
        chosen = list(generations)
        async with self._write() as conn:
            await conn.execute(delete(oidc_signing_keys).where(
                oidc_signing_keys.c.generation.in_(chosen)))

    # -- shadow devices -------------------------------------------------------------
    async def add_shadow_device(self, name: str, code_hash: str,
                                code_expires_at: datetime) -> None:
        """An administrator adds a device: it waits for its agent with a one-time code."""
        try:
            async with self._write() as conn:
                await conn.execute(insert(shadow_devices).values(
                    name=name, status="enrolling", enrolment_code_hash=code_hash,
                    code_expires_at=code_expires_at, created_at=datetime.now(UTC)))
        except _Integrity:
            raise DuplicateError(f"a device named {name!r} exists already") from None

    async def add_pending_shadow_device(self, name: str, certificate: str, fingerprint: str,
                                        advertise: str | None, now: datetime) -> None:
        """An agent registered without a code: it waits for approval of its fingerprint."""
        try:
            async with self._write() as conn:
                await conn.execute(insert(shadow_devices).values(
                    name=name, status="pending", certificate=certificate,
                    fingerprint=fingerprint, advertise=advertise, first_seen=now,
                    last_seen=now, created_at=now))
        except _Integrity:
            raise DuplicateError(f"a device named {name!r}, or with this certificate, "
                                 "exists already") from None

    async def enrol_shadow_device(self, name: str, code_hash: str, certificate: str,
                                  fingerprint: str, advertise: str | None,
                                  now: datetime) -> bool:
        """Spend the device's enrolment code on this certificate; False unless the code
        is the device's, unexpired and unused (the update names the code: two agents
        racing with one code cannot both win)."""
        devices = shadow_devices
        record = await self.shadow_device(name)
        if (record is None or record.status != "enrolling" or record.code_hash is None
                or record.code_expires_at is None or record.code_expires_at <= now
                or not hmac.compare_digest(record.code_hash, code_hash)):
            return False
        try:
            async with self._write() as conn:
                result = await conn.execute(update(devices).where(
                    devices.c.name == name, devices.c.status == "enrolling",
                    devices.c.enrolment_code_hash == code_hash,
                ).values(status="approved", certificate=certificate, fingerprint=fingerprint,
                         advertise=advertise, first_seen=now, last_seen=now,
                         approved_by="enrolment code", enrolment_code_hash=None,
                         code_expires_at=None))
        except _Integrity:
            return False   # the certificate is another device's
        return bool(result.rowcount)

    async def approve_shadow_device(self, name: str, fingerprint: str, by: str) -> bool:
        """Approve a pending device if it waits with exactly this fingerprint."""
        devices = shadow_devices
        async with self._write() as conn:
            result = await conn.execute(update(devices).where(
                devices.c.name == name, devices.c.status == "pending",
                devices.c.fingerprint == fingerprint).values(status="approved",
                                                             approved_by=by))
        return bool(result.rowcount)

    async def replace_shadow_certificate(self, name: str, old_fingerprint: str,
                                         certificate: str, fingerprint: str) -> bool:
        """A renewal: the new certificate replaces the one the agent signed in with."""
        devices = shadow_devices
        try:
            async with self._write() as conn:
                result = await conn.execute(update(devices).where(
                    devices.c.name == name, devices.c.status == "approved",
                    devices.c.fingerprint == old_fingerprint,
                ).values(certificate=certificate, fingerprint=fingerprint))
        except _Integrity:
            return False
        return bool(result.rowcount)

    async def seen_shadow_device(self, name: str, now: datetime,
                                 advertise: str | None = None) -> None:
        values: dict[str, Any] = {"last_seen": now}
        if advertise is not None:
            values["advertise"] = advertise
        async with self._write() as conn:
            await conn.execute(update(shadow_devices).where(
                shadow_devices.c.name == name).values(**values))

    async def remove_shadow_device(self, name: str) -> bool:
        async with self._write() as conn:
            result = await conn.execute(delete(shadow_devices).where(
                shadow_devices.c.name == name))
        return bool(result.rowcount)

    async def shadow_device(self, name: str) -> ShadowDeviceRecord | None:
        async with self._read() as conn:
            row = (await conn.execute(select(shadow_devices).where(
                shadow_devices.c.name == name))).first()
        return None if row is None else _device(row)

    async def shadow_device_with(self, fingerprint: str) -> ShadowDeviceRecord | None:
        """The device whose registered certificate has this fingerprint."""
        async with self._read() as conn:
            row = (await conn.execute(select(shadow_devices).where(
                shadow_devices.c.fingerprint == fingerprint))).first()
        return None if row is None else _device(row)

    async def shadow_devices(self) -> list[ShadowDeviceRecord]:
        async with self._read() as conn:
            rows = (await conn.execute(select(shadow_devices).order_by(
                shadow_devices.c.name))).all()
        return [_device(row) for row in rows]

    async def _user_id(self, conn: AsyncConnection, name: str) -> int:
        user_id = (
            await conn.execute(select(users.c.id).where(users.c.name == name))
        ).scalar_one_or_none()
        if user_id is None:
            raise NotFoundError(f"no user named {name!r}")
        return int(user_id)

    async def _update_user(self, conn: AsyncConnection, name: str, **values: Any) -> None:
        result = await conn.execute(update(users).where(users.c.name == name).values(**values))
        if result.rowcount == 0:
            raise NotFoundError(f"no user named {name!r}")

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        with self._mapped_errors("database operation failed"):
            async with self._engine.connect() as conn:
                yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        with self._mapped_errors("database operation failed"):
            async with self._writer.begin() as conn:
                yield conn

    @contextmanager
    def _mapped_errors(self, what: str) -> Iterator[None]:
        """The one place where driver exceptions become ours."""
        try:
            yield
        except StoreError:
            raise
        except IntegrityError as exc:
            # Callers that expect a constraint violation turn this into a precise error.
            raise _Integrity(f"{what} at {self._where}: {exc.orig}") from exc
        except SQLAlchemyError as exc:
            detail = getattr(exc, "orig", None) or exc
            raise StoreError(f"{what} at {self._where}: {detail}") from exc
        except OSError as exc:
            raise StoreError(f"{what} at {self._where}: {exc}") from exc


class _Integrity(StoreError):
    """A constraint was violated (duplicate name); `add_user` reports it as DuplicateError."""


def _record(row: Row[Any], groups: tuple[str, ...]) -> UserRecord:
    return UserRecord(
        name=row.name,
        password_hash=row.password_hash,
        groups=groups,
        disabled=bool(row.disabled),
        created_at=_as_utc(row.created_at),
        sessions_valid_after=(_as_utc(row.sessions_valid_after)
                              if row.sessions_valid_after is not None else None),
    )


def _device(row: Row[Any]) -> ShadowDeviceRecord:
    def moment(value: datetime | None) -> datetime | None:
        return None if value is None else _as_utc(value)

    return ShadowDeviceRecord(
        name=row.name, status=row.status, certificate=row.certificate,
        fingerprint=row.fingerprint, advertise=row.advertise,
        first_seen=moment(row.first_seen), last_seen=moment(row.last_seen),
        approved_by=row.approved_by, created_at=_as_utc(row.created_at),
        code_hash=row.enrolment_code_hash, code_expires_at=moment(row.code_expires_at))
