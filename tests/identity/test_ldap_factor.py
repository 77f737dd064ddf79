"""The LDAP factor against the real slapd (tests/peers/ldap.py): sign-in by each login
attribute over LDAPS and StartTLS, the claims an entry becomes, what must be refused
(wrong or empty password, unknown users, filter injection), nested groups, required
attributes, failover, an unreadable bind password, and TLS certificate verification."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import free_port
from peers.ldap import USERS, Slapd
from peers.login import HASHER_KEY, BuildLogin, Login, flow, settings_for
from portcullis.errors import ConfigError
from portcullis.identity.claims import Claims
from portcullis.identity.login import Authenticated, Denied
from portcullis.identity.providers import IdentityProviders
from portcullis.store import DurableStore, MemoryStore
from portcullis.tokens import TokenHasher

pytestmark = pytest.mark.peer

BIND_PASSWORD_FILE = "corp-bind.pw"
ALICE = USERS["alice"]


def corp(slapd: Slapd, **overrides: Any) -> dict[str, Any]:
    """An ldap provider "corp" over LDAPS, verified against slapd's CA."""
    return {**slapd.provider("corp", BIND_PASSWORD_FILE, timeout=3), **overrides}


@pytest.fixture
def make_login(slapd: Slapd, build_login: BuildLogin, tmp_path: Path):  # type: ignore[no-untyped-def]
    """make_login(**provider overrides, throttle=...) -> a one-step LDAP flow."""
    (tmp_path / BIND_PASSWORD_FILE).write_text(slapd.bind_password + "\n")

    def make(throttle: dict[str, Any] | None = None, **overrides: Any) -> Login:
        return build_login(flow({"provider": "corp"}, providers=[corp(slapd, **overrides)]),
                           throttle=throttle)

    return make


# Both transports: LDAPS, and plain LDAP upgraded with StartTLS before any bind.
TRANSPORTS = ["ldaps", "starttls"]


def transport(slapd: Slapd, name: str) -> dict[str, Any]:
    if name == "ldaps":
        return {"servers": [slapd.ldaps_url], "start_tls": False}
    return {"servers": [slapd.ldap_url], "start_tls": True}


def assert_alice(claims: Claims) -> None:
    assert claims.username == "alice"
    assert claims.sub == "corp:alice" and claims.idp == "corp"
    assert claims.amr == ("corp",)
    assert claims.email == ALICE.mail == "alice@corp.example"
    assert claims.upn == ALICE.user_principal_name
    assert claims.display_name == "Alice Liddell"
    assert claims.sid == "S-1-5-21-1-2-3-1104"
    assert claims.guid == str(ALICE.guid)
    assert set(claims.groups) == {"staff", "finance"}


@pytest.mark.parametrize("via", TRANSPORTS)
@pytest.mark.parametrize("typed", ["alice", "ALICE", "alice@corp.example"])
async def test_alice_signs_in_and_gets_her_directory_claims(
        make_login, slapd: Slapd, via: str, typed: str) -> None:  # type: ignore[no-untyped-def]
    login = make_login(**transport(slapd, via))
    assert_alice(await login.claims(typed, ALICE.password))


# alice's UPN and mail are the same string; restricting login_attributes shows that each
# attribute on its own finds her, and that an attribute not listed does not.
@pytest.mark.parametrize(("attributes", "typed", "admitted"), [
    (["sAMAccountName"], "alice", True),
    (["userPrincipalName"], "alice@corp.example", True),
    (["mail"], "alice@corp.example", True),
    (["sAMAccountName"], "alice@corp.example", False),
    (["userPrincipalName", "mail"], "alice", False),
])
async def test_each_login_attribute_names_the_user(
        make_login, attributes: list[str], typed: str, admitted: bool) -> None:  # type: ignore[no-untyped-def]
    login = make_login(login_attributes=attributes)
    result = await login.sign_in(typed, ALICE.password)
    if admitted:
        assert isinstance(result, Authenticated)
        # Whatever was typed, the user name is the entry's sAMAccountName.
        assert_alice(result.session.claims)
    else:
        assert isinstance(result, Denied)


