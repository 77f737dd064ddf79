"""Shadowing (issue 13): what a VNC viewer gets from a large desktop, directly and through
TLS proxies, in interleaved rounds.

Setups, each reaching the same x11vnc serving the same Xvfb screen (BENCH_SCREEN,
default 1920x1080x24), everything on loopback:
  direct        viewer -> x11vnc
  stunnel       viewer -> stunnel client -> (mutual TLS, throw-away CA made with the
                openssl command) -> stunnel server -> x11vnc: the off-the-shelf baseline
  portcullis    viewer -> `portcullis shadow` -> `portcullis shadow-agent` -> x11vnc:
                NOT YET MEASURED; the lead fills in through_portcullis() below.

The viewer is vncdotool (its Twisted client through vncdotool.api) in a subprocess of
its own, `python -m bench.shadow viewer HOST::PORT FRAMES SECONDS`, which prints one
JSON line: so Twisted's reactor never runs here, the viewer's CPU is its own, and
`portcullis shadow --exec` can run the very same command. Per run it measures:
  first frame   from connect() to the first full frame-buffer received (TCP connect,
                TLS where there is some, RFB handshake, one full update)
  frames/s      then FRAMES full (non-incremental) updates one after another, or as many
                as fit in SECONDS; MB/s = frames/s x width x height x bytes per pixel.
                vncdotool asks for the Raw encoding only, so the bytes per frame do not
                depend on what the screen shows: the screen is painted once, not animated.
CPU: seconds (user + system) each proxy process spent during the run, per frame, from
/proc (bench.deployment.Process); x11vnc's and the viewer's are shown for scale.

Rounds: every round runs every setup in turn (the order rotates each round), so that a
slow moment of the shared machine lands on every setup alike. "÷ direct" is this setup's
figure over direct's in the same round, summarised as the median over rounds.

Environment: BENCH_ROUNDS (default 5), BENCH_FRAMES (per run, default 30),
BENCH_SCREEN (default 1920x1080x24). Every run is also bounded in time (RUN_SECONDS).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.deployment import Process, free_port, start_process, wait_for_listen
from bench.peers import require
from bench.report import Report, Table

# The tests' VNC desktop is the real thing: reuse it rather than keep a second copy.
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
FRAMES = int(os.environ.get("BENCH_FRAMES", "30"))
SCREEN = os.environ.get("BENCH_SCREEN", "1920x1080x24")
RUN_SECONDS = 30.0        # a viewer run stops after this many seconds, frames or not
VIEWER_GRACE = 30.0       # and is killed this much later if it has not stopped itself
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ViewerRun:
    """What one viewer run printed."""

    first_frame: float        # seconds
    frame_seconds: list[float]
    width: int
    height: int
    bytes_per_pixel: int
    cpu: float                # the viewer process's CPU seconds

    @property
    def frames_per_second(self) -> float:
        return len(self.frame_seconds) / sum(self.frame_seconds)

    @property
    def megabytes_per_second(self) -> float:
        return self.frames_per_second * self.width * self.height * self.bytes_per_pixel / 1e6


@dataclass
class Setup:
    """One way for the viewer to reach x11vnc: `view(frames)` runs the viewer through
    it; `proxies` are the processes whose CPU is this setup's cost."""

    name: str
    view: Callable[[int], ViewerRun]
    proxies: list[Process] = field(default_factory=list)


def viewer_argv(address: str, frames: int, seconds: float = RUN_SECONDS) -> list[str]:
    """The viewer command: for a subprocess here, or for `portcullis shadow --exec`."""
    return [sys.executable, "-m", "bench.shadow", "viewer", address, str(frames),
            f"{seconds:g}"]


def run_viewer(argv: list[str]) -> ViewerRun:
    """Run a viewer command (viewer_argv, possibly wrapped) and read its JSON line."""
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=RUN_SECONDS + VIEWER_GRACE,
                          cwd=Path(__file__).parent.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"viewer {argv} exited {done.returncode}:\n{done.stdout}"
                           f"{done.stderr[-3000:]}")
    result = json.loads(lines[-1])
    return ViewerRun(**result)


def direct_viewer(address: str) -> Callable[[int], ViewerRun]:
    return lambda frames: run_viewer(viewer_argv(address, frames))


# -- the lead's part ----------------------------------------------------------------------


def through_portcullis(stack: ExitStack, directory: Path, vnc_port: int) -> Setup | None:
    """HOOK FOR THE LEAD (issue 13): the portcullis setup, or None while it is missing.

    To do: a deployment (bench.deployment) with shadowing on; `portcullis shadow-agent
    --vnc 127.0.0.1:{vnc_port} --listen 127.0.0.1:P ...` started with start_process on
    `stack` and registered/approved; then return
        Setup("portcullis", view, proxies=[agent process, ...])
    where view(frames) runs
        run_viewer([PORTCULLIS, "shadow", DEVICE, "--exec",
                    shlex.join(viewer_argv("{address}", frames))])
    (with whatever placeholder `--exec` substitutes for the local address), and the
    console side's process in `proxies` if it is a long-lived one."""
    del stack, directory, vnc_port
    return None


