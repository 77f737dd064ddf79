"""The administrator's user commands on a deployment whose users are in a real Samba AD:
each accepts any name the user signs in with (sAMAccountName, UPN or mail, any case or
width), and an unknown name is an error with a message, never a silent no-op; the
enrolment code `user totp-code` prints is what the sign-in's enrolment step accepts."""

from __future__ import annotations

import asyncio
import re
import secrets

import pytest

from conftest import Deployment, run_cli
from peers.samba import PASSWORDS, Samba
from peers.stores import REDIS_URL, answering_redis_url
from portcullis.audit import AuditTrail
from portcullis.config import config_path, load_settings
from portcullis.identity.accounts import AccountStatus
from portcullis.identity.conditions import LoginContext
from portcullis.identity.login import LoginService, NextStep
from portcullis.identity.providers import IdentityProviders
from portcullis.identity.sessions import SessionManager
from portcullis.identity.throttle import Throttle
from portcullis.store import DurableStore, MemoryStore, open_ephemeral
from portcullis.tokens import TokenHasher

pytestmark = pytest.mark.peer


def add_ad_flow(deployment: Deployment, samba: Samba) -> None:
    (deployment.directory / "secrets" / "ad-bind").write_text(samba.bind_password)
    with deployment.config.open("a") as handle:
        handle.write(f"""
[auth]
flow = "corp"
{samba.provider_toml("corp", "secrets/ad-bind")}[[auth.flows]]
name = "corp"
[[auth.flows.steps]]
provider = "corp"
""")


@pytest.mark.parametrize("typed", ["alice", "ALICE", "alice@pc.test", "ａｌｉｃｅ＠ＰＣ．ｔｅｓｔ"])
def test_user_show_finds_a_directory_user_by_any_name_they_sign_in_with(
        deployment: Deployment, samba: Samba, typed: str) -> None:
    add_ad_flow(deployment, samba)
    shown = run_cli("user", "show", typed, "--dir", str(deployment.directory))
    assert shown.returncode == 0, shown.stderr
    assert "realm corp: alice" in shown.stdout and "not enrolled" in shown.stdout


@pytest.mark.parametrize("command", [["show"], ["totp-reset"], ["unlock"]])
def test_a_user_command_given_an_unknown_name_fails_and_says_so(
        deployment: Deployment, samba: Samba, command: list[str]) -> None:
    add_ad_flow(deployment, samba)
    asyncio.run(answering_redis_url())
    deployment.set("store", "ephemeral",
                   f'"{REDIS_URL}?prefix=pc-identity-{secrets.token_hex(4)}:"')
    result = run_cli("user", *command, "nobody@pc.test", "--dir", str(deployment.directory))
    assert result.returncode == 1, result.stdout
    assert "no user 'nobody@pc.test' in realm corp" in result.stderr
    audit = deployment.directory / "audit.jsonl"
    assert not audit.exists() or "totp.reset" not in audit.read_text()


def test_totp_reset_by_upn_resets_the_account_it_names(
        deployment: Deployment, samba: Samba) -> None:
    add_ad_flow(deployment, samba)
    reset = run_cli("user", "totp-reset", "Alice@PC.test", "--dir", str(deployment.directory))
    assert reset.returncode == 0, reset.stderr
    assert "corp:alice had no TOTP secret" in reset.stdout


