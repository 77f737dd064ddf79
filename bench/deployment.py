"""A throwaway Portcullis deployment for the benchmarks, plus the subprocess plumbing
they share: free ports from the OS, processes stopped by their id, readiness by log line
or by a listening socket (never a fixed sleep).

The deployment is made with the real CLI (`portcullis init`, `user add`) in a temporary
directory and run with `portcullis up` as a subprocess, exactly as an administrator
would. Every process started here is stopped when the caller's ExitStack closes.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

PORTCULLIS = str(Path(sys.executable).parent / "portcullis")
USER = "alice"
PASSWORD = "bench horse battery staple"
_picker = random.Random()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_run(count: int) -> int:
    """A port P with P..P+count-1 all free (`portcullis init` uses three in a row).

    Picked below the kernel's ephemeral range: a port from that range, free when
    picked, may become the source port of any outgoing connection (this machine makes
    thousands a second under load) before `portcullis up` binds it."""
    low = _ephemeral_low()
    for _ in range(200):
        base = _picker.randrange(10000, low - count)
        sockets: list[socket.socket] = []
        try:
            for offset in range(count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("found no run of free ports in 200 tries")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _listening_ports() -> set[int]:
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_for_listen(port: int, timeout: float = 15, process: Process | None = None) -> None:
    """Wait until something listens on `port`, without connecting to it (a probe
    connection would reach the server behind a tunnel and confuse iperf3)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port in _listening_ports():
            return
        if process is not None and process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited {process.popen.returncode}:\n"
                               f"{process.output()[-2000:]}")
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


class Process:
    """A subprocess whose stdout and stderr go to a log file; stopped by its pid."""

    def __init__(self, argv: list[str], log: Path, *, env: dict[str, str] | None = None,
                 name: str | None = None) -> None:
        self.name = name or Path(argv[0]).name
        self.log = log
        self._handle = log.open("wb")
        self.popen = subprocess.Popen(argv, stdout=self._handle, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL,
                                      env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.popen.returncode}:\n"
                                   f"{self.output()[-2000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.name}: no {pattern!r} after {timeout} s:\n"
                           f"{self.output()[-2000:]}")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and of every process under it
        (threads included): a gateway with worker processes, or a program that forks,
        counts whole. Children that already exited and were waited for count too."""
        root = psutil.Process(self.pid)
        total = _cpu(root, reaped=True)
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                total += _cpu(child, reaped=False)
        return total

    def processes(self) -> int:
        """How many processes this one is, with its descendants (a gateway's workers)."""
        return len(self._tree())

    def rss_kib(self) -> int:
        """The resident memory of this process and every process under it: a gateway's
        workers hold its connections, not the supervisor."""
        return sum(self._each(lambda process: process.memory_info().rss)) // 1024

    def open_fds(self) -> int:
        """Open file descriptors of this process and of every process under it."""
        return sum(self._each(lambda process: process.num_fds()))

    def _tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]

    def _each(self, value: Callable[[psutil.Process], int]) -> list[int]:
        values = []
        for process in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):   # a worker being replaced
                values.append(value(process))
        return values

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._handle.close()


def _cpu(process: psutil.Process, *, reaped: bool) -> float:
    times = process.cpu_times()
    own = float(times.user + times.system)
    # The root's children_* fields hold the children it already waited for; a live
    # descendant counts its own time only (its exited children are rare here).
    return own + (float(times.children_user + times.children_system) if reaped else 0.0)


def start_process(stack: ExitStack, argv: list[str], log: Path, *,
                  env: dict[str, str] | None = None, name: str | None = None) -> Process:
    """Start a process that `stack` stops on exit (registered before anything can fail)."""
    process = Process(argv, log, env=env, name=name)
    stack.callback(process.stop)
    return process


