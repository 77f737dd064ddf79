"""Real VNC peers: a desktop (Xvfb + x11vnc, optionally an xterm that logs what is typed
into it) and a viewer (vncdotool's `vncdo`, run as a subprocess so that Twisted's reactor
never runs inside pytest).

Every process is started in a process group of its own and stopped by its id at
close(); every wait is bounded and checks readiness (never a fixed sleep).

What `vncdo` (vncdotool 1.4.2) does, found against the real x11vnc and a tiny server that
answers with an RFB security failure:
- exit status 0 on success; 10 when nothing listens (connection failed); 11 when the
  server closes mid-way; 20 on a protocol error, a security failure included; 3 on a
  failed password; 30 when a command fails; 40 when `-t SECONDS` runs out.
- the reason a server gives with a security failure (RFB 3.3 and 3.8 alike, both tested) is
  printed on stderr as `CRITICAL:root:Connection refused: b'<reason>'`: Python's repr
  of the bytes, so a non-ASCII reason shows as \\x escapes. `refusal_reason` undoes that.
- `--nocursor` keeps the pointer (sent by x11vnc as a cursor pseudo-encoding) out of a
  capture; `type` sends lowercase letters, digits and space as keysyms, and `key` takes
  keysym names in lower case (`key enter`; `key Return` fails with status 30). The
  xterm hands Enter to its raw tty as a line feed ("\\n").
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port, require_program
from peers.missing import missing_peer

Colour = tuple[int, int, int]
Point = tuple[int, int]

# The xterm sits at the top-left corner, this many character cells in size; a point
# inside it (XTERM_POINT) is where a viewer puts the pointer before typing: with no
# window manager the keyboard focus follows the pointer (the X server's PointerRoot).
XTERM_GEOMETRY = "40x10+0+0"
XTERM_POINT: Point = (20, 20)
START_TIMEOUT = 20.0      # seconds for each program to become ready
VNCDO_TIMEOUT = 20.0      # vncdo's own -t; the subprocess gets a few seconds more
_REFUSAL = re.compile(r"Connection refused: (b(?:'[^\n]*'|\"[^\n]*\"))")


def parse_colour(name: str) -> Colour:
    """`#rrggbb` as a tuple, as a screenshot's pixel reads."""
    match = re.fullmatch(r"#([0-9a-fA-F]{2})([0-9a-fA-F]{2})([0-9a-fA-F]{2})", name)
    if match is None:
        raise ValueError(f"colour {name!r} is not #rrggbb")
    red, green, blue = (int(part, 16) for part in match.groups())
    return (red, green, blue)


