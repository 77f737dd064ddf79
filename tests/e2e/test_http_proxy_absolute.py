"""`portcullis connect`'s HTTP proxy forwards plain requests in absolute form
(`GET http://host:port/path`) through the tunnel, as curl and pip send them for http://
URLs: bodies both ways (Content-Length and chunked), keep-alive, the gateway's policy
(403 with its reason), and 400/431 for what is not HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_tunnel import audit, connect, curl, login, vpn  # noqa: F401  (vpn: a fixture)

from conftest import Deployment, free_port
from peers.servers import HttpServer

# A small ASGI application run by uvicorn (a real HTTP/1.1 server: keep-alive, chunked
# request bodies): it answers with what it received, and which TCP connection it came on.
ECHO_APP = '''
import hashlib, json

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].startswith("/big/"):
        size = int(scope["path"].split("/")[2])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        chunk = bytes(range(256)) * 256
        for _ in range(size // len(chunk)):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    answer = json.dumps({
        "method": scope["method"], "path": scope["path"],
        "query": scope["query_string"].decode(), "client_port": scope["client"][1],
        "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
        "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}).encode() + b"\\n"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"connection", b"x-hop"), (b"x-hop", b"dropped"),
                            (b"keep-alive", b"timeout=5")]})
    await send({"type": "http.response.body", "body": answer})
'''


class EchoServer:
    def __init__(self, directory: Path) -> None:
        (directory / "echo_app.py").write_text(ECHO_APP)
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "echo_app:app", "--host", "127.0.0.1",
             "--port", str(self.port), "--no-access-log", "--http", "h11"],
            cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def echo_app(tmp_path: Path) -> Iterator[EchoServer]:
    directory = tmp_path / "echo"
    directory.mkdir()
    server = EchoServer(directory)
    yield server
    server.close()


@pytest.fixture
def proxied(vpn: Deployment, tmp_path: Path, start_process):  # type: ignore[no-untyped-def]  # noqa: F811
    home = tmp_path / "alice"
    login(vpn, "alice", home)
    return connect(vpn, start_process, home)


def echoes(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def raw_exchange(proxy: str, data: bytes) -> bytes:
    """Send ``data`` to the proxy and read until it closes the connection."""
    host, port = proxy.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.sendall(data)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer


def test_curl_gets_posts_and_uploads_chunked_through_the_proxy_on_one_connection(
        proxied, echo_app: EchoServer, http_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base = f"http://127.0.0.1:{echo_app.port}"
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(300_000))
    result = curl("-v", "-x", f"http://{proxied.http}",
                  "-H", "Proxy-Connection: keep-alive", f"{base}/first?a=1",
                  "--next", "-x", f"http://{proxied.http}", "--data-binary", "posted body",
                  f"{base}/form",
                  "--next", "-x", f"http://{proxied.http}", "-H", "Transfer-Encoding: chunked",
                  "--data-binary", f"@{upload}", f"{base}/chunked",
                  "--next", "-x", f"http://{proxied.http}", "-I", f"{base}/head",
                  # Another server, by a name the gateway resolves, on the same connection.
                  "--next", "-x", f"http://{proxied.http}",
                  f"http://localhost:{http_server.port}/")
    assert result.returncode == 0, result.stderr
    got = echoes(result.stdout)
    assert [(e["method"], e["path"]) for e in got] == [
        ("GET", "/first"), ("POST", "/form"), ("POST", "/chunked")]
    first, form, chunked = got
    assert first["query"] == "a=1"
    assert first["headers"]["host"] == f"127.0.0.1:{echo_app.port}"   # type: ignore[index]
    assert "proxy-connection" not in first["headers"]   # type: ignore[operator]
    assert form["length"] == len(b"posted body")
    assert form["sha256"] == hashlib.sha256(b"posted body").hexdigest()
    assert chunked["headers"]["transfer-encoding"] == "chunked"   # type: ignore[index]
    assert chunked["sha256"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    assert "intranet home" in result.stdout
    # One client connection for all five, and one upstream connection for the first four.
    assert result.stderr.count("Re-using existing connection") == 4, result.stderr
    assert len({e["client_port"] for e in got}) == 1
    # Hop-by-hop headers of the response (and those its Connection names) stay behind.
    assert "x-hop" not in result.stderr.lower()
    assert "keep-alive: timeout" not in result.stderr.lower()


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def test_a_large_download_streams_through_whole_and_a_slow_reader_holds_the_server_back(
        proxied, echo_app: EchoServer) -> None:  # type: ignore[no-untyped-def]
    size = 32 * 1024 * 1024
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "60", "-x", f"http://{proxied.http}",
         f"http://127.0.0.1:{echo_app.port}/big/{size}"], capture_output=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == size
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(
        bytes(range(256)) * (size // 256)).hexdigest()

    # A client that stops reading: what is in flight stays bounded by the tunnel's
    # window and the sockets' buffers, not by the 512 MiB the server would send.
    pid = proxied.process.popen.pid
    before = rss_mib(pid)
    host, port = proxied.http.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(b"GET http://127.0.0.1:%d/big/%d HTTP/1.1\r\nHost: x\r\n\r\n"
                       % (echo_app.port, 512 * 1024 * 1024))
        assert client.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(3)   # the server would have sent hundreds of MiB by now
        grown = rss_mib(pid) - before
    print(f"connect grew by {grown:.1f} MiB while its client did not read")
    assert grown < 48


def test_what_is_not_carried_gets_403_400_or_431_with_a_reason_and_the_connection_closes(
        vpn: Deployment, proxied, echo_app: EchoServer) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    # The gateway's policy denies the destination: 403 with its reason, printed by connect.
    result = curl("-i", "-x", f"http://{proxied.http}", "http://127.0.0.1:22/")
    assert result.stdout.startswith("HTTP/1.1 403 Forbidden\n"), result.stdout
    assert result.stdout.splitlines()[-1] == 'denied: denied by rule "no-ssh"'
    proxied.process.wait_for(r"refused 127\.0\.0\.1:22: ")
    denied = [e for e in audit(vpn) if e["event"] == "tunnel.denied"]
    assert denied[-1]["rule"] == "no-ssh"
    # Not for this proxy to forward: https:// in absolute form, a bare path.
    https = raw_exchange(proxied.http, b"GET https://127.0.0.1:1/ HTTP/1.1\r\n"
                                       b"Host: 127.0.0.1:1\r\n\r\n")
    assert https.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"CONNECT" in https.split(b"\r\n\r\n", 1)[1]
    origin = raw_exchange(proxied.http, b"GET / HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
    assert origin.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    good = (b"GET http://127.0.0.1:%d/ok HTTP/1.1\r\nHost: x\r\n\r\n" % echo_app.port)
    malformed = raw_exchange(proxied.http, good + b"GET http://127.0.0.1:1/ HTTP/1.1\r\n"
                             b"Host: x\r\nContent-Length: nope\r\n\r\n")
    first, _, rest = malformed.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")   # the first request on it was answered
    assert b"HTTP/1.1 400 Bad Request\r\n" in rest
    assert raw_exchange(proxied.http, b"\x00\x01\r\n\r\n").startswith(
        b"HTTP/1.1 400 Bad Request\r\n")
    long_head = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70_000
    for prefix in (b"", good):   # the first head, and a later one
        answer = raw_exchange(proxied.http, prefix + long_head)
        assert b"HTTP/1.1 431 Request Header Fields Too Large\r\n" in answer, answer[-300:]


def wheel(name: str, version: str) -> tuple[str, bytes]:
    """A minimal pure-Python wheel (PEP 427) with one module."""
    dist = f"{name}-{version}"
    files = {f"{name}.py": b"VALUE = 42\n",
             f"{dist}.dist-info/METADATA": (f"Metadata-Version: 2.1\nName: {name}\n"
                                             f"Version: {version}\n").encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
                                        b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record.encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return f"{dist}-py3-none-any.whl", buffer.getvalue()


def test_pip_downloads_a_package_from_an_index_through_the_proxy(
        vpn: Deployment, proxied, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    root = tmp_path / "index"
    filename, data = wheel("portcullis_probe", "1.0")
    (root / "files").mkdir(parents=True)
    (root / "files" / filename).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    (root / "simple" / "portcullis-probe").mkdir(parents=True)
    (root / "simple" / "portcullis-probe" / "index.html").write_text(
        f'<html><body><a href="../../files/{filename}#sha256={digest}">{filename}</a>'
        "</body></html>\n")
    index = HttpServer(root, free_port())
    try:
        env = {key: value for key, value in os.environ.items()
               if not key.upper().startswith(("PIP_", "NO_PROXY", "HTTP_PROXY", "ALL_PROXY"))}
        env["PIP_CONFIG_FILE"] = os.devnull
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
             "--disable-pip-version-check", "--proxy", f"http://{proxied.http}",
             "--index-url", f"http://127.0.0.1:{index.port}/simple", "-d",
             str(tmp_path / "got"), "portcullis-probe"],
            capture_output=True, text=True, timeout=120, env=env)
    finally:
        index.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "got" / filename).read_bytes() == data
    # Through the tunnel: the gateway audited the streams to the index (each is audited
    # when it ends; http.server closes after every answer).
    index_streams: list[dict[str, object]] = []
    deadline = time.monotonic() + 10
    while not index_streams and time.monotonic() < deadline:
        index_streams = [e for e in audit(vpn) if e["event"] == "tunnel.stream"
                         and e["destination"] == f"127.0.0.1:{index.port}/tcp"]
        time.sleep(0.05)
    assert index_streams and index_streams[-1]["user"] == "alice"
