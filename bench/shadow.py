"""Shadowing (issue 13): what a VNC viewer gets from a large desktop directly, through an
stunnel pair and through Portcullis, in interleaved rounds; how long each takes from
its start to the viewer's first frame; and what an idle device agent costs in memory.

Setups, each reaching the same x11vnc serving the same Xvfb screen (BENCH_SCREEN,
default 1920x1080x24), everything on loopback:
  direct        viewer -> x11vnc
  stunnel       viewer -> stunnel client -> (mutual TLS, throw-away CA made with the
                openssl command) -> stunnel server -> x11vnc: the off-the-shelf baseline
  portcullis    `portcullis shadow DEVICE --exec VIEWER` (the console proxy, which asks
                the hub for a signed request and a console certificate) -> mutual TLS ->
                `portcullis shadow-agent` (the device proxy, which verifies the request
                at the hub) -> x11vnc. The hub is `portcullis up` of a deployment made
                with `portcullis init`; the agent enrolled with `shadow device add`'s code.

The viewer is vncdotool (its Twisted client through vncdotool.api) in a subprocess of
its own, `python -m bench.shadow viewer HOST::PORT FRAMES SECONDS [pause]`, which prints
one JSON line: so Twisted's reactor never runs here, the viewer's CPU is its own, and
`portcullis shadow --exec` runs the very same command. Three measurements:

1. Frame-buffer throughput, ROUNDS interleaved rounds (the order rotates each round, so
   a slow moment of the shared machine lands on every setup alike). The viewer takes one
   full frame, prints "first-frame" and waits for a line on stdin (the proxies' CPU is
   read then), then takes FRAMES full (non-incremental) updates one after another, or as
   many as fit in RUN_SECONDS. vncdotool asks for the Raw encoding only, so the bytes per
   frame (width x height x 4) do not depend on what the screen shows. Proxy CPU is user +
   system seconds from /proc between the first frame and the last, so it is the relaying
   cost alone (the console's start-up is in the second table).
2. Time to first frame, START_RUNS runs per setup interleaved (bounded by START_SECONDS):
   from starting the viewer (direct), a fresh stunnel client then the viewer (stunnel),
   or `portcullis shadow --exec viewer` (portcullis) to the viewer holding its first full
   frame; p50 and p99 nearest-rank. CPU to first frame: the proxies' CPU over the run.
3. Memory: RSS of AGENTS idle `portcullis shadow-agent` processes after enrolment
   (median), and an agent's RSS growth per idle connection at its device proxy: IDLE
   connections that sent a TLS ClientHello and then nothing (the state a scanner or a
   stalled console leaves; the agent holds it until its 10 s handshake timeout).

Environment: BENCH_ROUNDS (default 5), BENCH_FRAMES (default 30), BENCH_SCREEN
(default 1920x1080x24), BENCH_START_RUNS (default 20), BENCH_AGENTS (default 3),
BENCH_IDLE (default 1000). Every run and wait is bounded in time; every process is
stopped (by its id, its group where it has helpers) when the benchmark ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import selectors
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.deployment import (
    PORTCULLIS,
    Process,
    _listening_ports,
    free_port,
    free_port_run,
    run_cli,
    wait_for_listen,
)
from bench.peers import require
from bench.report import Report, Table

# The tests' VNC desktop is the real thing: reuse it rather than keep a second copy.
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
FRAMES = int(os.environ.get("BENCH_FRAMES", "30"))
SCREEN = os.environ.get("BENCH_SCREEN", "1920x1080x24")
START_RUNS = int(os.environ.get("BENCH_START_RUNS", "20"))
AGENTS = int(os.environ.get("BENCH_AGENTS", "3"))
IDLE = int(os.environ.get("BENCH_IDLE", "1000"))
RUN_SECONDS = 30.0        # a viewer run stops after this many seconds, frames or not
VIEWER_GRACE = 30.0       # and is killed this much later if it has not stopped itself
START_SECONDS = 240.0     # the time-to-first-frame runs stop after this, done or not
IDLE_SECONDS = 7.0        # idle connections answered within this (the agent drops
                          # a handshake after 10 s: measure well before)
REPO = Path(__file__).parent.parent
DEVICE = "bench-kiosk"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FIRST_FRAME_MARK = "first-frame"


@dataclass(frozen=True)
class ViewerRun:
    """What one viewer run printed."""

    first_frame: float        # seconds from the viewer's connect() to its first frame
    first_frame_at: float     # time.monotonic() then (the same clock in every process)
    frame_seconds: list[float]
    width: int
    height: int
    bytes_per_pixel: int
    cpu: float                # the viewer process's CPU seconds

    @property
    def frames_per_second(self) -> float:
        return len(self.frame_seconds) / sum(self.frame_seconds)

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * self.bytes_per_pixel

    @property
    def megabytes_per_second(self) -> float:
        return self.frames_per_second * self.frame_bytes / 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from /proc (threads included,
    children not)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pss_kib(pid: int) -> int:
    """Proportional set size: shared library pages divided among their users."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError(f"no Pss for pid {pid}")


