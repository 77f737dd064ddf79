"""Fixtures shared by the suites: deployments made by the real CLI, the gateway as a
real subprocess, and real peers (HTTP server, echo server) on free ports."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
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

sys.path.insert(0, str(Path(__file__).parent))

from peers.missing import missing_peer
from peers.servers import DnsServer, EchoServer, HttpServer

# Real PostgreSQL / Redis backends for every store-backed test; slapd and FreeRADIUS;
# the in-process login service (durable, build_login).
pytest_plugins = ("peers.stores", "peers.ldap", "peers.samba", "peers.radius", "peers.login",
                  "peers.oidc")

PORTCULLIS = str(Path(sys.executable).parent / "portcullis")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def require_program(name: str) -> str:
    """The path of a real peer program; under CI a missing one fails the test."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (run 'make peers' as root)"
        missing_peer(message)
    return path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports the tests pick for servers lie below the kernel's ephemeral range: a port from
# that range, free when picked, may be taken as the source port of any outgoing
# connection (this run's or another's) before the server binds it.
_PICK_LOW = 10000
_PICK_HIGH = _ephemeral_range()[0] - 1
_picked = random.Random()


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        # As the servers bind: a port whose old connections linger in TIME_WAIT is free
        # for a listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    return free_port_run(1)


def free_port_run(count: int) -> int:
    """A port P with P..P+count-1 all free (init uses four consecutive ports)."""
    for _ in range(500):
        base = _picked.randrange(_PICK_LOW, _PICK_HIGH - count)
        if all(_bindable(base + offset) for offset in range(count)):
            return base
    raise RuntimeError("no run of free ports")


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PORTCULLIS, *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@dataclass
class Deployment:
    directory: Path
    port: int
    admin_password: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.directory / "pki" / "ca.crt"

    @property
    def config(self) -> Path:
        return self.directory / "portcullis.toml"

    def add_resource(self, name: str, address: str, groups: list[str], title: str = "") -> None:
        with self.config.open("a") as handle:
            handle.write(f'\n[[resources]]\nname = "{name}"\ntitle = "{title or name}"\n'
                         f'address = "{address}"\ngroups = {groups!r}\n'.replace("'", '"'))

    def add_web_resource(self, name: str, upstream: str, host: str, groups: list[str],
                         title: str = "", identity_headers: bool = False) -> None:
        """A web application at `host` (a name under the gateway's, e.g. wiki.localhost)."""
        with self.config.open("a") as handle:
            handle.write(f'\n[[resources]]\nname = "{name}"\ntitle = "{title or name}"\n'
                         f'kind = "web"\nupstream = "{upstream}"\nhost = "{host}"\n'
                         f'identity_headers = {str(identity_headers).lower()}\n'
                         f'groups = {json.dumps(groups)}\n')

    def set(self, section: str, key: str, value: str) -> None:
        """Set `key = value` (a TOML literal) in [section], replacing an existing line."""
        lines = self.config.read_text().splitlines()
        start = lines.index(f"[{section}]")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")),
                   len(lines))
        for index in range(start + 1, end):
            if re.match(rf"{re.escape(key)}\s*=", lines[index]):
                lines[index] = f"{key} = {value}"
                break
        else:
            lines.insert(start + 1, f"{key} = {value}")
        self.config.write_text("\n".join(lines) + "\n")

    def add_user(self, name: str, password: str, groups: list[str]) -> None:
        args = ["user", "add", name, "--dir", str(self.directory), "--password-stdin"]
        for group in groups:
            args += ["--group", group]
        result = run_cli(*args, input=password + "\n")
        assert result.returncode == 0, result.stderr


def init_deployment(directory: Path) -> Deployment:
    """`portcullis init` in `directory`, on four free ports."""
    port = free_port_run(4)
    result = run_cli("init", "--dir", str(directory), "--port", str(port))
    assert result.returncode == 0, result.stderr
    password = re.search(r"password: (\S+)", result.stdout)
    assert password, result.stdout
    deployment = Deployment(directory, port, password.group(1))
    # One process, as the suites expect (tests/e2e/test_workers.py runs several).
    deployment.set("gateway", "workers", "1")
    return deployment


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    return init_deployment(tmp_path / "deployment")


class Process:
    """A subprocess (by default `portcullis ARGS`) whose output is collected to a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None,
                 program: str = PORTCULLIS, group: bool = False) -> None:
        self.log = log
        self._handle = log.open("wb")
        # group: the process leads a process group of its own, and stop() ends the
        # whole group (e.g. socat's per-connection children).
        self._group = group
        self.popen = subprocess.Popen([program, *args], stdout=self._handle,
                                      stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                      start_new_session=group)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited {self.popen.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output()}")

    def wait_listening(self, port: int, timeout: float = 10) -> None:
        """Until 127.0.0.1:`port` accepts a connection; fail with the output if the
        process exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if self.popen.poll() is not None:
                    raise AssertionError(f"process exited {self.popen.returncode}:\n"
                                         f"{self.output()}") from None
                time.sleep(0.05)
        raise AssertionError(f"nothing listens on {port}:\n{self.output()}")

    def stop(self) -> int:
        if self._group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._handle.close()
        return self.popen.returncode


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[object]:
    started: list[Process] = []

    def start(*args: str, name: str = "portcullis", env: dict[str, str] | None = None,
              program: str = PORTCULLIS) -> Process:
        process = Process(list(args), tmp_path / f"{name}-{len(started)}.log", env, program)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def gateway(deployment: Deployment, start_process) -> Process:  # type: ignore[no-untyped-def]
    """`portcullis up` on the deployment, once the portal answers."""
    process = start_process("up", "--dir", str(deployment.directory), name="up")
    process.wait_for(r"Portal: https://")
    return process


@pytest.fixture
def client_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "client-home"
    monkeypatch.setenv("PORTCULLIS_HOME", str(home))
    return home


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[HttpServer]:
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<h1>intranet home</h1>\n")
    server = HttpServer(root, free_port())
    yield server
    server.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_dns_port() -> int:
    """A port free for UDP and for TCP too (dnsmasq listens on both): after a test that
    opened thousands of TCP connections, many ports free for UDP are still TCP's."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer(require_program("dnsmasq"), free_dns_port)
    yield server
    server.close()


@dataclass
class TestHost:
    """A host of our own: a network namespace behind a veth pair, on 198.18.0.0/15
    (the benchmarking range), made by the test and removed after it."""

    namespace: str
    address: str
    gateway_side: str
    octet: int

    def run(self, *args: str, inside: bool = False) -> None:
        prefix = ["ip", "-n", self.namespace] if inside else ["ip"]
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def test_host(tmp_path: Path) -> Iterator[TestHost]:
    from peers.topology import link, namespaces

    with namespaces("host", logs=tmp_path) as hosts:
        host = hosts["host"]
        tag = host.namespace.rsplit("-", 1)[1]
        octet = int(tag[:2], 16) % 250 + 1
        host_address, ns_address = f"198.18.{octet}.1", f"198.18.{octet}.2"
        # This end is in the root namespace: its name carries the tag, and it goes even
        # if a process the test left keeps the namespace alive.
        near = f"pc{tag}a"
        try:
            link(None, near, host_address, host, "eth0", ns_address, prefix=30)
            yield TestHost(host.namespace, ns_address, host_address, octet)
        finally:
            subprocess.run(["ip", "link", "del", near], capture_output=True, timeout=10)
