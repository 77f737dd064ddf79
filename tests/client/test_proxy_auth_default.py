"""When `connect` asks for a proxy secret by default: the rule over the accounts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from portcullis.client.proxyauth import (
    Account,
    new_credentials,
    proxy_auth_default,
    proxy_url,
    write_credentials,
)
from portcullis.proto.proxyauth import ProxyCredentials

ME = 1000
SYSTEM = [Account("root", 0, "/bin/bash"), Account("daemon", 1, "/usr/sbin/nologin"),
          Account("nobody", 65534, "/usr/sbin/nologin"), Account("postgres", 110, "/bin/bash")]


def test_a_machine_with_only_system_accounts_and_me_needs_no_secret() -> None:
    decision = proxy_auth_default([*SYSTEM, Account("me", ME, "/bin/bash")], ME)
    assert not decision.required
    assert "no other local account" in decision.reason


def test_another_person_with_a_login_shell_turns_the_secret_on_and_is_named() -> None:
    decision = proxy_auth_default([*SYSTEM, Account("me", ME, "/bin/bash"),
                                   Account("bob", 1001, "/bin/zsh")], ME)
    assert decision.required
    assert "bob" in decision.reason


def test_an_account_without_a_login_does_not_count() -> None:
    for shell in ("/usr/sbin/nologin", "/bin/false", ""):
        decision = proxy_auth_default([Account("svc", 1002, shell)], ME)
        assert not decision.required, shell


def test_the_uid_range_is_that_of_ordinary_users() -> None:
    accounts = [Account("low", 999, "/bin/sh"), Account("high", 60001, "/bin/sh")]
    assert not proxy_auth_default(accounts, ME).required
    assert proxy_auth_default(accounts, ME, uid_min=500, uid_max=65000).required


def test_root_running_connect_still_protects_against_ordinary_users() -> None:
    assert proxy_auth_default([*SYSTEM, Account("alice", 1000, "/bin/bash")], 0).required


def test_many_other_accounts_are_summarised() -> None:
    accounts = [Account(f"user{n}", 2000 + n, "/bin/bash") for n in range(9)]
    assert proxy_auth_default(accounts, ME).reason.endswith("and 4 more")


def test_each_run_gets_a_new_secret_that_fits_in_a_url() -> None:
    first, second = new_credentials(), new_credentials()
    assert first.password != second.password and len(first.password) >= 32
    assert proxy_url("socks", "127.0.0.1", 1080, first) == (
        f"socks5h://portcullis:{first.password}@127.0.0.1:1080")
    assert proxy_url("http", "::1", 3128, None) == "http://[::1]:3128"


def test_the_credentials_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    secret = ProxyCredentials("portcullis", "s3cret")
    path = write_credentials(tmp_path / "home", secret, {"socks": "socks5h://x"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"user": "portcullis", "password": "s3cret",
                                            "socks": "socks5h://x"}
