"""The launch file: what the portal hands a client to open one resource through the gateway.

A small INI-like text file (in the spirit of Citrix .ica files), specified in
docs/launch-file.md::

    [Portcullis Launch]
    Version=1
    Resource=wiki
    Title=Team wiki
    Gateway=wss://gw.example.com:8443/api/v1/launch
    Ticket=STA01;Q2hhbmdlTWU...
    Expires=2026-11-23T13:30:00Z

`format_launch_file` writes UTF-8 text with LF line endings (one per line, including the
last); `parse_launch_file` also accepts CRLF and a leading byte order mark, since Windows
tools add both.

The same launch also travels as a `portcullis://` URL (`format_launch_url`,
`parse_launch_url`), which the portal links to and the client's URL handler opens, so
nothing is written to the Downloads folder. A URL may come from any web page, so it is
read more strictly than a file: an https:// gateway only, a ticket of the STA's shape,
no key unknown or given twice.

This codec is pure: no I/O, no clock (expiry is the STA's business, not the parser's).
It must never emit a file in which a value could start a new line, so a title cannot
inject a Ticket or Gateway line, and it has no field for the resource server's address:
clients only ever learn the gateway. Error messages never repeat the ticket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from portcullis.errors import LaunchFileError

MIME_TYPE = "application/x-portcullis-launch"
FILE_EXTENSION = ".portcullis"
SECTION = "Portcullis Launch"
SUPPORTED_VERSION = 1
MAX_SIZE = 16 * 1024  # bytes of UTF-8; a real file is a few hundred
GATEWAY_SCHEMES = ("wss", "https")

# Field order in a written file; the keys are case-insensitive when read.
_KEYS = ("Version", "Resource", "Title", "Gateway", "Ticket", "Expires")

_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})\Z"
)
# A ticket travels in a JSON string and an HTTP header-like line: printable ASCII only.
_TICKET = re.compile(r"[\x21-\x7e]+\Z")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
_VERSION = re.compile(r"[0-9]{1,9}\Z")
# Characters that some reader, somewhere, takes as the end of a line.
_LINE_BREAKERS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")

URL_SCHEME = "portcullis"
_URL_PREFIX = f"{URL_SCHEME}://launch/?"
MAX_URL_LENGTH = 2048   # a real one is about 250 characters
# The URL's keys (all required) and the launch file keys they stand for.
_URL_KEYS = {"v": "Version", "resource": "Resource", "title": "Title", "gateway": "Gateway",
             "ticket": "Ticket", "expires": "Expires"}
# The STA's tickets: its id, ";", then a URL-safe random part (sta/authority.py).
_URL_TICKET = re.compile(r"[A-Za-z0-9]{1,16};[A-Za-z0-9_-]{16,64}\Z")
_BLANK = " \t"


@dataclass(frozen=True)
class LaunchFile:
    """One launch of one resource: where the gateway is and the ticket to present there."""

    resource: str
    title: str
    gateway_url: str
    ticket: str = field(repr=False)  # a bearer secret until redeemed
    expires: datetime  # timezone-aware; parse_launch_file returns UTC
    version: int = SUPPORTED_VERSION


def format_launch_file(lf: LaunchFile) -> str:
    """The text of a launch file for `lf`; ValueError if a value cannot be written safely.

    Values may not contain control characters or line breaks (CR, LF, NUL, U+2028...),
    nor begin or end with blanks, which a reader strips.
    """
    if lf.version != SUPPORTED_VERSION:
        raise ValueError(f"this codec writes launch file version {SUPPORTED_VERSION} only")
    if lf.expires.tzinfo is None or lf.expires.utcoffset() is None:
        raise ValueError("expires must be timezone-aware")
    try:
        expires = _format_timestamp(lf.expires)
    except OverflowError:
        raise ValueError("expires is out of range once converted to UTC") from None
    values = {
        "Version": str(lf.version),
        "Resource": lf.resource,
        "Title": lf.title,
        "Gateway": lf.gateway_url,
        "Ticket": lf.ticket,
        "Expires": expires,
    }
    for key, value in values.items():
        problem = _value_problem(value)
        if problem is not None:
            raise ValueError(f"{key}: {problem}")
    if not lf.resource:
        raise ValueError("Resource: must not be empty")
    problem = _gateway_problem(lf.gateway_url)
    if problem is not None:
        raise ValueError(f"Gateway: {problem}")
    if not _TICKET.match(lf.ticket):
        raise ValueError("Ticket: must be printable ASCII without spaces")
    lines = [f"[{SECTION}]", *(f"{key}={values[key]}" for key in _KEYS)]
    text = "\n".join(lines) + "\n"
    if len(text.encode("utf-8")) > MAX_SIZE:
        raise ValueError(f"the launch file would exceed {MAX_SIZE} bytes")
    return text


def parse_launch_file(text: str | bytes) -> LaunchFile:
    """Read a launch file; LaunchFileError naming the line or key for anything wrong.

    Unknown keys and other sections are ignored (newer portals may add them); comment
    lines start with ';' or '#'; blank lines are allowed; keys are case-insensitive;
    blanks around keys and values are stripped.
    """
    if isinstance(text, str):
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError:
            raise LaunchFileError("launch file text holds a lone surrogate") from None
    if len(text) > MAX_SIZE:
        raise LaunchFileError(f"launch file is {len(text)} bytes; the limit is {MAX_SIZE}")
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LaunchFileError(
            f"launch file is not UTF-8 text (invalid byte at offset {exc.start})"
        ) from None
    return _parse_lines(decoded.removeprefix("\ufeff"))


def _parse_lines(text: str) -> LaunchFile:
    values: dict[str, tuple[int, str]] = {}  # lower-case key -> (line number, value)
    seen_section = False  # the [Portcullis Launch] section
    seen_any_section = False
    in_section = False
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start another
    for number, raw in enumerate(lines, start=1):
        line = raw.removesuffix("\r")
        bad = _first_control_character(line)
        if bad is not None:
            raise LaunchFileError(f"line {number}: control character U+{ord(bad):04X} in the file")
        stripped = line.strip(_BLANK)
        if not stripped or stripped[0] in ";#":
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]"):
                raise LaunchFileError(f"line {number}: section header lacks its closing ']'")
            name = stripped[1:-1].strip(_BLANK)
            seen_any_section = True
            if name.lower() == SECTION.lower():
                if seen_section:
                    raise LaunchFileError(f"line {number}: second [{SECTION}] section")
                seen_section = in_section = True
            else:
                in_section = False
            continue
        if not seen_any_section:
            raise LaunchFileError(
                f"line {number}: expected the section header [{SECTION}] before any key"
            )
        key, equals, value = stripped.partition("=")
        key = key.rstrip(_BLANK)
        if not equals or not _KEY.match(key):
            raise LaunchFileError(f"line {number}: expected Key=Value")
        if not in_section:
            continue
        folded = key.lower()
        if folded in values:
            first = values[folded][0]
            raise LaunchFileError(
                f"line {number}: duplicate key {key!r} (first given on line {first})"
            )
        values[folded] = (number, value.lstrip(_BLANK))

    if not seen_section:
        raise LaunchFileError(f"not a launch file: no [{SECTION}] section header")
    return _build(values)


def _build(values: dict[str, tuple[int, str]]) -> LaunchFile:
    def get(key: str) -> tuple[int, str]:
        try:
            return values[key.lower()]
        except KeyError:
            raise LaunchFileError(f"missing key {key!r} in [{SECTION}]") from None

    line, version_text = get("Version")
    if not _VERSION.match(version_text):
        raise LaunchFileError(f"line {line}: Version must be a whole number")
    version = int(version_text)
    if version != SUPPORTED_VERSION:
        raise LaunchFileError(
            f"line {line}: launch file version {version} is not supported; this client "
            f"reads version {SUPPORTED_VERSION} (update the client)"
        )

    line, resource = get("Resource")
    if not resource:
        raise LaunchFileError(f"line {line}: Resource is empty")
    _, title = get("Title")
    line, gateway_url = get("Gateway")
    problem = _gateway_problem(gateway_url)
    if problem is not None:
        raise LaunchFileError(f"line {line}: Gateway {problem}")
    line, ticket = get("Ticket")
    if not _TICKET.match(ticket):
        raise LaunchFileError(f"line {line}: Ticket must be printable ASCII without spaces")
    line, expires_text = get("Expires")
    expires = _parse_timestamp(expires_text)
    if expires is None:
        raise LaunchFileError(
            f"line {line}: Expires must be a UTC timestamp like 2026-11-23T13:30:00Z"
        )
    return LaunchFile(
        resource=resource,
        title=title,
        gateway_url=gateway_url,
        ticket=ticket,
        expires=expires,
        version=version,
    )


def format_launch_url(lf: LaunchFile) -> str:
    """The `portcullis://` URL of a launch; ValueError as `format_launch_file`, or if the
    gateway is not https:// (a wss:// one is given as its https:// twin)."""
    format_launch_file(lf)   # the same checks of every value
    gateway = lf.gateway_url
    if gateway.lower().startswith("wss://"):
        gateway = "https://" + gateway[len("wss://"):]
    if not gateway.lower().startswith("https://"):
        raise ValueError("Gateway: a launch URL needs an https:// or wss:// gateway")
    if not _URL_TICKET.match(lf.ticket):
        raise ValueError("Ticket: not shaped like a ticket of the STA")
    query = urlencode({"v": str(lf.version), "resource": lf.resource, "title": lf.title,
                       "gateway": gateway, "ticket": lf.ticket,
                       "expires": _format_timestamp(lf.expires)}, quote_via=quote)
    url = _URL_PREFIX + query
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the launch URL would exceed {MAX_URL_LENGTH} characters")
    return url


