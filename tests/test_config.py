"""Configuration: typed settings whose errors name the key and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from portcullis.config import parse_settings
from portcullis.errors import ConfigError

RESOURCE = '[[resources]]\nname = "wiki"\ntitle = "Wiki"\naddress = "wiki:80"\n'


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, path=Path("/etc/portcullis.toml"))
    return caught.value


def test_an_invalid_value_names_the_key_and_its_line() -> None:
    error = error_of('[gateway]\nlisten = "127.0.0.1:8443"\n\n[sta]\nticket_lifetime = -1\n')
    assert (error.key, error.line) == ("sta.ticket_lifetime", 5)
    assert str(error).startswith("/etc/portcullis.toml:5: sta.ticket_lifetime: ")


def test_a_dead_peer_timeout_not_above_the_keepalive_interval_names_its_key() -> None:
    error = error_of("[vpn]\nkeepalive_interval = 20\ndead_peer_timeout = 20\n")
    assert (error.key, error.line) == ("vpn.dead_peer_timeout", 3)
    assert "more than keepalive_interval" in str(error)


def test_an_error_in_the_second_resource_points_at_its_own_line() -> None:
    error = error_of(RESOURCE + '\n[[resources]]\nname = "b"\ntitle = "B"\naddress = "nohost"\n')
    assert (error.key, error.line) == ("resources[1].address", 9)
    assert "Value error" not in str(error) and "HOST:PORT" in str(error)


def test_a_misspelt_key_is_an_error_not_ignored() -> None:
    error = error_of("[gateway]\nlisen = 1\n")
    assert error.key == "gateway.lisen" and "unknown setting" in str(error)


def test_broken_toml_names_the_line() -> None:
    assert error_of('[gateway]\nlisten = "unterminated\n').line == 2


def test_resource_user_names_are_canonical_and_titles_trimmed() -> None:
    settings = parse_settings(RESOURCE.replace('title = "Wiki"', 'title = "  Wiki  "')
                              + 'users = [" Alice", "ＢＯＢ"]\n', path=Path("p.toml"))
    assert settings.resources[0].users == ["alice", "bob"]
    assert settings.resources[0].title == "Wiki"


@pytest.mark.parametrize("title", ['"   "', '"two\\nlines"', '"tab\\there"'])
def test_blank_or_multi_line_titles_are_refused(title: str) -> None:
    error = error_of(RESOURCE.replace('"Wiki"', title))
    assert error.key == "resources[0].title"


def test_duplicate_resource_names_are_refused() -> None:
    assert "used twice" in str(error_of(RESOURCE + "\n" + RESOURCE))


@pytest.mark.parametrize("url", ["sqlite:///x.db", "postgresql://u@h/d", "postgres://u@h/d"])
def test_durable_store_urls_are_accepted(url: str) -> None:
    parse_settings(f'[store]\ndurable = "{url}"\n', path=Path("p.toml"))


def test_a_misspelt_resource_key_is_named_rather_than_the_missing_one() -> None:
    error = error_of(RESOURCE.replace("address", "adress"))
    assert (error.key, error.line) == ("resources[0].adress", 4)


def test_a_repeated_resource_name_points_at_the_repeat() -> None:
    assert error_of(RESOURCE + "\n" + RESOURCE).line == 7


def flow_toml(*steps: str, extra: str = "", realm: str = "") -> str:
    body = "".join(f"[[auth.flows.steps]]\n{step}\n" for step in steps)
    return (f'[auth]\nflow = "f"\n{extra}[[auth.flows]]\nname = "f"\n{realm}' + body)


@pytest.mark.parametrize(("text", "message"), [
    (flow_toml('provider = "ldapp"'), "names provider 'ldapp', which is not defined"),
    (flow_toml('provider = "totp"', realm='realm = "local"\n'),
     "has no step that can tell who the user is"),
    (flow_toml('provider = "totp"\nwhen = { passed = ["local"] }', 'provider = "local"'),
     "passed names 'local', which no earlier step"),
    (flow_toml('provider = "local"', 'provider = "totp"\nwhen = { certificate = "valid" }'),
     "reads the client certificate, but auth.client_ca is not set"),
    (flow_toml('provider = "certificate"'), "auth.client_ca is not set"),
    ('[auth]\nflow = "other"\n', "auth.flow names 'other', which auth.flows does not define"),
    (flow_toml('provider = "local"\nwhen = { client_address = ["10.0.0.300/8"] }'),
     "'10.0.0.300/8' is not an IPv4 or IPv6 network"),
    (flow_toml('provider = "local"\nwhen = { certificate_subject = "(" }',
               extra='client_ca = "pki/ca.crt"\n'), "not a regular expression"),
])
def test_broken_auth_sections_are_refused_with_the_reason(text: str, message: str) -> None:
    error = error_of(text)
    assert str(error).startswith("/etc/portcullis.toml:") and message in str(error)
    assert error.key is not None and error.key.startswith("auth")


def test_the_three_seed_flows_are_accepted_as_written() -> None:
    ldap = ('[[auth.providers]]\ntype = "ldap"\nname = "corp"\nservers = ["ldaps://dc1"]\n'
            'bind_dn = "cn=svc"\nbind_password_file = "secrets/ldap"\nbase_dn = "dc=corp"\n'
            '[[auth.providers]]\ntype = "radius"\nname = "radius"\nservers = ["10.0.0.2:1812"]\n'
            'secret_file = "secrets/radius"\n')
    for steps in (('provider = "radius"', 'provider = "corp"'),
                  ('provider = "totp"\nwhen = { not = { certificate = "valid" } }',
                   'provider = "corp"'),
                  ('provider = "corp"', 'provider = "totp"\nwhen = { groups = ["Finance"] }')):
        settings = parse_settings(flow_toml(*steps, extra='client_ca = "pki/ca.crt"\n' + ldap),
                                  path=Path("/etc/portcullis.toml"))
        assert [step.provider for step in settings.auth.flow_named("f").steps] == [
            line.split('"')[1] for line in steps]


def test_a_relay_in_classic_mode_without_its_address_names_dialer_relay() -> None:
    error = error_of('[dialer]\nvia = "relay"\nmode = "classic"\n')
    assert "dialer.relay: classic mode needs the relay's HOST:PORT" in str(error)


def test_an_address_pool_through_a_relay_is_refused_naming_the_pool() -> None:
    error = error_of('[vpn]\naddress_pool = "10.9.0.0/24"\n\n'
                     '[dialer]\nvia = "relay"\nmode = "dial-out"\n')
    assert "vpn.address_pool: tunnels' pool addresses" in str(error)
    assert 'dialer.via = "direct"' in str(error)


def test_a_relay_backoff_that_shrinks_names_reconnect_max() -> None:
    error = error_of("[relay]\nreconnect_min = 5\nreconnect_max = 1\n")
    assert (error.key, error.line) == ("relay.reconnect_max", 3)
    assert "not be less than reconnect_min (5.0)" in str(error)



def resource_toml(**fields: object) -> str:
    return "[[resources]]\n" + "".join(
        f"{key} = {str(value).lower() if isinstance(value, bool) else json.dumps(value)}\n"
        for key, value in fields.items())


@pytest.mark.parametrize(("fields", "key", "expected"), [
    ({"name": "a", "title": "A"}, "resources[0]", 'a tcp resource needs address = "HOST:PORT"'),
    ({"name": "w", "title": "W", "kind": "web", "host": "wiki.localhost"}, "resources[0]",
     "a web resource needs upstream"),
    ({"name": "w", "title": "W", "kind": "web", "upstream": "ftp://x", "host": "w.localhost"},
     "resources[0].upstream", "expected http(s)://HOST[:PORT][/PREFIX]"),
    ({"name": "w", "title": "W", "kind": "web", "upstream": "http://h:99999",
      "host": "w.localhost"}, "resources[0].upstream", "the port is not a number"),
    ({"name": "w", "title": "W", "kind": "web", "upstream": "http://h", "host": "w:8443"},
     "resources[0].host", "is not a host name"),
    ({"name": "v", "title": "V", "address": "h:5900", "password_file": "p"}, "resources[0]",
     'password_file: only for vnc resources, this one is kind = "tcp"'),
    ({"name": "v", "title": "V", "kind": "vnc", "address": "h:5900", "host": "v.localhost"},
     "resources[0]", 'host: only for web resources, this one is kind = "vnc"'),
])
def test_a_resource_of_each_kind_needs_its_own_fields(fields: dict[str, object], key: str,
                                                       expected: str) -> None:
    error = error_of(resource_toml(**fields))
    assert error.key == key and expected in str(error)


def test_a_web_resource_gets_a_host_name_of_its_own_under_the_gateways() -> None:
    settings = parse_settings(
        resource_toml(name="wiki", title="Wiki", kind="web", upstream="http://127.0.0.1:8080/",
                      host="Wiki.LOCALHOST.")
        + resource_toml(name="desk", title="Desk", kind="vnc", address="127.0.0.1:5900"),
        path=Path("/etc/portcullis.toml"))
    wiki, desk = settings.resources
    assert (wiki.kind, wiki.host, wiki.upstream) == ("web", "wiki.localhost",
                                                     "http://127.0.0.1:8080")
    assert (desk.kind, settings.resources[0].address) == ("vnc", "")
    elsewhere = error_of(resource_toml(name="w", title="W", kind="web", upstream="http://h",
                                       host="w.example.org"))
    assert "must be a name under the gateway's ('NAME.localhost')" in str(elsewhere)
    twice = error_of("".join(resource_toml(name=name, title=name, kind="web", upstream="http://h",
                                           host="wiki.localhost") for name in ("a", "b")))
    assert "host 'wiki.localhost' is used twice" in str(twice)


def test_the_ephemeral_store_defaults_to_the_embedded_file_beside_the_configuration() -> None:
    settings = parse_settings("", path=Path("/etc/portcullis.toml")).model_copy(
        update={"base_dir": Path("/srv/deployment")})
    assert settings.store.ephemeral == "sqlite:///ephemeral.db"
    assert settings.ephemeral_url() == "sqlite:////srv/deployment/ephemeral.db"
    absolute = parse_settings('[store]\nephemeral = "sqlite:////var/lib/pc/e.db"\n',
                              path=Path("/etc/portcullis.toml"))
    assert absolute.ephemeral_url() == "sqlite:////var/lib/pc/e.db"


@pytest.mark.parametrize("url", ["memory://", "redis://127.0.0.1:6379/0",
                                 "rediss://redis.internal/0", "sqlite:///e.db"])
def test_every_ephemeral_store_url_kind_is_accepted(url: str) -> None:
    settings = parse_settings(f'[store]\nephemeral = "{url}"\n', path=Path("/p.toml"))
    assert settings.store.ephemeral == url


@pytest.mark.parametrize("url", ["sqlite:///", "memcached://x", "sqlite://host/e.db"])
def test_an_ephemeral_store_url_of_no_known_kind_names_its_key(url: str) -> None:
    error = error_of(f'[store]\nephemeral = "{url}"\n')
    assert error.key == "store.ephemeral"
    assert "sqlite:///file.db" in str(error)
