"""What every `portcullis` command module shares: running a long-lived command, and
failing with one line on stderr and the documented exit status."""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click

T = TypeVar("T")


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a long-lived command (servers, launches) on uvloop with the data-path tuning."""
    import uvloop

    from portcullis.net.allocator import tune_allocator

    tune_allocator()
    return uvloop.run(coroutine)


def fail(message: str, status: int = 1) -> None:
    click.echo(f"portcullis: {message}", err=True)
    sys.exit(status)
