"""The launch file codec: what a client reads must be exactly what the portal wrote."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.errors import LaunchFileError, ProtocolError
from portcullis.proto.launchfile import (
    FILE_EXTENSION,
    MAX_SIZE,
    MIME_TYPE,
    LaunchFile,
    format_launch_file,
    parse_launch_file,
)

EXAMPLE = LaunchFile(
    resource="wiki",
    title="Team wiki",
    gateway_url="wss://gw.example.com:8443/api/v1/launch",
    ticket="STA01;Q2hhbmdlTWU",
    expires=datetime(2026, 11, 23, 13, 30, tzinfo=UTC),
)

EXAMPLE_TEXT = (
    "[Portcullis Launch]\n"
    "Version=1\n"
    "Resource=wiki\n"
    "Title=Team wiki\n"
    "Gateway=wss://gw.example.com:8443/api/v1/launch\n"
    "Ticket=STA01;Q2hhbmdlTWU\n"
    "Expires=2026-11-23T13:30:00Z\n"
)


def example_with(**changes: str | None) -> str:
    """EXAMPLE_TEXT with the named keys' values replaced (None removes the line)."""
    lines = []
    for line in EXAMPLE_TEXT.splitlines():
        key = line.partition("=")[0]
        if key in changes:
            if changes[key] is None:
                continue
            line = f"{key}={changes[key]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def test_constants_name_the_mime_type_and_extension() -> None:
    assert MIME_TYPE == "application/x-portcullis-launch"
    assert FILE_EXTENSION == ".portcullis"


def test_format_writes_the_documented_bytes_exactly() -> None:
    assert format_launch_file(EXAMPLE).encode("utf-8") == EXAMPLE_TEXT.encode("utf-8")


def test_parse_reads_the_documented_example() -> None:
    parsed = parse_launch_file(EXAMPLE_TEXT.encode("utf-8"))
    assert parsed == EXAMPLE
    assert parsed.expires.tzinfo is UTC


def test_parse_accepts_crlf_bom_comments_blank_lines_and_any_key_case() -> None:
    text = (
        "\ufeff; written by hand\r\n"
        "\r\n"
        "[ portcullis launch ]\r\n"
        "# a comment\r\n"
        "VERSION = 1\r\n"
        "resource=wiki\r\n"
        "TiTlE=  Team wiki  \r\n"
        "gateway=wss://gw.example.com:8443/api/v1/launch\r\n"
        "TICKET=STA01;Q2hhbmdlTWU\r\n"
        "Expires=2026-11-23T13:30:00Z"  # no final newline
    )
    assert parse_launch_file(text) == EXAMPLE


def test_parse_ignores_unknown_keys_and_other_sections() -> None:
    text = EXAMPLE_TEXT + "Colour=blue\n[Future Section]\nTicket=not-this-one\n"
    assert parse_launch_file(text) == EXAMPLE


def test_parse_converts_an_offset_timestamp_to_utc() -> None:
    parsed = parse_launch_file(example_with(Expires="2026-11-23T15:30:00+02:00"))
    assert parsed.expires == EXAMPLE.expires
    assert parsed.expires.utcoffset() == timedelta(0)


def test_repr_does_not_show_the_ticket() -> None:
    assert "Q2hhbmdlTWU" not in repr(EXAMPLE)


_value_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1
).map(lambda text: text.strip(" \t")).filter(bool)


