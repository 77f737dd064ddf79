"""Nothing idles forever at the edge: slow or silent clients are closed within the
configured timeouts, connections over the limits are refused, and so are sign-ins over
the limit of unfinished ones. Real sockets against a running `portcullis up`."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from conftest import Deployment, Process, require_program

WEBSOCKET_UPGRADE = (b"GET /api/v1/launch HTTP/1.1\r\nHost: localhost\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
HEALTH = b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n"

Start = Callable[..., Process]


@pytest.fixture
def start_gateway(deployment: Deployment, start_process) -> Start:  # type: ignore[no-untyped-def]
    """`portcullis up` with these [limits] (TOML literals), once it answers."""
    def start(**limits: str) -> Process:
        for key, value in limits.items():
            deployment.set("limits", key, value)
        process = start_process("up", "--dir", str(deployment.directory), name="up")
        process.wait_for(r"Portal: https://")
        return process
    return start


def tls_context(deployment: Deployment) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(deployment.ca))


def connect(deployment: Deployment, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", deployment.port), timeout=10,
                                    source_address=(source, 0))


def secured(deployment: Deployment, source: str = "127.0.0.1") -> ssl.SSLSocket:
    return tls_context(deployment).wrap_socket(connect(deployment, source),
                                               server_hostname="localhost")


def read_until_closed(sock: socket.socket, limit: float = 30) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except (ssl.SSLError, ConnectionResetError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks), time.monotonic() - started


def read_response(sock: ssl.SSLSocket) -> bytes:
    """One HTTP response with a content-length, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def refused(deployment: Deployment, source: str = "127.0.0.1") -> bool:
    """True when the gateway closes a new connection without completing TLS."""
    try:
        secured(deployment, source).close()
    except (ssl.SSLError, ConnectionError):
        return True
    return False


def test_a_slow_header_client_is_answered_408_and_closed_after_the_header_timeout(
        deployment: Deployment, start_gateway: Start) -> None:
    start_gateway(header_timeout="2")
    tls = secured(deployment)
    tls.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n")
    started = time.monotonic()
    answer = b""
    # One header byte every 0.25 s, never the blank line that ends the head.
    for byte in b"X-Slow: " + b"a" * 200:
        readable, _, _ = select.select([tls], [], [], 0.25)
        if readable:
            answer, _ = read_until_closed(tls, 5)
            break
        tls.sendall(bytes([byte]))
    elapsed = time.monotonic() - started
    print(f"slow-header client closed after {elapsed:.2f} s (header_timeout 2 s)")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 1.5 <= elapsed <= 5


def test_a_client_that_completes_tls_and_sends_nothing_is_closed(
        deployment: Deployment, start_gateway: Start) -> None:
    start_gateway(header_timeout="2")
    answer, elapsed = read_until_closed(secured(deployment))
    print(f"silent TLS client closed after {elapsed:.2f} s (header_timeout 2 s)")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 1.5 <= elapsed <= 5


def test_a_client_that_connects_and_starts_no_tls_is_closed_after_the_handshake_timeout(
        deployment: Deployment, start_gateway: Start) -> None:
    start_gateway(tls_handshake_timeout="2")
    answer, elapsed = read_until_closed(connect(deployment))
    print(f"silent TCP client closed after {elapsed:.2f} s (tls_handshake_timeout 2 s)")
    assert answer == b""
    assert 1.5 <= elapsed <= 5


