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
from typing import Any, Literal

import structlog


def configure_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Route structlog and the standard library (uvicorn) through one formatter on stderr."""
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
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
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