class _Program:
    """A subprocess in a process group of its own, output to a log file."""

    def __init__(self, argv: list[str], log: Path, *, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.name = Path(argv[0]).name
        self.log = log
        self._handle = log.open("wb")
        self.popen = subprocess.Popen(argv, stdout=self._handle, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, pass_fds=pass_fds,
                                      env={**os.environ, **(env or {})},
                                      start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_running(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.popen.returncode}:\n"
                               f"{self.output()[-3000:]}")

    def stop(self) -> None:
        # The whole group: xterm's and x11vnc's helpers go with them.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self._handle.close()


def _wait(condition_name: str, check: object, program: _Program,
          timeout: float = START_TIMEOUT) -> None:
    """Poll `check()` (a callable returning a truthy value when ready) until it holds,
    failing early with the program's output if it exits."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        program.check_running()
        time.sleep(0.02)
    raise RuntimeError(f"{program.name}: not {condition_name} after {timeout} s:\n"
                       f"{program.output()[-3000:]}")


class VncDesktop:
    """Xvfb on a display number it picks itself (-displayfd), its root window painted
    `colour`, x11vnc serving it on 127.0.0.1:`port` (asking for `password`, if given,
    with VNC authentication; else none), and with `xterm_log` an xterm whose keystrokes
    (raw tty, no echo) are appended to that file.

    Use as a context manager, or call start() and close()."""

    def __init__(self, directory: Path, *, width: int = 640, height: int = 480,
                 depth: int = 24, colour: str = "#1e90ff",
                 xterm_log: Path | None = None, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.width, self.height, self.depth = width, height, depth
        self.colour = colour
        self.xterm_log = xterm_log
        self.display = ""
        self.port = 0
        self.xvfb: _Program | None = None
        self.x11vnc: _Program | None = None
        self.xterm: _Program | None = None
        self._typist_pid: int | None = None

    @property
    def address(self) -> str:
        """The server as vncdo and most viewers take it: HOST::PORT."""
        return f"127.0.0.1::{self.port}"

    @property
    def root_point(self) -> Point:
        """A point where the root window shows (away from the xterm)."""
        return (self.width - 10, self.height - 10)

    @property
    def xterm_point(self) -> Point:
        return XTERM_POINT

    def __enter__(self) -> VncDesktop:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> VncDesktop:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._start_xvfb()
            self.paint(self.colour)
            if self.xterm_log is not None:
                self._start_xterm(self.xterm_log)
            self._start_x11vnc()
        except BaseException:
            self.close()
            raise
        return self

    def paint(self, colour: str) -> None:
        """Paint the root window (Xvfb runs with -noreset, so it stays painted after
        xsetroot disconnects)."""
        subprocess.run([require_program("xsetroot"), "-solid", colour], check=True,
                       env=self._x_env(), capture_output=True, timeout=START_TIMEOUT)
        self.colour = colour

    def close(self) -> None:
        for program in (self.x11vnc, self.xterm, self.xvfb):
            if program is not None:
                program.stop()
        # The shell under the xterm is in a session of its own (the pty's); it gets
        # SIGHUP when the xterm goes, and SIGTERM here in case it did not.
        if self._typist_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._typist_pid, signal.SIGTERM)
        self.x11vnc = self.xterm = self.xvfb = None
        self._typist_pid = None

    def _x_env(self) -> dict[str, str]:
        return {**os.environ, "DISPLAY": self.display, "XAUTHORITY": "/dev/null"}

    def _start_xvfb(self) -> None:
        # Xvfb writes its display number to the pipe once it accepts connections: no
        # guessing of a free number, no lock-file race.
        read_end, write_end = os.pipe()
        try:
            self.xvfb = _Program(
                [require_program("Xvfb"), "-displayfd", str(write_end), "-screen", "0",
                 f"{self.width}x{self.height}x{self.depth}", "-nolisten", "tcp",
                 "-noreset"],
                self.directory / "xvfb.log", pass_fds=(write_end,))
            os.close(write_end)
            write_end = -1
            number = b""
            deadline = time.monotonic() + START_TIMEOUT
            while not number.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                ready, _, _ = select.select([read_end], [], [], max(0.0, remaining))
                chunk = os.read(read_end, 16) if ready else b""
                if not chunk:
                    self.xvfb.check_running()
                    raise RuntimeError(f"Xvfb: no display number after {START_TIMEOUT} s:"
                                       f"\n{self.xvfb.output()[-3000:]}")
                number += chunk
            self.display = f":{int(number)}"
        finally:
            os.close(read_end)
            if write_end != -1:
                os.close(write_end)

    def _start_xterm(self, log: Path) -> None:
        xdotool = require_program("xdotool")
        ready = self.directory / "xterm.ready"
        # The shell writes its pid (cat's, after exec) once the tty is raw and silent:
        # every key then reaches the file as typed, without waiting for Enter.
        script = (f"stty raw -echo && echo $$ > '{ready}.tmp' && mv '{ready}.tmp' '{ready}'"
                  f" && exec cat >> '{log}'")
        self.xterm = _Program(
            [require_program("xterm"), "-geometry", XTERM_GEOMETRY, "-e", "sh", "-c",
             script], self.directory / "xterm.log", env={"DISPLAY": self.display,
                                                         "XAUTHORITY": "/dev/null"})
        _wait("ready", ready.exists, self.xterm)
        self._typist_pid = int(ready.read_text())

        def mapped() -> bool:
            found = subprocess.run([xdotool, "search", "--onlyvisible", "--class", "XTerm"],
                                   env=self._x_env(), capture_output=True, timeout=10)
            return found.returncode == 0 and bool(found.stdout.strip())

        _wait("mapped", mapped, self.xterm)

    def _start_x11vnc(self) -> None:
        program = require_program("x11vnc")
        # A free port can be taken between our probe and x11vnc's bind: try again then.
        for attempt in range(5):
            port = free_port()
            self.x11vnc = _Program(
                [program, "-display", self.display, "-localhost", "-noipv6",
                 "-rfbport", str(port),
                 *(["-passwd", self.password] if self.password else ["-nopw"]),
                 "-forever", "-shared", "-norc",
                 "-auth", "/dev/null"],
                self.directory / f"x11vnc-{attempt}.log")
            try:
                _wait("listening", lambda port=port: f"PORT={port}" in self.x11vnc_output(),
                      self.x11vnc)
            except RuntimeError:
                if "could not obtain listening port" not in self.x11vnc.output():
                    raise
                self.x11vnc.stop()
                continue
            self.port = port
            self._check_greeting()
            return
        raise RuntimeError("x11vnc found no free port in 5 tries")

    def x11vnc_output(self) -> str:
        return self.x11vnc.output() if self.x11vnc is not None else ""

    def _check_greeting(self) -> None:
        """x11vnc speaks RFB on the port (a viewer's first read)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=START_TIMEOUT) as sock:
            greeting = b""
            while len(greeting) < 12:
                chunk = sock.recv(12 - len(greeting))
                if not chunk:
                    break
                greeting += chunk
        if not greeting.startswith(b"RFB "):
            raise RuntimeError(f"x11vnc answered {greeting!r}, not an RFB greeting")


# -- the viewer -------------------------------------------------------------------------


def vncdo_program() -> str:
    """vncdo from this interpreter's environment (the venv), else from PATH."""
    beside = Path(sys.executable).parent / "vncdo"
    if beside.exists():
        return str(beside)
    found = shutil.which("vncdo")
    if found is None:
        missing_peer("vncdo is not installed (pip install -e '.[test]')")
    return found


@dataclass(frozen=True)
class VncdoResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def refusal_reason(self) -> str | None:
        """The reason a server gave with an RFB security failure, decoded, or None."""
        match = _REFUSAL.search(self.stderr)
        if match is None:
            return None
        raw = ast.literal_eval(match.group(1))
        assert isinstance(raw, bytes)
        return raw.decode("utf-8", errors="replace")

    def check(self) -> VncdoResult:
        if self.returncode != 0:
            raise AssertionError(f"vncdo exited {self.returncode}: {self.argv}\n"
                                 f"{self.stdout}{self.stderr}")
        return self


def vncdo(address: str, *commands: str, timeout: float = VNCDO_TIMEOUT) -> VncdoResult:
    """`vncdo -s ADDRESS -t TIMEOUT COMMANDS...`; the subprocess itself is killed (its
    whole group) if vncdo overruns its own timeout."""
    argv = [vncdo_program(), "-s", address, "-t", f"{timeout:g}", "--nocursor", *commands]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout + 10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += f"\n(killed after {timeout + 10:g} s)"
    return VncdoResult(argv, process.returncode, stdout, stderr)


def capture(address: str, path: Path, *, timeout: float = VNCDO_TIMEOUT) -> Image.Image:
    """A full-screen capture to `path` (PNG), loaded."""
    vncdo(address, "capture", str(path), timeout=timeout).check()
    with Image.open(path) as image:
        return image.convert("RGB")


def pixel_at(address: str, point: Point, directory: Path, *,
             timeout: float = VNCDO_TIMEOUT) -> Colour:
    """The colour a viewer sees at `point` of the screen."""
    pixel = capture(address, directory / "screen.png", timeout=timeout).getpixel(point)
    assert isinstance(pixel, tuple)
    red, green, blue = pixel[:3]
    return (int(red), int(green), int(blue))


def type_text(address: str, text: str, *, at: Point = XTERM_POINT, enter: bool = False,
              timeout: float = VNCDO_TIMEOUT) -> VncdoResult:
    """Move the pointer to `at` (the focus follows it) and type `text` (lowercase
    letters, digits, space), then Enter if asked."""
    commands = ["move", str(at[0]), str(at[1]), "type", text]
    if enter:
        commands += ["key", "enter"]
    return vncdo(address, *commands, timeout=timeout).check()


def wait_for_file_text(path: Path, expected: str, timeout: float = 10.0) -> str:
    """The file's text once it contains `expected` (keys arrive asynchronously after
    vncdo exits); the last text seen if the time runs out."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if expected in text:
            break
        time.sleep(0.05)
    return text


@pytest.fixture
def vnc_desktop(tmp_path: Path) -> Iterator[VncDesktop]:
    """A 640x480 desktop painted #1e90ff with an xterm logging keys to
    tmp_path/'keys.log' (register "peers.vnc" in pytest_plugins to use it)."""
    with VncDesktop(tmp_path / "vnc", xterm_log=tmp_path / "keys.log") as desktop:
        yield desktop