def test_a_client_that_stalls_in_the_middle_of_the_handshake_is_closed(
        deployment: Deployment, start_gateway: Start) -> None:
    start_gateway(tls_handshake_timeout="2")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = tls_context(deployment).wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    sock = connect(deployment)
    sock.sendall(hello[: len(hello) // 2])   # half a ClientHello, then nothing
    answer, elapsed = read_until_closed(sock)
    print(f"stalled handshake closed after {elapsed:.2f} s (tls_handshake_timeout 2 s)")
    assert answer == b""
    assert 1.5 <= elapsed <= 5


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
        deployment: Deployment, start_gateway: Start) -> None:
    start_gateway(keepalive_timeout="1", header_timeout="10")
    tls = secured(deployment)
    tls.sendall(HEALTH)
    assert read_response(tls).startswith(b"HTTP/1.1 200 ")
    tls.sendall(HEALTH)   # within the timeout the connection is still good
    assert read_response(tls).startswith(b"HTTP/1.1 200 ")
    answer, elapsed = read_until_closed(tls)
    print(f"idle keep-alive connection closed after {elapsed:.2f} s (keepalive_timeout 1 s)")
    assert answer == b""
    assert 0.7 <= elapsed <= 4


def test_every_keep_alive_request_head_has_the_header_timeout(
        deployment: Deployment, start_gateway: Start) -> None:
    start_gateway(keepalive_timeout="5", header_timeout="2")
    tls = secured(deployment)
    tls.sendall(HEALTH)
    assert read_response(tls).startswith(b"HTTP/1.1 200 ")
    tls.sendall(b"GET /api/v1/health HTTP/1.1\r\n")   # the second head, never finished
    answer, elapsed = read_until_closed(tls)
    print(f"second head timed out after {elapsed:.2f} s (header_timeout 2 s)")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 1.5 <= elapsed <= 4.5


def test_connections_over_the_per_address_limit_are_refused_and_others_are_not(
        deployment: Deployment, start_gateway: Start) -> None:
    gateway = start_gateway(max_connections_per_address="3", max_connections="100")
    held = [secured(deployment) for _ in range(3)]
    assert refused(deployment)
    assert not refused(deployment, source="127.0.0.2")   # another address has its own
    held.pop().close()
    # The close reaches the gateway; the probe that is let in is itself one connection
    # (closed at once), so the first admitted probe is the answer, not a second one.
    deadline = time.monotonic() + 5
    admitted = not refused(deployment)
    while not admitted and time.monotonic() < deadline:
        time.sleep(0.1)
        admitted = not refused(deployment)
    assert admitted
    assert "connections refused" in gateway.output()
    assert "limits.max_connections_per_address" in gateway.output()


def test_connections_over_the_global_limit_are_refused(
        deployment: Deployment, start_gateway: Start) -> None:
    gateway = start_gateway(max_connections_per_address="2", max_connections="4")
    held = [secured(deployment, source) for source in ("127.0.0.1", "127.0.0.1",
                                                       "127.0.0.2", "127.0.0.2")]
    assert refused(deployment, source="127.0.0.3")
    assert "limits.max_connections" in gateway.output()
    for sock in held:
        sock.close()


def test_websocket_connections_count_against_the_limit_until_they_end(
        deployment: Deployment, start_gateway: Start) -> None:
    start_gateway(max_connections_per_address="2", max_connections="100")
    launches = []
    for _ in range(2):
        tls = secured(deployment)
        tls.sendall(WEBSOCKET_UPGRADE)   # a launch, waiting for its ticket
        assert tls.recv(65536).startswith(b"HTTP/1.1 101 ")
        launches.append(tls)
    assert refused(deployment)
    for tls in launches:
        tls.close()
    deadline = time.monotonic() + 5
    while refused(deployment) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not refused(deployment)


def test_sign_ins_over_the_limit_of_unfinished_ones_are_denied_until_one_ends(
        deployment: Deployment, start_gateway: Start) -> None:
    with deployment.config.open("a") as handle:
        handle.write("\n[auth.throttle]\naddress_unfinished = 3\n")
    start_gateway()
    with httpx.Client(base_url=deployment.url, verify=tls_context(deployment),
                      timeout=10) as client:
        begun = [client.post("/api/v1/login", json={}) for _ in range(3)]
        assert [response.json()["status"] for response in begun] == ["continue"] * 3
        over = client.post("/api/v1/login", json={})
        assert over.status_code == 401
        assert over.json() == {"status": "denied", "error": "denied"}
        # One flow ends (a wrong password): its place is free again.
        ended = client.post("/api/v1/login", json={
            "handle": begun[0].json()["handle"],
            "answers": {"username": "admin", "password": "not the password"}})
        assert ended.json()["status"] == "denied"
        assert client.post("/api/v1/login", json={}).json()["status"] == "continue"
    audit = [json.loads(line) for line in
             (deployment.directory / "audit.jsonl").read_text().splitlines()]
    assert any(event.get("event") == "login.throttled"
               and event.get("reason") == "too many unfinished sign-ins from this address"
               for event in audit), audit[-5:]


def open_sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))


def lived_longer(csv: str, limit: float) -> list[str]:
    """The seconds of a slowhttptest CSV at which fewer connections had closed than had
    opened `limit` seconds before: some lived longer than `limit`."""
    rows = [[int(field) for field in line.split(",")[:4]] for line in csv.splitlines()[1:]]
    opened = {second: closed + connected for second, closed, _, connected in rows}
    late = []
    for second, closed, _, _ in rows:
        before = opened.get(second - int(limit))
        if before is not None and closed < before:
            late.append(f"at {second} s {closed} closed, {before} open at {second - limit:.0f} s")
    return late