def viewer_argv(address: str, frames: int, *, pause: bool = False,
                seconds: float = RUN_SECONDS) -> list[str]:
    """The viewer command: for a subprocess here, or for `portcullis shadow --exec`."""
    return [sys.executable, "-m", "bench.shadow", "viewer", address, str(frames),
            f"{seconds:g}", *(["pause"] if pause else [])]


@dataclass
class CommandRun:
    """One viewer command run: what the viewer printed, when the command started
    (time.monotonic), and CPU snapshots (seconds per watched process) taken at the
    viewer's first frame (pause mode only) and after its last."""

    viewer: ViewerRun
    started: float
    cpu_at_first: list[float]
    cpu_at_end: list[float]

    @property
    def time_to_first_frame(self) -> float:
        return self.viewer.first_frame_at - self.started


def run_command(argv: list[str], watched: list[Callable[[], float]], *, pause: bool,
                env: dict[str, str] | None = None, own_cpu: bool = False,
                started: float | None = None) -> CommandRun:
    """Run a viewer command (viewer_argv, possibly wrapped by `portcullis shadow
    --exec`), snapshotting the `watched` CPU counters at the first frame and at the end;
    with own_cpu the command's own process (a console proxy) is watched too. The
    command runs in a process group of its own, killed whole if it overstays."""
    deadline = time.monotonic() + RUN_SECONDS + VIEWER_GRACE
    with tempfile.TemporaryFile("w+") as errors:
        started = time.monotonic() if started is None else started
        popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=errors, text=True, cwd=REPO, start_new_session=True,
                                 env={**os.environ, **(env or {})})
        assert popen.stdin is not None and popen.stdout is not None

        def snapshot() -> list[float]:
            own = [cpu_seconds(popen.pid)] if own_cpu else []
            return [read() for read in watched] + own

        try:
            at_first: list[float] = []
            at_end: list[float] = []
            result: dict[str, Any] | None = None
            output: list[str] = []
            for line in _lines(popen.stdout, deadline):
                output.append(line)
                if line.strip() == FIRST_FRAME_MARK:
                    at_first = snapshot()
                    popen.stdin.write("\n")
                    popen.stdin.flush()
                elif line.startswith("{"):
                    at_end = snapshot()
                    result = json.loads(line)
            code = popen.wait(max(0.1, deadline - time.monotonic()))
        except BaseException:
            _kill_group(popen)
            raise
        finally:
            with contextlib.suppress(OSError):
                popen.stdin.close()
            popen.stdout.close()
        if code != 0 or result is None or (pause and not at_first):
            errors.seek(0)
            raise RuntimeError(f"viewer {shlex.join(argv)} exited {code}:\n"
                               f"{''.join(output)[-2000:]}{errors.read()[-3000:]}")
    return CommandRun(ViewerRun(**result), started, at_first, at_end)


