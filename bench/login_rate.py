"""Login rate: sign-ins per second, per gateway CPU core, and their latency, for three
flows against a real `portcullis up`:

- local password (argon2id t=3, 64 MiB, p=4: RFC 9106's second recommended setting);
- LDAP: service-account search + user bind against a real slapd over LDAPS;
- local password + TOTP (each user answers a fresh code: codes are single-use).

Each sign-in is the whole JSON API exchange (`POST /api/v1/login` per step, keep-alive
TLS) until the session token arrives. Beside each, the same work done directly in this
process without a gateway (argon2 verify; ldap3 search + bind) shows what the gateway
adds. "per core" = sign-ins / gateway CPU seconds.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pyotp
import uvloop

from bench.deployment import Deployment, Process, api_client
from bench.launch_rate import Run, measure
from bench.report import Report, Table

CONCURRENCY = 8
LOGINS = 300
TIME_LIMIT = 30.0
USERS = 400              # TOTP: one fresh code per user per run
PASSWORD = "bench horse battery staple"

# The slapd used by the tests is a real directory with AD-like users; reuse it rather
# than keep a second copy of its setup here.
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from peers.ldap import PASSWORDS as LDAP_PASSWORDS  # noqa: E402
from peers.ldap import Slapd, start_slapd  # noqa: E402


async def api_sign_in(api: object, answers: Callable[[str], str]) -> float:
    started = time.perf_counter()
    body: dict[str, object] = {}
    for _ in range(6):
        response = await api.post("/api/v1/login", json=body)  # type: ignore[attr-defined]
        result = response.json()
        if result.get("status") == "authenticated":
            return time.perf_counter() - started
        if result.get("status") != "continue":
            raise RuntimeError(f"sign-in refused: {result}")
        body = {"handle": result["handle"], "answers": {
            prompt["name"]: answers(prompt["name"]) for prompt in result["step"]["prompts"]}}
    raise RuntimeError("too many steps")


def _configure(deployment: Deployment, toml: str) -> None:
    config = deployment.directory / "portcullis.toml"
    text = config.read_text().split("\n# -- bench auth --\n")[0]
    config.write_text(text + "\n# -- bench auth --\n" + toml)


async def _create_users(deployment: Deployment, count: int, totp: bool) -> dict[str, str]:
    """Local users sharing one hash (made once: argon2 is the slow part), TOTP secrets
    enrolled directly in the store. Returns user -> TOTP secret."""
    from portcullis.config import config_path, load_settings
    from portcullis.identity.passwords import hash_password
    from portcullis.identity.providers import IdentityProviders
    from portcullis.store import DurableStore, MemoryStore
    from portcullis.tokens import TokenHasher

    settings = load_settings(config_path(deployment.directory))
    durable = await DurableStore.open(settings.durable_url())
    secrets: dict[str, str] = {}
    try:
        hashed = hash_password(PASSWORD)
        hasher = TokenHasher.from_directory(settings.path(settings.secrets_dir))
        service = IdentityProviders(settings, durable, MemoryStore(), hasher).totp()
        for index in range(count):
            name = f"user{index:04d}"
            if await durable.get_user(name) is None:
                await durable.add_user(name, hashed, ["staff"])
            if totp:
                enrolment = service.new_enrolment(name)
                code = pyotp.TOTP(enrolment.secret).now()
                check = await service.confirm(f"local:{name}", enrolment, code)
                assert check.ok, check.reason
                secrets[name] = enrolment.secret
    finally:
        await durable.close()
    return secrets


def _restart(stack: ExitStack, deployment: Deployment, logs: Path,
             running: list[Process]) -> Process:
    for process in running:
        process.stop()
    running.clear()
    running.append(deployment.start(stack, logs))
    return running[0]


async def _gateway_run(deployment: Deployment, gateway: Process, name: str,
                       answers_for: Callable[[int], Callable[[str], str]], count: int) -> Run:
    async with api_client(deployment, CONCURRENCY) as api:
        counter = iter(range(10**9))

        async def once() -> float:
            return await api_sign_in(api, answers_for(next(counter)))

        await measure("warm-up", once, CONCURRENCY, {})
        return await measure(name, once, count, {"up": gateway}, concurrency=CONCURRENCY,
                             time_limit=TIME_LIMIT)


async def _direct_run(name: str, work: Callable[[], object], count: int) -> Run:
    async def once() -> float:
        started = time.perf_counter()
        await asyncio.to_thread(work)
        return time.perf_counter() - started

    return await measure(name, once, count, {}, concurrency=CONCURRENCY,
                         time_limit=TIME_LIMIT)


def _ldap_direct(slapd: Slapd) -> Callable[[], object]:
    import ldap3

    tls = slapd.tls()

    def bind() -> None:
        server = ldap3.Server(slapd.ldaps_url, tls=tls, get_info=ldap3.NONE)
        service = ldap3.Connection(server, slapd.bind_dn, slapd.bind_password, auto_bind=True)
        service.search(slapd.base_dn, "(sAMAccountName=alice)", attributes=["memberOf"])
        dn = service.response[0]["dn"]
        service.unbind()
        user = ldap3.Connection(server, dn, LDAP_PASSWORDS["alice"])
        if not user.bind():
            raise RuntimeError("bind failed")
        user.unbind()

    return bind


def _per_core(run: Run) -> float:
    cpu = sum(run.server_cpu.values()) or run.client_cpu
    return len(run.latencies) / cpu if cpu else float("nan")


def run() -> Report:
    from portcullis.identity.passwords import hash_password, verify_password

    runs: list[tuple[Run, Run]] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-login-") as tmp:
        logs = Path(tmp)
        deployment = Deployment.create(logs)
        slapd = start_slapd(logs / "slapd")
        stack.callback(slapd.stop)
        (deployment.directory / "secrets" / "ldap-bind").write_text(slapd.bind_password)
        running: list[Process] = []

        # 1. Local password.
        uvloop.run(_create_users(deployment, USERS, totp=False))
        gateway = _restart(stack, deployment, logs, running)
        stored = hash_password(PASSWORD)
        local = uvloop.run(_gateway_run(
            deployment, gateway, "portcullis: local password",
            lambda i: {"username": f"user{i % USERS:04d}", "password": PASSWORD}.__getitem__,
            LOGINS))
        direct = uvloop.run(_direct_run("argon2id verify in-process",
                                        lambda: verify_password(stored, PASSWORD), LOGINS))
        runs.append((local, direct))

        # 2. LDAP bind against slapd.
        _configure(deployment, f"""