def test_4000_slow_header_connections_are_reaped_within_the_header_timeout_while_health_answers(
        deployment: Deployment, start_gateway: Start, tmp_path: Path) -> None:
    slowhttptest = require_program("slowhttptest")
    header_timeout = 20   # the default
    # The per-address limit above 4,000: this shows the timeout reaping, not the limit.
    gateway = start_gateway(header_timeout=str(header_timeout),
                            max_connections_per_address="6000", max_connections="8000")
    pid = gateway.popen.pid
    baseline = open_sockets(pid)
    answers: list[int] = []
    failures: list[str] = []
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=deployment.url, verify=tls_context(deployment),
                          timeout=10) as client:
            while not stop.is_set():
                try:
                    answers.append(client.get("/api/v1/health").status_code)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                stop.wait(0.25)

    poller = threading.Thread(target=poll_health)
    poller.start()
    started = time.monotonic()
    # Two of them: slowhttptest completes one TLS handshake at a time. Each sends another
    # header line every 2 s and never ends its request head.
    attacks = [subprocess.Popen(
        [slowhttptest, "-H", "-c", "2000", "-r", "1000", "-i", "2", "-l", "100",
         "-u", f"https://127.0.0.1:{deployment.port}/", "-g", "-o", str(tmp_path / f"slow{n}")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=raise_open_files,
        cwd=tmp_path) for n in range(2)]
    try:
        # Sample the gateway's sockets until slowhttptest has none left (bounded).
        while (any(attack.poll() is None for attack in attacks)
               and time.monotonic() - started < 110):
            samples.append((time.monotonic() - started, open_sockets(pid)))
            time.sleep(0.25)
    finally:
        for attack in attacks:
            if attack.poll() is None:
                attack.kill()
        outputs = [attack.communicate(timeout=10)[0].decode(errors="replace")
                   for attack in attacks]
        stop.set()
        poller.join(15)
    ended = time.monotonic() - started
    deadline = time.monotonic() + 5
    while open_sockets(pid) > baseline + 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    left = open_sockets(pid) - baseline
    peak_at, peak = max(samples, key=lambda sample: sample[1])
    csvs = [(tmp_path / f"slow{n}.csv").read_text() for n in range(2)]
    # One second for the CSV's granularity, two for this shared machine.
    late = [row for csv in csvs for row in lived_longer(csv, header_timeout + 3)]
    print(f"4000 slow-header connections: at most {peak - baseline} open at once "
          f"({peak_at:.0f} s in), none left {ended:.0f} s in, none lived beyond "
          f"header_timeout {header_timeout} s + 3 s: {not late}; /api/v1/health answered "
          f"{len(answers)} times, {len(failures)} failures")
    for output in outputs:
        assert "No open connections left" in output, output[-2000:]
    last_rows = [[int(field) for field in csv.splitlines()[-1].split(",")] for csv in csvs]
    assert [closed + connected for _, closed, _, connected, _ in last_rows] == [2000, 2000]
    assert peak - baseline >= 1000   # many held open at once
    assert not late, late[:5]
    assert left <= 5
    assert not failures, failures[:5]
    assert len(answers) >= 40 and set(answers) == {200}


# What the proxy cannot forward as it is; then what it forwards, which the portal answers.
UNFORWARDABLE = [b"/%00", b"/static/%0d%0aSet-Cookie:%20x=1", b"/" + b"a" * 9000,
                 b"/\x7f", b"/\xc3\xa9", b"/a\tb", b"/api/v1/health?" + b"q" * 9000,
                 b"//evil.example/x"]
FORWARDED = [b"/%c3%28", b"/%zz", b"/login?next=%00%0a", b"https://evil.example/x", b"*"]


def test_every_target_the_split_portal_proxy_cannot_forward_is_a_4xx(
        deployment: Deployment, start_process) -> None:  # type: ignore[no-untyped-def]
    deployment.set("gateway", "portal_url", f'"https://127.0.0.1:{deployment.port + 1}"')
    portal = start_process("serve", "sta", "portal", "--dir", str(deployment.directory),
                           name="portal")
    portal.wait_for(r"portal listening on")
    edge = start_process("serve", "gateway", "--dir", str(deployment.directory), name="edge")
    edge.wait_for(r"gateway listening on")
    statuses = {}
    for target in UNFORWARDABLE + FORWARDED:
        tls = secured(deployment)
        tls.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n"
                    b"Connection: close\r\n\r\n")
        answer, _ = read_until_closed(tls, 15)
        statuses[target] = int(answer.split(b" ", 2)[1]) if answer else None
    print({target[:40]: status for target, status in statuses.items()})
    assert all(400 <= (statuses[target] or 0) < 500 for target in UNFORWARDABLE), statuses
    assert all(statuses[target] is not None and statuses[target] < 500  # type: ignore[operator]
               for target in FORWARDED), statuses
    assert "Traceback" not in edge.output() + portal.output()
    health = secured(deployment)
    health.sendall(HEALTH)
    assert read_response(health).startswith(b"HTTP/1.1 200 ")   # the proxy still forwards