@pytest.mark.parametrize("via", TRANSPORTS)
async def test_wrong_password_and_unknown_user_are_denied(
        make_login, slapd: Slapd, via: str) -> None:  # type: ignore[no-untyped-def]
    login = make_login(**transport(slapd, via))
    assert isinstance(await login.sign_in("alice", "alice-pw-not"), Denied)
    assert isinstance(await login.sign_in("alice", USERS["bob"].password), Denied)
    assert isinstance(await login.sign_in("mallory", ALICE.password), Denied)
    assert not login.events("login.succeeded")
    # The same service still admits the right password: the denials were not an outage.
    assert_alice(await login.claims("alice", ALICE.password))


async def test_empty_password_is_refused_before_any_bind(make_login) -> None:  # type: ignore[no-untyped-def]
    # An LDAP simple bind with a DN and no password is an unauthenticated bind that
    # "succeeds" on many servers; the factor must never get that far.
    login = make_login()
    assert isinstance(await login.sign_in("alice", ""), Denied)
    assert login.last_failure() == "empty user name or password"
    assert isinstance(await login.sign_in("", ALICE.password), Denied)
    assert login.last_failure() == "empty user name or password"


@pytest.mark.parametrize("typed", [
    "*",
    "al*",                      # unescaped, this would match alice alone and sign her in
    "*lice",
    "alice)(|(cn=*",
    "*)(sAMAccountName=alice",
    "alice)(objectClass=*",
    "alice\\",
    "alice\x00",
])
async def test_filter_injection_in_the_user_name_is_denied(
        make_login, typed: str) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    assert isinstance(await login.sign_in(typed, ALICE.password), Denied)
    assert not login.events("login.factor_passed")


