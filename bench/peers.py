"""The real programs the benchmarks measure against: an iperf3 server, the echo server
process, an stunnel client/server pair (the baseline the product must match), and nginx
(a web upstream, or the plain reverse proxy the web proxy is compared with).
Each is started on a free port and stopped by the caller's ExitStack."""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.deployment import Process, free_port, start_process, wait_for_listen


def require(program: str, *alternatives: str) -> str:
    for name in (program, *alternatives):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(f"{program} is not installed (run 'make peers' as root)")


def start_iperf3_server(stack: ExitStack, logs: Path) -> int:
    port = free_port()
    process = start_process(
        stack, [require("iperf3"), "-s", "-p", str(port), "-B", "127.0.0.1", "--forceflush"],
        logs / "iperf3-server.log", name="iperf3 -s")
    wait_for_listen(port, process=process)
    return port


def start_echo_server(stack: ExitStack, logs: Path) -> tuple[Process, int]:
    process = start_process(stack, [sys.executable, "-m", "bench.echo_server"],
                            logs / "echo-server.log", name="echo server")
    port = int(process.wait_for(r"echo listening on (\d+)").group(1))
    return process, port


def start_stunnel_server(stack: ExitStack, logs: Path, *, target_port: int,
                         cert: Path, key: Path,
                         name: str = "stunnel server") -> tuple[Process, int]:
    """TLS on a free port, forwarding plain TCP to 127.0.0.1:target_port. `name` names
    the process, its config and its log (several may run side by side)."""
    port = free_port()
    config = logs / f"{_file_name(name)}.conf"
    config.write_text(
        "foreground = yes\npid =\ndebug = 4\n"
        f"[server]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target_port}\n"
        f"cert = {cert}\nkey = {key}\n")
    process = start_process(stack, [require("stunnel4", "stunnel"), str(config)],
                            logs / f"{_file_name(name)}.log", name=name)
    wait_for_listen(port, process=process)
    return process, port


def start_stunnel_client(stack: ExitStack, logs: Path, *, server_port: int,
                         ca: Path, name: str = "stunnel client") -> tuple[Process, int]:
    """Plain TCP on a free port, carried with TLS (verified against `ca`) to server_port."""
    port = free_port()
    config = logs / f"{_file_name(name)}.conf"
    config.write_text(
        "foreground = yes\npid =\ndebug = 4\n"
        f"[client]\nclient = yes\naccept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{server_port}\n"
        f"CAfile = {ca}\nverifyChain = yes\ncheckHost = localhost\nsni = localhost\n")
    process = start_process(stack, [require("stunnel4", "stunnel"), str(config)],
                            logs / f"{_file_name(name)}.log", name=name)
    wait_for_listen(port, process=process)
    return process, port


@dataclass
class StunnelPair:
    """An stunnel client -> stunnel server pair: plain TCP in at `port`, TLS between the
    two (the server listening on `tls_port`), plain TCP out to the target."""

    client: Process
    server: Process
    port: int
    tls_port: int

    @property
    def path(self) -> dict[str, Process]:
        """Role -> process, as the throughput measurements name a tunnel's ends."""
        return {"stunnel client": self.client, "stunnel server": self.server}


def start_stunnel_pair(stack: ExitStack, logs: Path, *, target_port: int, cert: Path,
                       key: Path, ca: Path, suffix: str = "") -> StunnelPair:
    """The baseline in front of 127.0.0.1:target_port; `suffix` tells the processes (and
    their configs and logs) apart when several pairs run: "stunnel server SUFFIX"."""
    server, tls_port = start_stunnel_server(stack, logs, target_port=target_port, cert=cert,
                                            key=key, name=f"stunnel server{suffix}")
    client, port = start_stunnel_client(stack, logs, server_port=tls_port, ca=ca,
                                        name=f"stunnel client{suffix}")
    return StunnelPair(client, server, port, tls_port)


def start_stunnel_chain(stack: ExitStack, logs: Path, *, target_port: int, hops: int,
                        cert: Path, key: Path, ca: Path,
                        name: str = "stunnel") -> tuple[list[Process], int]:
    """`hops` TLS hops in a row, each an stunnel client -> stunnel server pair, the last
    server forwarding to 127.0.0.1:target_port: plain -> TLS -> plain -> ... -> plain.
    Returns the processes in the order traffic crosses them, and the first one's port."""
    processes: list[Process] = []
    port = target_port
    # Built from the far end back: each client must know the port of its server.
    for hop in range(hops, 0, -1):
        server, server_port = start_stunnel_server(
            stack, logs, target_port=port, cert=cert, key=key,
            name=f"{name} {2 * hop} server")
        client, port = start_stunnel_client(stack, logs, server_port=server_port, ca=ca,
                                            name=f"{name} {2 * hop - 1} client")
        processes[:0] = [client, server]
    return processes, port


def _file_name(name: str) -> str:
    return name.replace(" ", "-")


def start_nginx(stack: ExitStack, logs: Path, *, name: str, servers: str,
                ports: list[int]) -> Process:
    """A private nginx (one worker, its own prefix, pid and temporary files under
    logs/NAME) serving `servers`, the http{} blocks it is given; returned once it
    listens on every port in `ports`."""
    here = logs / _file_name(name)
    here.mkdir()
    user = pwd.getpwuid(os.geteuid()).pw_name
    config = here / "nginx.conf"
    config.write_text(
        # `user` counts only when started as root; then it keeps the worker in our user,
        # who owns the temporary directory.
        f"daemon off;\nworker_processes 1;\nuser {user};\npid {here}/nginx.pid;\n"
        f"error_log {here}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  access_log off;\n"
        f"  client_body_temp_path {here}/body;\n  proxy_temp_path {here}/proxy;\n"
        f"  fastcgi_temp_path {here}/fastcgi;\n  uwsgi_temp_path {here}/uwsgi;\n"
        f"  scgi_temp_path {here}/scgi;\n"
        f"{servers}}}\n")
    process = start_process(
        stack, [require("nginx"), "-p", str(here), "-e", "stderr", "-c", str(config)],
        logs / f"{_file_name(name)}.log", name=name)
    for port in ports:
        wait_for_listen(port, process=process)
    return process