[auth]
flow = "ldap"
{slapd.provider_toml("corp", "secrets/ldap-bind")}[[auth.flows]]
name = "ldap"
[[auth.flows.steps]]
provider = "corp"
""")
        # Many users, as a morning rush: the gateway checks one sign-in at a time per
        # account (parallel guesses must not all be verified), so one user would queue.
        people = slapd.add_people("bench", USERS, PASSWORD)
        gateway = _restart(stack, deployment, logs, running)
        ldap = uvloop.run(_gateway_run(
            deployment, gateway, "portcullis: LDAP (slapd, LDAPS)",
            lambda i: {"username": people[i % len(people)], "password": PASSWORD}.__getitem__,
            LOGINS * 3))
        ldap_direct = uvloop.run(_direct_run("ldap3 search + bind in-process",
                                             _ldap_direct(slapd), LOGINS * 3))
        runs.append((ldap, ldap_direct))

        # 3. Local password + TOTP, every user enrolled; one sign-in per user, each with
        # the code of the next time step (the current one was used to enrol).
        _configure(deployment, """
[auth]
flow = "mfa"
[[auth.flows]]
name = "mfa"
[[auth.flows.steps]]
provider = "local"
[[auth.flows.steps]]
provider = "totp"
""")
        secrets = uvloop.run(_create_users(deployment, USERS, totp=True))
        gateway = _restart(stack, deployment, logs, running)
        names = sorted(secrets)

        def totp_answers(i: int) -> Callable[[str], str]:
            name = names[i % len(names)]
            code = pyotp.TOTP(secrets[name]).at(time.time() + 30)
            return {"username": name, "password": PASSWORD, "code": code}.__getitem__

        mfa = uvloop.run(_gateway_run(deployment, gateway, "portcullis: password + TOTP",
                                      totp_answers, min(LOGINS, USERS - CONCURRENCY)))
        runs.append((mfa, direct))

    columns = ["setup", "done", "errors", "wall s", "logins/s", "p50 ms", "p90 ms", "p99 ms",
               "client CPU", "server CPU"]
    rows = []
    data: dict[str, object] = {}
    verdicts = []
    for gateway_run, direct_run in runs:
        rows += [gateway_run.row(), direct_run.row()]
        per_core = _per_core(gateway_run)
        direct_per_core = len(direct_run.latencies) / direct_run.client_cpu
        verdicts.append(f"{gateway_run.name}: {per_core:.1f} logins/s per gateway core "
                        f"(direct: {direct_per_core:.1f} per core; ratio "
                        f"{per_core / direct_per_core:.2f}x), p50 "
                        f"{gateway_run.percentile_ms(50):.0f} ms, p99 "
                        f"{gateway_run.percentile_ms(99):.0f} ms")
        data[gateway_run.name] = {**gateway_run.as_json(), "per_core": per_core,
                                  "direct": direct_run.as_json(),
                                  "direct_per_core": direct_per_core}
    return Report(
        name="login_rate",
        tables=[Table(f"Sign-ins (concurrency {CONCURRENCY})", columns, rows)],
        verdicts=verdicts,
        notes=[f"{os.cpu_count()} cores shared by the benchmark client, the gateway and "
               "slapd; argon2id t=3, m=64 MiB, p=4 (RFC 9106 second recommendation): "
               "its cost is the floor of a local sign-in, by design",
               "LDAP sign-in = service search + user bind, new LDAPS connection for the "
               "bind; direct = the same with ldap3 in this process"],
        data=data)