def test_unlock_by_mail_clears_the_lockout_of_the_account_it_names(
        deployment: Deployment, samba: Samba) -> None:
    add_ad_flow(deployment, samba)
    asyncio.run(answering_redis_url())
    deployment.set("store", "ephemeral",
                   f'"{REDIS_URL}?prefix=pc-identity-{secrets.token_hex(4)}:"')
    settings = load_settings(config_path(deployment.directory))

    async def lock_and_read(lock: bool) -> bool:
        ephemeral = open_ephemeral(settings.store.ephemeral)
        try:
            throttle = Throttle(ephemeral, settings.auth.throttle)
            if lock:
                for _ in range(settings.auth.throttle.account_failures):
                    await throttle.failed("corp:alice", "198.51.100.9")
            return (await throttle.account("corp:alice")).locked
        finally:
            await ephemeral.close()

    assert asyncio.run(lock_and_read(True))
    shown = run_cli("user", "show", "alice@pc.test", "--dir", str(deployment.directory))
    assert "lockout: LOCKED" in shown.stdout, shown.stdout + shown.stderr
    unlocked = run_cli("user", "unlock", "ＡＬＩＣＥ@pc.test", "--dir", str(deployment.directory))
    assert unlocked.returncode == 0, unlocked.stderr
    assert "unlocked corp:alice" in unlocked.stdout
    assert not asyncio.run(lock_and_read(False))


def test_totp_code_issues_a_code_the_enrolment_step_of_a_directory_user_accepts(
        deployment: Deployment, samba: Samba) -> None:
    add_ad_flow(deployment, samba)
    with deployment.config.open("a") as handle:
        handle.write('[[auth.flows.steps]]\nprovider = "totp"\n[auth.totp]\nenrolment = "code"\n')
    issued = run_cli("user", "totp-code", "alice@pc.test", "--dir", str(deployment.directory))
    assert issued.returncode == 0, issued.stderr
    code = re.search(r"enrolment code for corp:alice: ([a-z0-9]{5}-[a-z0-9]{5})", issued.stdout)
    assert code, issued.stdout
    audit = (deployment.directory / "audit.jsonl").read_text()
    assert '"event":"totp.enrolment_code_issued","identity":"corp:alice"' in audit
    assert code.group(1) not in audit
    dry = run_cli("auth", "test", "--user", "alice", "--answer",
                  f"password={PASSWORDS['alice']}", "--dir", str(deployment.directory))
    assert "with the enrolment code an administrator issued" in dry.stdout, dry.stdout

    async def enrol_step(answer: str) -> str:
        settings = load_settings(config_path(deployment.directory))
        durable = await DurableStore.open(settings.durable_url())
        try:
            hasher = TokenHasher.from_directory(settings.path(settings.secrets_dir))
            ephemeral = MemoryStore()
            providers = IdentityProviders(settings, durable, ephemeral, hasher)
            service = LoginService(
                providers.flow(), ephemeral, hasher,
                SessionManager(ephemeral, AccountStatus(durable), hasher, settings.session),
                settings.session, AuditTrail(None), Throttle(ephemeral, settings.auth.throttle))
            context = LoginContext("192.0.2.10")
            step = await service.submit(None, {"username": "ALICE",
                                               "password": PASSWORDS["alice"]}, context)
            assert isinstance(step, NextStep) and step.step.kind == "totp-enrolment-code"
            shown = await service.submit(step.handle, {"enrolment_code": answer}, context)
            return shown.step.kind if isinstance(shown, NextStep) else "denied"
        finally:
            await durable.close()

    assert asyncio.run(enrol_step("wrong-guess")) == "denied"
    assert asyncio.run(enrol_step(code.group(1))) == "totp-enrol"
    # Single use: the same code a second time is refused.
    assert asyncio.run(enrol_step(code.group(1))) == "denied"


def test_disable_by_upn_disables_the_local_account_that_governs_the_directory_user(
        deployment: Deployment, samba: Samba) -> None:
    add_ad_flow(deployment, samba)
    deployment.add_user("alice", "local-pw", [])
    disabled = run_cli("user", "disable", "ALICE@pc.test", "--dir", str(deployment.directory))
    assert disabled.returncode == 0, disabled.stderr
    assert disabled.stdout.strip() == "disabled alice"
    listed = run_cli("user", "list", "--dir", str(deployment.directory))
    assert re.search(r"^alice\s+disabled", listed.stdout, re.MULTILINE), listed.stdout
    unknown = run_cli("user", "disable", "nobody@pc.test", "--dir", str(deployment.directory))
    assert unknown.returncode == 1
    assert "no local account 'nobody@pc.test'" in unknown.stderr
