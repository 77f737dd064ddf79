"""Structured logs and the audit trail of security events.

The audit trail is an append-only file of JSON lines, one per event (logins, tickets
issued/redeemed/refused, launches with bytes and duration), and each event is also
logged. Callers pass masked tokens only: this module never sees a full ticket or
session token, and must never be handed one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import structlog


def configure_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Route structlog and the standard library (uvicorn) through one renderer on stderr.

    Our own events (every audit event is one) are rendered by structlog and written
    straight to stderr: a gateway logs a line per tunnel stream, and the standard
    library's path (a LogRecord, the caller's frame looked up, handler locks, a second
    formatter) cost more than the line itself. Its level is checked before any of that.
    Library loggers (uvicorn) still go through `logging`, rendered the same way.
    """
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The JSON renderer does not format tracebacks itself; the console renderer does.
    tracebacks: list[Any] = [structlog.processors.format_exc_info] if fmt == "json" else []
    structlog.configure(
        processors=[*shared, *tracebacks, renderer],
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _Stderr())),
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer])
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log would print request paths; ours are safe, but keep one format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The websockets library logs every connection at INFO; our audit trail says more.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


class _Stderr:
    """Whatever sys.stderr is when a line is written (loggers are cached on first use,
    and sys.stderr may be replaced after that, as pytest's capture does)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class AuditTrail:
    """Appends security events as JSON lines and logs them."""

    def __init__(self, path: Path | None, *, echo: bool = True) -> None:
        """`echo`: also log each event (False: a dry run, whose command shows what
        happened its own way and must not write to the trail or the log)."""
        self._path = path
        self._echo = echo
        self._lock = threading.Lock()
        self._log = structlog.get_logger("portcullis.audit")
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Readable by the service only: it names users and client addresses.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def record(self, event: str, **fields: Any) -> None:
        entry = {"at": time.time(), "event": event, **fields}
        if self._echo:
            self._log.info(event, **fields)
        if self._file is not None:
            line = json.dumps(entry, default=str, separators=(",", ":"))
            with self._lock:
                self._file.write(line + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