def _lines(stream: IO[str], deadline: float) -> Iterator[str]:
    """Lines from a child's stdout until it closes, bounded by `deadline`."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError(f"the viewer did not finish within "
                                   f"{RUN_SECONDS + VIEWER_GRACE:g} s")
            line = stream.readline()
            if not line:
                return
            yield line


def _kill_group(popen: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait(10)


@dataclass
class Setup:
    """One way for the viewer to reach x11vnc.

    `command(frames, pause)` is the viewer command through it; `proxies` are the
    long-lived processes whose CPU is this setup's cost; with `console` the command's
    own process (`portcullis shadow`) is a proxy too. `first_frame()` is one run from a
    cold start (a fresh stunnel client for stunnel)."""

    name: str
    command: Callable[[int, bool], list[str]]
    proxies: list[Process] = field(default_factory=list)
    proxy_names: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    console: bool = False
    first_frame: Callable[[], StartRun] | None = None

    def run(self, frames: int, pause: bool) -> CommandRun:
        return run_command(self.command(frames, pause),
                           [process.cpu_seconds for process in self.proxies],
                           pause=pause, env=self.env, own_cpu=self.console)


@dataclass(frozen=True)
class StartRun:
    """One cold start: seconds to the first frame, the proxies' CPU seconds meanwhile."""

    seconds: float
    proxy_cpu: float
    hub_cpu: float = 0.0


def direct_setup(address: str) -> Setup:
    setup = Setup("direct", lambda frames, pause: viewer_argv(address, frames, pause=pause))
    setup.first_frame = lambda: _start_run(setup, [])
    return setup


def _start_run(setup: Setup, extra: list[Callable[[], float]],
               started: float | None = None) -> StartRun:
    """One run of 0 frames past the first: how long from `started` to the first frame,
    and the CPU of the proxies (and `extra` counters) over it."""
    watched = [process.cpu_seconds for process in setup.proxies] + extra
    before = [read() for read in watched]
    run = run_command(setup.command(0, False), watched, pause=False, env=setup.env,
                      own_cpu=setup.console, started=started)
    spent = [end - start for end, start in zip(run.cpu_at_end, before, strict=False)]
    own = run.cpu_at_end[-1] if setup.console else 0.0
    proxies = sum(spent[:len(setup.proxies)]) + own
    hub = sum(spent[len(setup.proxies):len(setup.proxies) + len(extra)])
    return StartRun(run.time_to_first_frame, proxies, hub)


