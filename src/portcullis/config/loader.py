"""Reads portcullis.toml into `Settings`; every error names the key and, when it can, the line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from pydantic import ValidationError

from portcullis.config.model import Settings
from portcullis.errors import ConfigError

CONFIG_NAME = "portcullis.toml"


def config_path(directory: Path) -> Path:
    return directory / CONFIG_NAME


def load_settings(path: Path) -> Settings:
    """Load and validate a configuration file, or raise ConfigError naming the key and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            "no configuration file here; create one with 'portcullis init --dir DIR'",
            path=str(path),
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the configuration: {exc}", path=str(path)) from None
    return parse_settings(text, path=path)


def parse_settings(text: str, *, path: Path) -> Settings:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _line_of_decode_error(str(exc))
        raise ConfigError(f"not valid TOML ({exc})", path=str(path), line=line) from None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        # A misspelt key also makes the real one "missing": name the misspelling first.
        errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        error = errors[0]
        key = _dotted(error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        line = _line_of_key(text, error["loc"]) if error["loc"] else _line_of_quoted(
            text, message)
        if error["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling; see docs/configuration.md)"
        raise ConfigError(message, key=key, line=line, path=str(path)) from None
    return settings.model_copy(update={"base_dir": path.parent.resolve()})


def _dotted(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(item)
    return ".".join(parts)


def _line_of_quoted(text: str, message: str) -> int | None:
    """For whole-file errors ("resource name 'x' is used twice"): the last line that
    sets the quoted value, which is the offending repeat."""
    match = re.search(r"'([^']+)'", message)
    if not match:
        return None
    pattern = re.compile(rf"=\s*[\"']{re.escape(match.group(1))}[\"']")
    lines = [number for number, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    return lines[-1] if lines else None


def _line_of_decode_error(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None


def _line_of_key(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Best effort: the line where the innermost named key is set, inside its table.

    tomllib keeps no positions, so walk the text: find the table header of the key's
    parent (counting [[array]] entries for list indexes), then the key inside it.
    """
    names = [item for item in loc if isinstance(item, str)]
    if not names:
        return None
    lines = text.splitlines()
    table = list(loc[:-1])
    start = (_find_table(lines, table) or 0) if table else 0
    key = names[-1]
    pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    for number in range(start, len(lines)):
        if number > start and lines[number].lstrip().startswith("[") and table:
            break
        if pattern.match(lines[number]):
            return number + 1
    header = re.compile(rf"^\s*\[+\s*{re.escape(key)}\s*\]+")
    for number, line in enumerate(lines):
        if header.match(line):
            return number + 1
    return None


def _find_table(lines: list[str], table: list[int | str]) -> int | None:
    names = [item for item in table if isinstance(item, str)]
    index = next((item for item in table if isinstance(item, int)), None)
    dotted = ".".join(names)
    array_header = re.compile(rf"^\s*\[\[\s*{re.escape(dotted)}\s*\]\]")
    table_header = re.compile(rf"^\s*\[\s*{re.escape(dotted)}\s*\]")
    seen = -1
    for number, line in enumerate(lines):
        if array_header.match(line):
            seen += 1
            if index is None or seen == index:
                return number
        elif index is None and table_header.match(line):
            return number
    return None
