"""Real servers for resources to point at: a TCP echo server and Python's own HTTP
server (http.server, in a subprocess), each on a free port.

`python servers.py HOST PORT` serves echo on HOST:PORT until stopped (to run it inside
a network namespace, see peers/topology.py)."""

from __future__ import annotations

import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            data = sock.recv(1 << 20)
            if not data:
                sock.shutdown(socket.SHUT_WR)
                return
            sock.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoServer:
    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Echo)
        self.port = self._server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class HttpServer:
    def __init__(self, root: Path, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
             "--directory", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("http.server did not start")

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(5)


class DnsServer:
    """dnsmasq answering one made-up name, on a free UDP port of 127.0.0.1."""

    NAME = "wiki.corp.example"
    ADDRESS = "10.1.2.3"

    def __init__(self, dnsmasq: str, ports: Callable[[], int], attempts: int = 3) -> None:
        """dnsmasq on a port `ports` gives; another one if it could not bind it (a free
        UDP port can be taken by any process's outgoing socket before dnsmasq binds)."""
        query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                 b"\x04wiki\x04corp\x07example\x00\x00\x01\x00\x01")
        for _ in range(attempts):
            self.port = ports()
            self._process = subprocess.Popen(
                [dnsmasq, *self.arguments("127.0.0.1", self.port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 10
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.settimeout(0.2)
                while time.monotonic() < deadline and self._process.poll() is None:
                    probe.sendto(query, ("127.0.0.1", self.port))
                    try:
                        if probe.recv(512)[:2] == b"\x12\x34":
                            return
                    except OSError:
                        continue
            self.close()
        raise RuntimeError(f"dnsmasq did not answer: {self._errors()}")

    def _errors(self) -> str:
        assert self._process.stderr is not None
        return self._process.stderr.read().decode(errors="replace").strip()[-300:]

    @classmethod
    def arguments(cls, address: str, port: int) -> list[str]:
        """dnsmasq's arguments: in the foreground, on address:port, answering NAME."""
        return ["--no-daemon", "-C", "/dev/null", f"--port={port}",
                f"--listen-address={address}", "--bind-interfaces", "--no-resolv",
                "--no-hosts", f"--address=/{cls.NAME}/{cls.ADDRESS}", "--user=root"]

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(5)


def echo_round_trip(host: str, port: int, size: int = 100 * 1024 * 1024,
                    seed: int = 7) -> tuple[str, str, int]:
    """Send `size` bytes to an echo server and read them back at the same time:
    (sha256 sent, sha256 received, bytes received)."""
    import hashlib
    import random

    block = random.Random(seed).randbytes(1 << 20)
    sent, received = hashlib.sha256(), hashlib.sha256()
    count = 0
    with socket.create_connection((host, port), timeout=60) as sock:
        def reader() -> None:
            nonlocal count
            while count < size:
                data = sock.recv(1 << 20)
                if not data:
                    return
                received.update(data)
                count += len(data)

        thread = threading.Thread(target=reader)
        thread.start()
        for index in range(size // len(block)):
            chunk = bytes([index & 0xFF]) + block[1:]   # no two megabytes alike
            sent.update(chunk)
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        thread.join(120)
    return sent.hexdigest(), received.hexdigest(), count


def serve_echo(host: str, port: int) -> None:
    with _Server((host, port), _Echo) as server:
        server.serve_forever()


SCRIPT = Path(__file__)

if __name__ == "__main__":
    serve_echo(sys.argv[1], int(sys.argv[2]))
