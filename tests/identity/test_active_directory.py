"""Sign-in edge cases against a real Samba Active Directory (tests/peers/samba.py): every
spelling of a user counts against one lockout, a failed step takes as long whatever the
reason, AD's precise refusal reaches the audit line (the user sees only "denied"), and
`ldap://` without StartTLS is refused when the configuration is read."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from conftest import Deployment, run_cli
from peers.login import BuildLogin, Login, flow, settings_for
from peers.samba import PASSWORDS, Samba
from portcullis.config.loader import parse_settings
from portcullis.errors import ConfigError
from portcullis.identity.login import Authenticated, Denied
from portcullis.identity.providers import IdentityProviders
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

pytestmark = pytest.mark.peer

BIND_PASSWORD_FILE = "ad-bind.pw"


@pytest.fixture
def make_login(samba: Samba, build_login: BuildLogin, tmp_path: Path):  # type: ignore[no-untyped-def]
    """make_login(throttle=..., **provider overrides) -> a one-step flow against the AD."""
    (tmp_path / BIND_PASSWORD_FILE).write_text(samba.bind_password + "\n")

    def make(throttle: dict[str, Any] | None = None, **overrides: Any) -> Login:
        provider = samba.provider("corp", BIND_PASSWORD_FILE, timeout=10, **overrides)
        return build_login(flow({"provider": "corp"}, providers=[provider]), throttle=throttle)

    return make


@pytest.mark.parametrize("typed", ["alice", "ALICE", "alice@pc.test", "Alice@PC.TEST",
                                   "ａｌｉｃｅ", "ＡＬＩＣＥ＠ｐｃ．ｔｅｓｔ"])
async def test_alice_signs_in_with_any_spelling_of_her_names(make_login, typed: str) -> None:  # type: ignore[no-untyped-def]
    claims = await make_login().claims(typed, PASSWORDS["alice"])
    assert claims.username == "alice" and claims.sub == "corp:alice"
    assert "staff" in claims.groups


async def test_every_spelling_of_a_user_counts_against_the_same_lockout(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login(throttle={"account_failures": 4})
    # Case, the UPN, full-width letters (NFKC), full-width UPN: one account.
    for typed in ("ALICE", "alice@PC.test", "ａｌｉｃｅ", "ＡＬＩＣＥ＠ｐｃ．ｔｅｓｔ"):
        assert isinstance(await login.sign_in(typed, "not-the-password"), Denied)
    assert await login.account_failures("corp:alice") == 4
    assert (await login.throttle.account("corp:alice")).locked
    # Now even the right password, typed any way, is refused without asking the AD.
    assert isinstance(await login.sign_in("alice", PASSWORDS["alice"]), Denied)
    assert login.last_failure() == "account locked"
    failures = login.events("login.failed")
    assert [event["user"] for event in failures] == ["alice"] * 5
    assert failures[3]["locked"] is True


@pytest.mark.parametrize(("name", "reason"), [
    ("dora", "account disabled (AD 533)"),
    ("eve", "account expired (AD 701)"),
    ("frank", "password must be changed (AD 773)"),
    ("mallory", "account locked by the directory (AD 775)"),
])
async def test_the_directorys_precise_refusal_reaches_the_audit_line(  # type: ignore[no-untyped-def]
        make_login, name: str, reason: str) -> None:
    login = make_login()
    result = await login.sign_in(name, PASSWORDS[name])
    # The user is told "denied" and nothing more; the audit line says what AD said.
    assert result == Denied()
    failure = login.events("login.failed")[-1]
    assert failure["reason"] == reason and failure["user"] == name


async def test_a_wrong_password_and_an_unknown_name_are_audited_as_such(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    assert isinstance(await login.sign_in("alice", "not-the-password"), Denied)
    assert login.last_failure() == "wrong password"
    assert isinstance(await login.sign_in("nobody-here", PASSWORDS["alice"]), Denied)
    assert login.last_failure() == "unknown user"


ROUNDS = 30
FLOOR = 0.3


async def test_failed_steps_take_as_long_for_an_unknown_name_a_wrong_password_and_a_locked_account(  # type: ignore[no-untyped-def]
        make_login) -> None:
    """Each kind ROUNDS times, interleaved (so the machine's noise falls on all three),
    each step timed as the client sees it; the three distributions must overlap."""
    login = make_login(throttle={"account_failures": 100, "address_failures": 100_000,
                                 "failure_floor": FLOOR})
    # eve is locked by Portcullis: refused without any bind (the fastest path there is).
    for _ in range(100):
        await login.throttle.failed("corp:eve", "198.51.100.1")
    assert (await login.throttle.account("corp:eve")).locked
    kinds = {"unknown name": ("nobody-at-all", "a-password"),
             "wrong password": ("alice", "not-the-password"),
             "locked account": ("eve", PASSWORDS["eve"])}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(ROUNDS):
        for kind, (name, password) in kinds.items():
            started = time.perf_counter()
            result = await login.sign_in(name, password)
            times[kind].append(time.perf_counter() - started)
            assert isinstance(result, Denied)
    reasons = {event["reason"] for event in login.events("login.failed")}
    assert reasons == {"unknown user", "wrong password", "account locked"}
    for kind, samples in times.items():
        print(f"{kind:>15}: min {min(samples) * 1000:6.1f} ms  median "
              f"{statistics.median(samples) * 1000:6.1f} ms  max {max(samples) * 1000:6.1f} ms")
    for kind, samples in times.items():
        median = statistics.median(samples)
        for other, other_samples in times.items():
            assert min(other_samples) <= median <= max(other_samples), (kind, other, times)


def test_an_ldap_url_without_starttls_is_refused_when_the_configuration_is_read(
        samba: Samba, tmp_path: Path) -> None:
    text = ("[auth]\n" + samba.provider_toml("corp", BIND_PASSWORD_FILE,
                                            servers=[samba.ldap_url])
            + '[[auth.flows]]\nname = "default"\n[[auth.flows.steps]]\nprovider = "corp"\n')
    with pytest.raises(ConfigError) as refused:
        parse_settings(text, path=tmp_path / "portcullis.toml")
    assert refused.value.key == "auth.providers[0].ldap.servers"
    assert "clear text" in str(refused.value) and "start_tls" in str(refused.value)
    # With StartTLS, or an ldaps:// URL, the same provider is accepted.
    parse_settings(text.replace("[[auth.providers]]\n", "[[auth.providers]]\nstart_tls = true\n"),
                   path=tmp_path / "portcullis.toml")


def test_the_gateway_refuses_to_start_with_an_ldap_url_without_starttls(
        deployment: Deployment, samba: Samba) -> None:
    (deployment.directory / "secrets" / "ad-bind").write_text(samba.bind_password)
    with deployment.config.open("a") as handle:
        handle.write(f"""
[auth]
flow = "corp"
{samba.provider_toml("corp", "secrets/ad-bind", servers=[samba.ldap_url])}[[auth.flows]]
name = "corp"
[[auth.flows.steps]]
provider = "corp"
""")
    result = run_cli("up", "--dir", str(deployment.directory), timeout=30)
    assert result.returncode != 0
    assert "auth.providers[0]" in result.stderr and "clear text" in result.stderr


async def test_insecure_ldap_is_allowed_when_the_provider_says_so_and_warns_at_start(  # type: ignore[no-untyped-def]
        samba: Samba, tmp_path: Path, durable: DurableStore) -> None:
    (tmp_path / BIND_PASSWORD_FILE).write_text(samba.bind_password)
    settings = settings_for(flow({"provider": "corp"}, providers=[
        samba.provider("corp", BIND_PASSWORD_FILE, servers=[samba.ldap_url],
                       insecure=True)]), tmp_path)
    with structlog.testing.capture_logs() as logs:
        IdentityProviders(settings, durable, MemoryStore(), TokenHasher(b"k" * 32)).flow()
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warnings and "clear text" in warnings[0]["event"]
    assert warnings[0]["servers"] == [samba.ldap_url]


async def test_starttls_over_ldap_signs_in(make_login, samba: Samba) -> None:  # type: ignore[no-untyped-def]
    login = make_login(servers=[samba.ldap_url], start_tls=True)
    assert isinstance(await login.sign_in("alice", PASSWORDS["alice"]), Authenticated)
