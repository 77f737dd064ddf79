"""The log the servers write: our events (every audit event is one) are rendered by
structlog straight to stderr, library records through `logging`, in one format."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from portcullis.audit import AuditTrail, configure_logging


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restored_logging")
def test_an_audit_event_is_one_text_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    AuditTrail(None).record("tunnel.stream", user="alice", destination="10.0.0.1:22/tcp")
    # A library's record (a logger no other test configured: uvicorn's may be, in-process).
    logging.getLogger("a.library").info("Started server process")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "[info     ] tunnel.stream" in lines[0]
    assert "user=alice" in lines[0] and "destination=10.0.0.1:22/tcp" in lines[0]
    assert "[info     ] Started server process" in lines[1]


@pytest.mark.usefixtures("restored_logging")
def test_the_level_is_checked_before_rendering(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning", "json")
    log = structlog.get_logger("portcullis.test")
    log.info("quiet")
    log.warning("loud", user="bob")
    logging.getLogger("a.library").info("also quiet")
    entries = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(e["event"], e["level"], e["user"]) for e in entries] == [("loud", "warning", "bob")]
    assert entries[0]["timestamp"].endswith("Z")


@pytest.mark.usefixtures("restored_logging")
def test_a_json_log_carries_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    try:
        raise RuntimeError("the store went away")
    except RuntimeError:
        structlog.get_logger("portcullis.test").exception("launch failed")
    entry = json.loads(capsys.readouterr().err)
    assert entry["event"] == "launch failed"
    assert "RuntimeError: the store went away" in entry["exception"]
