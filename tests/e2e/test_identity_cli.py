"""The administrator's identity commands on a real deployment: `auth test` against slapd,
`user show`, `user totp-reset` (the user must enrol again), `cert issue`, and the config
errors that name the key."""

from __future__ import annotations

import asyncio
import time

import pyotp
import pytest

from conftest import Deployment, run_cli
from peers.ldap import PASSWORDS, Slapd
from peers.totp import oathtool_code
from portcullis.config import config_path, load_settings
from portcullis.identity.providers import IdentityProviders
from portcullis.identity.totp import Enrolment
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

pytestmark = pytest.mark.peer


def add_ldap_flow(deployment: Deployment, slapd: Slapd, *, finance_totp: bool) -> None:
    (deployment.directory / "secrets" / "ldap-bind").write_text(slapd.bind_password)
    totp = '[[auth.flows.steps]]\nprovider = "totp"\nwhen = { groups = ["finance"] }\n'
    with deployment.config.open("a") as handle:
        handle.write(f"""
[auth]
flow = "corp"
{slapd.provider_toml("corp", "secrets/ldap-bind", nested_groups=True)}[[auth.flows]]
name = "corp"
[[auth.flows.steps]]
provider = "corp"
{totp if finance_totp else ""}""")


def enrol(deployment: Deployment, identity: str) -> Enrolment:
    """Enrol a TOTP secret directly in the store, as a finished enrolment would."""
    async def run() -> Enrolment:
        settings = load_settings(config_path(deployment.directory))
        durable = await DurableStore.open(settings.durable_url())
        try:
            hasher = TokenHasher.from_directory(settings.path(settings.secrets_dir))
            service = IdentityProviders(settings, durable, MemoryStore(), hasher).totp()
            enrolment = service.new_enrolment(identity.split(":")[1])
            check = await service.confirm(identity, enrolment,
                                          pyotp.TOTP(enrolment.secret).now())
            assert check.ok
            return enrolment
        finally:
            await durable.close()

    return asyncio.run(run())


def test_auth_test_shows_each_step_and_the_claims(deployment: Deployment, slapd: Slapd) -> None:
    add_ldap_flow(deployment, slapd, finance_totp=False)
    result = run_cli("auth", "test", "--user", "bob@corp.example", "--answer",
                     f"password={PASSWORDS['bob']}", "--dir", str(deployment.directory))
    assert result.returncode == 0, result.stderr
    assert "passed  corp as bob" in result.stdout
    assert "sub           corp:bob" in result.stdout
    assert "sales" in result.stdout                  # nested: emea is a member of sales
    assert "S-1-5-21-1-2-3-1105" in result.stdout
    wrong = run_cli("auth", "test", "--user", "bob", "--answer", "password=nope",
                    "--dir", str(deployment.directory))
    assert wrong.returncode == 1
    assert "FAILED  corp: wrong password" in wrong.stdout   # the reason, for the admin
    # A dry run counts nothing: the real audit trail has no failure for bob.
    audit = (deployment.directory / "audit.jsonl")
    assert not audit.exists() or "nope" not in audit.read_text()


def test_auth_test_stops_before_an_enrolment_and_reports_skipped_steps(
        deployment: Deployment, slapd: Slapd) -> None:
    add_ldap_flow(deployment, slapd, finance_totp=True)
    alice = run_cli("auth", "test", "--user", "alice", "--answer",
                    f"password={PASSWORDS['alice']}", "--dir", str(deployment.directory))
    assert alice.returncode == 0, alice.stderr
    assert "a real sign-in would enrol now" in alice.stdout
    bob = run_cli("auth", "test", "--user", "bob", "--answer", f"password={PASSWORDS['bob']}",
                  "--dir", str(deployment.directory))
    assert "skipped totp: condition does not hold (not a member of finance)" in bob.stdout
    shown = run_cli("user", "show", "alice", "--dir", str(deployment.directory))
    assert "no local account" in shown.stdout and "not enrolled" in shown.stdout


def test_totp_reset_forces_enrolment_at_the_next_sign_in(
        deployment: Deployment, slapd: Slapd) -> None:
    add_ldap_flow(deployment, slapd, finance_totp=True)
    secret = enrol(deployment, "corp:alice").secret
    shown = run_cli("user", "show", "ALICE", "--dir", str(deployment.directory))
    assert "enrolled" in shown.stdout and "10 recovery codes left" in shown.stdout
    # The next step's code: the current one was used to enrol.
    code = oathtool_code(secret, time.time() + 30)
    signed_in = run_cli("auth", "test", "--user", "alice", "--answer",
                        f"password={PASSWORDS['alice']}", "--answer", f"code={code}",
                        "--dir", str(deployment.directory))
    assert signed_in.returncode == 0, signed_in.stdout + signed_in.stderr
    assert "passed  totp as alice" in signed_in.stdout
    reset = run_cli("user", "totp-reset", "alice", "--dir", str(deployment.directory))
    assert reset.returncode == 0 and "corp:alice" in reset.stdout
    again = run_cli("auth", "test", "--user", "alice", "--answer",
                    f"password={PASSWORDS['alice']}", "--dir", str(deployment.directory))
    assert "a real sign-in would enrol now" in again.stdout
    audit = (deployment.directory / "audit.jsonl").read_text()
    assert '"event":"totp.reset","identity":"corp:alice","removed":true' in audit


def test_a_broken_auth_section_names_the_key(deployment: Deployment) -> None:
    with deployment.config.open("a") as handle:
        handle.write('\n[auth]\nflow = "corp"\n[[auth.flows]]\nname = "corp"\n'
                     '[[auth.flows.steps]]\nprovider = "ldapp"\n')
    result = run_cli("user", "show", "alice", "--dir", str(deployment.directory))
    assert result.returncode == 2
    assert "auth" in result.stderr and "'ldapp'" in result.stderr


def test_a_missing_bind_password_file_names_the_key(
        deployment: Deployment, slapd: Slapd) -> None:
    add_ldap_flow(deployment, slapd, finance_totp=False)
    (deployment.directory / "secrets" / "ldap-bind").unlink()
    result = run_cli("auth", "test", "--user", "bob", "--answer", "password=x",
                     "--dir", str(deployment.directory))
    assert result.returncode == 2
    assert "auth.providers[0].bind_password_file" in result.stderr


def test_cert_issue_refuses_a_role_name(deployment: Deployment) -> None:
    result = run_cli("cert", "issue", "portcullis-gateway", "--out",
                     str(deployment.directory / "c"), "--dir", str(deployment.directory))
    assert result.returncode in (0, 2)
    if result.returncode == 0:
        pytest.fail("issued a certificate with a role's common name")


def test_auth_test_checks_a_recovery_code_without_using_it_up(
        deployment: Deployment, slapd: Slapd) -> None:
    add_ldap_flow(deployment, slapd, finance_totp=True)
    recovery = enrol(deployment, "corp:alice").recovery_codes[0]
    for _ in range(2):   # twice: the dry run did not spend it
        result = run_cli("auth", "test", "--user", "alice", "--answer",
                         f"password={PASSWORDS['alice']}", "--answer", f"code={recovery}",
                         "--dir", str(deployment.directory))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "passed  totp as alice" in result.stdout
    shown = run_cli("user", "show", "alice", "--dir", str(deployment.directory))
    assert "10 recovery codes left" in shown.stdout