class GroupProcess(Process):
    """A Process in a process group of its own, stopped with its whole group (`portcullis
    up` and the agent may start helpers; none must outlive the benchmark)."""

    def __init__(self, argv: list[str], log: Path, *, name: str) -> None:
        self.name = name
        self.log = log
        self._handle = log.open("wb")
        self.popen = subprocess.Popen(argv, stdout=self._handle, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            # Wait for the leader without reaping it: while it is a zombie its group id
            # cannot be reused, so the SIGKILL below reaches only what is left of ours.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.waitid(
                    os.P_PID, self.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self._handle.close()


def start_group(stack: ExitStack, argv: list[str], log: Path, name: str) -> GroupProcess:
    """Start a process group that `stack` stops on exit."""
    process = GroupProcess(argv, log, name=name)
    stack.callback(process.stop)
    return process


# -- portcullis ---------------------------------------------------------------------------


@dataclass
class Hub:
    """A deployment made with `portcullis init`, running (`portcullis up`), with an
    operator signed in (`portcullis login` into `home`)."""

    directory: Path
    port: int
    up: Process
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def hub_url(self) -> str:
        return f"https://127.0.0.1:{self.port + 3}"   # init's fourth port: the shadow hub

    @property
    def ca(self) -> Path:
        return self.directory / "pki" / "ca.crt"

    def add_device(self, name: str) -> str:
        """`portcullis shadow device add NAME`: its one-time enrolment code."""
        printed = run_cli("shadow", "device", "add", name, "--dir", str(self.directory))
        code = re.search(r"code \(shown once\):\s*(\S+)", printed)
        if code is None:
            raise RuntimeError(f"no enrolment code in: {printed}")
        return code.group(1)

    def start_agent(self, stack: ExitStack, directory: Path, name: str,
                    vnc_port: int) -> tuple[Process, int]:
        """Enrol and start `portcullis shadow-agent` for device `name`; returns it once
        its device proxy listens, and the proxy's port."""
        code = self.add_device(name)
        port = free_port()
        agent = start_group(
            stack, [PORTCULLIS, "shadow-agent", "--hub", self.hub_url, "--ca", str(self.ca),
                    "--name", name, "--code", code, "--vnc", f"127.0.0.1:{vnc_port}",
                    "--listen", f"127.0.0.1:{port}", "--dir", str(directory / name)],
            directory / f"agent-{name}.log", name=f"agent {name}")
        agent.wait_for(r"device proxy listening on", timeout=60)
        return agent, port


def start_hub(stack: ExitStack, directory: Path) -> Hub:
    port = free_port_run(4)
    deployment = directory / "deployment"
    printed = run_cli("init", "--dir", str(deployment), "--port", str(port))
    password = re.search(r"password: (\S+)", printed)
    if password is None:
        raise RuntimeError(f"no admin password in `portcullis init`'s output: {printed}")
    up = start_group(stack, [PORTCULLIS, "up", "--dir", str(deployment)],
                     directory / "portcullis-up.log", name="portcullis up")
    up.wait_for(r"Portal: https://", timeout=60)
    env = {"PORTCULLIS_HOME": str(directory / "operator")}
    hub = Hub(deployment, port, up, env)
    run_cli("login", hub.url, "--ca", str(hub.ca), "--user", "admin", "--password-stdin",
            stdin=password.group(1) + "\n", env=env)
    return hub


def through_portcullis(stack: ExitStack, hub: Hub, directory: Path, vnc_port: int) -> Setup:
    """viewer -> `portcullis shadow` -> mutual TLS -> `portcullis shadow-agent` -> x11vnc."""
    agent, _ = hub.start_agent(stack, directory, DEVICE, vnc_port)

    def command(frames: int, pause: bool) -> list[str]:
        viewer = shlex.join(viewer_argv("{host}::{port}", frames, pause=pause))
        return [PORTCULLIS, "shadow", DEVICE, "--exec", viewer]

    setup = Setup("portcullis", command, [agent], ["agent", "console"], env=hub.env,
                  console=True)
    setup.first_frame = lambda: _start_run(setup, [hub.up.cpu_seconds])
    return setup


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
    return start_group(stack, [require("stunnel4", "stunnel"), str(config)],
                       directory / f"{name}.log", name=name)


def _stunnel_client(stack: ExitStack, directory: Path, name: str, server_port: int,
                    certs: dict[str, Path]) -> tuple[Process, int]:
    port = free_port()
    client = _stunnel(stack, directory, name,
                      f"[vnc]\nclient = yes\naccept = 127.0.0.1:{port}\n"
                      f"connect = 127.0.0.1:{server_port}\n"
                      f"cert = {certs['client.crt']}\nkey = {certs['client.key']}\n"
                      f"CAfile = {certs['ca.crt']}\nverifyChain = yes\n"
                      f"checkHost = localhost\nsni = localhost\n")
    return client, port


def _wait_listening(port: int, process: Process, timeout: float = 15.0) -> None:
    """As wait_for_listen, polling every 2 ms: this wait is inside a timed start."""
    deadline = time.monotonic() + timeout
    while port not in _listening_ports():
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} is not listening on {port}:\n"
                               f"{process.output()[-2000:]}")
        time.sleep(0.002)


def through_stunnel(stack: ExitStack, directory: Path, vnc_port: int) -> Setup:
    """stunnel client -> mutual TLS -> stunnel server -> x11vnc."""
    certs = make_certificates(directory)
    server_port = free_port()
    server = _stunnel(stack, directory, "stunnel-server",
                      f"[vnc]\naccept = 127.0.0.1:{server_port}\n"
                      f"connect = 127.0.0.1:{vnc_port}\n"
                      f"cert = {certs['server.crt']}\nkey = {certs['server.key']}\n"
                      f"CAfile = {certs['ca.crt']}\nverifyChain = yes\n")
    wait_for_listen(server_port, process=server)
    client, client_port = _stunnel_client(stack, directory, "stunnel-client", server_port,
                                          certs)
    wait_for_listen(client_port, process=client)
    setup = Setup("stunnel", lambda frames, pause: viewer_argv(
        f"127.0.0.1::{client_port}", frames, pause=pause), [client, server],
        ["stunnel client", "stunnel server"])
    starts = iter(range(1_000_000))

    def first_frame() -> StartRun:
        # A fresh client, as a user starting "stunnel + viewer" has: timed from its start.
        with ExitStack() as fresh:
            started = time.monotonic()
            cold, port = _stunnel_client(fresh, directory, f"stunnel-cold-{next(starts)}",
                                         server_port, certs)
            _wait_listening(port, cold)
            cold_setup = Setup("stunnel", lambda frames, pause: viewer_argv(
                f"127.0.0.1::{port}", frames, pause=pause), [server])
            run = _start_run(cold_setup, [], started=started)
            return StartRun(run.seconds, run.proxy_cpu + cold.cpu_seconds())

    setup.first_frame = first_frame
    return setup


