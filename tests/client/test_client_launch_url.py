"""The `portcullis://` launch URL and the desktop entry that opens it: a URL may come
from any web page, so the client takes only an https:// gateway and a ticket of the
STA's shape, and never a command to run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.client.desktop import SCHEME_MIME_TYPE, desktop_entry, exec_argument
from portcullis.client.launcher import foreign_gateway
from portcullis.errors import LaunchFileError
from portcullis.proto.launchfile import LaunchFile, format_launch_url, parse_launch_url

TICKET = "STA01;" + "Q2hhbmdlTWU-_" * 3
EXAMPLE = LaunchFile(resource="wiki", title="Team wiki & co",
                     gateway_url="wss://gw.example.com:8443/api/v1/launch", ticket=TICKET,
                     expires=datetime(2026, 11, 23, 13, 30, tzinfo=UTC))
URL = format_launch_url(EXAMPLE)


def test_a_launch_url_reads_back_as_the_launch_with_its_https_gateway() -> None:
    assert URL.startswith("portcullis://launch/?v=1&resource=wiki&")
    launch = parse_launch_url(URL)
    assert launch.gateway_url == "https://gw.example.com:8443/api/v1/launch"
    assert (launch.resource, launch.title, launch.ticket, launch.expires) == (
        EXAMPLE.resource, EXAMPLE.title, EXAMPLE.ticket, EXAMPLE.expires)


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40)
       .map(str.strip).filter(bool))
def test_any_title_survives_the_url(title: str) -> None:
    launch = LaunchFile("wiki", title, EXAMPLE.gateway_url, TICKET, EXAMPLE.expires)
    assert parse_launch_url(format_launch_url(launch)).title == title


@pytest.mark.parametrize("url", [
    URL.replace("gateway=https%3A", "gateway=http%3A"),                  # plain http
    URL.replace("gateway=https%3A", "gateway=wss%3A"),                   # not https
    URL.replace("gateway=https%3A%2F%2F", "gateway=https%3A%2F%2Fme%40"),  # user name
    URL.replace("%2Fapi%2Fv1%2Flaunch", "%2Fapi%3Fx%3D1"),               # a query
    URL.replace("ticket=STA01%3B", "ticket=STA01%3A"),                   # not a ticket
    URL.replace("ticket=STA01%3B", "ticket=STA01%3B%20"),                # a blank in it
    URL.replace("&title=", "&exec=xterm&title="),                        # an unknown key
    URL + "&v=1",                                                        # a key twice
    URL.replace("v=1", "v=2"),                                           # another version
    URL.replace("&expires=2026-11-23T13%3A30%3A00Z", ""),                # missing key
    URL.replace("Team%20wiki", "Team%0Awiki"),                           # a line break
    URL.replace("gw.example.com", "gw.examp]le.com"),                    # not a URL
    URL + "#x",
    URL.replace("portcullis://launch/", "portcullis://evil.example/"),
    URL.replace("resource=wiki", "resource=" + "w" * 3000),
])
def test_a_hostile_or_broken_url_is_refused_without_repeating_the_ticket(url: str) -> None:
    with pytest.raises(LaunchFileError) as refused:
        parse_launch_url(url)
    assert TICKET not in str(refused.value)


def test_the_desktop_entry_handles_the_scheme_and_passes_the_url_as_one_argument() -> None:
    entry = desktop_entry(["/opt/py thon/bin/python3", "/home/a/portcullis-client.pyz"])
    lines = dict(line.split("=", 1) for line in entry.splitlines()[1:] if line)
    assert lines["MimeType"] == SCHEME_MIME_TYPE + ";"
    assert lines["Exec"] == ('"/opt/py thon/bin/python3" /home/a/portcullis-client.pyz '
                             'open --hold %u')
    assert lines["Terminal"] == "true"


@pytest.mark.parametrize(("argument", "written"), [
    ("/usr/bin/python3", "/usr/bin/python3"),
    ("/a b/c", '"/a b/c"'),
    ('/a"$`b', '"/a\\\\"\\\\$\\\\`b"'),
    ("/100%", "/100%%"),
])
def test_exec_arguments_are_quoted_as_the_desktop_entry_specification_says(
        argument: str, written: str) -> None:
    assert exec_argument(argument) == written


@pytest.mark.parametrize(("signed_in", "noted"), [
    ("https://gw.example.com:8443", False),
    ("https://GW.example.com:8443/", False),
    ("https://gw.example.com", True),
    ("https://other.example.com:8443", True),
])
def test_a_launch_to_another_gateway_than_the_signed_in_one_is_pointed_out(
        signed_in: str, noted: bool) -> None:
    note = foreign_gateway(parse_launch_url(URL), signed_in)
    assert (note is not None) == noted
    assert note is None or "gw.example.com:8443" in note