@given(
    resource=_value_text,
    title=_value_text | st.just(""),
    ticket=st.from_regex(r"[\x21-\x7e]{1,200}", fullmatch=True),
    expires=st.datetimes(
        min_value=datetime(1970, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.just(UTC)
    ),
    scheme=st.sampled_from(["wss", "https"]),
)
def test_format_then_parse_returns_the_same_launch(
    resource: str, title: str, ticket: str, expires: datetime, scheme: str
) -> None:
    original = LaunchFile(
        resource=resource,
        title=title,
        gateway_url=f"{scheme}://gw.example.com/api/v1/launch",
        ticket=ticket,
        expires=expires,
    )
    assert parse_launch_file(format_launch_file(original)) == original


@given(title=st.text(alphabet=st.characters(codec="utf-8")))
def test_a_title_never_changes_any_other_field(title: str) -> None:
    try:
        text = format_launch_file(dataclasses.replace(EXAMPLE, title=title))
    except ValueError:
        return
    parsed = parse_launch_file(text)
    assert dataclasses.replace(parsed, title=EXAMPLE.title) == EXAMPLE


@pytest.mark.parametrize("breaker", ["\r", "\n", "\0", "\x0b", "\x85", "\u2028"])
def test_format_refuses_a_title_that_would_inject_a_line(breaker: str) -> None:
    evil = dataclasses.replace(EXAMPLE, title=f"Wiki{breaker}Ticket=STOLEN")
    with pytest.raises(ValueError, match="Title"):
        format_launch_file(evil)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"resource": ""}, "Resource"),
        ({"resource": " wiki"}, "blanks"),
        ({"gateway_url": "http://gw.example.com/"}, "wss:// or https://"),
        ({"ticket": "has space"}, "Ticket"),
        ({"expires": datetime(2026, 11, 23, 13, 30)}, "timezone"),
        ({"version": 2}, "version 1"),
    ],
)
def test_format_refuses_values_it_cannot_write(change: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_launch_file(dataclasses.replace(EXAMPLE, **change))  # type: ignore[arg-type]


def test_format_writes_a_non_utc_expiry_in_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    lf = dataclasses.replace(EXAMPLE, expires=datetime(2026, 11, 23, 15, 30, tzinfo=plus_two))
    assert "Expires=2026-11-23T13:30:00Z\n" in format_launch_file(lf)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (EXAMPLE_TEXT.split("\n", 1)[1], r"line 1: expected the section header"),
        ("; nothing here\n", "no \\[Portcullis Launch\\] section"),
        ("[Portcullis Launch\nVersion=1\n", "line 1: section header lacks"),
        (example_with(Ticket=None), "missing key 'Ticket'"),
        (example_with(Title=None), "missing key 'Title'"),
        (example_with(Version="2"), "line 2: launch file version 2 is not supported"),
        (example_with(Version="one"), "line 2: Version must be a whole number"),
        (EXAMPLE_TEXT + "title=Other\n", r"line 8: duplicate key 'title' \(first .* line 4\)"),
        (EXAMPLE_TEXT + "[Portcullis Launch]\n", "line 8: second"),
        (example_with(Gateway="http://gw.example.com/"), "line 5: Gateway URL must start with"),
        (example_with(Gateway="ftp://gw.example.com/"), "line 5: Gateway URL must start with"),
        (example_with(Gateway="wss://"), "line 5: Gateway URL has no host"),
        (example_with(Gateway="wss://u:p@gw.example.com/"), "user name or password"),
        (example_with(Gateway="wss://gw.example.com:99999/"), "not a valid URL"),
        (example_with(Expires="tomorrow"), "line 7: Expires must be a UTC timestamp"),
        (example_with(Expires="2026-11-23T13:30:00"), "line 7: Expires"),
        (example_with(Expires="2026-02-30T13:30:00Z"), "line 7: Expires"),
        (example_with(Ticket="two words"), "line 6: Ticket must be printable ASCII"),
        (example_with(Resource=""), "line 3: Resource is empty"),
        (EXAMPLE_TEXT + "no equals sign\n", "line 8: expected Key=Value"),
        (EXAMPLE_TEXT.replace("Title=Team wiki", "Title=Team\rTicket=X"), "line 4: control"),
        (EXAMPLE_TEXT.replace("Title=Team wiki", "Title=Team\0wiki"), "line 4: control"),
        (EXAMPLE_TEXT.replace("Title=Team wiki", "Title=Team\u2028wiki"), "line 4: control"),
    ],
)
def test_parse_rejects_malformed_files_with_the_line_or_key(text: str, match: str) -> None:
    with pytest.raises(LaunchFileError, match=match):
        parse_launch_file(text)


def test_parse_rejects_bytes_that_are_not_utf8() -> None:
    with pytest.raises(LaunchFileError, match="not UTF-8"):
        parse_launch_file(EXAMPLE_TEXT.encode("utf-8").replace(b"Team", b"T\xe9am"))


def test_parse_rejects_files_over_16_kib_before_reading_them() -> None:
    padded = EXAMPLE_TEXT + "; " + "x" * MAX_SIZE + "\n"
    with pytest.raises(LaunchFileError, match="limit is 16384"):
        parse_launch_file(padded)


def test_parse_accepts_a_file_of_exactly_16_kib() -> None:
    filler = MAX_SIZE - len(EXAMPLE_TEXT) - 3
    text = EXAMPLE_TEXT + "; " + "x" * filler + "\n"
    assert len(text.encode()) == MAX_SIZE
    assert parse_launch_file(text) == EXAMPLE


def test_parse_errors_never_repeat_the_ticket() -> None:
    with pytest.raises(LaunchFileError) as caught:
        parse_launch_file(example_with(Ticket="SECRET TICKET"))
    assert "SECRET" not in str(caught.value)


def test_launch_file_errors_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        parse_launch_file(b"")


@given(st.binary(max_size=512))
def test_parse_of_arbitrary_bytes_is_a_launch_or_one_launch_file_error(data: bytes) -> None:
    try:
        parsed = parse_launch_file(data)
    except LaunchFileError:
        return
    assert parsed.version == 1


@given(st.data())
def test_parse_of_a_mutated_example_is_a_launch_or_one_launch_file_error(
    data: st.DataObject,
) -> None:
    raw = bytearray(EXAMPLE_TEXT.encode())
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    try:
        parsed = parse_launch_file(bytes(raw))
    except LaunchFileError:
        return
    assert parsed.gateway_url.lower().startswith(("wss://", "https://"))