# -- the rounds ---------------------------------------------------------------------------


@dataclass
class Measured:
    """One setup's figures in one round, per frame after the first."""

    run: ViewerRun
    proxy_cpu: list[float]    # CPU seconds per frame, per proxy process
    x11vnc_cpu: float         # CPU seconds per frame


def measure(setup: Setup, x11vnc: int) -> Measured:
    run = run_command(setup.command(FRAMES, True),
                      [p.cpu_seconds for p in setup.proxies] + [lambda: cpu_seconds(x11vnc)],
                      pause=True, env=setup.env, own_cpu=setup.console)
    frames = max(1, len(run.viewer.frame_seconds))
    spent = [(end - start) / frames
             for end, start in zip(run.cpu_at_end, run.cpu_at_first, strict=True)]
    x11vnc_cpu = spent.pop(len(setup.proxies))
    return Measured(run.viewer, spent, x11vnc_cpu)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}–{max(values):.2f}"


def _median_ratio(rounds: list[dict[str, Measured]], name: str, other: str,
                  figure: Callable[[Measured], float]) -> str:
    if other not in rounds[0]:
        return "–"
    return f"{statistics.median(figure(r[name]) / figure(r[other]) for r in rounds):.2f}x"


def machine_line() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"machine: {os.cpu_count()} cores, {model}, Linux {platform.release()}, "
            f"{ssl.OPENSSL_VERSION}, Python {platform.python_version()}")


@dataclass
class Memory:
    agent_rss_kib: list[int]
    agent_pss_kib: list[int]
    idle_opened: int
    idle_answered: int
    idle_growth_kib: int


def _throughput_table(setups: list[Setup], rounds: list[dict[str, Measured]],
                      data: dict[str, Any]) -> tuple[Table, list[str]]:
    rows: list[list[Any]] = []
    verdicts: list[str] = []
    for setup in setups:
        runs = [round_[setup.name] for round_ in rounds]
        first_ms = [m.run.first_frame * 1000 for m in runs]
        fps = [m.run.frames_per_second for m in runs]
        mbps = [m.run.megabytes_per_second for m in runs]
        proxy_ms = [sum(m.proxy_cpu) * 1000 for m in runs]
        gib_per_frame = runs[0].run.frame_bytes / 2**30
        viewer_ms = [m.run.cpu / (len(m.run.frame_seconds) + 1) * 1000 for m in runs]
        x11vnc_ms = [m.x11vnc_cpu * 1000 for m in runs]
        by_proxy = ", ".join(
            f"{name} {statistics.median(m.proxy_cpu[i] for m in runs) * 1000:.1f}"
            for i, name in enumerate(setup.proxy_names))
        fps_direct = _median_ratio(rounds, setup.name, "direct",
                                   lambda m: m.run.frames_per_second)
        fps_stunnel = _median_ratio(rounds, setup.name, "stunnel",
                                    lambda m: m.run.frames_per_second)
        rows.append([setup.name, statistics.median(first_ms), _spread(first_ms),
                     statistics.median(fps), _spread(fps), statistics.median(mbps),
                     fps_direct, fps_stunnel,
                     f"{statistics.median(proxy_ms):.1f}" if setup.proxy_names else "–",
                     f"{statistics.median(proxy_ms) / 1000 / gib_per_frame:.2f}"
                     if setup.proxy_names else "–",
                     by_proxy or "–",
                     statistics.median(x11vnc_ms), statistics.median(viewer_ms)])
        verdicts.append(f"{setup.name}: {statistics.median(fps):.1f} frames/s "
                        f"({fps_direct} direct, {fps_stunnel} stunnel)")
        data[setup.name] = {
            "first_frame_ms": first_ms, "frames_per_second": fps, "mb_per_second": mbps,
            "proxy_cpu_ms_per_frame": [[c * 1000 for c in m.proxy_cpu] for m in runs],
            "proxies": setup.proxy_names, "x11vnc_cpu_ms_per_frame": x11vnc_ms,
            "viewer_cpu_ms_per_frame": viewer_ms}
    table = Table(
        f"Frame-buffer throughput: vncdotool full-screen Raw frames of {SCREEN}, "
        f"{len(rounds)} interleaved rounds of {FRAMES} frames; median and min–max over "
        "rounds",
        ["setup", "connect→1st frame ms", "min–max", "frames/s", "min–max", "MB/s",
         "× direct", "× stunnel", "proxy CPU ms/frame", "proxy CPU s/GiB",
         "ms/frame by proxy", "x11vnc CPU ms/frame", "viewer CPU ms/frame"], rows)
    return table, verdicts