def parse_launch_url(url: str) -> LaunchFile:
    """Read a `portcullis://launch/?…` URL; LaunchFileError saying what is wrong (never
    repeating the ticket). The gateway is https:// only."""
    if len(url) > MAX_URL_LENGTH:
        raise LaunchFileError(f"launch URL is longer than {MAX_URL_LENGTH} characters")
    if not url.startswith(_URL_PREFIX) or "#" in url:
        raise LaunchFileError(f"not a launch URL: expected {_URL_PREFIX}… without a fragment")
    try:
        pairs = parse_qsl(url[len(_URL_PREFIX):], keep_blank_values=True,
                          strict_parsing=True, errors="strict",
                          max_num_fields=len(_URL_KEYS))
    except (ValueError, UnicodeDecodeError):
        raise LaunchFileError("launch URL: the query is not KEY=VALUE&… of UTF-8 "
                              f"(keys: {', '.join(_URL_KEYS)})") from None
    values: dict[str, tuple[int, str]] = {}
    for key, value in pairs:
        if key not in _URL_KEYS:
            raise LaunchFileError(f"launch URL: unknown key {key[:20]!r}")
        if _URL_KEYS[key].lower() in values:
            raise LaunchFileError(f"launch URL: key {key!r} given twice")
        problem = _value_problem(value)
        if problem is not None:
            raise LaunchFileError(f"launch URL: {key} {problem}")
        values[_URL_KEYS[key].lower()] = (0, value)
    missing = [key for key, name in _URL_KEYS.items() if name.lower() not in values]
    if missing:
        raise LaunchFileError(f"launch URL: missing {', '.join(missing)}")
    gateway = values["gateway"][1]
    if (not gateway.startswith("https://") or _gateway_problem(gateway) is not None
            or urlsplit(gateway).query or urlsplit(gateway).fragment):
        raise LaunchFileError("launch URL: the gateway must be an https:// URL with a host, "
                              "no user name, query or fragment")
    if not _URL_TICKET.match(values["ticket"][1]):
        raise LaunchFileError("launch URL: the ticket is not shaped like one")
    try:
        return _build(values)
    except LaunchFileError as exc:   # its words name line 0 of a file that is not there
        raise LaunchFileError("launch URL: " + str(exc).removeprefix("line 0: ")) from None


