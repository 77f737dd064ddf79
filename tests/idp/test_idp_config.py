"""`[oidc]` is checked when the file is read, and every error names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from portcullis.config.loader import parse_settings
from portcullis.errors import ConfigError
from portcullis.idp.endpoints import client_secrets

CLIENT = '''
[oidc]
enabled = true
[[oidc.clients]]
id = "wiki"
redirect_uris = ["https://wiki.test/cb"]
groups = ["staff"]
'''


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, path=Path("/etc/portcullis/portcullis.toml"))
    return caught.value


@pytest.mark.parametrize(("change", "key", "says"), [
    (('"https://wiki.test/cb"', '"https://wiki.test/cb#x"'), "oidc.clients[0].redirect_uris",
     "fragment"),
    (('"https://wiki.test/cb"', '"http://wiki.test/cb"'), "oidc.clients[0].redirect_uris",
     "loopback"),
    (('"https://wiki.test/cb"', '"/cb"'), "oidc.clients[0].redirect_uris", "absolute"),
    (('groups = ["staff"]', 'groups = []'), "oidc.clients[0].groups", "at least 1"),
    (('groups = ["staff"]', 'groups = ["staff"]\nscopes = ["openid", "admin"]'),
     "oidc.clients[0].scopes", "unknown scope 'admin'"),
    (('groups = ["staff"]', 'groups = ["staff"]\nscopes = ["profile"]'),
     "oidc.clients[0].scopes", "openid"),
    (('enabled = true', 'enabled = true\ncode_lifetime = 300'), "oidc.code_lifetime", "60"),
    (('enabled = true', 'enabled = true\naccess_token_lifetime = 7200'),
     "oidc.access_token_lifetime", "3600"),
])
def test_a_bad_client_setting_names_its_key(change: tuple[str, str], key: str,
                                            says: str) -> None:
    error = error_of(CLIENT.replace(*change))
    assert error.key == key and says in str(error)


def test_a_client_id_used_twice_is_refused() -> None:
    error = error_of(CLIENT + CLIENT.split("[oidc]\nenabled = true\n")[1])
    assert "oidc.clients[1].id" in str(error) and "used twice" in str(error)


def test_loopback_http_redirect_uris_are_allowed_for_native_applications() -> None:
    settings = parse_settings(CLIENT.replace("https://wiki.test/cb", "http://127.0.0.1:8765/cb"),
                              path=Path("/x/portcullis.toml"))
    assert settings.oidc.clients[0].public


def test_an_unreadable_or_short_secret_file_names_its_key(tmp_path: Path) -> None:
    text = CLIENT.replace('id = "wiki"', 'id = "wiki"\nsecret_file = "wiki.secret"')
    settings = parse_settings(text, path=tmp_path / "portcullis.toml")
    with pytest.raises(ConfigError) as missing:
        client_secrets(settings)
    (tmp_path / "wiki.secret").write_text("short\n")
    with pytest.raises(ConfigError) as short:
        client_secrets(settings)
    assert missing.value.key == short.value.key == "oidc.clients[0].secret_file"
    assert "shorter than 16" in str(short.value)