# -- the baseline -------------------------------------------------------------------------


def make_certificates(directory: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate (DNS:localhost) and a client certificate,
    P-256, made with the openssl command."""
    openssl = require("openssl")
    paths = {name: directory / name for name in (
        "ca.key", "ca.crt", "server.key", "server.crt", "client.key", "client.crt")}

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30,
                       cwd=directory)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.crt"]), "-days", "1",
        "-subj", "/CN=bench shadow CA")
    for role, extensions in (("server", "subjectAltName=DNS:localhost\n"
                                        "extendedKeyUsage=serverAuth\n"),
                             ("client", "extendedKeyUsage=clientAuth\n")):
        (directory / f"{role}.ext").write_text(extensions)
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(paths[f"{role}.key"]), "-out", f"{role}.csr",
            "-subj", f"/CN={'localhost' if role == 'server' else 'bench console'}")
        run("x509", "-req", "-in", f"{role}.csr", "-CA", str(paths["ca.crt"]),
            "-CAkey", str(paths["ca.key"]), "-CAcreateserial", "-days", "1",
            "-out", str(paths[f"{role}.crt"]), "-extfile", f"{role}.ext")
    return paths


def _stunnel(stack: ExitStack, directory: Path, name: str, section: str) -> Process:
    config = directory / f"{name}.conf"
    config.write_text(f"foreground = yes\npid =\ndebug = 4\n{section}")
    return start_process(stack, [require("stunnel4", "stunnel"), str(config)],
                         directory / f"{name}.log", name=name)


def through_stunnel(stack: ExitStack, directory: Path, vnc_port: int) -> Setup:
    """stunnel client -> mutual TLS -> stunnel server -> x11vnc."""
    certs = make_certificates(directory)
    server_port, client_port = free_port(), free_port()
    server = _stunnel(stack, directory, "stunnel-server",
                      f"[vnc]\naccept = 127.0.0.1:{server_port}\n"
                      f"connect = 127.0.0.1:{vnc_port}\n"
                      f"cert = {certs['server.crt']}\nkey = {certs['server.key']}\n"
                      f"CAfile = {certs['ca.crt']}\nverifyChain = yes\n")
    wait_for_listen(server_port, process=server)
    client = _stunnel(stack, directory, "stunnel-client",
                      f"[vnc]\nclient = yes\naccept = 127.0.0.1:{client_port}\n"
                      f"connect = 127.0.0.1:{server_port}\n"
                      f"cert = {certs['client.crt']}\nkey = {certs['client.key']}\n"
                      f"CAfile = {certs['ca.crt']}\nverifyChain = yes\n"
                      f"checkHost = localhost\nsni = localhost\n")
    wait_for_listen(client_port, process=client)
    return Setup("stunnel", direct_viewer(f"127.0.0.1::{client_port}"), [client, server])


# -- the rounds ---------------------------------------------------------------------------


@dataclass
class Measured:
    """One setup's figures in one round."""

    run: ViewerRun
    proxy_cpu: list[float]    # CPU seconds per frame, per proxy process
    x11vnc_cpu: float         # CPU seconds per frame


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc (threads included)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(setup: Setup, x11vnc: int) -> Measured:
    before = [process.cpu_seconds() for process in setup.proxies]
    x11vnc_before = cpu_seconds(x11vnc)
    run = setup.view(FRAMES)
    # The first frame counts too: the proxies carried it.
    frames = len(run.frame_seconds) + 1
    return Measured(run, [(process.cpu_seconds() - start) / frames
                          for process, start in zip(setup.proxies, before, strict=True)],
                    (cpu_seconds(x11vnc) - x11vnc_before) / frames)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def _report(setups: list[Setup], rounds: list[dict[str, Measured]],
            screen: str, missing: list[str]) -> Report:
    rows: list[list[Any]] = []
    data: dict[str, Any] = {"screen": screen, "frames": FRAMES}
    for setup in setups:
        runs = [round_[setup.name] for round_ in rounds]
        first_ms = [m.run.first_frame * 1000 for m in runs]
        fps = [m.run.frames_per_second for m in runs]
        mbps = [m.run.megabytes_per_second for m in runs]
        fps_ratio = [round_[setup.name].run.frames_per_second
                     / round_["direct"].run.frames_per_second for round_ in rounds]
        first_ratio = [round_[setup.name].run.first_frame / round_["direct"].run.first_frame
                       for round_ in rounds]
        proxy_ms = [sum(m.proxy_cpu) * 1000 for m in runs]
        viewer_ms = [m.run.cpu / (len(m.run.frame_seconds) + 1) * 1000 for m in runs]
        x11vnc_ms = [m.x11vnc_cpu * 1000 for m in runs]
        rows.append([setup.name, statistics.median(first_ms), _spread(first_ms),
                     f"{statistics.median(first_ratio):.2f}x",
                     statistics.median(fps), _spread(fps), statistics.median(mbps),
                     f"{statistics.median(fps_ratio):.2f}x",
                     statistics.median(proxy_ms) if setup.proxies else "–",
                     statistics.median(x11vnc_ms), statistics.median(viewer_ms)])
        data[setup.name] = {
            "first_frame_ms": first_ms, "frames_per_second": fps, "mb_per_second": mbps,
            "frames_ratio_vs_direct": fps_ratio, "first_frame_ratio_vs_direct": first_ratio,
            "proxy_cpu_ms_per_frame": [[c * 1000 for c in m.proxy_cpu] for m in runs],
            "proxies": [p.name for p in setup.proxies],
            "x11vnc_cpu_ms_per_frame": x11vnc_ms, "viewer_cpu_ms_per_frame": viewer_ms}
    table = Table(
        f"Shadowing: vncdotool full-screen frames of {screen}, {len(rounds)} interleaved "
        f"rounds of {FRAMES} frames; median and min–max over rounds",
        ["setup", "1st frame ms", "min–max", "÷ direct", "frames/s", "min–max", "MB/s",
         "× direct", "proxy CPU ms/frame", "x11vnc CPU ms/frame", "viewer CPU ms/frame"],
        rows)
    verdicts = [f"{row[0]}: {row[4]:.1f} frames/s ({row[7]} direct), first frame "
                f"{row[1]:.0f} ms ({row[3]} direct)" for row in rows]
    notes = ["÷ direct (first frame): this setup's time over direct's, in the same round "
             "(above 1: slower); × direct (frames/s): this setup's rate over direct's "
             "(below 1: slower)",
             "proxy CPU: all the setup's proxy processes together (stunnel: client + "
             "server), user + system, per frame",
             "raw encoding (vncdotool's only one): bytes per frame = width × height × 4"]
    notes += [f"{name}: not measured yet (bench/shadow.py through_portcullis)"
              for name in missing]
    return Report("shadow", [table], verdicts, notes=notes, data=data)


def run() -> Report:
    from peers.vnc import VncDesktop

    width, height, depth = (int(part) for part in SCREEN.split("x"))
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        desktop = stack.enter_context(VncDesktop(directory / "desktop", width=width,
                                                 height=height, depth=depth,
                                                 colour="#336699"))
        assert desktop.x11vnc is not None
        x11vnc = desktop.x11vnc.popen.pid
        setups = [Setup("direct", direct_viewer(desktop.address)),
                  through_stunnel(stack, directory, desktop.port)]
        missing = []
        portcullis = through_portcullis(stack, directory, desktop.port)
        if portcullis is None:
            missing.append("portcullis")
        else:
            setups.append(portcullis)
        rounds: list[dict[str, Measured]] = []
        for index in range(ROUNDS):
            # Rotate the order so that no setup always runs first (a cold cache) or last.
            order = setups[index % len(setups):] + setups[:index % len(setups)]
            measured = {setup.name: measure(setup, x11vnc) for setup in order}
            rounds.append(measured)
            print(f"round {index + 1}/{ROUNDS}: " + ", ".join(
                f"{name} {m.run.frames_per_second:.1f} frames/s"
                for name, m in measured.items()), flush=True)
        return _report(setups, rounds, SCREEN, missing)


# -- the viewer (its own process) -----------------------------------------------------------


def viewer_main(address: str, frames: int, seconds: float) -> int:
    """Connect, take one full frame, then up to `frames` more within `seconds`; print
    the timings as one JSON line."""
    from vncdotool import api

    cpu_started = time.process_time()
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    client = api.connect(address, password=None, timeout=seconds)
    try:
        client.refreshScreen(incremental=False)
        first_frame = time.perf_counter() - started
        frame_seconds: list[float] = []
        for _ in range(frames):
            if time.monotonic() > deadline:
                break
            frame_started = time.perf_counter()
            client.refreshScreen(incremental=False)
            frame_seconds.append(time.perf_counter() - frame_started)
        protocol = client.protocol
        assert protocol is not None
        result = {"first_frame": first_frame, "frame_seconds": frame_seconds,
                  "width": protocol.width, "height": protocol.height,
                  "bytes_per_pixel": protocol.pixel_format.bypp,
                  "cpu": time.process_time() - cpu_started}
    finally:
        client.disconnect()
        api.shutdown()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "viewer":
        sys.exit(viewer_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    sys.exit("usage: python -m bench.shadow viewer HOST::PORT FRAMES SECONDS "
             "(the benchmark itself: python -m bench shadow)")