def run_cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> str:
    result = subprocess.run([PORTCULLIS, *args], input=stdin, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"portcullis {args[0]} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return result.stdout


@dataclass
class Deployment:
    directory: Path
    port: int

    @classmethod
    def create(cls, root: Path, name: str = "deployment") -> Deployment:
        """`portcullis init` in root/NAME on three free ports, plus our user."""
        port = free_port_run(4)
        directory = root / name
        run_cli("init", "--dir", str(directory), "--port", str(port))
        deployment = cls(directory, port)
        run_cli("user", "add", USER, "--dir", str(directory), "--group", "staff",
                "--password-stdin", stdin=PASSWORD + "\n")
        return deployment

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.directory / "pki" / "ca.crt"

    @property
    def server_cert(self) -> tuple[Path, Path]:
        """The gateway's certificate and key (valid for localhost), reused by stunnel."""
        pki = self.directory / "pki"
        return pki / "gateway.crt", pki / "gateway.key"

    def client_tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    @property
    def name(self) -> str:
        return self.directory.name

    def add_config(self, toml: str) -> None:
        """Append sections to portcullis.toml (before the processes start)."""
        with (self.directory / "portcullis.toml").open("a") as handle:
            handle.write("\n" + toml)

    def add_resource(self, name: str, title: str, address: str) -> None:
        self.add_config(f'[[resources]]\nname = "{name}"\ntitle = "{title}"\n'
                        f'address = "{address}"\ngroups = ["staff"]\n')

    def start(self, stack: ExitStack, logs: Path) -> Process:
        """`portcullis up`, returned once it printed "Portal:" (it is then serving)."""
        process = start_process(stack, [PORTCULLIS, "up", "--dir", str(self.directory)],
                                logs / f"portcullis-up-{self.name}.log", name="portcullis up")
        process.wait_for(r"Portal: https://", timeout=60)
        return process

    def start_relay(self, stack: ExitStack, logs: Path) -> Process:
        """`portcullis serve relay` from this directory (its [relay] section); the caller
        waits for what readiness means in its mode (a listener, or a working path)."""
        return start_process(stack, [PORTCULLIS, "serve", "relay", "--dir", str(self.directory)],
                             logs / f"portcullis-relay-{self.name}.log",
                             name="portcullis relay")

    def login_cli(self, home: Path) -> dict[str, str]:
        """`portcullis login` into client home `home`; returns the env for later commands."""
        env = {"PORTCULLIS_HOME": str(home)}
        run_cli("login", self.url, "--user", USER, "--password-stdin", "--ca", str(self.ca),
                stdin=PASSWORD + "\n", env=env)
        return env

    def start_launch(self, stack: ExitStack, logs: Path, env: dict[str, str],
                     resource: str) -> tuple[Process, int]:
        """`portcullis launch RESOURCE` on a free local port; returns it and the port."""
        process = start_process(
            stack, [PORTCULLIS, "launch", resource, "--listen", "127.0.0.1:0"],
            logs / f"portcullis-launch-{self.name}-{resource}.log", env=env,
            name="portcullis launch")
        match = process.wait_for(r"listening on [\d.]+:(\d+)")
        return process, int(match.group(1))


def api_client(deployment: Deployment, concurrency: int) -> httpx.AsyncClient:
    """A keep-alive client for the JSON API with one pooled connection per worker."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(base_url=deployment.url, verify=deployment.client_tls(),
                             limits=limits, timeout=30)


async def sign_in(api: httpx.AsyncClient) -> str:
    """Sign in over the JSON API; sets the Bearer header on `api` and returns the token."""
    body: dict[str, object] = {"answers": {"username": USER, "password": PASSWORD}}
    for _ in range(5):  # a handful of steps at most; stop a runaway flow
        response = await api.post("/api/v1/login", json=body)
        result = response.json()
        if result.get("status") == "authenticated":
            token = str(result["token"])
            api.headers["authorization"] = f"Bearer {token}"
            return token
        if result.get("status") != "continue":
            raise RuntimeError(f"sign-in failed: {response.status_code} {response.text[:200]}")
        body = {"handle": result["handle"],
                "answers": {"username": USER, "password": PASSWORD}}
    raise RuntimeError("sign-in did not finish in 5 steps")