def _start_table(setups: list[Setup], starts: dict[str, list[StartRun]],
                 data: dict[str, Any]) -> tuple[Table, list[str]]:
    rows: list[list[Any]] = []
    verdicts: list[str] = []
    p50 = {name: percentile([s.seconds for s in runs], 50) for name, runs in starts.items()}
    for setup in setups:
        runs = starts[setup.name]
        if not runs:
            continue
        seconds = [s.seconds * 1000 for s in runs]
        cpu = [s.proxy_cpu * 1000 for s in runs]
        hub = [s.hub_cpu * 1000 for s in runs]
        rows.append([setup.name, len(runs), percentile(seconds, 50), percentile(seconds, 99),
                     f"{p50[setup.name] / p50['direct']:.2f}x",
                     f"{(p50[setup.name] - p50['direct']) * 1000:+.0f}",
                     f"{p50[setup.name] / p50['stunnel']:.2f}x" if starts["stunnel"] else "–",
                     f"{statistics.median(cpu):.0f}" if setup.name != "direct" else "–",
                     f"{statistics.median(hub):.0f}" if setup.console else "–"])
        verdicts.append(f"{setup.name}: start to first frame p50 "
                        f"{percentile(seconds, 50):.0f} ms, p99 {percentile(seconds, 99):.0f} ms")
        data.setdefault(setup.name, {})["start_to_first_frame_ms"] = seconds
        data[setup.name]["start_proxy_cpu_ms"] = cpu
        data[setup.name]["start_hub_cpu_ms"] = hub
    table = Table(
        "Time to first frame: from starting the viewer (direct), a fresh stunnel client + "
        "the viewer (stunnel), `portcullis shadow --exec viewer` (portcullis); "
        "runs interleaved",
        ["setup", "runs", "p50 ms", "p99 ms", "p50 ÷ direct", "p50 − direct ms",
         "p50 ÷ stunnel",
         "proxy CPU ms", "hub CPU ms"], rows)
    return table, verdicts


def _memory_table(memory: Memory | None, data: dict[str, Any]) -> tuple[Table, list[str]]:
    if memory is None:
        return Table("Memory per idle agent: not measured", ["figure", "value"], []), []
    per_connection = memory.idle_growth_kib / memory.idle_answered \
        if memory.idle_answered else math.nan
    rows: list[list[Any]] = [
        [f"idle agent RSS MiB (median of {len(memory.agent_rss_kib)})",
         f"{statistics.median(memory.agent_rss_kib) / 1024:.1f}",
         f"{_spread([k / 1024 for k in memory.agent_rss_kib])}"],
        ["idle agent PSS MiB (shared pages divided)",
         f"{statistics.median(memory.agent_pss_kib) / 1024:.1f}",
         f"{_spread([k / 1024 for k in memory.agent_pss_kib])}"],
        [f"RSS growth per idle connection KiB ({memory.idle_answered}/{memory.idle_opened} "
         "answered)", f"{per_connection:.1f}", f"total {memory.idle_growth_kib / 1024:.1f} MiB"],
    ]
    data["memory"] = {"agent_rss_kib": memory.agent_rss_kib,
                      "agent_pss_kib": memory.agent_pss_kib,
                      "idle_opened": memory.idle_opened,
                      "idle_answered": memory.idle_answered,
                      "idle_growth_kib": memory.idle_growth_kib,
                      "kib_per_idle_connection": per_connection}
    table = Table("Memory: idle `portcullis shadow-agent` after enrolment; idle connections "
                  "at its device proxy (TLS ClientHello sent, then nothing)",
                  ["figure", "median", "min–max"], rows)
    verdict = (f"idle agent: {statistics.median(memory.agent_rss_kib) / 1024:.1f} MiB RSS, "
               f"{per_connection:.1f} KiB per idle connection")
    return table, [verdict]


