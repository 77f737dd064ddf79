"""A stock classic-mode relay: Debian's dante SOCKS5 server (`danted`) behind an stunnel
server that requires the edge's client certificate, each on a free port of 127.0.0.1.

The relay certificate and CA come from a deployment (`portcullis init`), so the edge
checks them exactly as it checks our own relay's."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"did not listen on {port}: {log.read_text()}")


class _Daemon:
    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        try:
            _wait_for_port(port, self._process, log)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(5)


class Danted(_Daemon):
    """danted: method none, clients from 127.0.0.0/8, CONNECT to 127.0.0.0/8 except
    `blocked_port` (refused by rule: NOT_ALLOWED)."""

    def __init__(self, danted: str, directory: Path, *, blocked_port: int) -> None:
        port = free_port()
        log = directory / "danted.log"
        config = directory / "danted.conf"
        config.write_text(f"""\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: error
}}
socks block {{
    from: 0.0.0.0/0 to: 127.0.0.1/32 port = {blocked_port}
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: error connect
}}
""")
        super().__init__([danted, "-f", str(config), "-p", str(directory / "danted.pid")],
                         port, log)


class StunnelServer(_Daemon):
    """stunnel accepting TLS with `cert`/`key`, requiring a client certificate that
    chains to `ca`, and connecting each accepted connection to 127.0.0.1:`forward`."""

    def __init__(self, stunnel: str, directory: Path, *, cert: Path, key: Path, ca: Path,
                 forward: int) -> None:
        port = free_port()
        log = directory / "stunnel.log"
        config = directory / "stunnel.conf"
        config.write_text(f"""\
foreground = yes
pid =
output = {log}
debug = 5
[relay]
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{forward}
cert = {cert}
key = {key}
CAfile = {ca}
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.2
""")
        super().__init__([stunnel, str(config)], port, log)
