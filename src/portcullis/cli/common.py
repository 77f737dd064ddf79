"""What every `portcullis` command module shares: the group that turns our errors into
the documented exit status, running a long-lived command, failing with one line on
stderr, and the options and TLS set-up both the client's and the administrator's
commands use. It is part of the light client (`portcullis-client`): it imports no
server package."""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from portcullis.errors import ConfigError, PortcullisError

T = TypeVar("T")


class PortcullisGroup(click.Group):
    """Turns our errors into one line on stderr and the documented exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            fail(str(exc), 2)
        except PortcullisError as exc:
            fail(str(exc), 1)
        except KeyboardInterrupt:
            fail("interrupted", 130)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a long-lived command (servers, launches) on uvloop with the data-path tuning.

    The light client may run without uvloop (a C extension: not in the single-file
    `portcullis-client.pyz`); the standard event loop then carries the same bytes."""
    from portcullis.net.allocator import tune_allocator

    tune_allocator()
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def fail(message: str, status: int = 1) -> None:
    click.echo(f"portcullis: {message}", err=True)
    sys.exit(status)


def answer_options(answers: tuple[str, ...]) -> dict[str, str]:
    """`--answer PROMPT=VALUE` options as a dict (sign-in prompts answered in advance)."""
    given: dict[str, str] = {}
    for item in answers:
        name, separator, value = item.partition("=")
        if not separator or not name:
            fail(f"--answer takes PROMPT=VALUE, got {item!r}", 2)
        given[name] = value
    return given


def client_tls(ca_file: str | None) -> Any:
    """The TLS context a client command reaches the gateway with."""
    from portcullis.net.tls import client_context

    return client_context(Path(ca_file) if ca_file else None)