def _report(setups: list[Setup], rounds: list[dict[str, Measured]],
            starts: dict[str, list[StartRun]], memory: Memory | None) -> Report:
    data: dict[str, Any] = {"screen": SCREEN, "frames": FRAMES, "machine": machine_line()}
    throughput, verdicts = _throughput_table(setups, rounds, data)
    start, start_verdicts = _start_table(setups, starts, data)
    memory_table, memory_verdicts = _memory_table(memory, data)
    notes = ["× direct / × stunnel: this setup's frames/s over the other's in the same "
             "round, median over rounds (below 1: slower)",
             "proxy CPU: user + system of the setup's proxies from the first frame to the "
             "last (stunnel: client + server; portcullis: agent + `portcullis shadow`), "
             "per frame and per GiB relayed; start-up is in the time-to-first-frame table",
             "time to first frame, proxy CPU: the proxies' CPU over the whole run "
             "(portcullis: the console's start-up included); hub CPU: `portcullis up`'s",
             "connect→1st frame: the viewer's own figure; through portcullis the channel "
             "(and the agent's connection to x11vnc) is up before the viewer starts, so "
             "compare the time-to-first-frame table instead",
             "CPU from /proc/PID/stat: 10 ms ticks (threads that ended included)",
             "raw encoding (vncdotool's only one): bytes per frame = width × height × 4",
             machine_line()]
    return Report("shadow", [throughput, start, memory_table],
                  verdicts + start_verdicts + memory_verdicts, notes=notes, data=data)


# -- memory -------------------------------------------------------------------------------


def _settled_rss(process: Process, timeout: float = 5.0) -> int:
    """RSS once two readings 0.5 s apart agree within 1% (start-up work done)."""
    deadline = time.monotonic() + timeout
    last = process.rss_kib()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = process.rss_kib()
        if abs(now - last) <= last // 100:
            return now
        last = now
    return last