def _first_control_character(text: str) -> str | None:
    # Tab is allowed (as a blank); every other C0/C1 control, DEL and Unicode line
    # separators are refused wherever they appear.
    for char in text:
        code = ord(char)
        if char != "\t" and (code < 0x20 or 0x7F <= code <= 0x9F or char in _LINE_BREAKERS):
            return char
    return None


def _value_problem(value: str) -> str | None:
    bad = _first_control_character(value)
    if bad is not None:
        return f"contains control character U+{ord(bad):04X}; it cannot be written safely"
    if any("\ud800" <= char <= "\udfff" for char in value):
        return "contains a lone surrogate, which is not UTF-8"
    if value != value.strip(_BLANK):
        return "begins or ends with blanks, which a reader would strip"
    return None


def _gateway_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    del port
    if parts.scheme.lower() not in GATEWAY_SCHEMES:
        return "URL must start with wss:// or https://"
    if not parts.hostname:
        return "URL has no host"
    if parts.username is not None or parts.password is not None:
        return "URL must not carry a user name or password"
    return None


def _format_timestamp(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    fraction = f".{utc.microsecond:06d}" if utc.microsecond else ""
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
        f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}{fraction}Z"
    )


def _parse_timestamp(text: str) -> datetime | None:
    if not _TIMESTAMP.match(text):
        return None
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except (ValueError, OverflowError):  # 2026-02-30, or an offset past year 1 or 9999
        return None
