"""The gateway's login service, in process, for the tests of flows and factors.

The fixture `build_login(auth)` turns an `[auth]` section into the LoginService the
gateway would run (IdentityProviders, sessions, throttle, audit trail) over the test's
SQLite store, the fixture `durable`, and returns a `Login` that signs in and reads back
what the audit trail and the throttle recorded. Both fixtures are registered in
tests/conftest.py; a module may override `durable` to add its users:

    @pytest.fixture
    async def durable(durable: DurableStore) -> DurableStore:
        await durable.add_user(...)
        return durable
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from portcullis.audit import AuditTrail
from portcullis.config.model import Settings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.claims import Claims
from portcullis.identity.conditions import LoginContext
from portcullis.identity.login import Authenticated, LoginResult, LoginService
from portcullis.identity.providers import IdentityProviders
from portcullis.identity.sessions import SessionManager
from portcullis.identity.throttle import Throttle
from portcullis.identity.totp import TotpService
from portcullis.net.dialer import Dialer, DirectDialer
from portcullis.store import DurableStore, EphemeralStore, MemoryStore
from portcullis.tokens import TokenHasher

HASHER_KEY = b"k" * 32
CLIENT = LoginContext("192.0.2.7")
"""Where sign-ins come from unless a module or a call says otherwise."""


def flow(*steps: dict[str, Any], **auth: Any) -> dict[str, Any]:
    """An `[auth]` section whose one flow, "default", has these steps; `auth` adds the
    section's other keys (providers, throttle, ...)."""
    return {"flows": [{"name": "default", "steps": list(steps)}], **auth}


def settings_for(auth: dict[str, Any], base_dir: Path, **sections: Any) -> Settings:
    """Settings with this `[auth]` section (and other `sections`: gateway, tls...); its
    relative paths (secret files, CA certificates) are relative to base_dir, as to a
    deployment directory."""
    return Settings.model_validate({**sections, "auth": auth}).model_copy(
        update={"base_dir": base_dir})


@dataclass
class Login:
    """A LoginService built from an `[auth]` section the way the gateway builds it."""

    service: LoginService
    providers: IdentityProviders
    throttle: Throttle
    ephemeral: EphemeralStore
    audit_path: Path
    client: LoginContext = CLIENT

    @property
    def totp(self) -> TotpService:
        return self.providers.totp()

    async def submit(self, handle: str | None, answers: dict[str, str],
                     context: LoginContext | None = None) -> LoginResult:
        """One step, from `context` (by default the client this Login was built for)."""
        return await self.service.submit(handle, answers,
                                         self.client if context is None else context)

    async def sign_in(self, username: str, password: str) -> LoginResult:
        return await self.submit(None, {"username": username, "password": password})

    async def claims(self, username: str, password: str) -> Claims:
        """The claims of a one-step sign-in that must succeed."""
        result = await self.sign_in(username, password)
        assert isinstance(result, Authenticated), self.events()[-1:]
        return result.session.claims

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """This service's audit trail, or its events called `name`."""
        lines = self.audit_path.read_text().splitlines() if self.audit_path.exists() else []
        entries = [json.loads(line) for line in lines]
        return [e for e in entries if name is None or e["event"] == name]

    def last_failure(self) -> str:
        failures = self.events("login.failed")
        assert failures, "no login.failed in the audit trail"
        return str(failures[-1]["reason"])

    async def account_failures(self, identity: str) -> int:
        return (await self.throttle.account(identity)).failures

    async def address_failures(self) -> int:
        count = await self.ephemeral.get(f"throttle:address:{self.client.client_address}")
        return int(count) if count is not None else 0


BuildLogin = Callable[..., Login]


@pytest.fixture
async def durable(tmp_path: Path) -> AsyncIterator[DurableStore]:
    """A real SQLite durable store, in the file `db` of the test's directory."""
    store = await DurableStore.open(f"sqlite:///{tmp_path / 'db'}")
    yield store
    await store.close()


def build_login_service(auth: dict[str, Any], durable: DurableStore, base_dir: Path,
                        audit_path: Path, *, throttle: dict[str, Any] | None = None,
                        client: LoginContext = CLIENT, ephemeral: EphemeralStore | None = None,
                        dialer: Dialer | None = None,
                        **sections: Any) -> tuple[Login, AuditTrail]:
    """The LoginService the gateway would build from `auth` (see the fixture build_login
    for the arguments; `sections` are other sections of the configuration), and its audit
    trail, which the caller closes. Benchmarks build theirs with it too."""
    throttling = {"failure_floor": 0, **auth.get("throttle", {}), **(throttle or {})}
    settings = settings_for({**auth, "throttle": throttling}, base_dir, **sections)
    store = ephemeral if ephemeral is not None else MemoryStore()
    hasher = TokenHasher(HASHER_KEY)
    providers = IdentityProviders(settings, durable, store, hasher,
                                  dialer=dialer or DirectDialer())
    sessions = SessionManager(store, AccountStatus(durable, ttl=0), hasher, settings.session)
    throttler = Throttle(store, settings.auth.throttle)
    trail = AuditTrail(audit_path)
    # As the gateway does, where a [gateway] section says where it is; the tests that
    # give none keep LoginService's default (their callbacks are https://localhost/...).
    public_url = settings.gateway.public_url if "gateway" in sections else "https://localhost"
    service = LoginService(providers.flow(), store, hasher, sessions, settings.session,
                           trail, throttler, public_url=public_url)
    return Login(service, providers, throttler, store, audit_path, client), trail


@pytest.fixture
def build_login(durable: DurableStore, tmp_path: Path) -> Iterator[BuildLogin]:
    """build_login(auth, *, throttle=None, client=CLIENT, ephemeral=None, dialer=None)
    -> Login.

    `throttle` becomes the section's `[auth.throttle]`, with `failure_floor = 0` unless
    it says otherwise (flow tests need not wait half a second per denial; the pacing has
    tests of its own); `ephemeral` is the store for sessions, steps and counters (a fresh
    MemoryStore by default); `dialer` is the one the providers' servers (RADIUS) are
    asked through (a DirectDialer by default). Relative paths in `auth` are relative to
    tmp_path. Each Login has its own audit trail file, closed when the test ends."""
    trails: list[AuditTrail] = []

    def build(auth: dict[str, Any], **options: Any) -> Login:
        login, trail = build_login_service(auth, durable, tmp_path,
                                           tmp_path / f"audit-{len(trails)}.jsonl", **options)
        trails.append(trail)
        return login

    yield build
    for trail in trails:
        trail.close()