def _client_hello(context: ssl.SSLContext) -> bytes:
    """A fresh ClientHello (its own random and key share), as a new console sends."""
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(),
                           server_hostname=DEVICE)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def idle_connections(agent: Process, port: int, count: int) -> tuple[int, int, int]:
    """Open `count` connections that each send a ClientHello and then nothing; once the
    agent answered them (or IDLE_SECONDS passed), its RSS growth. Returns (opened,
    answered, growth KiB); every socket is closed before returning."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    before = _settled_rss(agent)
    sockets: list[socket.socket] = []
    deadline = time.monotonic() + IDLE_SECONDS
    answered = 0
    try:
        with selectors.DefaultSelector() as selector:
            for _ in range(count):
                if time.monotonic() > deadline:
                    break
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sockets.append(sock)
                sock.sendall(_client_hello(context))
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            # Answered (the server's flight arrived) means the agent holds the handshake.
            while answered < len(sockets) and time.monotonic() < deadline:
                for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                    selector.unregister(key.fileobj)
                    answered += 1
            growth = agent.rss_kib() - before
    finally:
        for sock in sockets:
            sock.close()
    return len(sockets), answered, growth


def measure_memory(stack: ExitStack, hub: Hub, directory: Path, vnc_port: int) -> Memory:
    agents = [hub.start_agent(stack, directory, f"bench-idle-{index}", vnc_port)
              for index in range(AGENTS)]
    rss = [_settled_rss(agent) for agent, _ in agents]
    pss = [pss_kib(agent.pid) for agent, _ in agents]
    agent, port = agents[0]
    opened, answered, growth = idle_connections(agent, port, IDLE)
    for other, _ in agents:
        other.stop()
    return Memory(rss, pss, opened, answered, growth)


# -- the benchmark ------------------------------------------------------------------------


def first_frames(setups: list[Setup]) -> dict[str, list[StartRun]]:
    """START_RUNS cold starts per setup, interleaved, within START_SECONDS."""
    starts: dict[str, list[StartRun]] = {setup.name: [] for setup in setups}
    deadline = time.monotonic() + START_SECONDS
    for index in range(START_RUNS):
        if time.monotonic() > deadline:
            print(f"time to first frame: stopped after {index} runs per setup "
                  f"({START_SECONDS:g} s)", flush=True)
            break
        order = setups[index % len(setups):] + setups[:index % len(setups)]
        for setup in order:
            assert setup.first_frame is not None
            starts[setup.name].append(setup.first_frame())
    return starts


def run() -> Report:
    from peers.vnc import VncDesktop

    width, height, depth = (int(part) for part in SCREEN.split("x"))
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-shadow-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        desktop = stack.enter_context(VncDesktop(directory / "desktop", width=width,
                                                 height=height, depth=depth,
                                                 colour="#336699"))
        assert desktop.x11vnc is not None
        x11vnc = desktop.x11vnc.popen.pid
        hub = start_hub(stack, directory)
        setups = [direct_setup(desktop.address),
                  through_stunnel(stack, directory, desktop.port),
                  through_portcullis(stack, hub, directory, desktop.port)]
        rounds: list[dict[str, Measured]] = []
        for index in range(ROUNDS):
            # Rotate the order so that no setup always runs first (a cold cache) or last.
            order = setups[index % len(setups):] + setups[:index % len(setups)]
            measured = {setup.name: measure(setup, x11vnc) for setup in order}
            rounds.append(measured)
            print(f"round {index + 1}/{ROUNDS}: " + ", ".join(
                f"{name} {m.run.frames_per_second:.1f} frames/s"
                for name, m in measured.items()), flush=True)
        starts = first_frames(setups)
        print("time to first frame: " + ", ".join(
            f"{name} p50 {percentile([s.seconds for s in runs], 50) * 1000:.0f} ms"
            for name, runs in starts.items()), flush=True)
        memory = measure_memory(stack, hub, directory, desktop.port)
        return _report(setups, rounds, starts, memory)


# -- the viewer (its own process) -----------------------------------------------------------


def viewer_main(address: str, frames: int, seconds: float, pause: bool) -> int:
    """Connect, take one full frame, (pause: say so and wait for a line on stdin), then
    up to `frames` more within `seconds`; print the timings as one JSON line."""
    from vncdotool import api

    cpu_started = time.process_time()
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    client = api.connect(address, password=None, timeout=seconds)
    try:
        client.refreshScreen(incremental=False)
        first_frame_at = time.monotonic()
        first_frame = time.perf_counter() - started
        if pause:
            print(FIRST_FRAME_MARK, flush=True)
            sys.stdin.readline()   # the benchmark has read the proxies' CPU (or is gone)
        frame_seconds: list[float] = []
        for _ in range(frames):
            if time.monotonic() > deadline:
                break
            frame_started = time.perf_counter()
            client.refreshScreen(incremental=False)
            frame_seconds.append(time.perf_counter() - frame_started)
        protocol = client.protocol
        assert protocol is not None
        result = {"first_frame": first_frame, "first_frame_at": first_frame_at,
                  "frame_seconds": frame_seconds,
                  "width": protocol.width, "height": protocol.height,
                  "bytes_per_pixel": protocol.pixel_format.bypp,
                  "cpu": time.process_time() - cpu_started}
    finally:
        client.disconnect()
        api.shutdown()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "viewer" and sys.argv[5:] in ([], ["pause"]):
        sys.exit(viewer_main(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
                             sys.argv[5:] == ["pause"]))
    sys.exit("usage: python -m bench.shadow viewer HOST::PORT FRAMES SECONDS [pause] "
             "(the benchmark itself: python -m bench shadow)")
