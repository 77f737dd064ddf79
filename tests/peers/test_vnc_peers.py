"""The VNC peers work on their own, with nothing of Portcullis between them: what the
viewer sees and types, and how it reports a server's refusal."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conftest import free_port
from peers.vnc import (
    VncDesktop,
    parse_colour,
    pixel_at,
    type_text,
    vncdo,
    wait_for_file_text,
)

pytestmark = pytest.mark.peer


@pytest.fixture
def desktop(tmp_path: Path) -> Iterator[VncDesktop]:
    with VncDesktop(tmp_path / "vnc", colour="#1e90ff",
                    xterm_log=tmp_path / "keys.log") as started:
        yield started


def test_screenshot_shows_the_painted_root_window(desktop: VncDesktop,
                                                  tmp_path: Path) -> None:
    assert pixel_at(desktop.address, desktop.root_point, tmp_path) == parse_colour("#1e90ff")


def test_screenshot_follows_a_repaint(desktop: VncDesktop, tmp_path: Path) -> None:
    desktop.paint("#c81e28")
    assert pixel_at(desktop.address, desktop.root_point, tmp_path) == (0xC8, 0x1E, 0x28)


def test_keys_typed_by_the_viewer_reach_the_xterm(desktop: VncDesktop,
                                                  tmp_path: Path) -> None:
    type_text(desktop.address, "shadow 13", at=desktop.xterm_point, enter=True)
    # The tty is raw, so the file holds exactly what the xterm sent: for Enter that is
    # a line feed (xterm under Xvfb, as xdotool's Return shows too).
    assert wait_for_file_text(tmp_path / "keys.log", "shadow 13\n") == "shadow 13\n"


def test_desktop_close_stops_every_process(tmp_path: Path) -> None:
    started = VncDesktop(tmp_path / "vnc", xterm_log=tmp_path / "keys.log").start()
    programs = [started.xvfb, started.x11vnc, started.xterm]
    started.close()
    assert [p.popen.poll() is not None for p in programs if p is not None] == [True] * 3
    assert vncdo(started.address, "capture", str(tmp_path / "gone.png"),
                 timeout=5).returncode == 10


# -- a server that refuses every viewer with a reason ------------------------------------

REASON = "secure shadowing is required: run 'portcullis shadow lab-pc-7'"


@contextlib.asynccontextmanager
async def refusing_server(version: bytes, reason: bytes) -> AsyncIterator[int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(version)
        await reader.readexactly(12)            # the viewer's ProtocolVersion
        # 3.3: the server picks security type 0; 3.7/3.8: it offers zero types. Both
        # are then followed by the reason's length and the reason.
        failure = struct.pack("!I", 0) if version == b"RFB 003.003\n" else b"\x00"
        writer.write(failure + struct.pack("!I", len(reason)) + reason)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("version", [b"RFB 003.008\n", b"RFB 003.003\n"])
async def test_vncdo_shows_the_reason_of_a_security_failure(version: bytes,
                                                            tmp_path: Path) -> None:
    async with refusing_server(version, REASON.encode()) as port:
        result = await asyncio.to_thread(vncdo, f"127.0.0.1::{port}", "capture",
                                         str(tmp_path / "x.png"), timeout=10)
    assert result.returncode == 20, result
    assert "Connection refused: " in result.stderr and REASON in result.stderr
    assert result.refusal_reason == REASON


async def test_vncdo_refusal_reason_keeps_non_ascii_text(tmp_path: Path) -> None:
    reason = "Zugriff verweigert – «portcullis shadow»"
    async with refusing_server(b"RFB 003.008\n", reason.encode()) as port:
        result = await asyncio.to_thread(vncdo, f"127.0.0.1::{port}", "capture",
                                         str(tmp_path / "x.png"), timeout=10)
    assert result.returncode == 20, result
    assert result.refusal_reason == reason


def test_vncdo_reports_nothing_listening_apart_from_a_refusal(tmp_path: Path) -> None:
    result = vncdo(f"127.0.0.1::{free_port()}", "capture", str(tmp_path / "x.png"),
                   timeout=5)
    assert (result.returncode, result.refusal_reason) == (10, None)