async def test_wrong_passwords_count_towards_the_lockout(make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login(throttle={"account_failures": 2})
    assert isinstance(await login.sign_in("alice", "nope-1"), Denied)
    assert login.last_failure() == "wrong password"
    assert await login.account_failures("corp:alice") == 1
    assert isinstance(await login.sign_in("mallory", "nope"), Denied)
    assert login.last_failure() == "unknown user"
    assert await login.address_failures() == 2
    assert isinstance(await login.sign_in("alice@corp.example", "nope-2"), Denied)
    # Locked now: even the right password is refused, and the directory is not asked.
    assert isinstance(await login.sign_in("alice", ALICE.password), Denied)
    assert login.last_failure() == "account locked"


async def test_a_locked_account_is_refused_without_checking_the_password(
        make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login(throttle={"account_failures": 1})
    await login.throttle.failed("corp:alice", "198.51.100.1")
    assert (await login.throttle.account("corp:alice")).locked
    # Typed by mail: the lock is keyed by the entry's user name, not by what was typed.
    assert isinstance(await login.sign_in("alice@corp.example", ALICE.password), Denied)
    assert login.last_failure() == "account locked"
    assert_alice(await make_login().claims("alice", ALICE.password))


@pytest.mark.parametrize(("nested", "groups"), [
    (True, {"staff", "emea", "sales"}),
    (False, {"staff", "emea"}),
])
async def test_nested_groups_follow_group_membership(
        make_login, nested: bool, groups: set[str]) -> None:  # type: ignore[no-untyped-def]
    login = make_login(nested_groups=nested)
    claims = await login.claims("bob", USERS["bob"].password)
    assert claims.username == "bob"
    assert set(claims.groups) == groups


async def test_an_entry_without_a_required_attribute_is_refused_and_logged(
        make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login(required_attributes=["mail"])
    with structlog.testing.capture_logs() as logs:
        result = await login.sign_in("carol", USERS["carol"].password)
    assert isinstance(result, Denied)
    assert login.last_failure() == "entry lacks mail"
    assert login.events("login.failed")[-1]["user"] == "carol"
    reports = [entry for entry in logs
               if entry["event"] == "directory entry lacks required attributes"]
    assert len(reports) == 1
    assert reports[0]["missing"] == ["mail"] and reports[0]["log_level"] == "error"
    assert reports[0]["dn"] == USERS["carol"].dn
    # alice has a mail attribute: the same provider admits her.
    assert_alice(await login.claims("alice", ALICE.password))


@pytest.mark.parametrize("via", TRANSPORTS)
async def test_a_dead_first_server_fails_over_to_the_next(
        make_login, slapd: Slapd, via: str) -> None:  # type: ignore[no-untyped-def]
    dead_scheme = "ldaps" if via == "ldaps" else "ldap"
    servers = [f"{dead_scheme}://127.0.0.1:{free_port()}", *transport(slapd, via)["servers"]]
    login = make_login(servers=servers, start_tls=via == "starttls")
    assert_alice(await login.claims("alice", ALICE.password))
    assert_alice(await login.claims("alice@corp.example", ALICE.password))


async def test_no_server_answering_denies_without_counting_a_failure(
        make_login) -> None:  # type: ignore[no-untyped-def]
    login = make_login(servers=[f"ldaps://127.0.0.1:{free_port()}",
                                f"ldaps://127.0.0.1:{free_port()}"],
                       throttle={"account_failures": 1, "address_failures": 1})
    for _ in range(3):
        assert isinstance(await login.sign_in("alice", ALICE.password), Denied)
        assert login.last_failure().startswith("directory unavailable")
    # Not the user's fault: neither the account nor the address was charged.
    assert await login.account_failures("corp:alice") == 0
    assert not (await login.throttle.account("corp:alice")).locked
    assert await login.address_failures() == 0
    assert [e["locked"] for e in login.events("login.failed")] == [None, None, None]


async def test_a_wrong_service_account_password_is_an_outage_not_a_failure(
        make_login, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    login = make_login()
    (tmp_path / BIND_PASSWORD_FILE).write_text("not-the-service-password\n")
    wrong = make_login()   # reads the file now
    assert isinstance(await wrong.sign_in("alice", ALICE.password), Denied)
    assert wrong.last_failure().startswith("directory unavailable")
    assert await wrong.address_failures() == 0
    # The first service read the right password before the file changed.
    assert_alice(await login.claims("alice", ALICE.password))


async def test_a_missing_bind_password_file_is_a_config_error_naming_the_key(
        slapd: Slapd, durable: DurableStore, tmp_path: Path) -> None:
    settings = settings_for(flow({"provider": "corp"}, providers=[
        corp(slapd, bind_password_file="secrets/missing.pw")]), tmp_path)
    providers = IdentityProviders(settings, durable, MemoryStore(), TokenHasher(HASHER_KEY))
    with pytest.raises(ConfigError) as raised:
        providers.flow()
    assert raised.value.key == "auth.providers[0].bind_password_file"
    assert "auth.providers[0].bind_password_file" in str(raised.value)
    assert str(tmp_path / "secrets" / "missing.pw") in str(raised.value)


def write_other_ca(path: Path) -> Path:
    """A CA certificate that did not sign slapd's certificate."""
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the LDAP CA")])
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256()))
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.mark.parametrize("via", TRANSPORTS)
@pytest.mark.parametrize("trust", ["other-ca", "system-cas"])
async def test_the_directory_certificate_is_verified(
        make_login, slapd: Slapd, tmp_path: Path, via: str, trust: str) -> None:  # type: ignore[no-untyped-def]
    ca_cert = str(write_other_ca(tmp_path / "other-ca.pem")) if trust == "other-ca" else None
    login = make_login(ca_cert=ca_cert, **transport(slapd, via))
    assert isinstance(await login.sign_in("alice", ALICE.password), Denied)
    assert login.last_failure().startswith("directory unavailable")
    assert not login.events("login.factor_passed")
    # The right CA, by a path relative to the deployment directory, is trusted.
    (tmp_path / "ldap-ca.pem").write_bytes(Path(slapd.ca_cert).read_bytes())
    trusted = make_login(ca_cert="ldap-ca.pem", **transport(slapd, via))
    assert_alice(await trusted.claims("alice", ALICE.password))
